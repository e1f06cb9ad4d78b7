"""Throughput of the release-style path against the fast path, measured side by side.

    python bench.py                      # GPU when present: ResNet-101, 448 px, batch 32
    python bench.py --device cpu         # CPU: smaller sizes by default (printed)
    python bench.py --pipeline-only      # only the input pipeline (one data-loading worker)
    python bench.py --json bench.json    # also write the figures as JSON

Release-style: float32, contiguous memory, the PIL pipeline (ToTensor + Normalize per image).
Fast: --amp (bf16, or fp16 with a scaler), --channels-last, uint8 batches normalised on the
device, the tensor pipeline (JPEGs decoded by torchvision, uint8 resampling), and optionally
--compile. The model figures run the real training step (engine.train_one_epoch) and evaluation
(engine.evaluate) through a DataLoader of synthetic images that are already on the device, so
they measure the model, not the disk; the pipeline figures measure one data-loading worker
(read + decode + train transform) on generated VOC-sized JPEGs. On a GPU, bench.py also times
decoding on the GPU (nvJPEG) and turns the training and evaluation images/s into the wall-clock
time of the paper's recipes.
"""
import options

if __name__ == "__main__":  # parse before importing torch: --help and mistakes answer at once
    options.bench_parser(__doc__).parse_args()

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import ImageReadMode, decode_jpeg

import engine
import models
import trunks
from distributed import resolve_device
from util import (DSDLError, atomic_write, load_image, load_image_tensor, normalize_on_device,
                  read_image, train_transform)

# Dense bf16 / fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the MFU figure.
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}
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


def synthetic_model(settings, num_classes, device):
    """The model of `settings` (random class vectors for DSDL) and its loss, on `device`."""
    model = models.build_model(settings, num_classes, torch.randn(num_classes, 300), pretrained=False)
    return model.to(device), models.build_loss(settings)


def measure_model(device, settings, image_size, batch_size, num_classes, steps, warmup, fast,
                  compile=False, rounds=3):
    """Training, evaluation and inference images/s, and on a GPU the peak memory, of one
    configuration. Inference is the forward pass alone, of the model and of its folded form
    (`DSDL.folded`: the head as one linear layer, as export.py writes it). Each figure is the
    best of `rounds` timed passes: other work on a shared machine only ever slows a pass down."""
    torch.manual_seed(0)
    model, loss_fn = synthetic_model(settings, num_classes, device)
    amp_dtype, scaler = engine.mixed_precision(device, fast)
    if fast:
        model.to(memory_format=torch.channels_last)
        if compile:
            engine.compile_trunk(model.trunk)
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)

    def loader(batches):
        return DataLoader(SyntheticImages(batches * batch_size, image_size, num_classes, device, fast),
                          batch_size=batch_size)

    warmup_loader, timed_loader = loader(warmup), loader(steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train(batches):
        engine.train_one_epoch(model, loss_fn, optimizer, batches, device, 0, 10.0, amp_dtype,
                               scaler, channels_last=fast)

    def evaluate(batches):
        engine.evaluate(model, loss_fn, batches, device, amp_dtype, channels_last=fast)

    def inference(network):
        def run(batches):
            network.eval()
            with torch.no_grad(), engine.autocast(device, amp_dtype):
                for images, _, _ in batches:
                    network(engine.prepare_images(images, device, channels_last=fast))
        return run

    figures = {}
    for name, function in (("train", train), ("eval", evaluate), ("infer", inference(model)),
                           ("infer_folded", inference(model.folded()))):
        function(warmup_loader)
        seconds = math.inf
        for _ in range(rounds):
            synchronize(device)
            start = time.perf_counter()
            function(timed_loader)
            synchronize(device)
            seconds = min(seconds, time.perf_counter() - start)
        figures[name] = steps * batch_size / seconds
    if device.type == "cuda":
        # Without the synthetic images, which a real run keeps on the host (4 bytes a value
        # on the release's path, 1 on the fast path): the model's own memory.
        data = sum(batches.dataset.images.nbytes for batches in (warmup_loader, timed_loader))
        figures["peak_memory_gib"] = (torch.cuda.max_memory_allocated(device) - data) / 2 ** 30
    return figures


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


def forward_flops(device, settings, image_size, num_classes):
    """FLOPs of one image's forward pass, counted by PyTorch (spec: about 62 G for ResNet-101 at 448)."""
    model = synthetic_model(settings, num_classes, device)[0].eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size, device=device))
    return counter.get_total_flops()


def peak_tflops(device):
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def hours_to_reproduce(train_img_s, eval_img_s):
    """Wall-clock hours of each paper recipe at these rates (data loading keeping up)."""
    return {name: epochs * (train / train_img_s + test / eval_img_s) / 3600
            for name, (epochs, train, test) in RECIPES.items()}


def print_row(title, release, fast, unit="{:>13.1f}"):
    ratio = f"{fast / release:>5.2f}x" if release and fast else ""
    print(f"| {title:<42} | {unit.format(release)} | {unit.format(fast).strip():>9} | {ratio:>6} |")


