"""See it work in about a minute, on the CPU, with nothing to download.

    python demo.py                 # in a new temporary folder, removed at the end
    python demo.py --keep          # the same, and the files stay (the folder is printed)
    python demo.py --dir demo      # in the folder demo/ (kept)

It writes a small multi-label image set in the VOC 2007 layout, where each of the 20 VOC classes
paints its own shape in its own colour and place, and random class vectors (there is no network
for GloVe). Then it runs the real scripts of this folder, each step shown first as the command
you would type: train a ResNet-18 from random weights at 64 px and stop it with Ctrl-C after its
first epoch, resume it, evaluate the best checkpoint (-e), print the reproduction record
(report.py), label two images with their class maps (predict.py) and export the model
(export.py: TorchScript, and ONNX when its packages are installed).

What it does not show: accuracy at the paper's scale, which needs ImageNet weights, the real
datasets and a GPU.
"""
import ast
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

import options

HERE = os.path.dirname(os.path.abspath(__file__))


def voc_classes():
    """voc.VOC_CLASSES, read from voc.py's source: importing voc.py loads torch (seconds), which
    the demo's own process does not need (its steps load it)."""
    with open(os.path.join(HERE, "voc.py"), encoding="utf-8") as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["VOC_CLASSES"]:
                return ast.literal_eval(node.value)
    raise RuntimeError(f"no VOC_CLASSES in {os.path.join(HERE, 'voc.py')}")


VOC_CLASSES = voc_classes()

# Class c paints shape c % 5 in colour c // 5, in cell c of a 4 x 5 grid (a little shifted).
SHAPES = ("disc", "square", "triangle", "cross", "ring")
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 210, 40))
GRID_ROWS, GRID_COLUMNS, CELL = 4, 5, 20  # images of 100 x 80 pixels
INTERRUPT_AFTER = 1  # the epoch after which the first training run gets its Ctrl-C


def get_args_parser():
    parser = options.ArgumentParser(
        description="Train, interrupt, resume, evaluate, report, label and export a small DSDL "
                    "model on generated images, with the real scripts, on the CPU and offline.")
    parser.add_argument("--dir", metavar="DIR",
                        help="write everything into DIR, a new or empty folder, and keep it "
                             "(default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the files at the end (implied by --dir)")
    parser.add_argument("--images", type=options.positive_int, default=300,
                        help="generated images, two thirds trainval and one third test "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=options.positive_int, default=4,
                        help=f"training epochs, at least {INTERRUPT_AFTER + 1}: the first run is "
                             f"stopped after epoch {INTERRUPT_AFTER} and resumed "
                             f"(default: %(default)s)")
    parser.add_argument("--image-size", type=options.positive_int, default=64,
                        help="input side in pixels (default: %(default)s)")
    parser.add_argument("--threads", type=options.positive_int,
                        default=min(4, options.default_workers()),
                        help="CPU threads of each step (OMP_NUM_THREADS; default: the CPUs, at "
                             "most 4: %(default)s)")
    return parser


# --------------------------------------------------------------------------------------------
# The data: a VOC 2007 tree of generated images, and class vectors
# --------------------------------------------------------------------------------------------

def paint(draw, c, scale, rng):
    """Class c's shape, in its colour, in its cell; `scale` < 1 for a difficult (small) one."""
    row, column = divmod(c, GRID_COLUMNS)
    half = CELL * 0.35 * scale
    x = (column + 0.5) * CELL + rng.uniform(-2, 2)
    y = (row + 0.5) * CELL + rng.uniform(-2, 2)
    box = (x - half, y - half, x + half, y + half)
    colour = COLOURS[c // len(SHAPES)]
    shape = SHAPES[c % len(SHAPES)]
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)
    elif shape == "cross":
        width = max(2, round(half / 2))
        draw.line([(x - half, y), (x + half, y)], fill=colour, width=width)
        draw.line([(x, y - half), (x, y + half)], fill=colour, width=width)
    else:
        draw.ellipse(box, outline=colour, width=max(2, round(half / 2.5)))


