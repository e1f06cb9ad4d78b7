"""See it work in about a minute, on the CPU, with nothing to download.

    python demo.py                 # in a new temporary folder, removed at the end
    python demo.py --keep          # the same, and the files stay (the folder is printed)
    python demo.py --dir demo      # in the folder demo/ (kept)

It writes a small multi-label image set in the VOC 2007 layout, where each of the 20 VOC classes
paints its own shape in its own colour and place, and random class vectors (there is no network
for GloVe). Then it runs the real scripts of this folder, each step shown first as the command
you would type: train a ResNet-18 from random weights at 64 px and press Ctrl-C once its first
epoch is saved, resume it, evaluate the best checkpoint (-e), print the reproduction record
(report.py), label two images and draw their class maps (predict.py), export the model
(export.py: TorchScript, and ONNX when its packages are installed).

What it does not show: accuracy at the paper's scale, which needs ImageNet weights, the real
datasets and a GPU.
"""
import ast
import errno
import importlib.util
import io
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
    the demo's own process does not need (each step loads it)."""
    with open(os.path.join(HERE, "voc.py"), encoding="utf-8") as f:
        for node in ast.parse(f.read()).body:
            names = [getattr(target, "id", None) for target in getattr(node, "targets", [])]
            if isinstance(node, ast.Assign) and names == ["VOC_CLASSES"]:
                return ast.literal_eval(node.value)
    raise RuntimeError(f"no VOC_CLASSES in {os.path.join(HERE, 'voc.py')}")


VOC_CLASSES = voc_classes()
# Class c paints shape c % 5 in colour c // 5, in cell c of a 4 x 5 grid (a little shifted).
SHAPES = ("disc", "square", "triangle", "cross", "ring")
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 210, 40))
GRID_ROWS, GRID_COLUMNS, CELL = 4, 5, 20  # images of 100 x 80 pixels
# The recipe of a ResNet-18 from random weights on a few hundred images: small batches for more
# steps, and the trunk at the head's learning rate (--lrp 1).
BATCH = 8
RECIPE = ["--arch", "resnet18", "--no-pretrained", "-b", str(BATCH), "--lr", "0.1", "--lrp", "1"]
INTERRUPT_AFTER = 1  # the epoch after which the first training run gets its Ctrl-C


