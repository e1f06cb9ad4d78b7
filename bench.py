"""Throughput of the release-style path against the fast path, measured side by side.

    python bench.py                      # GPU when present: ResNet-101, 448 px, batch 32
    python bench.py --device cpu         # CPU: smaller sizes by default (printed)
    python bench.py --pipeline-only      # only the input pipeline (one data-loading worker)
    python bench.py --json bench.json    # also write the figures as JSON
    python bench.py --require-gpu        # a missing or unusable GPU is an error, not CPU figures
    python bench.py --metrics 125000x9605    # only the metrics, on Open Images' test split's N x C

Release-style: float32, contiguous memory, the PIL pipeline (ToTensor + Normalize per image).
Fast: --amp (bf16, or fp16 with a scaler), --channels-last, uint8 batches normalised on the
device, the tensor pipeline (JPEGs decoded by torchvision, uint8 resampling), and optionally
--compile. The model figures run the real training step (engine.train_one_epoch) and evaluation
(engine.evaluate) through a DataLoader of synthetic images that are already on the device, so
they measure the model, not the disk; the pipeline figures measure one data-loading worker
(read + decode + train transform) on generated VOC-sized JPEGs. On a GPU, bench.py also times
decoding on the GPU (nvJPEG) and turns the training and evaluation images/s into the wall-clock
time of the paper's recipes.

On a GPU the release-style path is measured twice: in strict float32 (TF32 off) and in TF32
(the float32 that cuDNN runs by default on Ampere and newer), each against its own peak; the
fast path against the bf16 peak. Each figure is written to the JSON file as soon as it is
measured, and a step that fails (out of memory, nvJPEG ...) is recorded with its error while the
others run on. `--require-gpu` makes a missing or unusable GPU an error instead of CPU figures.
"""
import options

if __name__ == "__main__":  # parse before importing torch: --help and mistakes answer at once
    options.bench_parser(__doc__).parse_args()

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import ImageReadMode, decode_jpeg

import engine
import models
import speed
import trunks
from distributed import gpu_problem, resolve_device
from util import (ABSENT, PRESENT, UNKNOWN, DSDLError, atomic_write, compute_metrics,
                  load_image, load_image_tensor, normalize_on_device, read_image, top_k_metrics,
                  train_transform, tune_thresholds)

# Dense peaks in TFLOP/s (without sparsity) from the vendors' data sheets, for the MFU figures:
# float32 on the CUDA cores, TF32 and bf16 on the tensor cores (fp16's peak is bf16's on these
# cards). The sheets print the tensor-core figures with sparsity; dense is half of them.
DATA_SHEET_PEAKS = {  # data sheet: (FP32, TF32, BF16)
    "H100 SXM": (67.0, 494.5, 989.5), "H100 PCIe": (51.0, 378.0, 756.5),
    "H100 NVL": (60.0, 417.5, 835.5), "H200 SXM": (67.0, 494.5, 989.5),
    "H200 NVL": (60.0, 417.5, 835.5), "A100 SXM": (19.5, 156.0, 312.0),
    "A100 PCIe": (19.5, 156.0, 312.0), "L40S": (91.6, 183.0, 362.05),
}
# torch.cuda.get_device_name without its "NVIDIA " -> data sheet, matched whole: an H100 NVL or
# an H200 NVL is not the SXM card whose name it contains. Any other name: MFU not computed.
GPU_MODELS = {
    "H100 80GB HBM3": "H100 SXM", "H100 PCIe": "H100 PCIe", "H100 NVL": "H100 NVL",
    "H200": "H200 SXM", "H200 NVL": "H200 NVL",
    "A100-SXM4-40GB": "A100 SXM", "A100-SXM4-80GB": "A100 SXM",
    "A100-PCIE-40GB": "A100 PCIe", "A100 80GB PCIe": "A100 PCIe",
    "L40S": "L40S",
}
UNKNOWN_GPU = "unknown: MFU not computed"
# The configurations measured: name -> (title, fast path, TF32 on a GPU, the peak of its MFU).
# The fast path's float32 remainder (the head's solve, the loss) runs in strict float32.
CONFIGURATIONS = {"release": ("release-style fp32", False, False, "fp32"),
                  "release_tf32": ("release-style TF32", False, True, "tf32"),
                  "fast": ("fast", True, False, "bf16")}
