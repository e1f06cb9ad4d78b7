"""Throughput of the release-style path against the fast path, measured side by side.

    python bench.py                      # GPU when present: ResNet-101, 448 px, batch 32
    python bench.py --device cpu         # CPU: smaller sizes by default (printed)
    python bench.py --json bench.json    # also write the figures as JSON

Release-style: float32, contiguous memory, the PIL pipeline (ToTensor + Normalize per image).
Fast: --amp (bf16, or fp16 with a scaler), --channels-last, uint8 batches normalised on the
device, the single-resize pipeline, and optionally --compile. The model figures run the real
training step (engine.train_one_epoch) and evaluation (engine.evaluate) on synthetic batches
already on the device, so they measure the model, not the disk; the pipeline figures measure one
data-loading worker (decode + transform) on generated VOC-sized JPEGs.
"""
import argparse
import json
import os
import resource
import tempfile
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import engine
from models import ARCHS, DSDL, DSDLLoss
from util import load_image, train_transform

# Dense bf16 / fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the MFU figure.
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


class Batches(list):
    """A list of (images, labels, ids) batches that engine.evaluate accepts as a loader."""
    dataset = None


def synthetic_batches(count, batch_size, image_size, num_classes, device, uint8):
    generator = torch.Generator().manual_seed(0)
    batches = Batches()
    for _ in range(count):
        if uint8:  # what the fast pipeline hands over: B x H x W x 3 uint8
            images = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8,
                                   generator=generator)
        else:
            images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        labels = torch.randint(-1, 2, (batch_size, num_classes), generator=generator)
        batches.append((images.to(device), labels.to(device), [""] * batch_size))
    return batches


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_model(args, device, fast):
    """Training and evaluation images/s, and peak memory, of one configuration."""
    torch.manual_seed(0)
    model = DSDL(args.num_classes, torch.randn(args.num_classes, 300), 10.0, args.arch,
                 pretrained=False).to(device)
    amp_dtype, scaler = engine.mixed_precision(device, fast)
    if fast:
        model.to(memory_format=torch.channels_last)
        if args.compile:
            engine.compile_trunk(model.features)
    loss_fn = DSDLLoss(10.0, 1e-4)
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
    warmup = synthetic_batches(args.warmup, args.batch_size, args.image_size, args.num_classes, device, fast)
    timed = synthetic_batches(args.steps, args.batch_size, args.image_size, args.num_classes, device, fast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train(batches):
        engine.train_one_epoch(model, loss_fn, optimizer, batches, device, 0, 10.0, amp_dtype,
                               scaler, channels_last=fast)

    def evaluate(batches):
        engine.evaluate(model, loss_fn, batches, device, amp_dtype, channels_last=fast)

    figures = {}
    for name, function in (("train", train), ("eval", evaluate)):
        function(warmup)
        synchronize(device)
        start = time.perf_counter()
        function(timed)
        synchronize(device)
        figures[name] = args.steps * args.batch_size / (time.perf_counter() - start)
    if device.type == "cuda":
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return figures


def measure_pipeline(args, folder, fast):
    """Images per second of one data-loading worker: decode, then the train transform."""
    transform = train_transform(args.image_size, fast=fast)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    torch.manual_seed(0)
    for path in paths[:4]:  # warm-up
        transform(load_image(path))
    start = time.perf_counter()
    for path in paths:
        transform(load_image(path))
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(paths) / seconds


def release_pipeline_breakdown(folder, image_size=448):
    """Milliseconds per image of each stage of the release's train pipeline, in one worker."""
    stages = train_transform(image_size).transforms  # Resize, MultiScaleCrop, Flip, ToTensor, Normalize
    names = ["JPEG decode", "resize to 8/7", "multi-scale crop + resize", "horizontal flip",
             "ToTensor (float conversion)", "Normalize"]
    totals = np.zeros(len(names))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    for path in paths:
        start = time.perf_counter()
        image = load_image(path)
        times = [time.perf_counter()]
        for stage in stages:
            image = stage(image)
            times.append(time.perf_counter())
        totals += np.diff([start] + times)
    torch.set_num_threads(threads)
    return dict(zip(names, 1000 * totals / len(paths)))


def write_jpegs(folder, count, size=(500, 375)):
    """VOC-sized JPEGs with smooth random content."""
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.cumsum(np.cumsum(rng.standard_normal((size[1], size[0], 3)), 0), 1)
        pixels = (pixels - pixels.min()) / np.ptp(pixels) * 255
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


def forward_flops(args, device):
    """FLOPs of one image's forward pass, counted by PyTorch (spec: about 62 G for ResNet-101 at 448)."""
    model = DSDL(args.num_classes, torch.randn(args.num_classes, 300), 10.0, args.arch,
                 pretrained=False).to(device).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, args.image_size, args.image_size, device=device))
    return counter.get_total_flops()