def get_args_parser():
    parser = options.ArgumentParser(
        description="Train, interrupt, resume, evaluate, report, label and export a small DSDL "
                    "model on generated images with the real scripts, on the CPU and offline.")
    parser.add_argument("--dir", metavar="DIR",
                        help="write everything into DIR, a new or empty folder, and keep it "
                             "(default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the files at the end (implied by --dir)")
    parser.add_argument("--images", type=options.positive_int, default=300,
                        help="generated images, two thirds trainval and one third test "
                             "(at least 12; default: %(default)s)")
    parser.add_argument("--epochs", type=options.positive_int, default=4,
                        help=f"training epochs, at least {INTERRUPT_AFTER + 1}: the first run is "
                             f"stopped after epoch {INTERRUPT_AFTER} and resumed "
                             f"(default: %(default)s)")
    parser.add_argument("--image-size", type=options.positive_int, default=64,
                        help="input side in pixels (default: %(default)s)")
    parser.add_argument("--threads", type=options.positive_int,
                        default=min(4, options.default_workers()),
                        help="CPU threads of training (OMP_NUM_THREADS; default: the CPUs, at "
                             "most 4: %(default)s)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="skip the ONNX export even when its packages are installed")
    return parser


# --------------------------------------------------------------------------------------------
# The data: a VOC 2007 tree of generated images
# --------------------------------------------------------------------------------------------

def paint(draw, c, scale, rng):
    """Class c's shape, in its colour, in its cell; `scale` < 1 for a difficult (small) one."""
    row, column = divmod(c, GRID_COLUMNS)
    half = CELL * 0.4 * scale
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
    """A VOCdevkit/VOC2007 tree under `root`: JPEGs with 1 to 3 classes each, and
    `<class>_<split>.txt` with the flags 1 (present), -1 (absent) and 0 (difficult: a positive
    drawn small, which VOC's AP leaves out). `splits` maps a split to its number of images;
    returns {split: (image ids, N x C flags)}."""
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
            noise = rng.integers(0, 50, (GRID_ROWS * CELL, GRID_COLUMNS * CELL, 3), dtype=np.uint8)
            image = Image.fromarray(noise)
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


def split_sizes(images):
    """(trainval, test): two thirds and one third, with no training batch of a single image."""
    test = images // 3
    if (images - test) % BATCH == 1:
        test += 1
    return images - test, test


def chance_map(flags):
    """The mAP of random scores on average, in percent. A random ranking of N images, R of them
    positive, has the expected AP (1/N) sum_i ((R - 1)(i - 1) / (N - 1) + 1) / i (Bestgen,
    "Exact expected average precision of the random baseline", 2015); difficult images are left
    out of their class's ranking, as in VOC's AP."""
    expected = []
    for column in flags.T:
        counted, positives = int((column != 0).sum()), int((column == 1).sum())
        if positives:
            i = np.arange(1, counted + 1)
            expected.append(np.mean(((positives - 1) * (i - 1) / max(counted - 1, 1) + 1) / i))
    return 100 * float(np.mean(expected))


# --------------------------------------------------------------------------------------------
# The steps: the real scripts, run as a user runs them
# --------------------------------------------------------------------------------------------

class StepFailed(Exception):
    """A step ended otherwise than expected; the message says how, with the end of its output."""


class Step:
    """One command of the demo, run by this Python in this folder, its output shown as it comes
    (stdout and stderr together)."""

    def __init__(self, title, script, *arguments):
        self.title, self.script, self.arguments = title, script, [str(a) for a in arguments]
        self.process = None

    def start(self, threads):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        # its own process group, which Ctrl-C (ours, or the demo's) reaches as a terminal's would
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, self.script), *self.arguments], cwd=HERE, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def interrupt(self):
        """Ctrl-C, as a terminal sends it: to the step's process group."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)

    def stop(self):
        """Interrupt the step if it still runs, and wait until it has ended."""
        self.interrupt()
        if self.process is not None:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def show(self, interrupt_on=None):
        """Print the command line and the output; returns the output's lines.

        `interrupt_on`: the beginning of the line after which the step gets a Ctrl-C; it must
        then end as interrupted (exit status 130). Anything else than the exit status expected
        raises StepFailed."""
        print(f"\n== {self.title}\n$ {shlex.join(['python', self.script, *self.arguments])}",
              flush=True)
        terminal, redrawing, lines, interrupted = sys.stdout.isatty(), False, [], False
        # newline="": a progress bar's updates end in a carriage return, the other lines in \n
        for piece in io.TextIOWrapper(self.process.stdout, errors="replace", newline=""):
            if piece.endswith("\r"):  # a progress bar: redrawn in place on a terminal, else left out
                if terminal:
                    sys.stdout.write("\r" + piece[:-1])
                    sys.stdout.flush()
                    redrawing = True
                continue
            line = piece.rstrip()
            print(("\r" if redrawing else "") + line, flush=True)
            redrawing = False
            lines.append(line)
            if interrupt_on and not interrupted and line.startswith(interrupt_on):
                print("^C  (the demo presses Ctrl-C)", flush=True)
                self.interrupt()
                interrupted = True
        status = self.process.wait()
        expected = 130 if interrupt_on else 0
        if status != expected:
            problem = ("ended before the demo could interrupt it" if interrupt_on and not interrupted
                       else f"ended with exit status {status}"
                       + (f" instead of {expected}" if interrupt_on else ""))
            tail = "\n".join("  " + line for line in lines[-15:])
            raise StepFailed(f"step {self.title.split('.')[0]} ({self.script}) {problem}; the end "
                             f"of its output:\n{tail}")
        return lines


class Paths:
    """Where the demo writes, in its folder."""

    def __init__(self, folder):
        self.data = os.path.join(folder, "voc2007")
        self.images = os.path.join(self.data, "VOCdevkit", "VOC2007", "JPEGImages")
        self.vectors = os.path.join(folder, "class_vectors.npy")
        self.run = os.path.join(folder, "run")
        self.checkpoint = os.path.join(self.run, "checkpoint.pth.tar")
        self.best = os.path.join(self.run, "model_best.pth.tar")
        self.report = os.path.join(self.run, "report.md")
        self.maps = os.path.join(folder, "class_maps")


def make_data(args, paths):
    """The images, their labels and the class vectors; returns the test split's (ids, flags)."""
    trainval, test = split_sizes(args.images)
    written = write_images(paths.data, {"trainval": trainval, "test": test})
    np.save(paths.vectors, np.random.default_rng(0).standard_normal((len(VOC_CLASSES), 300)).astype(np.float32))
    print(f"wrote {trainval} trainval and {test} test images, VOC 2007 layout, to {paths.data}:\n"
          f"  each class paints its own shape in its own colour and place (aeroplane a red disc "
          f"top left, bicycle a red square beside it, ...)\n"
          f"and random class vectors (20 x 300) to {paths.vectors}: without a network there are "
          f"no GloVe vectors, so DSDL's\n  semantic prior carries no meaning here")
    return written["test"]


