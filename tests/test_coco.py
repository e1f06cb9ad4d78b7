"""MS-COCO 2014: labels from instance annotations, class order, dropped images, the cache, the CLI."""
import json
import os
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import coco
import downloads
import checkpoints
import runs
from report import read_metrics
import main_coco
from coco import COCO2014
from conftest import SMALL, class_image
from models import DSDL
from downloads import md5sum
from util import DSDLError, compute_metrics, eval_transform

# Category ids deliberately out of name order: the class index must follow the names.
CATEGORIES = {"zebra": 1, "person": 2, "dog": 4, "bus": 7, "apple": 13}
CLASSES = ["apple", "bus", "dog", "person", "zebra"]
# Per image, the categories of its instance annotations: repeats and an image without any.
OBJECTS = {
    "train": [["person"], ["dog", "dog", "zebra"], [], ["apple", "bus"], ["bus"], ["zebra", "person"],
              ["apple"], ["dog", "person", "person"], ["bus", "zebra"], ["apple", "dog"],
              ["person"], ["zebra"], ["bus", "apple", "apple"], ["dog"], ["person", "bus"], ["zebra", "apple"]],
    "val": [["zebra"], [], ["person", "person"], ["apple", "bus"], ["dog", "zebra"], ["bus"],
            ["apple"], ["person", "dog"], ["zebra", "bus", "zebra"]],
}


def image_id(split, index):
    """Sparse ids, as COCO's are, different in each split."""
    return (1000 if split == "train" else 5000) + 7 * index


def write_coco_tree(root, objects=None, size=48, extra_annotations=0):
    """`root/{train,val}2014/*.jpg` and `root/annotations/instances_{train,val}2014.json`.

    Each image paints the cells of its classes (conftest.class_image), so that they are learnable.
    `extra_annotations` adds that many polygon-heavy duplicate annotations to the train file.
    """
    objects = objects or OBJECTS
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, per_image in objects.items():
        os.makedirs(os.path.join(root, f"{split}2014"), exist_ok=True)
        images, annotations = [], []
        for index, names in enumerate(per_image):
            number = image_id(split, index)
            file_name = f"COCO_{split}2014_{number:012d}.jpg"
            class_image(sorted({CLASSES.index(n) for n in names}), size, rng).save(
                os.path.join(root, f"{split}2014", file_name))
            images.append({"id": number, "file_name": file_name, "width": size, "height": size})
            for name in names:
                # a crowd annotation names its category like any other (spec section 5)
                annotations.append({"id": len(annotations) + 1, "image_id": number,
                                    "category_id": CATEGORIES[name], "iscrowd": int(index == 1),
                                    "bbox": [1.0, 2.0, 10.0, 12.0], "area": 120.0,
                                    "segmentation": [[1.0, 2.0, 11.0, 2.0, 11.0, 14.0]]})
        if split == "train":
            for k in range(extra_annotations):
                annotations.append({**annotations[k % len(annotations)], "id": len(annotations) + 1,
                                    "segmentation": [list(np.arange(200, dtype=float))]})
        with open(os.path.join(root, "annotations", f"instances_{split}2014.json"), "w") as f:
            json.dump({"info": {"year": 2014}, "licenses": [], "images": images,
                       "annotations": annotations,
                       "categories": [{"id": i, "name": n, "supercategory": "thing"}
                                      for n, i in CATEGORIES.items()]}, f)


def expected_labels(split, objects=None):
    """Hand-built: ids of the annotated images and their 1 / -1 vectors in sorted-name order."""
    objects = (objects or OBJECTS)[split]
    ids = [image_id(split, i) for i, names in enumerate(objects) if names]
    labels = [[1 if name in names else -1 for name in CLASSES] for names in objects if names]
    return ids, np.array(labels)


@pytest.fixture
def coco_root(tmp_path):
    root = str(tmp_path / "coco")
    write_coco_tree(root)
    return root


@pytest.fixture
def coco_embeddings(tmp_path):
    path = tmp_path / "coco_embeddings.npy"
    np.save(path, np.random.default_rng(2).standard_normal((len(CLASSES), 300)).astype(np.float32))
    return str(path)


