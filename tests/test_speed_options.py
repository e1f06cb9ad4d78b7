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