def train_and_resume(args, paths):
    """Steps 1 and 2: a training run stopped by Ctrl-C once its first epoch is saved, then resumed."""
    train = Step(f"1. Train DSDL, a ResNet-18 from random weights at {args.image_size} px, for "
                 f"{args.epochs} epochs; Ctrl-C once epoch {INTERRUPT_AFTER} is saved",
                 "main_voc2007.py", paths.data, *RECIPE, "--image-size", args.image_size,
                 "--embeddings", paths.vectors, "--epochs", args.epochs,
                 "--checkpoint-dir", paths.run, "-j", "0", "--device", "cpu")
    resume = Step(f"2. Resume: on to epoch {args.epochs}, with the recipe and the run folder of "
                  f"the checkpoint", "main_voc2007.py", paths.data, "--resume", paths.checkpoint,
                  "-j", "0", "--device", "cpu")
    for step, interrupt_on in ((train, f"epoch {INTERRUPT_AFTER}/"), (resume, None)):
        try:
            step.start(args.threads).show(interrupt_on)
        finally:
            step.stop()


def use_the_run(args, paths, test_split):
    """Steps 3 to 6, which read the finished run: evaluate, report, label, export. They run side
    by side (each is mostly the start of Python and torch), their outputs shown in turn."""
    ids, flags = test_split
    shown = ([i for i in range(len(ids)) if (flags[i] == 1).sum() >= 2] + [0, 1])[:2]
    truth = "; ".join(f"{ids[i]}.jpg " + " and ".join(VOC_CLASSES[c] for c in np.flatnonzero(flags[i] == 1))
                      for i in shown)
    formats = {"torchscript": ("TorchScript", "model.pt"), "onnx": ("ONNX", "model.onnx")}
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if args.no_onnx or missing:
        del formats["onnx"]
    steps = [
        Step("3. Evaluate the best checkpoint (-e): the results go beside it, training's files "
             "stay as they are", "main_voc2007.py", paths.data, "-e", "--resume", paths.best,
             "-j", "0", "--device", "cpu"),
        Step("4. The run's reproduction record, saved as report.md", "report.py", paths.run),
        Step(f"5. Label two test images (the truth: {truth}) with their three most probable "
             f"classes, and draw where each is seen (class maps)", "predict.py",
             "--resume", paths.best, *(os.path.join(paths.images, ids[i] + ".jpg") for i in shown),
             "--top-k", "3", "--cam", paths.maps, "-j", "0", "--device", "cpu"),
        *(Step(f"6. Export, the head folded into one linear layer: {name}", "export.py",
               "--resume", paths.best, "--format", kind, "-o", os.path.join(paths.run, file))
          for kind, (name, file) in formats.items()),
    ]
    print("\n(steps 3 to 6 read the finished run: they run side by side, and their outputs "
          "follow in turn)", flush=True)
    try:
        for step in steps:
            step.start(threads=1)  # light work
        outputs = [step.show() for step in steps]
    finally:
        for step in steps:
            step.stop()
    with open(paths.report, "w") as f:
        f.write("\n".join(outputs[1]) + "\n")
    if "onnx" not in formats:
        print("\nONNX export skipped: " + ("--no-onnx" if args.no_onnx else
              f"{' and '.join(missing)} not installed (pip install -r requirements-export.txt)"))