def test_coco_classes_are_the_category_names_sorted_not_the_id_order(coco_root):
    dataset = COCO2014(coco_root, "val", download=False)
    assert dataset.classes == CLASSES


def test_coco_labels_are_the_annotated_categories_and_unannotated_images_are_dropped(coco_root):
    for split in ("train", "val"):
        dataset = COCO2014(coco_root, split, download=False)
        ids, labels = expected_labels(split)
        assert dataset.image_ids.tolist() == ids
        assert len(dataset) == len(OBJECTS[split]) - 1  # the image without annotation is gone
        np.testing.assert_array_equal(dataset.labels, labels)


def test_coco_item_is_image_labels_and_coco_id(coco_root):
    dataset = COCO2014(coco_root, "val", download=False)
    ids, labels = expected_labels("val")
    image, label, number = dataset[7]  # zebra, bus, zebra: a repeated category counts once
    assert number == ids[7] == image_id("val", 8) and isinstance(number, int)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert label.dtype == torch.int64 and label.tolist() == [-1, 1, -1, -1, 1] == labels[7].tolist()


def test_coco_labels_are_cached_and_a_second_start_skips_the_json(coco_root, monkeypatch):
    first = COCO2014(coco_root, "train", download=False)
    cache = os.path.join(coco_root, "annotations", "instances_train2014.labels.npz")
    assert os.path.isfile(cache)

    def parse_again(path):
        raise AssertionError(f"{path} was parsed again although the cache is valid")

    monkeypatch.setattr(coco, "read_instance_labels", parse_again)
    second = COCO2014(coco_root, "train", download=False)
    assert second.classes == first.classes == CLASSES
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.image_ids, first.image_ids)
    assert second[4][2] == first[4][2] and second[4][1].tolist() == first[4][1].tolist()
    # plain str, not numpy.str_: the class names go into checkpoints read with weights_only=True
    assert all(type(name) is str for name in second.classes)


def test_main_coco_resumes_a_checkpoint_written_after_the_labels_came_from_the_cache(
        coco_root, coco_embeddings, tmp_path, monkeypatch):
    out = tmp_path / "ck"
    common = [coco_root, *SMALL, "--embeddings", coco_embeddings, "--checkpoint-dir", str(out)]
    for epochs in ("1", "2"):  # the second start reads the label cache and writes a checkpoint
        monkeypatch.setattr(sys, "argv", ["main_coco.py", *common, "--epochs", epochs,
                                          *(["--resume", str(out / checkpoints.CHECKPOINT)] if epochs == "2" else [])])
        main_coco.main()
    checkpoint = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["classes"] == CLASSES


def test_coco_cache_is_rebuilt_when_the_annotations_change(coco_root):
    COCO2014(coco_root, "val", download=False)
    changed = {"train": OBJECTS["train"], "val": [["apple"]] + OBJECTS["val"][1:]}  # zebra -> apple
    write_coco_tree(coco_root, changed)
    dataset = COCO2014(coco_root, "val", download=False)
    ids, labels = expected_labels("val", changed)
    assert dataset.labels[0].tolist() == [1, -1, -1, -1, -1]
    np.testing.assert_array_equal(dataset.labels, labels)


def test_coco_unreadable_cache_is_rebuilt(coco_root):
    cache = os.path.join(coco_root, "annotations", "instances_val2014.labels.npz")
    with open(cache, "wb") as f:
        f.write(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable label cache"):
        dataset = COCO2014(coco_root, "val", download=False)
    np.testing.assert_array_equal(dataset.labels, expected_labels("val")[1])


def test_coco_annotations_are_not_kept_in_memory_after_parsing(coco_root):
    write_coco_tree(coco_root, extra_annotations=2500)  # a train json of a few MB
    size = os.path.getsize(os.path.join(coco_root, "annotations", "instances_train2014.json"))
    assert size > 2.5e6
    tracemalloc.start()
    try:
        dataset = COCO2014(coco_root, "train", download=False)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > size  # the json was parsed in memory ...
    assert kept < size / 20  # ... and let go of: only ids, file names and labels remain
    np.testing.assert_array_equal(dataset.labels, expected_labels("train")[1])


def test_coco_missing_data_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DSDLError, match="instances_val2014.json not found"):
        COCO2014(str(tmp_path), "val", download=False)


