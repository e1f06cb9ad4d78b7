"""The release's train and test transforms (spec section 4), and how images are loaded."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

import util
from util import (IMAGENET_MEAN, IMAGENET_STD, DSDLError, MultiScaleCrop, eval_transform,
                  load_image, load_image_tensor, read_image, train_transform)

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


def test_a_seeded_fast_train_transform_takes_the_release_box_and_flip(monkeypatch):
    boxes = []
    draw = MultiScaleCrop.draw

    def recording_draw(self, width, height):
        boxes.append(draw(self, width, height))
        return boxes[-1]

    monkeypatch.setattr(MultiScaleCrop, "draw", recording_draw)
    ramp = np.tile(np.linspace(0, 255, 90, dtype=np.uint8)[None, :, None], (70, 1, 3))
    image = Image.fromarray(ramp)  # brighter to the right: a flip shows
    release, fast = train_transform(56), train_transform(56, fast=True)
    flips = []
    for seed in range(40):
        torch.manual_seed(seed)
        expected = release(image)                      # 3 x 56 x 56, normalised
        torch.manual_seed(seed)
        ours = fast(image)                             # 56 x 56 x 3 uint8
        flips.append((bool(expected[0, :, 0].mean() > expected[0, :, -1].mean()),
                      bool(ours[:, 0, 0].float().mean() > ours[:, -1, 0].float().mean())))
    assert boxes[0::2] == boxes[1::2]  # release, fast, release, fast ...: the same boxes
    assert len(set(boxes)) > 10
    assert all(a == b for a, b in flips) and 10 < sum(a for a, _ in flips) < 30


# --------------------------------------------------------------------------------------------
# Loading images: JPEGs straight to tensors for the fast transforms, 16 bits, errors
# --------------------------------------------------------------------------------------------

def photo(width=48, height=32):
    """Smooth colours, brighter to the right and redder at the bottom: any turn shows."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return Image.fromarray((np.stack([y, x, 1 - x * y], axis=2) * 255).astype(np.uint8))


def pil_pixels(path, upright=False):
    return F.pil_to_tensor(load_image(path, upright)).int()


def test_read_image_decodes_jpegs_with_torchvision_for_the_fast_transforms(tmp_path, monkeypatch):
    decoded = []
    decode = util.decode_jpeg

    def recording_decode(*args, **kwargs):
        decoded.append(args[0])
        return decode(*args, **kwargs)

    monkeypatch.setattr(util, "decode_jpeg", recording_decode)
    photo().save(tmp_path / "a.jpg", quality=90)
    photo().save(tmp_path / "b.jpg", format="PNG")  # PNG bytes under a .jpg name
    for name in ("a.jpg", "b.jpg"):
        path = str(tmp_path / name)
        ours = read_image(path, eval_transform(40, fast=True))
        assert ours.dtype == torch.uint8 and ours.shape == (40, 40, 3)
        release = read_image(path, eval_transform(40))  # PIL decode and resize, normalised
        std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        release = ((release * std + mean) * 255).permute(1, 2, 0)  # back to grey levels
        assert (ours - release).abs().max() <= 1.01
    assert len(decoded) == 1  # the JPEG, not the PNG
    assert read_image(str(tmp_path / "a.jpg")).mode == "RGB"  # no transform: PIL, as before


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_decode_to_the_rgb_that_pil_gives(tmp_path, mode):
    path = str(tmp_path / "image.jpg")
    photo().convert(mode).save(path, quality=95)
    ours = load_image_tensor(path)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 32, 48)
    assert (ours.int() - pil_pixels(path)).abs().max() <= 1


def test_a_corrupt_jpeg_on_the_fast_path_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    photo().save(path, quality=90)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DSDLError, match=re.escape(str(path)) + r".*truncated or not an image; restore it"):
        read_image(str(path), train_transform(32, fast=True))


def test_the_fast_path_turns_photos_upright_as_pil_does(tmp_path):
    path = str(tmp_path / "phone.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: the camera was turned, show it rotated 90 degrees
    photo().save(path, quality=95, exif=exif)
    stored, upright = load_image_tensor(path), load_image_tensor(path, upright=True)
    assert stored.shape == (3, 32, 48) and upright.shape == (3, 48, 32)
    assert (upright.int() - pil_pixels(path, upright=True)).abs().max() <= 1
    assert (stored.int() - pil_pixels(path)).abs().max() <= 1
    assert read_image(path, eval_transform(16, fast=True), upright=True).shape == (16, 16, 3)


def sixteen_bit_copies(tmp_path):
    """A gradient over all 256 grey levels and a mid-grey patch, as 8-bit PNG, 16-bit PNG
    (PIL mode I;16) and 32-bit-integer TIFF (mode I) holding the same 16-bit values."""
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey[:4, :4] = 128
    Image.fromarray(grey).save(tmp_path / "8bit.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "16bit.png")  # 255 -> 65535
    Image.fromarray(grey.astype(np.int32) * 257).save(tmp_path / "16bit_in_I.tif")
    return grey


def test_16_bit_images_load_as_their_8_bit_copies(tmp_path):
    grey = sixteen_bit_copies(tmp_path)
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    assert Image.open(tmp_path / "16bit_in_I.tif").mode == "I"
    expected = np.repeat(grey[:, :, None], 3, axis=2)
    for name in ("8bit.png", "16bit.png", "16bit_in_I.tif"):
        image = load_image(str(tmp_path / name))
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=name)
    fast = read_image(str(tmp_path / "16bit.png"), eval_transform(16, fast=True))  # same size: no resampling
    np.testing.assert_array_equal(fast.numpy(), expected)


def test_an_unreadable_own_photo_is_not_sent_to_an_archive(tmp_path):
    path = tmp_path / "holiday.jpg"
    path.write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(DSDLError, match=re.escape(str(path)) + r".*not an image; check that it opens") as error:
        load_image(str(path), upright=True)
    assert "archive" not in str(error.value)
    with pytest.raises(DSDLError, match=r"image not found: .*missing.jpg. Check the path"):
        load_image(str(tmp_path / "missing.jpg"), upright=True)


def test_an_image_over_pils_pixel_limit_is_reported_as_too_large_not_broken(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    photo().save(path)  # 48 x 32 = 1536 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL refuses more than twice the limit
    with pytest.raises(DSDLError, match=re.escape(str(path)) + r".*larger than PIL's limit of "
                       r"Image.MAX_IMAGE_PIXELS \(500\) pixels.*downscale it") as error:
        load_image(str(path))
    assert "truncated" not in str(error.value) and "archive" not in str(error.value)
