"""NUS-WIDE in its official layout: Windows-style image lists, one 0 / 1 label file per concept
and split, images missing from Flickr left out with one message, each input mistake one line."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import main_nuswide
import runs
from conftest import SMALL, call_main, class_image
from nuswide import NUSWIDE, relative_image_path
from report import read_metrics
from util import DSDLError

CONCEPTS = ["animal", "beach", "car", "sky"]
# Per split: (the image list's entry, its concepts, whether the image is on disk)
IMAGES = {
    "train": [("animal\\0001_2124494179.jpg", ["animal", "sky"], True),
              ("animal\\0002_174174086.jpg", ["animal"], True),
              ("beach\\0001_2228152718.jpg", ["beach", "sky"], True),
              ("beach\\0002_331528374.jpg", [], False),
              ("car\\0001_1179427352.jpg", ["car"], True),
              ("car\\0002_2409432367.jpg", ["car", "sky"], False),
              ("sky\\0001_435418521.jpg", ["sky"], True),
              ("sky\\0002_2290553547.jpg", [], True),
              ("animal\\0003_2305553412.jpg", ["animal", "beach"], True)],
    "test": [("beach\\0003_474318512.jpg", ["beach"], True),
             ("car\\0003_2131324543.jpg", ["car", "sky"], True),
             ("animal\\0004_1457632381.jpg", ["animal"], True),
             ("sky\\0003_2453245315.jpg", ["sky", "beach"], True),
             ("car\\0004_341234120.jpg", ["car"], True)],
}
SUFFIX = {"train": "Train", "test": "Test"}


def write_nuswide_tree(root, images=None):
    """Concepts81.txt, ImageList/, Groundtruth/TrainTestLabels/ and Flickr/ as the official
    downloads have them: CRLF lines, backslashes in the lists, `0` / `1` lines per image."""
    images = images or IMAGES
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "ImageList"))
    os.makedirs(os.path.join(root, "Groundtruth", "TrainTestLabels"))
    with open(os.path.join(root, "Concepts81.txt"), "w", newline="") as f:
        f.write("".join(f"{concept}\r\n" for concept in CONCEPTS))
    for split, entries in images.items():
        with open(os.path.join(root, "ImageList", f"{SUFFIX[split]}Imagelist.txt"), "w", newline="") as f:
            f.write("".join(f"{entry}\r\n" for entry, _, _ in entries))
        for concept in CONCEPTS:
            path = os.path.join(root, "Groundtruth", "TrainTestLabels", f"Labels_{concept}_{SUFFIX[split]}.txt")
            with open(path, "w", newline="") as f:
                f.write("".join(f"{int(concept in names)}\r\n" for _, names, _ in entries))
        for entry, names, on_disk in entries:
            if on_disk:
                path = os.path.join(root, "Flickr", *entry.split("\\"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                class_image([CONCEPTS.index(name) for name in names], 48, rng).save(path)


def expected(split):
    """The ids (paths below Flickr/) and 1 / -1 rows of the images on disk, from IMAGES."""
    kept = [(entry, names) for entry, names, on_disk in IMAGES[split] if on_disk]
    return ([entry.replace("\\", "/") for entry, _ in kept],
            np.array([[1 if concept in names else -1 for concept in CONCEPTS] for _, names in kept]))


@pytest.fixture
def nuswide_root(tmp_path):
    root = str(tmp_path / "nuswide")
    write_nuswide_tree(root)
    return root


def test_labels_are_the_ground_truth_files_in_the_order_of_concepts81(nuswide_root):
    for split in ("train", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = NUSWIDE(nuswide_root, split)
        ids, labels = expected(split)
        assert dataset.classes == CONCEPTS and dataset.split == split
        assert dataset.image_ids == ids and len(dataset) == len(ids)
        np.testing.assert_array_equal(dataset.labels, labels)
        assert dataset.partial is False and dataset.labelled and dataset.benchmark is None


def test_an_item_is_the_image_its_labels_and_its_path_below_flickr(nuswide_root):
    dataset = NUSWIDE(nuswide_root, "test")
    image, labels, image_id = dataset[3]
    assert image_id == "sky/0003_2453245315.jpg"
    assert isinstance(image, Image.Image) and image.size == (48, 48)
    assert labels.dtype == torch.int64 and labels.tolist() == [-1, 1, -1, 1]  # beach, sky


def test_listed_images_missing_from_flickr_are_left_out_with_one_warning_that_counts_them(nuswide_root):
    with pytest.warns(UserWarning) as caught:
        dataset = NUSWIDE(nuswide_root, "train")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "NUS-WIDE train: 7 of the 9 images of" in message and "are in" in message
    assert "the 2 missing (e.g. beach/0002_331528374.jpg, car/0002_2409432367.jpg) are left out" in message
    assert len(dataset) == 7


def test_a_split_without_any_of_its_images_is_an_error(tmp_path):
    root = str(tmp_path / "nuswide")
    write_nuswide_tree(root, {split: [(entry, names, False) for entry, names, _ in entries]
                              for split, entries in IMAGES.items()})
    with pytest.raises(DSDLError, match="none of the 5 images of .*TestImagelist.txt is in"):
        NUSWIDE(root, "test")


def remove(root, *path):
    os.remove(os.path.join(root, *path))


def rewrite(root, path, lines):
    with open(os.path.join(root, *path), "w", newline="") as f:
        f.write("".join(f"{line}\r\n" for line in lines))


LABELS = ("Groundtruth", "TrainTestLabels")
MISTAKES = {
    "no folder": (lambda root: os.rename(root, root + "-elsewhere"),
                  "NUS-WIDE not found: {root} is not a folder"),
    "no concept list": (lambda root: remove(root, "Concepts81.txt"), "Concepts81.txt not found"),
    "no image list": (lambda root: remove(root, "ImageList", "TestImagelist.txt"),
                      "TestImagelist.txt not found"),
    "no label files": (lambda root: [remove(root, *LABELS, f"Labels_{c}_Train.txt") for c in CONCEPTS[1:]],
                       "3 of the 4 label files are missing from"),
    "a label short": (lambda root: rewrite(root, (*LABELS, "Labels_car_Train.txt"), ["0"] * 8),
                      "Labels_car_Train.txt has 8 labels but"),
    "not 0 or 1": (lambda root: rewrite(root, (*LABELS, "Labels_sky_Test.txt"), ["1", "0", "2", "1", "0"]),
                   "Labels_sky_Test.txt, line 3: expected 0 or 1, got '2'"),
}


@pytest.mark.filterwarnings("ignore:NUS-WIDE train")  # the images missing from Flickr
@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_input_mistake_is_one_error_line_naming_the_file(mistake, nuswide_root, tmp_path, capsys):
    make, said = MISTAKES[mistake]
    make(nuswide_root)
    code = call_main(main_nuswide.main, [nuswide_root, *SMALL, "--model", "baseline",
                                         "--checkpoint-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and errors == err[-1:]
    assert said.format(root=nuswide_root) in errors[0] and nuswide_root in errors[0]


def test_main_nuswide_trains_one_epoch_and_logs_the_test_metrics(nuswide_root, tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="7 of the 9 images"):
        code = call_main(main_nuswide.main, [nuswide_root, *SMALL, "-b", "4", "--epochs", "1",
                                             "--model", "baseline", "--checkpoint-dir", str(out)])
    assert code == 0
    best = torch.load(out / checkpoints.BEST, weights_only=True)
    assert best["classes"] == CONCEPTS
    assert best["args"]["lambd"] == 0.1 and best["args"]["beta"] == 1e-6  # COCO's
    (record,) = read_metrics(out / runs.METRICS_LOG)
    assert (record["epoch"], record["split"]) == (1, "test") and np.isfinite(record["mAP"])


def test_a_list_entry_is_read_as_its_path_below_flickr_whatever_its_prefix():
    assert relative_image_path("actor\\0001_2124494179.jpg") == "actor/0001_2124494179.jpg"
    assert relative_image_path("C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg") == \
        "actor/0001_2124494179.jpg"
