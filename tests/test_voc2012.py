"""VOC 2012: labelled train / val, the unlabelled test split, the evaluation-server files, the CLI."""
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import checkpoints
import runs
import engine
import main_voc2012
import options
from conftest import SMALL, write_voc_tree
from models import DSDL, DSDLLoss
from util import DSDLError, eval_transform
from voc import VOC2012, VOC_CLASSES, write_submission



def write_voc2012_tree(root, splits=None):
    """A VOCdevkit/VOC2012 tree whose test split, as in the official archive, has no labels:
    only `ImageSets/Main/test.txt` and the JPEGs. Returns {split: (ids, flags)}; the test flags
    are the ones the organisers would keep to themselves."""
    written = write_voc_tree(root, year="2012", splits=splits or {"train": 16, "val": 8, "test": 8})
    main_folder = os.path.join(root, "VOCdevkit", "VOC2012", "ImageSets", "Main")
    for name in VOC_CLASSES:
        os.remove(os.path.join(main_folder, f"{name}_test.txt"))
    return written


def run_cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["main_voc2012.py", *argv])
    main_voc2012.main()


@pytest.fixture
def voc2012_root(tmp_path):
    root = str(tmp_path / "voc2012")
    return root, write_voc2012_tree(root)


def test_voc2012_labelled_splits_come_from_the_split_files(voc2012_root):
    root, written = voc2012_root
    for split in ("train", "val"):
        ids, flags = written[split]
        dataset = VOC2012(root, split, download=False)
        assert dataset.labelled and dataset.classes == list(VOC_CLASSES)
        assert dataset.folder.endswith(os.path.join("VOCdevkit", "VOC2012"))
        assert dataset.image_ids == ids
        np.testing.assert_array_equal(dataset.labels, flags)
        image, labels, image_id = dataset[2]
        assert image_id == ids[2] and isinstance(image, Image.Image)
        assert labels.tolist() == flags[2].tolist()


def test_voc2012_trainval_is_train_and_val_together(tmp_path):
    root = str(tmp_path / "voc")
    written = write_voc_tree(root, year="2012", splits={"train": 5, "val": 3})
    # The official trainval files list train's images, then val's.
    main_folder = os.path.join(root, "VOCdevkit", "VOC2012", "ImageSets", "Main")
    for c, name in enumerate(VOC_CLASSES):
        with open(os.path.join(main_folder, f"{name}_trainval.txt"), "w") as f:
            for split in ("train", "val"):
                ids, flags = written[split]
                f.writelines(f"{i} {flags[row, c]:2d}\n" for row, i in enumerate(ids))
    dataset = VOC2012(root, "trainval", download=False)
    assert dataset.image_ids == written["train"][0] + written["val"][0]
    np.testing.assert_array_equal(dataset.labels, np.concatenate([written["train"][1], written["val"][1]]))


def test_voc2012_test_ids_come_from_test_txt_and_labels_are_unknown_not_negative(voc2012_root):
    root, written = voc2012_root
    ids = written["test"][0]
    dataset = VOC2012(root, "test", download=False)
    assert not dataset.labelled
    assert dataset.image_ids == ids and len(dataset) == 8
    # Unknown is 0, the flag no metric ranks; never -1, which would claim the class is absent.
    assert dataset.labels.shape == (8, 20) and not dataset.labels.any()
    image, labels, image_id = dataset[5]
    assert image_id == ids[5] and image.size == (64, 64) and labels.tolist() == [0] * 20


def test_voc2012_missing_test_split_offline_is_a_clear_error(tmp_path):
    root = str(tmp_path / "voc")
    write_voc_tree(root, year="2012", splits={"train": 2})
    with pytest.raises(DSDLError, match="VOC 2012 test not found"):
        VOC2012(root, "test", download=False)


def test_an_unlabelled_split_is_scored_without_loss_or_metrics(voc2012_root, random_embeddings):
    root, _ = voc2012_root
    dataset = VOC2012(root, "test", eval_transform(64), download=False)
    torch.manual_seed(0)
    model = DSDL(20, np.load(random_embeddings), 10.0, "resnet18", pretrained=False).eval()
    result = engine.evaluate(model, DSDLLoss(10.0, 1e-4), DataLoader(dataset, batch_size=3),
                             torch.device("cpu"))
    with torch.no_grad():
        direct = model(torch.stack([dataset[i][0] for i in range(len(dataset))])).scores.numpy()
    np.testing.assert_allclose(result.scores, direct, rtol=1e-5, atol=1e-5)
    assert result.ids == dataset.image_ids
    assert np.isnan(result.loss)


