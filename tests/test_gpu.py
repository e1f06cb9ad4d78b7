"""The GPU tier: what only a GPU can show. Every test is skipped where no GPU can be used (CI),
and fails there instead under DSDL_REQUIRE_GPU=1, as in the README's GPU command:

    DSDL_REQUIRE_GPU=1 python -m pytest -q tests/test_gpu.py -rs --durations=0

With bench.py after it, the tier is meant to fit in 5 minutes on one H100: ESTIMATES below
(printed when the tier starts; --durations=0 prints what each test took).

Each test compares the GPU with an independent float32 computation on the same weights, most
often the CPU's. Float32 on the GPU runs its convolutions in TF32 (PyTorch's default for cuDNN:
a 10-bit mantissa), so even "float32" comparisons allow relative differences of about 1e-2 of
the largest value; bf16 and fp16 allow more, as each test states.
"""
import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

import checkpoints
import engine
import speed
from conftest import ROOT, class_image, write_voc_tree
from distributed import gpu_problem
from models import DSDL, DSDLLoss
from util import IMAGENET_MEAN, IMAGENET_STD, eval_transform

DEVICE = torch.device("cuda")
CLASSES = 20
# Seconds on one H100, estimated (not yet measured): cold start, cuDNN's autotuning and, for
# the compile test, one cold torch.compile of a ResNet-18 included. bench.py's default run
# (three configurations of ResNet-101 at 448 px, the pipelines) is estimated at BENCH_ESTIMATE.
ESTIMATES = {
    "test_a_training_step_matches_float32_with_the_solve_and_the_loss_in_float32": 10,
    "test_training_and_evaluation_steps_never_wait_for_the_gpu": 3,
    "test_channels_last_and_compile_give_the_plain_models_scores": 60,
    "test_uint8_batches_normalised_on_the_gpu_equal_the_release_pipelines_tensors": 1,
    "test_evaluate_and_class_maps_on_the_gpu_equal_the_cpu": 3,
    "test_a_checkpoint_written_on_the_gpu_loads_on_the_cpu_and_back": 2,
    "test_nccl_all_reduce_works_on_this_gpu": 3,
    "test_torchrun_trains_one_epoch_and_evaluates_on_the_gpu": 30,
    "test_torchrun_with_sync_bn_trains_on_two_gpus": 40,  # skipped with one GPU
    "test_resnet101_at_448_px_learns_alike_in_float32_and_on_the_fast_path": 60,
}
BENCH_ESTIMATE = 80


@pytest.fixture(scope="module", autouse=True)
def usable_gpu(request):
    """Skip the tier where no GPU can be used; under DSDL_REQUIRE_GPU=1 fail it instead, so that
    a machine whose CUDA is missing or broken cannot pass. Then print the time estimates."""
    problem = gpu_problem()
    if problem and os.environ.get("DSDL_REQUIRE_GPU", "") not in ("", "0"):
        pytest.fail(f"DSDL_REQUIRE_GPU=1, but {problem}", pytrace=False)
    if problem:
        pytest.skip(f"GPU tier: {problem} (run python -m pytest tests/test_gpu.py on a GPU machine)")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nGPU tier on {torch.cuda.get_device_name(DEVICE)}, estimated on one H100: "
                            f"{sum(ESTIMATES.values())} s, then bench.py {BENCH_ESTIMATE} s")
        for name, seconds in ESTIMATES.items():
            reporter.write_line(f"  {seconds:>3} s  {name}")


def small_model(seed=0, arch="resnet18"):
    torch.manual_seed(seed)
    return DSDL(CLASSES, torch.randn(CLASSES, 300), 10.0, arch, pretrained=False)