def test_coco_extracts_the_official_zips_found_in_root(tmp_path, monkeypatch):
    source = str(tmp_path / "source")
    write_coco_tree(source)
    root = tmp_path / "root"
    root.mkdir()
    zips = {"annotations_trainval2014.zip": ["annotations"], "val2014.zip": ["val2014"]}
    for archive, folders in zips.items():
        with zipfile.ZipFile(root / archive, "w") as zf:
            for folder in folders:
                for name in sorted(os.listdir(os.path.join(source, folder))):
                    zf.write(os.path.join(source, folder, name), f"{folder}/{name}")
    archives = dict(coco.COCO2014_ARCHIVES)
    for archive in zips:  # the checksums of these stand-ins instead of the official ones
        archives[archive] = (archives[archive][0], md5sum(str(root / archive)))
    monkeypatch.setattr(coco, "COCO2014_ARCHIVES", archives)

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded although verified archives are present")

    monkeypatch.setattr(downloads, "download", no_network)
    dataset = COCO2014(str(root), "val")
    assert os.path.isdir(root / "val2014") and not os.path.exists(root / "train2014")
    np.testing.assert_array_equal(dataset.labels, expected_labels("val")[1])
    assert dataset[0][0].size == (48, 48)

    # An extraction cut short (its staging folder is still there, images are missing) is redone.
    first = sorted(os.listdir(root / "val2014"))[0]
    os.remove(root / "val2014" / first)
    os.makedirs(root / ".extracting-val2014.zip" / "val2014")
    COCO2014(str(root), "val")
    assert os.path.isfile(root / "val2014" / first)
    assert not os.path.exists(root / ".extracting-val2014.zip")


def test_main_coco_trains_one_epoch_with_the_coco_defaults(coco_root, coco_embeddings, tmp_path, monkeypatch,
                                                           capsys):
    out = tmp_path / "ck"
    monkeypatch.setattr(sys, "argv", ["main_coco.py", coco_root, *SMALL, "--epochs", "1",
                                      "--embeddings", coco_embeddings, "--checkpoint-dir", str(out)])
    main_coco.main()
    best = torch.load(out / checkpoints.BEST, weights_only=True)
    assert best["args"]["lambd"] == 0.1 and best["args"]["beta"] == 1e-6  # spec section 3
    assert best["classes"] == CLASSES
    record = read_metrics(out / runs.METRICS_LOG)[-1]
    assert (record["epoch"], record["split"]) == (1, "val")

    # The logged metrics are those of the saved model's scores on val2014.
    model = DSDL(len(CLASSES), np.load(coco_embeddings), 0.1, "resnet18", pretrained=False)
    model.load_state_dict(best["model"])
    val = COCO2014(coco_root, "val", eval_transform(64), download=False)
    with torch.no_grad():
        scores = model.eval()(torch.stack([val[i][0] for i in range(len(val))])).scores.numpy()
    expected = compute_metrics(scores, val.labels)
    for name in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "OF1_top3"):
        assert record[name] == pytest.approx(expected[name], abs=1e-6), name

    # The paper's COCO layout, saved next to the checkpoint.
    with open(out / "results_val.md") as f:
        table = f.read()
    assert "| | mAP | CP | CR | CF1 | OP | OR | OF1 | top-3 CP |" in table
    assert f"| ours | {expected['mAP']:.1f} | {expected['CP']:.1f} |" in table
    assert table in capsys.readouterr().out


def test_the_80_coco_names_for_release_checkpoints_are_sorted_and_unique():
    assert len(coco.COCO_CLASSES) == len(set(coco.COCO_CLASSES)) == 80
    assert coco.COCO_CLASSES == sorted(coco.COCO_CLASSES)
    assert {"person", "dining table", "tv", "hair drier", "toothbrush"} <= set(coco.COCO_CLASSES)