# The paper's recipes (spec sections 1 and 4): the release's 200 epochs, each one pass over the
# training images and one evaluation of the evaluated split.
RECIPES = {"VOC 2007": (200, 5011, 4952), "VOC 2012": (200, 5717, 5823),
           "COCO 2014": (200, 82081, 40137)}
PIPELINE_SIZE = 448  # the pipeline figures: VOC-sized JPEGs to the paper's input size


class SyntheticImages(Dataset):
    """Random images and labels, as a loader of the fast pipeline (uint8, H x W x 3) or of the
    release's (normalised float, 3 x H x W) yields them. The images are made on the device, so
    the timed loop measures the model; the labels stay on the CPU, as a real loader's do."""

    labelled = True
    split = "synthetic"

    def __init__(self, count, image_size, num_classes, device, uint8):
        self.classes = [f"class {c}" for c in range(num_classes)]
        generator = torch.Generator(device).manual_seed(0)
        if uint8:
            self.images = torch.randint(0, 256, (count, image_size, image_size, 3), dtype=torch.uint8,
                                        generator=generator, device=device)
        else:
            self.images = torch.randn(count, 3, image_size, image_size, generator=generator, device=device)
        self.labels = torch.randint(-1, 2, (count, num_classes), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index], str(index)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_model(settings, num_classes, device, image_size):
    """The model of `settings` for images of `image_size` (random class vectors for DSDL) and
    its loss, on `device`."""
    context = models.ModelContext([f"class {c}" for c in range(num_classes)], image_size,
                                  torch.randn(num_classes, 300))
    model = models.build_model(settings, context, pretrained=False)
    return model.to(device), models.build_loss(settings)


