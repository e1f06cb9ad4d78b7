"""The authors' released checkpoints through -e --resume, and the paper's tables."""
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import checkpoints
import options
import report
from report import read_metrics
import main_coco
import main_voc2007
import main_voc2012
from coco import COCO2014
from models import DSDL
from test_coco import CLASSES as COCO_TINY_CLASSES, write_coco_tree
from test_voc2012 import write_voc2012_tree
from report import PAPER_RESULTS, results_table
from util import compute_metrics, eval_transform
from voc import VOC2007, VOC2012, VOC_CLASSES

RELEASE_SMALL = ["--no-pretrained", "--image-size", "64", "-j", "0", "-b", "8", "--device", "cpu"]
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def release_checkpoint(path, arch="resnet18", feature_dim=None, counters=True):
    """A checkpoint laid out as the authors released theirs (spec section 9).

    The trunk is a torchvision ResNet whose modules are numbered as in the release's
    `features` Sequential; BatchNorm statistics are made non-trivial so that a load that
    missed them would show. Returns (that ResNet, W1, W2).
    """
    torch.manual_seed(0)
    resnet = torchvision.models.get_model(arch)
    for module in resnet.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    weights = {}
    for index, name in enumerate(TRUNK):
        for key, value in getattr(resnet, name).state_dict().items():
            if counters or not key.endswith("num_batches_tracked"):
                weights[f"features.{index}.{key}"] = value
    W1 = torch.empty(300, 1024).uniform_(-1 / 32, 1 / 32)
    W2 = torch.empty(1024, feature_dim or resnet.fc.in_features).uniform_(-1 / 32, 1 / 32)
    weights.update(W1=W1, W2=W2)
    torch.save({"epoch": 17, "arch": None, "best_score": torch.tensor(93.9), "state_dict": weights}, path)
    return resnet, W1, W2


def scores_by_hand(resnet, W1, W2, embeddings, lambd, dataset, arch="resnet18"):
    """The scores of `dataset` with the same weights copied into the model module by module."""
    model = DSDL(len(dataset.classes), np.load(embeddings), lambd, arch, pretrained=False)
    for index, name in enumerate(TRUNK):
        model.features[index].load_state_dict(getattr(resnet, name).state_dict())
    with torch.no_grad():
        model.W1.copy_(W1)
        model.W2.copy_(W2)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return model.eval()(images).scores.numpy()


