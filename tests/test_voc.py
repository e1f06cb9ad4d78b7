"""VOC 2007 from the per-class split files, training targets, images."""
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import training_targets
from util import DSDLError, compute_metrics
from voc import VOC2007, VOC_CLASSES


def test_labels_ids_and_classes_come_from_the_split_files(voc_root):
    root, written = voc_root
    for split, (ids, flags) in written.items():
        dataset = VOC2007(root, split, download=False)
        assert dataset.classes == list(VOC_CLASSES)
        assert dataset.image_ids == ids
        np.testing.assert_array_equal(dataset.labels, flags)
        image, labels, image_id = dataset[3]
        assert image_id == ids[3] and isinstance(image, Image.Image) and image.mode == "RGB"
        assert labels.dtype == torch.int64 and labels.tolist() == flags[3].tolist()
    assert set(np.unique(written["trainval"][1])) == {-1, 0, 1}  # the tree has difficult flags


def test_difficult_is_a_positive_training_target():
    labels = torch.tensor([[1, 0, -1], [-1, -1, 0]])
    assert training_targets(labels).tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_difficult_images_do_not_count_in_ap_of_the_dataset_labels(voc_root):
    root, written = voc_root
    labels = VOC2007(root, "trainval", download=False).labels
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(labels.shape)
    c = int(np.argmax((labels == 0).sum(0)))  # a class with difficult images
    difficult = labels[:, c] == 0
    base = compute_metrics(scores, labels)["AP"][c]
    scores[difficult, c] = 100.0  # difficult images ranked first: AP unchanged
    assert compute_metrics(scores, labels)["AP"][c] == pytest.approx(base)


def test_a_missing_image_is_an_error_naming_its_path(voc_root):
    root, written = voc_root
    dataset = VOC2007(root, "test", download=False)
    path = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", written["test"][0][0] + ".jpg")
    os.remove(path)
    with pytest.raises(DSDLError, match=path):
        dataset[0]


def test_a_missing_split_file_is_an_error_naming_it_and_nothing_is_downloaded(voc_root, monkeypatch):
    root, _ = voc_root
    folder = os.path.join(root, "VOCdevkit", "VOC2007", "ImageSets", "Main")
    os.remove(os.path.join(folder, "tvmonitor_test.txt"))
    before = sorted(os.listdir(folder))
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)  # download=True: still never called
    with pytest.raises(DSDLError, match=r"VOC 2007 test is incomplete: 1 of its label files are "
                                        r"missing from .*Main \(tvmonitor_test.txt\)"):
        VOC2007(root, "test")
    assert sorted(os.listdir(folder)) == before and os.listdir(root) == ["VOCdevkit"]


def test_a_present_dataset_is_used_without_network(voc_root, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although the dataset is present")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    root, written = voc_root
    assert len(VOC2007(root, "trainval")) == len(written["trainval"][0])


def test_an_absent_dataset_offline_says_where_to_put_it(offline, tmp_path):
    with pytest.raises(DSDLError) as error:
        VOC2007(str(tmp_path), "test")
    message = str(error.value)
    assert "VOCtest_06-Nov-2007.tar" in message and os.path.join("VOCdevkit", "VOC2007") in message
    assert not any(name.endswith((".tar", ".part")) for name in os.listdir(tmp_path))


def test_an_image_too_large_to_decode_safely_is_an_error_naming_it(voc_root, monkeypatch):
    root, written = voc_root
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice this
    path = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", written["test"][0][0] + ".jpg")
    with pytest.raises(DSDLError, match=path):
        VOC2007(root, "test", download=False)[0]


def test_exif_orientation_is_applied_only_when_asked(tmp_path):
    from util import load_image
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    assert load_image(path).size == (40, 20)  # as stored: VOC and COCO, as the release read them
    upright = load_image(path, upright=True)
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[:20].mean(), np.asarray(upright)[20:].mean()
    assert top > 200 and bottom < 50  # the white left half is on top once turned clockwise