def peak_tflops(device):
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=ARCHS, default=None, help="default: resnet101 on a GPU, resnet18 on a CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 448 on a GPU, 224 on a CPU")
    parser.add_argument("-b", "--batch-size", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed batches (default: 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: 5 GPU, 1 CPU)")
    parser.add_argument("--pipeline-images", type=int, default=60, help="JPEGs for the pipeline figure")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--json", metavar="FILE", help="write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is available")
    args.arch = args.arch or ("resnet101" if gpu else "resnet18")
    args.image_size = args.image_size or (448 if gpu else 224)
    args.batch_size = args.batch_size or (32 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup or (5 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {where}; {args.arch}, {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}; torch {torch.__version__}")

    release = measure_model(args, device, fast=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = measure_model(args, device, fast=True)
    for warning in caught:
        print(f"note: {warning.message}")
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, args.pipeline_images)
        pipeline_release = measure_pipeline(SimpleNamespace(image_size=448), folder, fast=False)
        pipeline_fast = measure_pipeline(SimpleNamespace(image_size=448), folder, fast=True)
        breakdown = release_pipeline_breakdown(folder)

    flops = forward_flops(args, device)
    figures = {
        "device": where, "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
        "train_img_s_release": release["train"], "train_img_s_fast": fast["train"],
        "eval_img_s_release": release["eval"], "eval_img_s_fast": fast["eval"],
        "pipeline_img_s_release": pipeline_release, "pipeline_img_s_fast": pipeline_fast,
        "pipeline_image_size": 448, "forward_gflop_per_image": flops / 1e9,
        "pipeline_release_breakdown_ms": breakdown,
    }
    if gpu:
        figures["peak_memory_gib_release"] = release["peak_memory_gib"]
        figures["peak_memory_gib_fast"] = fast["peak_memory_gib"]
        peak = peak_tflops(device)
        if peak:  # a training step is about 3x the forward FLOPs (spec section 10)
            figures["mfu_release"] = 3 * flops * release["train"] / (peak * 1e12)
            figures["mfu_fast"] = 3 * flops * fast["train"] / (peak * 1e12)
            figures["peak_tflops_bf16"] = peak
    else:
        figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    rows = [("training images/s", "train_img_s"), ("evaluation images/s", "eval_img_s"),
            ("pipeline images/s per worker (448 px)", "pipeline_img_s")]
    print(f"\n| {'figure':<38} | {'release-style':>13} | {'fast':>9} | {'ratio':>6} |")
    print(f"|{'-' * 40}|{'-' * 15}|{'-' * 11}|{'-' * 8}|")
    for title, key in rows:
        a, b = figures[key + "_release"], figures[key + "_fast"]
        print(f"| {title:<38} | {a:>13.1f} | {b:>9.1f} | {b / a:>5.2f}x |")
    if gpu:
        print(f"| {'peak GPU memory (GiB)':<38} | {figures['peak_memory_gib_release']:>13.2f} | "
              f"{figures['peak_memory_gib_fast']:>9.2f} | {'':>6} |")
        if "mfu_fast" in figures:
            print(f"| {'model FLOP utilisation':<38} | {100 * figures['mfu_release']:>12.1f}% | "
                  f"{100 * figures['mfu_fast']:>8.1f}% | {'':>6} |")
    else:
        print(f"peak resident memory of the process: {figures['peak_rss_gib']:.2f} GiB")
    print(f"forward pass: {flops / 1e9:.1f} GFLOP per image at {args.image_size} px")
    total = sum(breakdown.values())
    print("release pipeline, one worker, 500 x 375 JPEG to 448 px: " + ", ".join(
        f"{name} {ms:.2f} ms ({100 * ms / total:.0f}%)" for name, ms in breakdown.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
