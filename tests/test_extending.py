"""Building on the code without reading it: a new loss, a head that needs the training labels,
a fixed-size timm trunk, a new dataset layout and a new metric are each one place (models.py,
nothing, a module and an entry script, util.py), and training, -e, --resume, predict.py,
export.py, torch.hub and report.py follow with no other edit (docs/code_layout.md)."""
import importlib
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import engine
import export
import hubconf
import main_voc2007
import models
import predict
import report
from conftest import ROOT, SMALL, call_main, class_image
from test_predict import direct_input
from util import DSDLError

HAS_TIMM = importlib.util.find_spec("timm") is not None
RUNTIME = ["-j", "0", "-b", "8", "--device", "cpu"]  # -e and --resume: the rest is the checkpoint's


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --------------------------------------------------------------------------------------------
# Losses: a class (scores, targets, known=None) and a line in models.LOSSES
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(models.LOSSES))
def test_every_classification_loss_counts_only_the_known_pairs(name):
    """Partial labels reach every loss of the table as `known`: the unknown pairs' targets do
    not change it and get no gradient; with every pair known it is the loss without a mask."""
    loss = models.classification_loss({"cls_loss": name})
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(6, 5, generator=generator) < 0.4).double()
    known = torch.rand(6, 5, generator=generator) < 0.6
    value = loss(scores, targets, known)
    assert torch.equal(value, loss(scores, torch.where(known, targets, 1 - targets), known))
    value.backward()
    assert (scores.grad[~known] == 0).all() and (scores.grad[known] != 0).all()
    everything = torch.ones_like(known)
    torch.testing.assert_close(loss(scores, targets, everything), loss(scores, targets))


def test_the_focal_loss_is_lin_et_als_formula_averaged_and_bce_without_focusing():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    targets = (torch.rand(4, 6, generator=generator) < 0.5).double()
    x, y = scores.numpy(), targets.numpy()
    for gamma, alpha in ((2.0, 0.25), (1.0, 0.6), (0.5, -1.0)):
        p_true = np.where(y == 1, sigmoid(x), 1 - sigmoid(x))
        weight = np.where(y == 1, alpha, 1 - alpha) if alpha >= 0 else 1.0
        expected = np.mean(-weight * (1 - p_true) ** gamma * np.log(p_true))
        ours = models.FocalLoss(gamma, alpha)(scores, targets).item()
        assert ours == pytest.approx(expected, rel=1e-10)
    bce = np.mean(-(y * np.log(sigmoid(x)) + (1 - y) * np.log(1 - sigmoid(x))))
    assert models.FocalLoss(0.0, -1.0)(scores, targets).item() == pytest.approx(bce, rel=1e-10)