def written_files(paths, images):
    """What the demo wrote, as (what, path) pairs."""
    listed = [(f"{images} images and their labels", paths.data), ("class vectors", paths.vectors),
              ("the run folder", paths.run)]
    listed += [(f"  {name}", os.path.join(paths.run, name)) for name in sorted(os.listdir(paths.run))]
    listed += [("class maps", paths.maps)]
    listed += [(f"  {name}", os.path.join(paths.maps, name)) for name in sorted(os.listdir(paths.maps))]
    return listed


def training_records(paths):
    """The records of the run's metrics.jsonl by epoch (the last one of an epoch logged twice)."""
    with open(os.path.join(paths.run, "metrics.jsonl")) as f:
        records = {record["epoch"]: record for record in map(json.loads, filter(str.strip, f))}
    return [records[epoch] for epoch in sorted(records)]


def demo(args, folder):
    """Every step, into `folder`; returns what was written ((what, path) pairs), the records of
    the training run and the mAP of random scores on the test images."""
    paths = Paths(folder)
    test_split = make_data(args, paths)
    train_and_resume(args, paths)
    use_the_run(args, paths, test_split)
    return written_files(paths, args.images), training_records(paths), chance_map(test_split[1])


# What a full or read-only disk is, and where the demo can go instead.
DISK_PROBLEMS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
WHERE_TO_WRITE = ("pass --dir with a new folder on a writable disk with room (the demo writes "
                  "a few hundred MB)")


def check_args(args):
    """What is wrong with the demo's own options, in words; None when nothing is."""
    if args.epochs <= INTERRUPT_AFTER:
        return (f"--epochs must be at least {INTERRUPT_AFTER + 1}: the first run is stopped after "
                f"epoch {INTERRUPT_AFTER} and resumed")
    if args.images < 12:
        return "--images must be at least 12"
    if args.dir and os.path.exists(args.dir) and (not os.path.isdir(args.dir) or os.listdir(args.dir)):
        return f"--dir {args.dir} is not a new or empty folder: pass another one"
    return None


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    problem = check_args(args)
    try:
        if problem is None and args.dir:
            folder = os.path.abspath(args.dir)
            os.makedirs(folder, exist_ok=True)
        elif problem is None:
            folder = tempfile.mkdtemp(prefix="dsdl-demo-")
        if problem is None:
            tempfile.TemporaryFile(dir=folder).close()  # a real write: a read-only disk says so now
    except OSError as error:
        problem = (f"cannot write into {args.dir or 'a temporary folder'} ({error.strerror}); "
                   f"{WHERE_TO_WRITE}")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    keep, started = args.keep or bool(args.dir), time.perf_counter()
    print(f"DSDL demo in {folder}: the real scripts on generated images, on the CPU, offline.\n"
          f"It shows the workflow at work, not accuracy at the paper's scale (that needs ImageNet "
          f"weights, the real datasets and a GPU).")
    try:
        listed, records, chance = demo(args, folder)
    except StepFailed as failure:
        full = any(text in str(failure) for text in ("No space left", "Disk quota", "Read-only"))
        print(f"\nerror: {failure}" + (f"\nThe demo writes into {folder}: {WHERE_TO_WRITE}"
                                       if full else ""), file=sys.stderr)
        return 1
    except OSError as error:  # writing the images or the class vectors
        if error.errno not in DISK_PROBLEMS:
            raise
        print(f"\nerror: could not write into {folder} ({error.strerror}); {WHERE_TO_WRITE}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    print("\n== What the demo wrote" + ("" if keep else " (now removed: --keep keeps it)"))
    width = max(len(what) for what, _ in listed)
    for what, path in listed:
        print(f"{what:<{width}}  {path}")
    last = records[-1]
    best = max(records, key=lambda record: record["mAP"] or 0)
    print(f"\ntest mAP {last['mAP']:.1f} after {last['epoch']} epochs (best {best['mAP']:.1f}, "
          f"epoch {best['epoch']}); random scores get about {chance:.1f}.\n"
          f"A ResNet-18 learning from random weights in a few epochs, on easy generated images: "
          f"not the paper's setting,\nwhose accuracy needs ImageNet weights, the real datasets "
          f"and a GPU (README.md, Results).")
    print(f"took {time.perf_counter() - started:.0f} s" + (f"; the files are in {folder}" if keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