def write_images(root, splits, seed=0):
    """A VOCdevkit/VOC2007 tree under `root`: JPEGs and `<class>_<split>.txt` with the flags
    1 (present), -1 (absent) and 0 (difficult: a positive drawn small, which VOC's AP ignores).
    `splits` maps a split to its number of images; returns {split: (ids, N x C flags)}."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "VOCdevkit", "VOC2007")
    images, lists = os.path.join(folder, "JPEGImages"), os.path.join(folder, "ImageSets", "Main")
    os.makedirs(images)
    os.makedirs(lists)
    written, number = {}, 0
    for split, count in splits.items():
        ids = [f"{number + i:06d}" for i in range(count)]
        number += count
        flags = np.full((count, len(VOC_CLASSES)), -1)  # N x C
        for i, image_id in enumerate(ids):
            present = rng.choice(len(VOC_CLASSES), size=rng.integers(1, 4), replace=False)
            difficult = rng.random(len(present)) < 0.1
            flags[i, present] = np.where(difficult, 0, 1)
            pixels = rng.integers(0, 50, (GRID_ROWS * CELL, GRID_COLUMNS * CELL, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            for c, small in zip(present, difficult):
                paint(draw, c, 0.5 if small else 1.0, rng)
            image.save(os.path.join(images, image_id + ".jpg"), quality=90)
        for c, name in enumerate(VOC_CLASSES):
            with open(os.path.join(lists, f"{name}_{split}.txt"), "w") as f:
                f.writelines(f"{image_id} {flags[i, c]:2d}\n" for i, image_id in enumerate(ids))
        with open(os.path.join(lists, f"{split}.txt"), "w") as f:
            f.writelines(image_id + "\n" for image_id in ids)
        written[split] = (ids, flags)
    return written


def chance_map(flags):
    """About the mAP of random scores (in percent): a random ranking's AP is, on average, about
    the share of positives among the images that count (difficult ones do not)."""
    counted = flags != 0
    positives = (flags == 1).sum(axis=0)
    has_positive = positives > 0
    return 100 * float(np.mean(positives[has_positive] / counted.sum(axis=0)[has_positive]))


# --------------------------------------------------------------------------------------------
# The steps: the real scripts, as a user runs them
# --------------------------------------------------------------------------------------------

class StepFailed(Exception):
    pass


def step_environment(threads):
    """The demo's environment for a step: its threads, output line by line, no progress bars
    (they are for a terminal, and a step's output here goes through a pipe)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def run_step(title, script, arguments, env, interrupt_on=None):
    """Print the command line, run it with this Python in this folder, show its output.

    `interrupt_on`: a prefix of an output line after which the step gets a Ctrl-C (SIGINT to its
    process group, as a terminal sends it); it must then end as interrupted (exit status 130).
    Returns the output. A step that fails raises StepFailed with the tail of its output."""
    print(f"\n== {title}\n$ {shlex.join(['python', script, *map(str, arguments)])}", flush=True)
    process = subprocess.Popen([sys.executable, os.path.join(HERE, script), *map(str, arguments)],
                               cwd=HERE, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, interrupted = [], False
    try:
        for line in process.stdout:
            line = line.rstrip("\n").rsplit("\r", 1)[-1]  # the last state of a progress line
            lines.append(line)
            print(line, flush=True)
            if interrupt_on and not interrupted and line.startswith(interrupt_on):
                print("^C   (the demo presses Ctrl-C)", flush=True)
                os.killpg(process.pid, signal.SIGINT)
                interrupted = True
        status = process.wait()
    except KeyboardInterrupt:  # the user's Ctrl-C, for the demo: the step stops too
        os.killpg(process.pid, signal.SIGINT)
        process.wait()
        raise
    expected = 130 if interrupt_on else 0
    if status != expected:
        tail = "\n".join("  " + line for line in lines[-15:])
        what = ("was not interrupted" if interrupt_on and not interrupted else
                f"ended with exit status {status}" + (f" instead of {expected}" if expected else ""))
        raise StepFailed(f"{script} {what}; the end of its output:\n{tail}")
    return "\n".join(lines)


def last_records(log):
    """The records of a metrics log (JSON lines), the last one of each epoch."""
    with open(log) as f:
        records = {(r["epoch"], r["split"]): r for r in map(json.loads, filter(str.strip, f))}
    return sorted(records.values(), key=lambda record: record["epoch"])


def demo(args, folder):
    """Every step, into `folder`; returns what to list at the end, as (what, path) pairs."""
    data, run = os.path.join(folder, "voc2007"), os.path.join(folder, "run")
    vectors = os.path.join(folder, "class_vectors.npy")
    maps, report_file = os.path.join(folder, "class_maps"), os.path.join(run, "report.md")
    env = step_environment(args.threads)
    test_count = max(2, args.images // 3)
    trainval_count = max(2, args.images - test_count)
    written = write_images(data, {"trainval": trainval_count, "test": test_count})
    np.save(vectors, np.random.default_rng(0).standard_normal((len(VOC_CLASSES), 300)).astype(np.float32))
    print(f"wrote {trainval_count} trainval and {test_count} test images (VOC 2007 layout) to {data}:\n"
          f"  each class paints its own shape in its own colour and place (aeroplane: a red disc "
          f"top left, bicycle: a red square next to it, ...)\n"
          f"  and {vectors}: random class vectors, 20 x 300, instead of GloVe's (no network here)")

    # Settings shared by the training runs: a small trunk from random weights, at a learning
    # rate for random weights (the trunk learns at lr x lrp = lr).
    common = ["--arch", "resnet18", "--no-pretrained", "--image-size", args.image_size,
              "-b", "16", "--lr", "0.3", "--lrp", "1", "-j", "0", "--device", "cpu"]
    checkpoint = os.path.join(run, "checkpoint.pth.tar")
    best = os.path.join(run, "model_best.pth.tar")
    run_step(f"1. Train for {args.epochs} epochs; Ctrl-C after epoch {INTERRUPT_AFTER} is saved",
             "main_voc2007.py", [data, *common, "--embeddings", vectors, "--epochs", args.epochs,
                                 "--checkpoint-dir", run],
             env, interrupt_on=f"epoch {INTERRUPT_AFTER}/")
    run_step(f"2. Resume: the recipe and the run folder come from the checkpoint",
             "main_voc2007.py", [data, "--resume", checkpoint, "-j", "0", "--device", "cpu"], env)
    run_step("3. Evaluate the best checkpoint (-e): written beside it, training's files untouched",
             "main_voc2007.py", [data, "-e", "--resume", best, "-j", "0", "--device", "cpu"], env)
    record = run_step("4. The reproduction record of the run (saved as report.md)",
                      "report.py", [run], env)
    with open(report_file, "w") as f:
        f.write(record + "\n")

    ids, flags = written["test"]
    shown = [i for i in range(len(ids)) if (flags[i] == 1).sum() >= 2][:2] or [0, 1]
    images = [os.path.join(data, "VOCdevkit", "VOC2007", "JPEGImages", ids[i] + ".jpg") for i in shown]
    truth = "; ".join(f"{ids[i]}.jpg: " + ", ".join(VOC_CLASSES[c] for c in np.flatnonzero(flags[i] == 1))
                      for i in shown)
    run_step(f"5. Label two test images, with the class maps of their three most probable "
             f"classes (the truth: {truth})",
             "predict.py", ["--resume", best, *images, "--top-k", "3", "--cam", maps,
                            "-j", "0", "--device", "cpu"], env)

    exports = [os.path.join(run, "model.pt")]
    run_step("6. Export, the head folded into one linear layer: TorchScript",
             "export.py", ["--resume", best, "--format", "torchscript", "-o", exports[0]], env)
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"\nONNX export skipped: the packages {' and '.join(missing)} are not installed "
              f"(pip install -r requirements-export.txt enables it)")
    else:
        exports.append(os.path.join(run, "model.onnx"))
        run_step("   and ONNX", "export.py",
                 ["--resume", best, "--format", "onnx", "-o", exports[1]], env)

    listed = [("the images and their labels", data), ("the class vectors", vectors),
              ("the run folder", run)]
    listed += [(f"  {name}", os.path.join(run, name)) for name in sorted(os.listdir(run))]
    listed += [("the class maps", maps)]
    listed += [(f"  {name}", os.path.join(maps, name)) for name in sorted(os.listdir(maps))]
    return listed, last_records(os.path.join(run, "metrics.jsonl")), chance_map(flags)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.epochs <= INTERRUPT_AFTER:
        print(f"error: --epochs must be at least {INTERRUPT_AFTER + 1}: the first run is stopped "
              f"after epoch {INTERRUPT_AFTER} and resumed", file=sys.stderr)
        return 1
    if args.dir:
        folder = os.path.abspath(args.dir)
        if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            print(f"error: --dir {args.dir} is not a new or empty folder; pass another one",
                  file=sys.stderr)
            return 1
        os.makedirs(folder, exist_ok=True)
    else:
        folder = tempfile.mkdtemp(prefix="dsdl-demo-")
    keep = args.keep or bool(args.dir)
    started = time.perf_counter()
    print(f"DSDL demo in {folder}: the real scripts on generated images, on the CPU, offline.\n"
          f"It shows the workflow, not accuracy at the paper's scale (that needs ImageNet "
          f"weights, the real datasets and a GPU).")
    status = 0
    try:
        listed, records, chance = demo(args, folder)
    except StepFailed as failure:
        print(f"\nerror: {failure}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    else:
        print("\n== What the demo wrote" + ("" if keep else " (removed now: --keep keeps it)"))
        width = max(len(what) for what, _ in listed)
        for what, path in listed:
            print(f"{what:<{width}}  {path}")
        last, best = records[-1], max(records, key=lambda record: record["mAP"] or 0)
        print(f"\ntest mAP {last['mAP']:.1f} after {last['epoch']} epochs (best {best['mAP']:.1f}, "
              f"epoch {best['epoch']}); random scores get about {chance:.1f}.\n"
              f"That is a small ResNet-18 learning from scratch on easy generated images in "
              f"a few epochs, not the paper's\nsetting: its accuracy needs ImageNet weights, the "
              f"real datasets and a GPU (README.md, Quick start).")
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"took {time.perf_counter() - started:.0f} s" + (f"; the files are in {folder}" if keep and status == 0 else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