def evaluate_cli(module, monkeypatch, *argv):
    """`main_*.py ... -e --resume FILE` in this process; returns the exit code (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *argv])
    try:
        module.main()
    except SystemExit as exit:
        return exit.code
    return 0


def assert_logged_metrics_are(log, expected):
    record = read_metrics(log)[-1]
    assert record["epoch"] == 17
    for name in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "OF1_top3"):
        assert record[name] == pytest.approx(expected[name], abs=1e-6), name
    ours = [np.nan if v is None else v for v in record["AP"]]
    np.testing.assert_allclose(ours, expected["AP"], atol=1e-6)
    return record


def test_release_checkpoint_evaluates_voc2007_as_the_weights_loaded_by_hand(voc_root, random_embeddings,
                                                                            tmp_path, monkeypatch, capsys):
    root, _ = voc_root
    checkpoint, out = str(tmp_path / "voc2007.pth.tar"), tmp_path / "out"
    resnet, W1, W2 = release_checkpoint(checkpoint)
    code = evaluate_cli(main_voc2007, monkeypatch, root, *RELEASE_SMALL, "--arch", "resnet18", "-e", "--resume",
                        checkpoint, "--embeddings", random_embeddings, "--checkpoint-dir", str(out))
    assert code == 0
    test_set = VOC2007(root, "test", eval_transform(64), download=False)
    expected = compute_metrics(scores_by_hand(resnet, W1, W2, random_embeddings, 10.0, test_set),
                               test_set.labels)
    assert_logged_metrics_are(out / "eval_test.jsonl", expected)
    with open(out / "eval_test.md") as f:
        table = f.read()
    assert table in capsys.readouterr().out
    assert "| | aero | bike |" in table and "DSDL paper" not in table  # resnet18: not the paper's setting


def test_release_checkpoint_evaluates_voc2012_val_and_submits_test_scores(tmp_path, monkeypatch,
                                                                          random_embeddings):
    root = str(tmp_path / "voc2012")
    written = write_voc2012_tree(root)
    checkpoint, out = str(tmp_path / "voc2012.pth.tar"), tmp_path / "out"
    resnet, W1, W2 = release_checkpoint(checkpoint)
    code = evaluate_cli(main_voc2012, monkeypatch, root, *RELEASE_SMALL, "--arch", "resnet18", "-e", "--resume",
                        checkpoint, "--embeddings", random_embeddings, "--checkpoint-dir", str(out))
    assert code == 0
    val = VOC2012(root, "val", eval_transform(64), download=False)
    expected = compute_metrics(scores_by_hand(resnet, W1, W2, random_embeddings, 10.0, val), val.labels)
    assert read_metrics(out / "eval_val.jsonl")[-1]["split"] == "val"
    assert_logged_metrics_are(out / "eval_val.jsonl", expected)

    test = VOC2012(root, "test", eval_transform(64), download=False)
    scores = scores_by_hand(resnet, W1, W2, random_embeddings, 10.0, test)
    with tarfile.open(out / "eval_submission" / "results.tar.gz") as tar:  # -e writes beside
        for c, name in enumerate(VOC_CLASSES):
            member = tar.extractfile(f"results/VOC2012/Main/comp1_cls_test_{name}.txt")
            rows = [line.split() for line in member.read().decode().splitlines()]
            assert [row[0] for row in rows] == written["test"][0]
            np.testing.assert_allclose([float(row[1]) for row in rows], scores[:, c], atol=1e-4)


def test_release_checkpoint_evaluates_coco_as_the_weights_loaded_by_hand(tmp_path, monkeypatch):
    root = str(tmp_path / "coco")
    write_coco_tree(root)
    embeddings = str(tmp_path / "coco_embeddings.npy")
    np.save(embeddings, np.random.default_rng(3).standard_normal((len(COCO_TINY_CLASSES), 300)).astype(np.float32))
    checkpoint, out = str(tmp_path / "coco.pth.tar"), tmp_path / "out"
    resnet, W1, W2 = release_checkpoint(checkpoint)
    code = evaluate_cli(main_coco, monkeypatch, root, *RELEASE_SMALL, "--arch", "resnet18", "-e", "--resume",
                        checkpoint, "--embeddings", embeddings, "--checkpoint-dir", str(out))
    assert code == 0
    val = COCO2014(root, "val", eval_transform(64), download=False)
    expected = compute_metrics(scores_by_hand(resnet, W1, W2, embeddings, 0.1, val), val.labels)
    assert_logged_metrics_are(out / "eval_val.jsonl", expected)


def test_release_checkpoint_without_batchnorm_counters_loads_the_same_weights(tmp_path, random_embeddings):
    with_counters, without = str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth.tar")
    release_checkpoint(with_counters)
    release_checkpoint(without, counters=False)  # as saved by PyTorch before 0.4.1
    models = []
    for path in (with_counters, without):
        model = DSDL(20, np.load(random_embeddings), 10.0, "resnet18", pretrained=False)
        checkpoints.load_weights(model, checkpoints.load_checkpoint(path), path)
        models.append(model.state_dict())
    for key, value in models[0].items():
        assert torch.equal(value, models[1][key]), key


def test_release_checkpoint_for_another_feature_size_says_so_and_stops(voc_root, random_embeddings, tmp_path,
                                                                       monkeypatch, capsys):
    root, _ = voc_root
    checkpoint = str(tmp_path / "wrong.pth.tar")
    release_checkpoint(checkpoint, feature_dim=2048)  # a ResNet-101 dictionary on a ResNet-18 trunk
    code = evaluate_cli(main_voc2007, monkeypatch, root, *RELEASE_SMALL, "--arch", "resnet18", "-e", "--resume",
                        checkpoint, "--embeddings", random_embeddings, "--checkpoint-dir", str(tmp_path / "out"))
    error = capsys.readouterr().err
    assert code == 1
    assert "2048" in error and "512" in error and "feature size" in error
    assert not os.path.exists(tmp_path / "out" / "eval_test.jsonl")


def test_coco_checkpoint_on_voc_says_the_class_counts_and_stops(voc_root, random_embeddings, tmp_path,
                                                                monkeypatch, capsys):
    root, _ = voc_root
    model = DSDL(len(COCO_TINY_CLASSES), torch.randn(len(COCO_TINY_CLASSES), 300), 0.1, "resnet18",
                 pretrained=False)
    checkpoint = str(tmp_path / "coco_ours.pth.tar")
    torch.save({"model": model.state_dict(), "epoch": 1, "classes": COCO_TINY_CLASSES,
                "semantics": model.semantics}, checkpoint)
    code = evaluate_cli(main_voc2007, monkeypatch, root, *RELEASE_SMALL, "--arch", "resnet18", "-e", "--resume",
                        checkpoint, "--embeddings", random_embeddings, "--checkpoint-dir", str(tmp_path / "out"))
    error = capsys.readouterr().err
    assert code == 1
    assert f"trained on {len(COCO_TINY_CLASSES)} classes" in error and "this dataset has 20" in error


def test_paper_row_and_difference_follow_ours_in_the_papers_setting(voc_root, tmp_path, capsys):
    root, _ = voc_root
    test_set = VOC2007(root, "test", download=False)
    scores = np.random.default_rng(4).standard_normal(test_set.labels.shape)
    metrics = compute_metrics(scores, test_set.labels)
    assert main_voc2007.get_args_parser().parse_args([root]).arch is None  # the checkpoint's, else:
    assert options.PAPER_ARCH == "resnet101"  # the paper's backbone
    report.report_evaluation(metrics, test_set.classes, "title", "voc2007", ("dsdl", "resnet101", 448, "test"), {"epoch": 3},
                             str(tmp_path / "log.jsonl"), str(tmp_path / "results_test.md"))
    with open(tmp_path / "results_test.md") as f:
        lines = f.read().splitlines()
    assert "\n".join(lines) in capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [np.nan if v.strip() == "–" else float(v) for v in line.split("|")[2:-1]]
            for line in lines if line.startswith("| ") and not line.startswith("| |")}
    assert list(rows) == ["ours", "DSDL paper", "difference"]
    paper = PAPER_RESULTS["voc2007"]["AP"] + [94.4]
    assert rows["DSDL paper"] == paper
    ours = np.array(metrics["AP"] + [metrics["mAP"]])
    np.testing.assert_allclose(rows["ours"], np.round(ours, 1))
    np.testing.assert_allclose(rows["difference"], ours - paper, atol=0.051)
    assert "VOC 2007 test" in lines[-1]


def test_table_lays_out_coco_as_the_paper_and_notes_the_papers_setting():
    names = ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
    metrics = {name: 50.0 + i for i, name in enumerate(names)}
    metrics.update({name + "_top3": 60.0 + i for i, name in enumerate(names[1:])})
    metrics["AP"] = [50.0] * 80
    table = results_table(metrics, [f"c{i}" for i in range(80)], "coco2014", ("dsdl", "resnet101", 448, "val"), "title")
    lines = table.splitlines()
    assert lines[0] == "title"
    assert lines[2] == ("| | mAP | CP | CR | CF1 | OP | OR | OF1 | top-3 CP | top-3 CR | top-3 CF1 | "
                        "top-3 OP | top-3 OR | top-3 OF1 |")
    assert lines[4] == "| ours | " + " | ".join(
        f"{v:.1f}" for v in [50, 51, 52, 53, 54, 55, 56, 60, 61, 62, 63, 64, 65]) + " |"
    assert lines[5] == "| DSDL paper | 81.7 | 84.1 | 70.4 | 76.7 | 85.1 | 73.9 | 79.1 | 88.1 | 62.9 | 73.4 | 89.6 | 65.3 | 75.6 |"
    assert lines[6].startswith("| difference | -31.7 | -33.1 | -18.4 |")
    assert "COCO 2014 val" in lines[-1]
    # The VOC 2012 paper row is the official test server's: the note says so.
    voc = results_table({"AP": [90.0] * 20, "mAP": 90.0}, list(VOC_CLASSES), "voc2012", ("dsdl", "resnet101", 448, "val"))
    assert "VOC 2012 test, scored by the evaluation server" in voc
    # our val next to the paper's test-server numbers: the paper's row, but no difference
    assert "| DSDL paper |" in voc and "| difference |" not in voc and "Ours is on val" in voc
    assert "| DSDL paper | 99.4 | 95.3 |" in voc


def test_the_papers_row_is_shown_only_in_the_papers_setting():
    metrics = {"AP": [90.0] * 20, "mAP": 90.0}
    for setting in (("dsdl", "resnet18", 448, "test"), ("dsdl", "resnet101", 224, "test"),
                    (None, None, None, None)):
        assert "DSDL paper" not in results_table(metrics, list(VOC_CLASSES), "voc2007", setting)
    assert "| difference |" in results_table(metrics, list(VOC_CLASSES), "voc2007", ("dsdl", "resnet101", 448, "test"))