def generated_images(count, size, seed=0):
    """B x H x W x 3 uint8 images of conftest.class_image (1-3 classes each) and B x C labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], np.full((count, CLASSES), -1, dtype=np.int64)
    for i in range(count):
        present = rng.choice(CLASSES, size=rng.integers(1, 4), replace=False)
        images.append(np.asarray(class_image(present, size, rng)))
        labels[i, present] = 1
    return torch.from_numpy(np.stack(images)), torch.from_numpy(labels)


def as_float(images):
    """uint8 B x H x W x 3 -> normalised float B x 3 x H x W on the images' device, computed with
    torchvision (independent of util.normalize_on_device)."""
    return F.normalize(images.permute(0, 3, 1, 2).float() / 255, IMAGENET_MEAN, IMAGENET_STD)


def relative_error(ours, reference):
    return float((ours.detach().cpu().double() - reference.detach().cpu().double()).abs().max()
                 / reference.detach().cpu().double().abs().max())


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.detach().cpu().double().flatten(),
                                                       b.detach().cpu().double().flatten(), dim=0))


class Generated(Dataset):
    """A labelled split of generated images, as engine.evaluate reads one."""
    labelled = True
    split = "generated"
    classes = [f"class {c}" for c in range(CLASSES)]

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index], f"{index:04d}"


# Mixed precision: (autocast dtype, gradient scaler, tolerance on the loss, least cosine of the
# trunk's whole gradient with float32's, tolerance on the dictionary's (W1, W2) gradients). The
# head (the C x C solve) and the loss are float32 in all three; the trunk rounds to TF32 in
# "float32" (10 bits of mantissa), to bf16 (8) or fp16 (11).
# Basis: this test's computation run with the CPU's bf16 and fp16 autocast (torch 2.14, one
# thread), on the 8 images and weights of seeds 0-9 for bf16 and 0-2 for fp16 (seed 0 is the
# test's): loss within 8e-4 (bf16) and 1.1e-4 (fp16); trunk gradient cosine 0.911-0.931 (bf16)
# and 0.988 (fp16); W1 / W2 gradient cosine at least 0.99989 (bf16) and 0.999998 (fp16), their
# largest relative error 1.0e-2 to 1.8e-2 (bf16) and at most 3.2e-3 (fp16). The tolerances leave
# about 2x the measured error (cosines: 1 - cosine about 2x) for the GPU's own rounding, which
# is not yet measured; float32 (TF32 on the GPU) is not measured either: TF32 keeps 3 more bits
# than bf16, so its errors should be about 8x smaller than bf16's. A broken path (the solve or
# the loss out of float32, an unscaled fp16 gradient) is far outside all of them.
PRECISIONS = {"float32": (None, False, 5e-3, 0.98, 2e-2),
              "bf16": (torch.bfloat16, False, 2e-2, 0.85, 4e-2),
              "fp16": (torch.float16, True, 2e-2, 0.97, 2e-2)}


def trunk_gradient(model):
    return torch.cat([p.grad.flatten().cpu() for p in model.trunk.parameters()])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_training_step_matches_float32_with_the_solve_and_the_loss_in_float32(precision, monkeypatch):
    amp_dtype, scaled, tolerance, least_cosine, dictionary_tolerance = PRECISIONS[precision]
    if amp_dtype is torch.bfloat16 and DEVICE.type == "cuda" and not speed.native_bf16(DEVICE):
        pytest.skip("this GPU has no bf16 units")
    images, labels = generated_images(8, 64)
    loss_fn = DSDLLoss(10.0, 1e-4)
    model = small_model()
    # The independent computation: the same weights, float32 on the CPU, forward and backward.
    reference = copy.deepcopy(model).train()
    expected_loss = loss_fn(reference(as_float(images)), (labels >= 0).float())
    expected_loss.backward()

    solves, losses = [], []
    solve = torch.linalg.solve_ex

    def recording_solve(gram, right, **kwargs):
        solves.append((gram.dtype, right.dtype))
        return solve(gram, right, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve_ex", recording_solve)

    def recording_loss(output, targets):
        loss = loss_fn(output, targets)
        losses.append(loss.detach())
        return loss

    model = model.to(DEVICE)
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10) if scaled else None
    engine.train_one_epoch(model, recording_loss, optimizer, [(images, labels, [""] * 8)], DEVICE, 0,
                           max_grad_norm=1e9, amp_dtype=amp_dtype, scaler=scaler)  # no clipping

    assert solves == [(torch.float32, torch.float32)]  # the C x C solve, once, in float32
    assert losses[0].dtype == torch.float32
    error = abs(losses[0].item() - expected_loss.item()) / expected_loss.item()
    assert error < tolerance, f"{precision}: loss {losses[0].item():.6f} vs float32 {expected_loss.item():.6f}"
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
    for name in ("W1", "W2"):  # the dictionary: float32 in every precision, and unscaled
        ours, theirs = model.get_parameter(name).grad, reference.get_parameter(name).grad
        assert cosine(ours, theirs) > 0.999 and relative_error(ours, theirs) < dictionary_tolerance, name
    assert cosine(trunk_gradient(model), trunk_gradient(reference)) > least_cosine, precision


def test_training_and_evaluation_steps_never_wait_for_the_gpu(monkeypatch):
    """CUDA's sync debug mode raises on any operation that makes the host wait; only the
    readers of the figures (every 10 steps, end of evaluation) may, and they are set aside."""
    images, labels = generated_images(8, 64)
    batches = [(as_float(images), labels, [str(i) for i in range(8)])] * 3
    model = small_model().to(DEVICE)
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
    loss_fn = DSDLLoss(10.0, 1e-4)
    monkeypatch.setattr(engine, "check_losses", lambda unread, epoch: [0.0] * len(unread))
    monkeypatch.setattr(engine, "read_evaluation", lambda *args: None)
    engine.train_one_epoch(model, loss_fn, optimizer, batches[:1], DEVICE, 0, 10.0)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.train_one_epoch(model, loss_fn, optimizer, batches, DEVICE, 0, 10.0)
        engine.evaluate(model, loss_fn, DataLoader(Generated(as_float(images), labels), batch_size=4),
                        DEVICE)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_channels_last_and_compile_give_the_plain_models_scores():
    images = as_float(generated_images(4, 64)[0]).to(DEVICE)
    model = small_model().to(DEVICE).eval()
    with torch.no_grad():
        plain = model(images).scores
        model.to(memory_format=torch.channels_last)
        channels_last = images.contiguous(memory_format=torch.channels_last)
        reordered = model(channels_last).scores
        engine.compile_trunk(model.trunk)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = model(channels_last).scores  # compiles, or falls back saying so: never raises
    fallback = [str(w.message) for w in caught if "--compile" in str(w.message)]
    print("torch.compile:", fallback[0] if fallback else "compiled")
    assert all(message.startswith("--compile does not work here") for message in fallback)
    assert relative_error(reordered, plain) < 1e-2
    assert relative_error(compiled, plain) < 1e-2


def test_uint8_batches_normalised_on_the_gpu_equal_the_release_pipelines_tensors():
    images = [class_image([c, c + 5], 64, np.random.default_rng(c)) for c in range(4)]
    # At the input size both pipelines' resizes leave the pixels alone: only normalisation differs.
    expected = torch.stack([eval_transform(64)(image) for image in images])  # ToTensor + Normalize, CPU
    batch = torch.stack([eval_transform(64, fast=True)(image) for image in images])  # B x H x W x 3 uint8
    ours = engine.prepare_images(batch, DEVICE, channels_last=True)
    assert ours.device.type == DEVICE.type and ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.cpu(), expected, rtol=0, atol=1e-5)


def test_evaluate_and_class_maps_on_the_gpu_equal_the_cpu(monkeypatch):
    # True float32 convolutions here: a class map puts each channel's share where its max pool
    # reads it, and TF32's rounding could move that position between two near-equal values.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    images, labels = generated_images(12, 64)
    loader = DataLoader(Generated(images, labels), batch_size=4)
    loss_fn = DSDLLoss(10.0, 1e-4)
    model = small_model().eval()
    on_cpu = engine.evaluate(model, loss_fn, loader, torch.device("cpu"))
    on_gpu = engine.evaluate(copy.deepcopy(model).to(DEVICE), loss_fn, loader, DEVICE)
    assert on_gpu.ids == on_cpu.ids and np.array_equal(on_gpu.labels, on_cpu.labels)
    assert relative_error(torch.from_numpy(on_gpu.scores), torch.from_numpy(on_cpu.scores)) < 1e-4
    assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-4)
    with torch.no_grad():
        maps_cpu = model.class_maps(as_float(images[:4]))
        maps_gpu = copy.deepcopy(model).to(DEVICE).class_maps(as_float(images[:4]).to(DEVICE))
    assert relative_error(maps_gpu.scores, maps_cpu.scores) < 1e-4
    assert relative_error(maps_gpu.maps, maps_cpu.maps) < 1e-3


def test_a_checkpoint_written_on_the_gpu_loads_on_the_cpu_and_back(tmp_path):
    images, labels = generated_images(8, 64)
    model = small_model().to(DEVICE)
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
    engine.train_one_epoch(model, DSDLLoss(10.0, 1e-4), optimizer, [(images, labels, [""] * 8)],
                           DEVICE, 0, 10.0)  # weights and BatchNorm statistics made on the GPU
    path = str(tmp_path / checkpoints.CHECKPOINT)
    checkpoints.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": 1}, path)
    checkpoint = checkpoints.load_checkpoint(path)
    assert all(tensor.device.type == "cpu" for tensor in checkpoint["model"].values())
    on_cpu, back_on_gpu = small_model(seed=1), small_model(seed=2)  # other weights, overwritten
    checkpoints.load_weights(on_cpu, checkpoint, path)
    checkpoints.load_weights(back_on_gpu, checkpoint, path)
    back_on_gpu.to(DEVICE)
    batch = as_float(images)
    with torch.no_grad():
        expected = model.eval()(batch.to(DEVICE)).scores
        assert relative_error(on_cpu.eval()(batch).scores, expected) < 1e-2
        torch.testing.assert_close(back_on_gpu.eval()(batch.to(DEVICE)).scores, expected,
                                   rtol=1e-5, atol=1e-6)  # same device, same weights


def test_nccl_all_reduce_works_on_this_gpu(tmp_path):
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}",
                                         rank=0, world_size=1)
    try:
        total = torch.arange(3.0, device=DEVICE)
        torch.distributed.all_reduce(total)
        assert total.tolist() == [0.0, 1.0, 2.0]
    finally:
        torch.distributed.destroy_process_group()


def torchrun(tmp_path, embeddings, processes, *options):
    """main_voc2007.py under torchrun, one epoch of ResNet-18 at 64 px on a generated VOC tree."""
    root = str(tmp_path / "voc")
    write_voc_tree(root)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), os.path.join(ROOT, "main_voc2007.py"), root, "--arch", "resnet18",
               "--no-pretrained", "--image-size", "64", "-b", "8", "-j", "0", "--epochs", "1",
               "--device", DEVICE.type, "--embeddings", embeddings,
               "--checkpoint-dir", str(tmp_path / "run"), *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (tmp_path / "run" / checkpoints.CHECKPOINT).is_file()
    assert "mAP" in result.stdout
    return result


def test_torchrun_trains_one_epoch_and_evaluates_on_the_gpu(tmp_path, random_embeddings):
    torchrun(tmp_path, random_embeddings, 1)


# NCCL takes one GPU per process, and the model is converted only with 2 processes or more
# (engine.build_model); gloo cannot run SyncBatchNorm's forward on the CPU, so this is its only run.
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--sync-bn under torchrun needs 2 GPUs")
def test_torchrun_with_sync_bn_trains_on_two_gpus(tmp_path, random_embeddings):
    torchrun(tmp_path, random_embeddings, 2, "--sync-bn")


# The paper's scale: ResNet-101 from random weights, 448 px, batch 32. Estimated at about a
# minute on an H100 (2 x 300 steps; not yet run there): ESTIMATES.
LEARNING = dict(arch="resnet101", size=448, batch=32, steps=300, pool=256)


def test_resnet101_at_448_px_learns_alike_in_float32_and_on_the_fast_path(monkeypatch):
    arch, size, batch, steps = LEARNING["arch"], LEARNING["size"], LEARNING["batch"], LEARNING["steps"]
    images, labels = generated_images(LEARNING["pool"], size)
    images, semantics = images.to(DEVICE), torch.randn(CLASSES, 300, generator=torch.Generator().manual_seed(0))
    # The release path's float batches, made once on the GPU (built per batch on the CPU they took
    # about 50 s of the 300 steps): 256 images x 3 x 448 x 448 float32, 0.6 GiB.
    floats = as_float(images)
    order = torch.randint(len(labels), (steps, batch), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as engine.run sets it on GPUs
    curves = {}
    for path, fast in (("float32", False), ("fast", True)):
        torch.manual_seed(0)
        model = DSDL(CLASSES, semantics, 10.0, arch, pretrained=False).to(DEVICE)
        if fast:
            model.to(memory_format=torch.channels_last)
        amp_dtype, scaler = engine.mixed_precision(DEVICE, fast)
        # lrp = 1: the trunk starts from random weights, so it learns at the dictionary's rate.
        optimizer = torch.optim.SGD(model.parameter_groups(0.01, 1.0), lr=0.01, momentum=0.9,
                                    weight_decay=1e-4)
        losses = []
        loss_fn = DSDLLoss(10.0, 1e-4)

        def recording_loss(output, targets):
            loss = loss_fn(output, targets)
            losses.append(loss.detach())
            return loss

        # The release's path gets float batches; the fast path uint8 ones normalised on the device.
        batches = ((images[i] if fast else floats[i], labels[i], [""] * batch) for i in order)
        engine.train_one_epoch(model, recording_loss, optimizer, batches, DEVICE, 0, 10.0, amp_dtype,
                               scaler, channels_last=fast)
        curves[path] = torch.stack(losses).float().cpu()
    # Means over 20 steps: the trajectories differ step by step (rounding changes which way SGD
    # goes), the curves should not. Basis: with ResNet-18 at 64 px on the CPU (float32 against
    # bf16), measured once when the test was written: 0.70 -> 0.24 in 100 steps, the two curves
    # within 0.003 of each other; the asserted fall (to 0.7x) and gap (0.1 of the first loss) leave
    # room for ResNet-101 at 448 px, not yet measured. Not measured again here: bf16 on this
    # project's CPU (no bf16 units) takes about 6 s for one step of 8 images at 64 px.
    smooth = {path: curve.unfold(0, 20, 20).mean(1) for path, curve in curves.items()}
    print({path: [round(v, 3) for v in s.tolist()] for path, s in smooth.items()})
    for path, s in smooth.items():
        assert s[-1] < 0.7 * s[0], f"{path}: the loss did not fall ({s[0]:.3f} -> {s[-1]:.3f})"
    gap = (smooth["fast"] - smooth["float32"]).abs() / smooth["float32"][0]
    assert gap.max() < 0.1, f"the curves part: {gap.max():.3f} of the first loss"