@contextlib.contextmanager
def tf32(enabled):
    """TF32 on or off for float32 matrix products and cuDNN convolutions, restored afterwards
    (None: as they are; a CPU has no TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def measure_model(device, settings, image_size, batch_size, num_classes, steps, warmup, fast,
                  compile=False, rounds=3, allow_tf32=None):
    """Yields, as each is measured, (figure, value): training, evaluation and inference images/s
    of one configuration and, on a GPU, its peak memory. Inference is the forward pass alone, of
    the model and of its folded form (`DSDL.folded`: the head as one linear layer, as export.py
    writes it). Each figure is the best of `rounds` timed passes: other work on a shared machine
    only ever slows a pass down."""
    torch.manual_seed(0)
    model, loss_fn = synthetic_model(settings, num_classes, device, image_size)
    amp_dtype, scaler = speed.mixed_precision(device, fast)
    if fast:
        model.to(memory_format=torch.channels_last)
        if compile:
            speed.compile_trunk(model.trunk)
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)

    def loader(batches):
        return DataLoader(SyntheticImages(batches * batch_size, image_size, num_classes, device, fast),
                          batch_size=batch_size)

    warmup_loader, timed_loader = loader(warmup), loader(steps)

    def train(batches):
        engine.train_one_epoch(model, loss_fn, optimizer, batches, device, 0, 10.0, amp_dtype,
                               scaler, channels_last=fast)

    def evaluate(batches):
        engine.evaluate(model, loss_fn, batches, device, amp_dtype, channels_last=fast)

    def inference(network):
        def run(batches):
            network.eval()
            with torch.no_grad(), speed.autocast(device, amp_dtype):
                for images, _, _ in batches:
                    network(speed.prepare_images(images, device, channels_last=fast))
        return run

    peak_memory = 0
    with tf32(allow_tf32):
        for name, function in (("train", train), ("eval", evaluate), ("infer", inference(model)),
                               ("infer_folded", inference(model.folded()))):
            function(warmup_loader)
            if device.type == "cuda":  # after the warm-up: cuDNN's autotuning and compilation are not counted
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds = math.inf
            for _ in range(rounds):
                synchronize(device)
                start = time.perf_counter()
                function(timed_loader)
                synchronize(device)
                seconds = min(seconds, time.perf_counter() - start)
            yield f"{name}_img_s", steps * batch_size / seconds
            if device.type == "cuda":
                peak_memory = max(peak_memory, torch.cuda.max_memory_allocated(device))
    if device.type == "cuda":
        # Without the synthetic images, which a real run keeps on the host (4 bytes a value
        # on the release's path, 1 on the fast path): the model's own memory.
        data = sum(batches.dataset.images.nbytes for batches in (warmup_loader, timed_loader))
        yield "peak_memory_gib", (peak_memory - data) / 2 ** 30


class Figures:
    """The figures of one run, written whole to the JSON file (atomically: util.atomic_write)
    each time one is measured, so that a step that fails, or a run cut short, keeps every figure
    measured before it. A step that raises is recorded under "errors" and the next one runs."""

    def __init__(self, path, **figures):
        self.path, self.values, self.errors = path, {}, {}
        self.add(**figures)

    def add(self, **figures):
        self.values.update(figures)
        if self.path:
            with atomic_write(self.path, "w") as f:
                json.dump(self.values, f, indent=2)

    def get(self, key):
        return self.values.get(key)

    def step(self, name, function, *args, suffix="", **kwargs):
        """Run `function`, which returns or yields (figure, value) pairs (or returns a dict),
        adding each figure, its name + `suffix`, as it comes; True if the step ran through."""
        try:
            result = function(*args, **kwargs)
            for key, value in (result.items() if isinstance(result, dict) else result):
                self.add(**{key + suffix: value})
            return True
        except Exception as error:  # out of memory, nvJPEG, a compiler ...: this step's figures only
            traceback.print_exc()
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.errors[name] = f"{type(error).__name__}: {message}"
            self.add(errors=self.errors)
            print(f"step {name} failed ({self.errors[name]}); the other steps run on", file=sys.stderr)
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            return False


def jpeg_paths(folder):
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def measure_pipelines(folder, image_size, rounds=3):
    """Images per second of one data-loading worker (read, decode, train transform) for the
    release's pipeline and the fast one: the best of `rounds` passes over the JPEGs, the two
    pipelines taking turns, so that other work on the machine slows neither more than the other."""
    transforms = {"release": train_transform(image_size), "fast": train_transform(image_size, fast=True)}
    paths = jpeg_paths(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    best = dict.fromkeys(transforms, math.inf)
    for _ in range(rounds):
        for name, transform in transforms.items():
            torch.manual_seed(0)
            for path in paths[:4]:  # warm-up
                read_image(path, transform)
            start = time.perf_counter()
            for path in paths:
                read_image(path, transform)
            best[name] = min(best[name], time.perf_counter() - start)
    torch.set_num_threads(threads)
    return {name: len(paths) / seconds for name, seconds in best.items()}


def pipeline_breakdown(folder, image_size, fast):
    """Milliseconds per image of each stage of a train pipeline, in one worker."""
    if fast:
        stages = [train_transform(image_size, fast=True)]
        names = ["JPEG decode (torchvision)", "resize, crop + resize, flip (uint8)"]
        decode = load_image_tensor
    else:
        stages = train_transform(image_size).transforms  # Resize, MultiScaleCrop, Flip, ToTensor, Normalize
        names = ["JPEG decode (PIL)", "resize to 8/7", "multi-scale crop + resize", "horizontal flip",
                 "ToTensor (float conversion)", "Normalize"]
        decode = load_image
    totals = np.zeros(len(names))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    paths = jpeg_paths(folder)
    for path in paths:
        start = time.perf_counter()
        image = decode(path)
        times = [time.perf_counter()]
        for stage in stages:
            image = stage(image)
            times.append(time.perf_counter())
        totals += np.diff([start] + times)
    torch.set_num_threads(threads)
    return dict(zip(names, 1000 * totals / len(paths)))


def measure_gpu_decode(folder, image_size, device, batch_size=32):
    """Images per second, end to end, of decoding on the GPU: read the files, decode each batch
    with nvJPEG, the fast train transform on the device, stack and normalise."""
    transform = train_transform(image_size, fast=True)
    paths = jpeg_paths(folder)

    def run():
        for first in range(0, len(paths), batch_size):
            data = [torch.from_numpy(np.fromfile(path, dtype=np.uint8)) for path in paths[first:first + batch_size]]
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            normalize_on_device(torch.stack([transform(image) for image in images]))

    torch.manual_seed(0)
    run()  # warm-up: nvJPEG's state, the kernels
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return len(paths) / (time.perf_counter() - start)


def write_jpegs(folder, count, size=(500, 375)):
    """VOC-sized JPEGs with smooth random content."""
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.cumsum(np.cumsum(rng.standard_normal((size[1], size[0], 3)), 0), 1)
        pixels = (pixels - pixels.min()) / np.ptp(pixels) * 255
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


# --------------------------------------------------------------------------------------------
# The metrics row: util's metrics on an evaluation of a given N x C (`--metrics`)
# --------------------------------------------------------------------------------------------

def generated_evaluation(num_images, num_classes, verified=8, seed=0):
    """Scores (float32) and labels (int8), N x C, as an evaluation gathers them. `verified`
    labels of each image are known, present or absent at even odds, the rest unknown (Open
    Images' partial labels); `verified` >= C: every label is known, about 3 present per image
    (COCO). A present pair scores 1 more on average, so that the APs are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    scores = np.empty((num_images, num_classes), dtype=np.float32)
    labels = np.empty((num_images, num_classes), dtype=np.int8)
    step = max(1, 2 ** 24 // num_classes)  # images made at a time: no N x C temporary
    for start in range(0, num_images, step):
        rows = slice(start, min(start + step, num_images))
        count = rows.stop - rows.start
        scores[rows] = rng.standard_normal((count, num_classes), dtype=np.float32)
        if verified >= num_classes:
            labels[rows] = np.where(rng.random((count, num_classes)) < 3 / num_classes, PRESENT, ABSENT)
        else:
            labels[rows] = UNKNOWN
            columns = rng.integers(0, num_classes, (count, verified))  # drawn twice: verified once
            labels[rows][np.arange(count)[:, None], columns] = rng.choice([PRESENT, ABSENT], (count, verified))
        scores[rows] += labels[rows] == PRESENT
    return scores, labels


def resident_gib():
    """(now, peak since the last `reset_peak_resident`) resident memory of this process, GiB
    (Linux's VmRSS and VmHWM; elsewhere both the lifetime peak)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return tuple(int(fields[name].split()[0]) / 2 ** 20 for name in ("VmRSS", "VmHWM"))
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return peak, peak


def reset_peak_resident():
    """Let the peak of `resident_gib` start from now (Linux; elsewhere it stays the lifetime peak)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def measure_metrics(num_images, num_classes, verified=8, device=None):
    """Seconds and peak resident memory (GiB, the inputs included) of what an evaluation of
    N x C computes: `util.compute_metrics` (every epoch), `util.tune_thresholds` (with a
    validation split) and `util.top_k_metrics` (-e --zero-shot), on `generated_evaluation`
    scores and labels; the AP ranked on `device` (None: numpy on the CPU)."""
    scores, labels = generated_evaluation(num_images, num_classes, verified)
    before, _ = resident_gib()
    figures = {"metrics_size": f"{num_images}x{num_classes}",
               "metrics_known_per_image": min(verified, num_classes),
               "metrics_inputs_gib": (scores.nbytes + labels.nbytes) / 2 ** 30,
               "metrics_resident_before_gib": before}
    for name, compute in (("metrics", lambda: compute_metrics(scores, labels, device=device)),
                          ("thresholds", lambda: tune_thresholds(scores, labels)),
                          ("top_k", lambda: top_k_metrics(scores, labels))):
        reset_peak_resident()
        start = time.perf_counter()
        compute()
        figures[f"{name}_seconds"] = time.perf_counter() - start
        figures[f"{name}_peak_gib"] = resident_gib()[1]
    return figures


def metrics_lines(figures):
    """The metrics row, as printed."""
    inputs = (f"{figures['metrics_size']} ({figures['metrics_known_per_image']} known labels "
              f"per image; inputs {figures['metrics_inputs_gib']:.2f} GiB, process resident "
              f"{figures['metrics_resident_before_gib']:.2f} GiB before)")
    return [f"metrics of {inputs}:"] + [
        f"  {title}: {figures[name + '_seconds']:.1f} s, peak resident {figures[name + '_peak_gib']:.2f} GiB"
        for name, title in (("metrics", "compute_metrics (every evaluation)"),
                            ("thresholds", "tune_thresholds (with a validation split)"),
                            ("top_k", "top_k_metrics (-e --zero-shot)"))]


def metrics_row(args):
    """`--metrics NxC`: only the metrics row, on the CPU, or with the AP ranked on the GPU."""
    device = torch.device(resolve_device(args.device))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({torch.get_num_threads()} threads)")
    figures = Figures(args.json, device=where, torch=torch.__version__)
    print(f"device: {where}; torch {torch.__version__}")
    if figures.step("metrics", measure_metrics, *args.metrics, args.metrics_known,
                    device if device.type == "cuda" else None):
        print("\n".join(metrics_lines(figures.values)))
    if figures.errors:
        sys.exit(f"error: the metrics row failed: {figures.errors['metrics']}")


def forward_flops(device, settings, image_size, num_classes):
    """FLOPs of one image's forward pass, counted by PyTorch (spec: about 62 G for ResNet-101 at 448)."""
    model = synthetic_model(settings, num_classes, device, image_size)[0].eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size, device=device))
    return counter.get_total_flops()


