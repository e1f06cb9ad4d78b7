"""--amp, --channels-last, --compile and --fast-pipeline: faster, and the model sees the same thing."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import models
import engine
from models import DSDL, ridge_coefficients
from conftest import class_image
from util import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize_on_device, train_transform


def natural_image(width=150, height=110, seed=0):
    """Smooth random colours with some edges: closer to a photo than white noise."""
    rng = np.random.default_rng(seed)
    pixels = np.cumsum(np.cumsum(rng.standard_normal((height, width, 3)), 0), 1)
    pixels = (pixels - pixels.min()) / np.ptp(pixels) * 255
    pixels[height // 3:height // 2, :, 0] = 250
    return Image.fromarray(pixels.astype(np.uint8))


def test_autocast_keeps_the_head_in_float32_and_close_to_the_float32_model():
    torch.manual_seed(0)
    model = DSDL(6, torch.randn(6, 300), 10.0, arch="resnet18", pretrained=False).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images)
            trunk_dtype = model.features(images).dtype
    assert trunk_dtype == torch.bfloat16  # the trunk really ran in bf16
    for name in ("scores", "features", "dictionary", "reconstruction"):
        assert getattr(mixed, name).dtype == torch.float32, name
    # the coefficients are the float32 solve of the (bf16-computed) features
    torch.testing.assert_close(mixed.scores, ridge_coefficients(mixed.features, mixed.dictionary, 10.0))
    torch.testing.assert_close(mixed.dictionary, reference.dictionary)  # not touched by autocast
    error = (mixed.scores - reference.scores).abs().max() / reference.scores.abs().max()
    assert error < 0.05, f"relative error {error:.3f}"


def grey_levels(normalised):
    """3 x H x W ImageNet-normalised (the release's output) -> H x W x 3 grey levels (integers)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((normalised * std + mean) * 255).round().permute(1, 2, 0)


def differences(release, fast, image, seeds):
    """|fast - release| in grey levels over `seeds` draws of both transforms, seeded alike."""
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        expected = grey_levels(release(image))
        torch.manual_seed(seed)
        ours = fast(image)
        assert ours.dtype == torch.uint8 and ours.shape == expected.shape  # H x W x 3
        out.append((ours.float() - expected).abs())
    return torch.stack(out)


IMAGES = {  # natural: 143 x 107 has VOC's aspect; noisy: the suite's generated images
    "natural": lambda: natural_image(143, 107),
    "noisy": lambda: class_image([0, 7, 13], size=128),
}


@pytest.mark.parametrize("kind", IMAGES)
@pytest.mark.parametrize("size", [64, 128])
def test_fast_train_pipeline_takes_the_same_crops_with_pixels_within_tolerance(kind, size):
    image = IMAGES[kind]()
    difference = differences(train_transform(size), train_transform(size, fast=True), image, seeds=12)
    print(f"fast vs release train pipeline, {kind} image to {size} px: mean {difference.mean():.4f}, "
          f"99th percentile {difference.quantile(0.99):.2f}, max {difference.max():.2f} grey levels")
    # The same two resamplings of the same box; only torchvision's and PIL's rounding differ.
    # Measured: mean <= 0.04, 99th percentile <= 1, max 2, natural and noisy images, 64-448 px.
    # Another box or flip, or one resampling instead of two, gives a mean of 0.6 or more.
    assert difference.mean() < 0.1
    assert difference.quantile(0.99) <= 1
    assert difference.max() <= 2


@pytest.mark.parametrize("kind", IMAGES)
def test_fast_eval_pipeline_gives_the_release_pixels_within_a_grey_level(kind):
    image = IMAGES[kind]()
    for size in (64, 112):
        difference = differences(eval_transform(size), eval_transform(size, fast=True), image, seeds=1)
        assert difference.mean() < 0.05  # measured: at most 0.003 at these sizes
        assert difference.max() <= 1


def test_fast_pipeline_batches_normalise_on_the_device_as_the_release_normalises():
    image = natural_image(64, 64)  # at the input size: both resizes leave the pixels as they are
    expected = eval_transform(64)(image)  # ToTensor + Normalize on the CPU
    ours = normalize_on_device(eval_transform(64, fast=True)(image).unsqueeze(0))[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_device_normalisation_gives_channels_last_memory():
    batch = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    images = engine.prepare_images(batch, torch.device("cpu"), channels_last=True)
    assert images.shape == (2, 3, 8, 8) and images.is_contiguous(memory_format=torch.channels_last)
    assert engine.prepare_images(batch, torch.device("cpu")).is_contiguous()


def test_channels_last_model_gives_the_same_scores():
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(images).scores
        model.to(memory_format=torch.channels_last)
        ours = model(images.contiguous(memory_format=torch.channels_last)).scores
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(images).scores

    def broken_compile(function):
        def call(*args):
            raise RuntimeError("no C compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    keys = set(model.state_dict())
    engine.compile_trunk(model.features)
    with pytest.warns(UserWarning, match="--compile does not work here.*no C compiler"):
        with torch.no_grad():
            first = model(images).scores
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then eager without trying again
        with torch.no_grad():
            second = model(images).scores
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)
    assert set(model.state_dict()) == keys  # checkpoints keep the release's key names


def test_amp_on_the_cpu_warns_and_stays_float32():
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="--amp has no effect on the CPU"):
        assert engine.mixed_precision(cpu, True) == (None, None)
    assert engine.mixed_precision(cpu, False) == (None, None)


def test_a_gradient_scaler_step_clips_and_updates_as_the_unscaled_float32_step(monkeypatch):
    """fp16 training scales the loss by 65536: clipping must see (and the step use) the true gradients."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm):
        norm = clip(parameters, max_norm)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    batch = [(torch.randn(4, 3, 32, 32), torch.tensor([[1, -1, 0, -1, 1]] * 4), [""] * 4)]
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        torch.manual_seed(0)
        model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False)
        optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
        engine.train_one_epoch(model, models.DSDLLoss(10.0, 1e-4), optimizer, batch,
                               torch.device("cpu"), 0, 1.0, scaler=scaler)
        weights.append(model.W2.detach().clone())
    assert norms[0] > 1.0  # the clip is active
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # unscaled before clipping
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-6)


# ---- the GPU path, checked on the CPU -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_closed_form_solve_is_torch_linalg_solve_without_its_waiting_check(dtype, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(7, 64, generator=generator, dtype=dtype, requires_grad=True)
    expected = torch.linalg.solve(dictionary @ dictionary.T + 10 * torch.eye(7, dtype=dtype),
                                  dictionary).T
    (expected_grad,) = torch.autograd.grad((expected ** 2).sum(), dictionary)

    def waiting_solve(*args, **kwargs):
        raise AssertionError("torch.linalg.solve checks its result on the host: a sync per batch")

    monkeypatch.setattr(torch.linalg, "solve", waiting_solve)
    ours = models.ridge_projection(dictionary, 10.0)
    (ours_grad,) = torch.autograd.grad((ours ** 2).sum(), dictionary)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-7 if dtype == torch.float32 else 0)


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
READERS = ("check_losses", "read_evaluation")  # where the figures are read, by design


@pytest.fixture
def host_waits(monkeypatch):
    """Every call that makes the host wait for a device (on a GPU) made by this project's code
    outside its readers, as (method, function, line). On the CPU nothing waits: the calls are
    found by who makes them."""
    import inspect
    import os
    from conftest import ROOT
    found = []

    def watch(name):
        original = getattr(torch.Tensor, name)

        def watched(self, *args, **kwargs):
            frames = inspect.stack(0)[1:]
            caller = frames[0]  # torch's own calls (the loader's seed) are on the CPU
            ours = os.path.dirname(os.path.abspath(caller.filename)) == ROOT
            if ((ours or caller.function == "added_wait")  # the test's stand-in for new code
                    and not any(frame.function in READERS for frame in frames)):
                found.append((name, caller.function, caller.lineno))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, watched)

    for name in SYNCS:
        watch(name)
    return found


def test_a_training_and_an_evaluation_step_never_wait_for_the_device(host_waits):
    from recipes import Schedule, WeightAverage
    import main_voc2007
    import options
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([[1, -1, 0, -1, 1]] * 4), ["a"] * 4)] * 3
    args = options.parse_args(main_voc2007.get_args_parser(), ["data", "--schedule", "cosine"])
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
    schedule = Schedule(optimizer, model, args, 0, 3)
    engine.train_one_epoch(model, models.DSDLLoss(10.0, 1e-4), optimizer, batches,
                           torch.device("cpu"), 0, 10.0, schedule=schedule,
                           average=WeightAverage(model, 0.9), accumulate=2)

    class Split(torch.utils.data.Dataset):
        labelled = True

        def __len__(self):
            return 6

        def __getitem__(self, index):
            return torch.randn(3, 32, 32), torch.tensor([1, -1, 0, -1, 1]), str(index)

    loader = torch.utils.data.DataLoader(Split(), batch_size=4)
    result = engine.evaluate(model, models.DSDLLoss(10.0, 1e-4), loader, torch.device("cpu"))
    assert result.scores.shape == (6, 5) and host_waits == []
    # and a wait added to the step is found
    loss_fn = models.DSDLLoss(10.0, 1e-4)

    def added_wait(output, targets):
        return loss_fn(output, targets) * (2.0 if output.scores.sum().item() > 1e9 else 1.0)

    engine.train_one_epoch(model, added_wait, optimizer, batches[:1], torch.device("cpu"), 0, 10.0)
    assert [(name, function) for name, function, _ in host_waits] == [("item", "added_wait")]


def test_amp_uses_bf16_only_on_gpus_with_bf16_units(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulated too
    cuda = torch.device("cuda")
    for capability, expected in (((7, 0), torch.float16), ((7, 5), torch.float16),
                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a GradScaler made without CUDA says so
            dtype, scaler = engine.mixed_precision(cuda, True)
        assert dtype == expected, capability
        assert (scaler is not None) == (expected == torch.float16), capability


@pytest.mark.parametrize("init_scale, skipped", [(3e38, 1), (1.0, 0)])
def test_the_steps_the_fp16_scaler_skips_are_counted(init_scale, skipped):
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False)
    before = model.W2.detach().clone()
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
    counts = {}
    batch = [(torch.randn(4, 3, 32, 32), torch.tensor([[1, -1, 0, -1, 1]] * 4), [""] * 4)]
    engine.train_one_epoch(model, models.DSDLLoss(10.0, 1e-4), optimizer, batch, torch.device("cpu"),
                           0, 10.0, scaler=torch.amp.GradScaler("cpu", init_scale=init_scale),
                           counts=counts)
    assert counts == {"skipped_steps": skipped}
    assert torch.equal(model.W2, before) == bool(skipped)  # a skipped step leaves the weights


def one_step(deterministic):
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False)
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
    batch = [(torch.randn(4, 3, 32, 32), torch.tensor([[1, -1, 0, -1, 1]] * 4), [""] * 4)]
    with engine.numerics(torch.device("cpu"), "off", deterministic):
        engine.train_one_epoch(model, models.DSDLLoss(10.0, 1e-4), optimizer, batch,
                               torch.device("cpu"), 0, 10.0)
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    return model.state_dict()


def test_deterministic_changes_nothing_on_the_cpu_and_is_undone_after_the_run():
    plain, deterministic = one_step(False), one_step(True)
    for key, value in plain.items():
        assert torch.equal(value, deterministic[key]), key
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("tf32", ["on", "off"])
def test_tf32_sets_convolutions_and_matrix_products_alike_on_gpus_only(tf32):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with engine.numerics(torch.device("cuda"), tf32, False):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            (tf32 == "on",) * 2)
        assert torch.backends.cudnn.benchmark  # autotuning, unless --deterministic
    with engine.numerics(torch.device("cpu"), tf32, False):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def counting_compile(compiled_graphs, backward=None):
    """torch.compile with a backend that counts the graphs it is given (and runs them as they are);
    `backward`, if given, compiles the backward graphs (through AOT autograd)."""
    def backend(graph, example_inputs):
        compiled_graphs.append(graph)
        if backward is None:
            return graph.forward
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g.forward, bw_compiler=backward)(graph, example_inputs)
    return lambda function: torch._dynamo.optimize(backend)(function)


def test_compile_keeps_one_shape_so_nothing_compiles_twice(monkeypatch):
    torch._dynamo.reset()
    graphs = []
    monkeypatch.setattr(torch, "compile", counting_compile(graphs))
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False)
    engine.compile_trunk(model.trunk)

    class Split(torch.utils.data.Dataset):
        labelled = True

        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.randn(3, 32, 32), torch.tensor([1, -1, 0, -1, 1]), str(index)

    train = engine.make_loader(Split(), 4, 0, 0, torch.device("cpu"), shuffle=True, drop_last=True)
    assert [len(images) for images, _, _ in train] == [4, 4]  # the last 2 dropped
    optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01)
    loss_fn = models.DSDLLoss(10.0, 1e-4)
    for epoch in range(2):
        engine.train_one_epoch(model, loss_fn, optimizer, train, torch.device("cpu"), epoch, 10.0)
        evaluation = engine.make_loader(Split(), 4, 0, 0, torch.device("cpu"), shuffle=False)
        result = engine.evaluate(model, loss_fn, evaluation, torch.device("cpu"))
        assert result.scores.shape == (10, 5)  # batches of 4, 4 and 2 (padded to 4)
    assert len(graphs) == 2  # one for training, one for evaluation
    with torch.no_grad():  # the padded batch's scores are the unpadded ones
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(images).scores, model(torch.cat([images, images]))[0][:2])
    torch._dynamo.reset()


def test_the_compile_fallback_covers_the_first_backward(monkeypatch):
    torch._dynamo.reset()

    def broken_backward(graph, example_inputs):
        raise RuntimeError("backward compiler missing")

    monkeypatch.setattr(torch, "compile", counting_compile([], backward=broken_backward))
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False)
    reference = copy_model(model)
    engine.compile_trunk(model.trunk)
    batch = [(torch.randn(4, 3, 32, 32), torch.tensor([[1, -1, 0, -1, 1]] * 4), [""] * 4)]
    weights = []
    for network, context in ((model, pytest.warns(UserWarning, match="backward compiler missing")),
                             (reference, warnings.catch_warnings())):
        with context:
            optimizer = torch.optim.SGD(network.parameter_groups(0.01, 0.1), lr=0.01)
            engine.train_one_epoch(network, models.DSDLLoss(10.0, 1e-4), optimizer, batch,
                                   torch.device("cpu"), 0, 10.0)
        weights.append(network.W2.detach())
    torch.testing.assert_close(weights[0], weights[1])  # trained eagerly, as without --compile
    torch._dynamo.reset()


def copy_model(model):
    import copy
    return copy.deepcopy(model)


def test_sync_bn_on_the_cpu_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """SyncBatchNorm has no CPU implementation: two CPU processes with --sync-bn are refused."""
    import main_voc2007
    from conftest import call_main
    monkeypatch.setattr(engine, "init_distributed", lambda device: (0, 2, torch.device("cpu")))
    code = call_main(main_voc2007.main, [str(tmp_path), "--sync-bn", "--device", "cpu",
                                         "--checkpoint-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines == ["error: --sync-bn needs GPUs (SyncBatchNorm has no CPU "
                                   "implementation); drop it on the CPU"]
    assert not (tmp_path / "run").exists()


def test_after_a_compiled_forward_has_run_a_later_error_is_raised_not_taken_for_no_compiler(monkeypatch):
    calls = []

    def flaky_compile(function):
        def call(images):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return function(images)
        return call

    monkeypatch.setattr(torch, "compile", flaky_compile)
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False).eval()
    engine.compile_trunk(model.trunk)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # compiled, in evaluation (no backward to check)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            model(torch.randn(2, 3, 32, 32))
