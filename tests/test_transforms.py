"""The release's train and test transforms (spec section 4)."""
import numpy as np
import pytest
import torch
from PIL import Image

from util import IMAGENET_MEAN, IMAGENET_STD, MultiScaleCrop, eval_transform, train_transform

# 0.66 * 64 = 42.24 and 0.875 * 64 = 56 (which is the target, so it stays 56)
SIDES_64 = [64, 56, 48, 42, 32]            # scales 1.0, 0.875, 0.75, 0.66, 0.5 of 64
GRID = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
        (1, 1), (3, 1), (1, 3), (3, 3)]    # corners, centre, edge centres, quarter points


def record_crops(monkeypatch, transform, image, draws):
    boxes = []
    original = Image.Image.crop

    def crop(self, box=None):
        boxes.append(tuple(box))
        return original(self, box)

    monkeypatch.setattr(Image.Image, "crop", crop)
    torch.manual_seed(0)
    for _ in range(draws):
        out = transform(image)
        assert out.size == (transform.size, transform.size)
    return boxes


def test_multiscale_crop_takes_only_the_spec_sizes_and_13_positions(monkeypatch):
    crop = MultiScaleCrop(56)
    boxes = record_crops(monkeypatch, crop, Image.new("RGB", (64, 64)), draws=3000)
    allowed_sizes = {(SIDES_64[j], SIDES_64[i]) for i in range(5) for j in range(5) if abs(i - j) <= 2}
    seen_sizes, seen_positions = set(), set()
    for x0, y0, x1, y1 in boxes:
        w, h = x1 - x0, y1 - y0
        assert (w, h) in allowed_sizes
        step_w, step_h = (64 - w) // 4, (64 - h) // 4
        positions = {(i * step_w, j * step_h) for i, j in GRID}
        assert (x0, y0) in positions
        seen_sizes.add((w, h))
        seen_positions.add((w, h, x0, y0))
    assert seen_sizes == allowed_sizes  # every allowed size occurs, e.g. (64, 42) but never (64, 32)
    assert (64, 32) not in seen_sizes
    # with a 32 x 32 crop all 13 positions are distinct, and all occur
    assert {(x, y) for w, h, x, y in seen_positions if (w, h) == (32, 32)} == {(i * 8, j * 8) for i, j in GRID}


def test_crop_sides_within_3_px_of_the_target_snap_to_it(monkeypatch):
    # base 58: 0.875 * 58 = 50.75 -> 50, within 3 px of 52, so it becomes 52
    boxes = record_crops(monkeypatch, MultiScaleCrop(52), Image.new("RGB", (58, 58)), draws=600)
    sides = {x1 - x0 for x0, _, x1, _ in boxes} | {y1 - y0 for _, y0, _, y1 in boxes}
    assert sides == {58, 52, 43, 38, 29}
    assert 50 not in sides


def test_train_transform_resizes_to_8_7_then_crops_to_the_input_size(monkeypatch):
    sizes = []
    original = Image.Image.crop

    def crop(self, box=None):
        sizes.append(self.size)
        return original(self, box)

    monkeypatch.setattr(Image.Image, "crop", crop)
    out = train_transform(448)(Image.new("RGB", (300, 200)))
    assert sizes == [(512, 512)]  # the release resizes to 512 x 512 ignoring the aspect ratio
    assert out.shape == (3, 448, 448)


def test_test_transform_warps_and_normalises_with_imagenet_statistics():
    colour = (200, 30, 120)
    out = eval_transform(64)(Image.new("RGB", (90, 40), colour))
    assert out.shape == (3, 64, 64)
    expected = (np.array(colour) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)
    assert out.std(dim=(1, 2)).max() < 1e-5


def test_train_transform_flips_half_the_time():
    # brightness grows from left to right, so every crop keeps that order unless flipped
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    image = Image.fromarray(ramp)
    torch.manual_seed(0)
    transform = train_transform(56)
    flipped = [bool(t[:, :, :4].mean() > t[:, :, -4:].mean()) for t in (transform(image) for _ in range(300))]
    assert 0.4 < np.mean(flipped) < 0.6