def gpu_peaks(device):
    """(data sheet, {"fp32", "tf32", "bf16": dense peak TFLOP/s}) of this GPU, looked up by its
    whole name; (UNKNOWN_GPU, None) for a GPU not in the table."""
    name = torch.cuda.get_device_name(device).strip()
    sheet = GPU_MODELS.get(name.removeprefix("NVIDIA ").strip())
    if sheet is None:
        return UNKNOWN_GPU, None
    return sheet, dict(zip(("fp32", "tf32", "bf16"), DATA_SHEET_PEAKS[sheet]))


def peaks_line(name, sheet, peaks):
    """What gpu_peaks found for the GPU called `name`, as bench.py prints it."""
    if peaks is None:
        return f"GPU peaks: {name!r} is not in bench.py's table: {UNKNOWN_GPU}"
    return (f"GPU peaks: {name!r} is the {sheet} of the data sheets: FP32 {peaks['fp32']:g}, "
            f"TF32 {peaks['tf32']:g}, BF16 {peaks['bf16']:g} dense TFLOP/s")


def hours_to_reproduce(train_img_s, eval_img_s):
    """Wall-clock hours of each paper recipe at these rates (data loading keeping up)."""
    return {name: epochs * (train / train_img_s + test / eval_img_s) / 3600
            for name, (epochs, train, test) in RECIPES.items()}