def main():
    args = options.bench_parser(__doc__).parse_args()
    try:
        args.device = resolve_device(args.device)
    except DSDLError as error:
        sys.exit(f"error: {error}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    arch = args.arch or ("resnet101" if gpu else "resnet18")
    try:
        trunks.check_arch(arch)
    except DSDLError as error:
        sys.exit(f"error: {error}")
    settings = argparse.Namespace(model=args.model, arch=arch, pool="max", lambd=10.0, beta=1e-4)
    image_size = args.image_size or (448 if gpu else 224)
    batch_size = args.batch_size or (32 if gpu else 8)
    steps, warmup = args.steps or (20 if gpu else 3), args.warmup or (5 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {where}; torch {torch.__version__}"
          + ("" if args.pipeline_only else f"; {arch}, {image_size} px, batch {batch_size}, best of "
                                            f"{args.rounds} x {steps} timed steps after {warmup}"))
    figures = {"device": where, "torch": torch.__version__, "pipeline_image_size": PIPELINE_SIZE}

    if not args.pipeline_only:
        model = dict(device=device, settings=settings, image_size=image_size, batch_size=batch_size,
                     num_classes=args.num_classes, steps=steps, warmup=warmup, rounds=args.rounds)
        release = measure_model(**model, fast=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast = measure_model(**model, fast=True, compile=args.compile)
        for warning in caught:
            print(f"note: {warning.message}")
        flops = forward_flops(device, settings, image_size, args.num_classes)
        figures.update({
            "arch": arch, "image_size": image_size, "batch_size": batch_size,
            "train_img_s_release": release["train"], "train_img_s_fast": fast["train"],
            "eval_img_s_release": release["eval"], "eval_img_s_fast": fast["eval"],
            "infer_img_s_release": release["infer"], "infer_img_s_fast": fast["infer"],
            "infer_folded_img_s_release": release["infer_folded"], "infer_folded_img_s_fast": fast["infer_folded"],
            "forward_gflop_per_image": flops / 1e9,
        })
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, args.pipeline_images)
        pipelines = measure_pipelines(folder, PIPELINE_SIZE)
        figures["pipeline_img_s_release"], figures["pipeline_img_s_fast"] = pipelines["release"], pipelines["fast"]
        figures["pipeline_release_breakdown_ms"] = pipeline_breakdown(folder, PIPELINE_SIZE, fast=False)
        figures["pipeline_fast_breakdown_ms"] = pipeline_breakdown(folder, PIPELINE_SIZE, fast=True)
        if gpu:
            figures["gpu_decode_img_s"] = measure_gpu_decode(folder, PIPELINE_SIZE, device)

    if gpu and not args.pipeline_only:
        figures["peak_memory_gib_release"] = release["peak_memory_gib"]
        figures["peak_memory_gib_fast"] = fast["peak_memory_gib"]
        peak = peak_tflops(device)
        if peak:  # a training step is about 3x the forward FLOPs (spec section 10)
            figures["mfu_release"] = 3 * flops * release["train"] / (peak * 1e12)
            figures["mfu_fast"] = 3 * flops * fast["train"] / (peak * 1e12)
            figures["peak_tflops_bf16"] = peak
        figures["hours_to_reproduce_release"] = hours_to_reproduce(release["train"], release["eval"])
        figures["hours_to_reproduce_fast"] = hours_to_reproduce(fast["train"], fast["eval"])
        # One worker's images/s against the training images/s: the -j that keeps the GPU fed.
        figures["workers_to_feed_training_fast"] = math.ceil(fast["train"] / figures["pipeline_img_s_fast"])
    if not gpu:
        figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    print(f"\n| {'figure':<42} | {'release-style':>13} | {'fast':>9} | {'ratio':>6} |")
    print(f"|{'-' * 44}|{'-' * 15}|{'-' * 11}|{'-' * 8}|")
    rows = [("pipeline images/s per worker (448 px)", "pipeline_img_s")]
    if not args.pipeline_only:
        rows = [("training images/s", "train_img_s"), ("evaluation images/s", "eval_img_s"),
                ("inference images/s", "infer_img_s"),
                ("inference images/s, head folded", "infer_folded_img_s")] + rows
    for title, key in rows:
        print_row(title, figures[key + "_release"], figures[key + "_fast"])
    if gpu:
        print(f"| {'pipeline images/s, decoded on the GPU':<42} | {'':>13} | "
              f"{figures['gpu_decode_img_s']:>9.1f} | {'':>6} |")
    if gpu and not args.pipeline_only:
        print_row("peak GPU memory (GiB)", figures["peak_memory_gib_release"],
                  figures["peak_memory_gib_fast"], unit="{:>13.2f}")
        if "mfu_fast" in figures:
            print_row("model FLOP utilisation (%)", 100 * figures["mfu_release"],
                      100 * figures["mfu_fast"])
        for name in RECIPES:
            print_row(f"hours to reproduce {name}", figures["hours_to_reproduce_release"][name],
                      figures["hours_to_reproduce_fast"][name])
        print(f"(the hours assume data loading keeps up: the fast path's training needs "
              f"-j {figures['workers_to_feed_training_fast']} or more workers like the one measured)")
    if not gpu:
        print(f"peak resident memory of the process: {figures['peak_rss_gib']:.2f} GiB")
    if not args.pipeline_only:
        print(f"forward pass: {figures['forward_gflop_per_image']:.1f} GFLOP per image at {image_size} px")
    for name in ("release", "fast"):
        breakdown = figures[f"pipeline_{name}_breakdown_ms"]
        total = sum(breakdown.values())
        print(f"{name} pipeline, one worker, 500 x 375 JPEG to 448 px ({total:.2f} ms): " + ", ".join(
            f"{stage} {ms:.2f} ms ({100 * ms / total:.0f}%)" for stage, ms in breakdown.items()))
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