def test_a_loss_is_chosen_and_set_by_name_and_its_mistakes_are_one_line(capsys):
    loss = models.classification_loss({"cls_loss": "focal", "loss_args": {"gamma": 1, "alpha": 0.5}})
    assert isinstance(loss, models.FocalLoss) and (loss.gamma, loss.alpha) == (1, 0.5)
    # the release's options of a loss (--asl-*) are its settings too
    asl = models.classification_loss({"cls_loss": "asl", "asl_gamma_neg": 2.0, "asl_clip": 0.0})
    assert (asl.gamma_neg, asl.gamma_pos, asl.clip) == (2.0, 0.0, 0.0)
    for argv, message in (
            (["--cls-loss", "fcoal"], "unknown --cls-loss 'fcoal'; choose one of " + ", ".join(models.LOSSES)),
            (["--cls-loss", "focal", "--loss-args", "gama=2"],
             "--loss-args gama: --cls-loss focal takes gamma, alpha"),
            (["--model", "dsld"], "unknown --model 'dsld'; choose one of " + ", ".join(models.MODELS)),
            (["--model-args", "lamda=3"], "--model-args lamda: --model dsdl takes lambd, arch, pool"),
            (["--loss-args", "gamma"], "argument --loss-args: 'gamma' is not KEY=VALUE"),
            (["--cls-loss", "focal", "--loss-args", "gamma=two"],
             "--loss-args gamma='two': gamma is a number (default 2.0)"),
            (["--model-args", "lambd=1.0"], "--model-args lambd: it has its own option: use --lambd")):
        assert call_main(main_voc2007.main, ["no-such-folder", "--device", "cpu", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_evaluating_a_run_uses_the_loss_it_was_trained_with(voc_root, random_embeddings, tmp_path):
    root, _ = voc_root
    run = tmp_path / "focal"
    argv = [root, *SMALL, "--embeddings", random_embeddings, "--checkpoint-dir", str(run)]
    assert call_main(main_voc2007.main, [*argv, "--epochs", "1", "--cls-loss", "focal",
                                         "--loss-args", "gamma=1", "alpha=0.5"]) == 0
    trained = records(run / "metrics.jsonl")[-1]
    # -e of the last epoch's checkpoint, with no loss option: the run's own loss, recorded
    assert call_main(main_voc2007.main, [root, *RUNTIME, "-e", "--resume",
                                         str(run / "checkpoint.pth.tar")]) == 0
    evaluated = records(run / "eval_test.jsonl")[-1]
    assert evaluated["settings"]["cls_loss"] == "focal"
    assert evaluated["settings"]["loss_args"] == {"gamma": 1, "alpha": 0.5}
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert evaluated["mAP"] == pytest.approx(trained["mAP"], rel=1e-9)


# --------------------------------------------------------------------------------------------
# A head that needs the training labels: a class and a line in models.MODELS
# --------------------------------------------------------------------------------------------

class CoOccurrenceHead(models.PooledModel):
    """An ML-GCN-style head, written as a researcher would add it to models.py: linear scores
    mixed by the label co-occurrence of the training split, A = (F W^T + b) (I + M)^T, with
    M[i, j] = 1 where P(j | i) >= tau. M comes from the training labels, so it is a buffer."""

    name = "cooc"
    title = "co-occurrence head"
    needs_class_vectors = False

    def __init__(self, num_classes, train_labels, arch="resnet18", pretrained=False, pool="max",
                 image_size=None, tau=0.4):
        super().__init__(num_classes, arch, pretrained, pool, image_size)
        self.tau = tau
        self.fc = nn.Linear(self.feature_dim, num_classes)
        mixing = torch.zeros(num_classes, num_classes)
        if train_labels is not None:  # None when rebuilt from a checkpoint: the buffer loads
            present = torch.as_tensor(np.asarray(train_labels) >= 0, dtype=torch.float32)
            together = present.T @ present                                 # C x C counts
            mixing = (together / together.diagonal().clamp(min=1)[:, None] >= tau).float()
        self.register_buffer("mixing", mixing)

    def readout(self):
        mix = torch.eye(self.num_classes) + self.mixing                   # C x C
        return self.fc.weight.T @ mix.T, self.fc.bias @ mix.T              # d_f x C, C

    def forward(self, images):
        features = self.pooled(images)                                     # B x d_f
        projection, bias = self.readout()
        return models.BaselineOutput(features @ projection + bias, features)

    def head_parameters(self):
        return self.fc.parameters()


def cooccurrence_by_numpy(flags, tau):
    present = (flags >= 0).astype(np.float64)
    counts = present.T @ present
    return (counts / np.maximum(np.diag(counts), 1)[:, None] >= tau).astype(np.float32)


def test_a_head_built_from_the_training_labels_trains_evaluates_resumes_predicts_and_exports(
        voc_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(models.MODELS, "cooc", models.ModelEntry(CoOccurrenceHead, models.BaselineLoss))
    root, flags = voc_root
    run = tmp_path / "cooc"
    argv = [root, *SMALL, "--model", "cooc", "--checkpoint-dir", str(run)]
    assert call_main(main_voc2007.main, [*argv, "--epochs", "1", "--model-args", "tau=0.3"]) == 0
    checkpoint = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["model_settings"]["tau"] == 0.3
    expected = cooccurrence_by_numpy(flags["trainval"][1], 0.3)
    assert expected.sum() > len(expected)  # some classes occur together
    np.testing.assert_array_equal(checkpoint["model"]["mixing"].numpy(), expected)
    # -e and --resume rebuild it from the checkpoint alone
    assert call_main(main_voc2007.main, [root, *RUNTIME, "-e", "--resume", str(run / "checkpoint.pth.tar")]) == 0
    assert records(run / "eval_test.jsonl")[-1]["mAP"] == pytest.approx(
        records(run / "metrics.jsonl")[-1]["mAP"], rel=1e-9)
    assert call_main(main_voc2007.main, [root, *RUNTIME, "--resume", str(run / "checkpoint.pth.tar"),
                                         "--epochs", "2"]) == 0
    assert [r["epoch"] for r in records(run / "metrics.jsonl")] == [1, 2]
    resumed = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert torch.equal(resumed["model"]["mixing"], checkpoint["model"]["mixing"])
    # predict.py, export.py and torch.hub score an image as the model does
    model = models.from_checkpoint(resumed, "checkpoint").eval()
    image = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", "000030.jpg")
    with torch.no_grad():
        direct = model(direct_input(image, 64)).scores[0].numpy()
    out = tmp_path / "labels.json"
    assert predict.main(["--resume", str(run / "checkpoint.pth.tar"), image, "--threshold", "0",
                         "--json", str(out), "-j", "0"]) == 0
    scores = {p["label"]: p["score"] for p in json.loads(out.read_text())[0]["predictions"]}
    np.testing.assert_allclose([scores[name] for name in model.classes], direct, rtol=1e-4, atol=1e-5)
    assert export.main(["--resume", str(run / "checkpoint.pth.tar"), "--format", "torchscript",
                        "-o", str(tmp_path / "cooc.pt")]) == 0
    with torch.no_grad():
        exported = torch.jit.load(str(tmp_path / "cooc.pt"))(direct_input(image, 64))[0].numpy()
    np.testing.assert_allclose(exported, direct, rtol=1e-4, atol=1e-5)
    for entry in ("cooc", "load"):
        loaded = torch.hub.load(ROOT, entry, source="local", checkpoint=str(run / "checkpoint.pth.tar"))
        assert loaded.name == "cooc" and loaded.tau == 0.3
        with torch.no_grad():
            np.testing.assert_allclose(loaded(direct_input(image, 64)).scores[0].numpy(), direct,
                                       rtol=1e-5, atol=1e-6)
    with pytest.raises(DSDLError, match="holds a cooc model, not a dsdl"):
        hubconf.dsdl(str(run / "checkpoint.pth.tar"))
    capsys.readouterr()
    assert report.main([str(run)]) == 0
    assert "co-occurrence head" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Trunks: a timm model built for one input size, at another; too small an input
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TIMM, reason="timm is optional (requirements-timm.txt)")
def test_a_fixed_size_timm_model_is_built_for_the_runs_image_size(voc_root, random_embeddings,
                                                                  tmp_path, capsys):
    root, _ = voc_root
    run = tmp_path / "vit"
    argv = [root, *SMALL, "--arch", "timm/vit_tiny_patch16_224", "--embeddings", random_embeddings]
    assert call_main(main_voc2007.main, [*argv, "--epochs", "1", "--checkpoint-dir", str(run)]) == 0
    checkpoint = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["model"]["features.body.pos_embed"].shape[1] == 1 + (64 // 16) ** 2
    assert call_main(main_voc2007.main, [root, *RUNTIME, "-e", "--resume", str(run / "checkpoint.pth.tar")]) == 0
    assert records(run / "eval_test.jsonl")[-1]["mAP"] == pytest.approx(
        records(run / "metrics.jsonl")[-1]["mAP"], rel=1e-9)
    image = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", "000030.jpg")
    assert predict.main(["--resume", str(run / "checkpoint.pth.tar"), image, "-j", "0"]) == 0
    # rebuilt for another input size, its position embeddings do not fit: the error says so
    capsys.readouterr()
    assert call_main(main_voc2007.main, [root, *RUNTIME, "-e", "--image-size", "96", "--resume",
                                         str(run / "checkpoint.pth.tar")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pos_embed" in line and "pass the --image-size it was trained at" in line


@pytest.mark.parametrize("arch, size", [("alexnet", 32), ("vgg11", 16)])
def test_an_image_size_too_small_for_the_trunk_is_one_line_before_training(
        arch, size, voc_root, random_embeddings, tmp_path, capsys):
    root, _ = voc_root
    run = tmp_path / "small"
    assert call_main(main_voc2007.main, [root, *SMALL, "--arch", arch, "--image-size", str(size),
                                         "--embeddings", random_embeddings,
                                         "--checkpoint-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: --arch {arch} cannot take {size} x {size} images \(.*\); pass "
                        rf"a larger --image-size\n", err), err
    assert not run.exists()  # nothing was trained or written


# --------------------------------------------------------------------------------------------
# A new dataset layout: the module and the entry script of docs/code_layout.md, as written there
# --------------------------------------------------------------------------------------------

def code_of(name):
    """The code block of docs/code_layout.md that starts with `# <name>`."""
    with open(os.path.join(ROOT, "docs", "code_layout.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    return next(block for block in blocks if block.startswith(f"# {name}\n"))


def write_json_layout(root, classes, splits, rng):
    os.makedirs(os.path.join(root, "images"))
    listings = {}
    for split, count in splits.items():
        images = []
        for i in range(count):
            present = sorted(rng.choice(len(classes), size=rng.integers(1, 3), replace=False).tolist())
            name = f"{split}_{i}.jpg"
            class_image(present, 64, rng).save(os.path.join(root, "images", name), quality=95)
            images.append({"file": name, "labels": [classes[c] for c in present]})
        listings[split] = {"classes": classes, "images": images}
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(listings[split], f)
    return listings


def test_the_documented_dataset_layout_trains_evaluates_resumes_and_reports(tmp_path, monkeypatch,
                                                                          capsys):
    code = tmp_path / "code"
    code.mkdir()
    (code / "jsonlayout.py").write_text(code_of("jsonlayout.py"))
    (code / "main_jsonlayout.py").write_text(code_of("main_jsonlayout.py"))
    assert len(code_of("jsonlayout.py").splitlines()) + len(code_of("main_jsonlayout.py").splitlines()) <= 50
    monkeypatch.syspath_prepend(str(code))
    for name in ("jsonlayout", "main_jsonlayout"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    jsonlayout, entry = importlib.import_module("jsonlayout"), importlib.import_module("main_jsonlayout")
    classes = ["cat", "dog", "kite", "zebra"]
    data = str(tmp_path / "data")
    listings = write_json_layout(data, classes, {"train": 16, "test": 12}, np.random.default_rng(3))
    test = jsonlayout.JSONLayout(data, "test")
    for row, image in enumerate(listings["test"]["images"]):  # the labels, read back by hand
        assert {classes[c] for c in np.flatnonzero(test.labels[row] == 1)} == set(image["labels"])
        assert (test.labels[row] != 1).sum() == (test.labels[row] == -1).sum()
    vectors = str(tmp_path / "vectors.npy")
    np.save(vectors, np.random.default_rng(4).standard_normal((4, 300)).astype(np.float32))
    run = tmp_path / "run"
    argv = [data, *SMALL, "--embeddings", vectors, "--checkpoint-dir", str(run)]
    assert call_main(entry.main, [*argv, "--epochs", "1"]) == 0
    assert call_main(entry.main, [data, *RUNTIME, "-e", "--resume", str(run / "checkpoint.pth.tar")]) == 0
    assert records(run / "eval_test.jsonl")[-1]["mAP"] == pytest.approx(
        records(run / "metrics.jsonl")[-1]["mAP"], rel=1e-9)
    assert call_main(entry.main, [data, *RUNTIME, "--resume", str(run / "checkpoint.pth.tar"),
                                  "--epochs", "2"]) == 0
    assert [r["epoch"] for r in records(run / "metrics.jsonl")] == [1, 2]
    capsys.readouterr()
    assert report.main([str(run)]) == 0
    assert "JSON layout" in capsys.readouterr().out
    out = tmp_path / "labels.json"
    assert predict.main(["--resume", str(run / "model_best.pth.tar"), os.path.join(data, "images"),
                         "--json", str(out), "--top-k", "1", "-j", "0"]) == 0
    assert len(json.loads(out.read_text())) == 28
    assert export.main(["--resume", str(run / "model_best.pth.tar"), "--format", "torchscript",
                        "-o", str(tmp_path / "json.pt")]) == 0
    assert json.loads((tmp_path / "json.pt.classes.json").read_text())["classes"] == classes


# --------------------------------------------------------------------------------------------
# A new metric: one more entry of util.compute_metrics
# --------------------------------------------------------------------------------------------

def test_a_new_metric_reaches_the_printout_the_logs_and_the_evaluation(voc_root, random_embeddings,
                                                                      tmp_path, monkeypatch, capsys):
    """What an edit of compute_metrics (util.py) gives the engine, simulated by wrapping the
    function the engine calls: its new entry is printed, logged, and recorded by -e."""
    computed = engine.compute_metrics

    def with_positives(scores, labels, *rest):
        return {**computed(scores, labels, *rest), "positives": float((labels == 1).sum())}

    monkeypatch.setattr(engine, "compute_metrics", with_positives)
    root, flags = voc_root
    run = tmp_path / "metric"
    argv = [root, *SMALL, "--embeddings", random_embeddings, "--checkpoint-dir", str(run)]
    assert call_main(main_voc2007.main, [*argv, "--epochs", "1"]) == 0
    positives = float((flags["test"][1] == 1).sum())
    assert f"other: positives {positives:.2f}" in capsys.readouterr().out
    assert records(run / "metrics.jsonl")[-1]["positives"] == positives
    assert call_main(main_voc2007.main, [root, *RUNTIME, "-e", "--resume", str(run / "checkpoint.pth.tar")]) == 0
    assert records(run / "eval_test.jsonl")[-1]["positives"] == positives