def cell(value, unit):
    return "" if value is None else unit.format(value)


def print_table(figures, names, rows):
    """One column per configuration in `names`, then the fast path's ratio to each other one."""
    others = [name for name in names if name != "fast"]
    columns = [CONFIGURATIONS[name][0] for name in names]
    columns += [f"fast / {CONFIGURATIONS[name][0]}" if len(others) > 1 else "ratio" for name in others]
    widths = [max(len(column), 9) for column in columns]
    print("\n| " + f"{'figure':<42} | " + " | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)) + " |")
    print(f"|{'-' * 44}|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for title, key, unit in rows:
        values = [key(name) if callable(key) else figures.get(f"{key}_{name}") for name in names]
        fast = values[names.index("fast")]
        ratios = [values[names.index(name)] for name in others]
        ratios = [f"{fast / value:.2f}x" if fast and value else "" for value in ratios]
        cells = [cell(value, unit) for value in values] + ratios
        print(f"| {title:<42} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + " |")


def setting_up(args):
    """(device, trunk name, Figures) of the command line, or a DSDLError / OSError for a mistake."""
    if args.require_gpu:
        if args.device == "cpu":
            raise DSDLError("--require-gpu with --device cpu: leave out one of them")
        problem = gpu_problem()
        if problem:
            raise DSDLError(f"--require-gpu: {problem}")
    device = torch.device(resolve_device(args.device))
    arch = args.arch or ("resnet101" if device.type == "cuda" else "resnet18")
    trunks.check_arch(arch)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({torch.get_num_threads()} threads)")
    return device, arch, Figures(args.json, device=where, torch=torch.__version__,
                                 pipeline_image_size=PIPELINE_SIZE)


def measure(figures, args, device, names, settings, image_size, batch_size, steps, warmup):
    """Every step of the benchmark, each figure into `figures` as it is measured."""
    gpu = device.type == "cuda"
    if not args.pipeline_only:
        figures.add(arch=settings.arch, image_size=image_size, batch_size=batch_size)
        model = dict(device=device, settings=settings, image_size=image_size, batch_size=batch_size,
                     num_classes=args.num_classes, steps=steps, warmup=warmup, rounds=args.rounds)
        for name in names:
            _, fast, allow_tf32, _ = CONFIGURATIONS[name]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                figures.step(name, measure_model, **model, fast=fast, compile=fast and args.compile,
                             allow_tf32=allow_tf32 if gpu else None, suffix=f"_{name}")
            for warning in caught:
                print(f"note: {warning.message}")
        figures.step("forward_flops", lambda: {"forward_gflop_per_image": forward_flops(
            device, settings, image_size, args.num_classes) / 1e9})
    with tempfile.TemporaryDirectory() as folder:
        figures.step("jpegs", lambda: write_jpegs(folder, args.pipeline_images) or {})
        figures.step("pipelines", lambda: {f"pipeline_img_s_{name}": value for name, value in
                                           measure_pipelines(folder, PIPELINE_SIZE).items()})
        for name in ("release", "fast"):
            figures.step(f"pipeline_{name}_breakdown", lambda: {
                f"pipeline_{name}_breakdown_ms": pipeline_breakdown(folder, PIPELINE_SIZE, fast=name == "fast")})
        if gpu:
            figures.step("gpu_decode", lambda: {"gpu_decode_img_s": measure_gpu_decode(folder, PIPELINE_SIZE, device)})


def derive(figures, names, peaks):
    """The figures computed from the measured ones: each configuration's MFU against its own peak
    (`peaks`: None for a GPU not in the table), the hours of the paper's recipes, the workers."""
    gflop = figures.get("forward_gflop_per_image")
    for name in names:
        train, evaluate = figures.get(f"train_img_s_{name}"), figures.get(f"eval_img_s_{name}")
        if peaks and gflop and train:  # a training step is about 3x the forward FLOPs (spec section 10)
            figures.add(**{f"mfu_{name}": 3 * gflop * 1e9 * train / (peaks[CONFIGURATIONS[name][3]] * 1e12)})
        if train and evaluate:
            figures.add(**{f"hours_to_reproduce_{name}": hours_to_reproduce(train, evaluate)})
    if figures.get("train_img_s_fast") and figures.get("pipeline_img_s_fast"):
        # One worker's images/s against the training images/s: the -j that keeps the GPU fed.
        figures.add(workers_to_feed_training_fast=math.ceil(
            figures.get("train_img_s_fast") / figures.get("pipeline_img_s_fast")))


def report(figures, args, names, gpu, image_size):
    """The table and the lines under it."""
    pipeline = ("pipeline images/s per worker (448 px)", "pipeline_img_s", "{:.1f}")
    rows = [pipeline] if args.pipeline_only else [
        ("training images/s", "train_img_s", "{:.1f}"), ("evaluation images/s", "eval_img_s", "{:.1f}"),
        ("inference images/s", "infer_img_s", "{:.1f}"),
        ("inference images/s, head folded", "infer_folded_img_s", "{:.1f}"), pipeline]
    if gpu:
        rows.append(("pipeline images/s, decoded on the GPU",
                     lambda name: figures.get("gpu_decode_img_s") if name == "fast" else None, "{:.1f}"))
    if gpu and not args.pipeline_only:
        rows.append(("peak GPU memory (GiB)", "peak_memory_gib", "{:.2f}"))
        rows.append(("model FLOP utilisation (%), own peak",
                     lambda name: figures.get(f"mfu_{name}") and 100 * figures.get(f"mfu_{name}"), "{:.1f}"))
        for recipe in RECIPES:
            rows.append((f"hours to reproduce {recipe}", lambda name, recipe=recipe: (
                figures.get(f"hours_to_reproduce_{name}") or {}).get(recipe), "{:.1f}"))
    print_table(figures, names, rows)
    if gpu and not args.pipeline_only:
        print("(release-style fp32: strict float32, TF32 off; release-style TF32: TF32 on for "
              "convolutions, cuDNN's default, and matrix products; MFU against the FP32, TF32 and "
              "BF16 peak respectively)")
        if figures.get("workers_to_feed_training_fast"):
            print(f"(the hours assume data loading keeps up: the fast path's training needs "
                  f"-j {figures.get('workers_to_feed_training_fast')} or more workers like the one measured)")
    if not gpu:
        print(f"peak resident memory of the process: {figures.get('peak_rss_gib'):.2f} GiB")
    if figures.get("forward_gflop_per_image"):
        print(f"forward pass: {figures.get('forward_gflop_per_image'):.1f} GFLOP per image at {image_size} px")
    for name in ("release", "fast"):
        breakdown = figures.get(f"pipeline_{name}_breakdown_ms")
        if breakdown:
            total = sum(breakdown.values())
            print(f"{name} pipeline, one worker, 500 x 375 JPEG to 448 px ({total:.2f} ms): " + ", ".join(
                f"{stage} {ms:.2f} ms ({100 * ms / total:.0f}%)" for stage, ms in breakdown.items()))


def main():
    args = options.bench_parser(__doc__).parse_args()
    if args.metrics:  # --metrics NxC
        return metrics_row(args)
    try:
        models.model_entry(args.model)  # an unknown --model is one line
        device, arch, figures = setting_up(args)
    except DSDLError as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        sys.exit(f"error: cannot write --json {args.json}: {error.strerror or error}")
    gpu = device.type == "cuda"
    image_size = args.image_size or (448 if gpu else 224)
    settings = argparse.Namespace(model=args.model, arch=arch, pool="max", lambd=10.0, beta=1e-4)
    batch_size = args.batch_size or (32 if gpu else 8)
    steps, warmup = args.steps or (20 if gpu else 3), args.warmup or (5 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    print(f"device: {figures.get('device')}; torch {torch.__version__}"
          + ("" if args.pipeline_only else f"; {arch}, {image_size} px, batch {batch_size}, best of "
                                            f"{args.rounds} x {steps} timed steps after {warmup}"))
    names = ["release", "release_tf32", "fast"] if gpu else ["release", "fast"]
    peaks = None
    if gpu:
        sheet, peaks = gpu_peaks(device)
        figures.add(gpu_data_sheet=sheet, peak_tflops=peaks)
        print(peaks_line(figures.get("device"), sheet, peaks))
    measure(figures, args, device, names, settings, image_size, batch_size, steps, warmup)
    if gpu:
        derive(figures, names, peaks)
    else:
        figures.add(peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    report(figures, args, names, gpu, image_size)
    if args.json:
        print(f"figures written to {args.json}")
    if figures.errors:
        sys.exit(f"error: {len(figures.errors)} step(s) failed, the others were measured: "
                 + "; ".join(f"{name}: {error}" for name, error in figures.errors.items()))


if __name__ == "__main__":
    main()