def test_submission_has_one_line_per_test_image_per_class_at_the_servers_paths(tmp_path):
    ids = ["2008_000001", "2008_000007", "2010_004950"]
    scores = np.random.default_rng(0).standard_normal((3, 20)) * 5
    folder, archive = write_submission(scores, ids, list(VOC_CLASSES), str(tmp_path))
    assert folder == os.path.join(str(tmp_path), "results", "VOC2012", "Main")
    assert archive == os.path.join(str(tmp_path), "results.tar.gz")
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert sorted(members) == sorted(f"results/VOC2012/Main/comp1_cls_test_{name}.txt" for name in VOC_CLASSES)
    for c, name in enumerate(VOC_CLASSES):
        with open(os.path.join(folder, f"comp1_cls_test_{name}.txt")) as f:
            text = f.read()
        assert members[f"results/VOC2012/Main/comp1_cls_test_{name}.txt"] == text
        lines = [line.split() for line in text.splitlines()]
        assert [line[0] for line in lines] == ids
        np.testing.assert_allclose([float(line[1]) for line in lines], scores[:, c], atol=1e-6)


def test_main_voc2012_trains_on_train_selects_on_val_and_submits_test(voc2012_root, random_embeddings,
                                                                      tmp_path, monkeypatch, capsys):
    root, written = voc2012_root
    out = tmp_path / "ck"
    run_cli(monkeypatch, root, *SMALL, "--epochs", "1", "--embeddings", random_embeddings,
            "--checkpoint-dir", str(out))
    best = torch.load(out / checkpoints.BEST, weights_only=True)
    assert best["args"]["lambd"] == 10.0 and best["args"]["beta"] == 1.9e-4  # spec section 3
    with open(out / runs.METRICS_LOG) as f:
        records = [json.loads(line) for line in f]
    assert [(r["epoch"], r["split"]) for r in records] == [(1, "val")]

    # The submission holds the best model's scores of the 8 unlabelled test images.
    model = DSDL(20, np.load(random_embeddings), 10.0, "resnet18", pretrained=False)
    model.load_state_dict(best["model"])
    test_set = VOC2012(root, "test", eval_transform(64), download=False)
    with torch.no_grad():
        expected = model.eval()(torch.stack([test_set[i][0] for i in range(8)])).scores.numpy()
    with tarfile.open(out / "results.tar.gz") as tar:
        for c, name in enumerate(VOC_CLASSES):
            lines = tar.extractfile(f"results/VOC2012/Main/comp1_cls_test_{name}.txt").read().decode().split("\n")
            rows = [line.split() for line in lines if line]
            assert [row[0] for row in rows] == written["test"][0]
            np.testing.assert_allclose([float(row[1]) for row in rows], expected[:, c], atol=1e-4)
    printed = capsys.readouterr().out
    assert str(out / "results" / "VOC2012" / "Main") in printed and str(out / "results.tar.gz") in printed

    # -e of the last checkpoint in the same folder writes its own submission beside training's.
    submitted = (out / "results.tar.gz").read_bytes()
    run_cli(monkeypatch, root, "-e", "--resume", str(out / checkpoints.CHECKPOINT), "--embeddings",
            random_embeddings, "-j", "0", "--device", "cpu")
    assert (out / "results.tar.gz").read_bytes() == submitted
    assert tarfile.open(out / "eval_submission" / "results.tar.gz").getnames() == \
        tarfile.open(out / "results.tar.gz").getnames()


def test_main_voc2012_refuses_to_select_the_best_model_on_the_unlabelled_test(voc2012_root, random_embeddings,
                                                                              tmp_path):
    root, _ = voc2012_root
    args = options.parse_args(main_voc2012.get_args_parser(),
                              [root, *SMALL, "--embeddings", random_embeddings, "--checkpoint-dir", str(tmp_path)])
    with pytest.raises(DSDLError, match="no labels"):
        engine.run(args, lambda a: (VOC2012(root, "train"), VOC2012(root, "test")),
                   default_embeddings=None)
