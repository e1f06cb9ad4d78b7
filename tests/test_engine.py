"""The training loop: learning, exact resume, evaluation, checkpoints, and the CLI end to end."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import checkpoints
import dataset
import runs
import engine
import main_voc2007
import models
import options
import recipes
from conftest import ROOT, SMALL, call_main, offline_environment
from models import DSDL
from report import read_metrics
from util import compute_metrics
from voc import VOC2007


def parse(root, embeddings, checkpoint_dir, *extra):
    return options.parse_args(main_voc2007.get_args_parser(), [
        root, *SMALL, "--embeddings", embeddings, "--checkpoint-dir", str(checkpoint_dir), *extra])


def run(args):
    return engine.run(args, main_voc2007.datasets, default_embeddings=None)


@pytest.mark.parametrize("workers", ["0"])  # with 2 loading processes: test_recipes.py
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(voc_root, random_embeddings, tmp_path, workers):
    root, _ = voc_root
    common = ("--epoch_step", "1", "-j", workers)
    run(parse(root, random_embeddings, tmp_path / "straight", "--epochs", "2", *common))
    run(parse(root, random_embeddings, tmp_path / "split", "--epochs", "1", *common))
    resumed = parse(root, random_embeddings, tmp_path / "split", "--epochs", "2", *common,
                    "--resume", str(tmp_path / "split" / checkpoints.CHECKPOINT))
    run(resumed)
    straight = torch.load(tmp_path / "straight" / checkpoints.CHECKPOINT, weights_only=True)
    split = torch.load(tmp_path / "split" / checkpoints.CHECKPOINT, weights_only=True)
    assert straight["epoch"] == split["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    assert [g["lr"] for g in split["optimizer"]["param_groups"]] == pytest.approx([1e-4, 1e-3])
    momentum = split["optimizer"]["state"]
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], momentum[index]["momentum_buffer"])


def test_evaluate_takes_the_input_size_from_the_checkpoint_and_prints_the_logged_map(
        voc_root, random_embeddings, tmp_path, capsys):
    root, _ = voc_root
    run(parse(root, random_embeddings, tmp_path, "--epochs", "2"))
    best = torch.load(tmp_path / checkpoints.BEST, weights_only=True)
    logged = {record["epoch"]: record["mAP"] for record in read_metrics(tmp_path / runs.METRICS_LOG)}
    assert best["best_score"] == pytest.approx(max(logged.values()))
    capsys.readouterr()
    # No --arch, no --image-size: the checkpoint's (resnet18 at 64 px), not the paper's 448.
    code = call_main(main_voc2007.main, [root, "-e", "--resume", str(tmp_path / checkpoints.BEST),
                                         "--embeddings", random_embeddings, "-j", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and f"mAP {logged[best['epoch']]:.2f} (over" in out
    assert "resnet18 at 64 px" in out
    (record,) = [json.loads(line) for line in open(tmp_path / "eval_test.jsonl")]
    assert record["mAP"] == pytest.approx(logged[best["epoch"]], abs=1e-9)


def test_checkpoint_holds_everything_needed_to_continue(voc_root, random_embeddings, tmp_path):
    root, _ = voc_root
    args = parse(root, random_embeddings, tmp_path, "--epochs", "1")
    run(args)
    checkpoint = torch.load(tmp_path / checkpoints.CHECKPOINT, weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "best_score", "args", "classes",
            "semantics", "dataset", "run_id", "provenance"} <= set(checkpoint)
    assert checkpoint["dataset"]["name"] == "VOC 2007"
    assert checkpoint["dataset"]["sizes"] == {"train": 24, "test": 16}  # by role
    assert checkpoint["dataset"]["roles"] == {"train": "trainval", "test": "test"}
    assert checkpoint["classes"] == VOC2007(root, "test", download=False).classes
    np.testing.assert_array_equal(checkpoint["semantics"].numpy(), np.load(random_embeddings))
    assert checkpoint["args"]["lambd"] == 10.0 and checkpoint["args"]["arch"] == "resnet18"
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


# ---- the command line ---------------------------------------------------------------------

def command(capsys, *args):
    """main_voc2007.py's command line in this process (an uncaught exception fails the test,
    so a passing test also shows there was no traceback)."""
    code = call_main(main_voc2007.main, list(args))
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main_voc2007.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=offline_environment(),
                          timeout=300)


def test_cli_trains_one_epoch_and_logs_every_metric(voc_root, random_embeddings, tmp_path, capsys):
    root, _ = voc_root
    result = command(capsys, root, "--epochs", "1", *SMALL, "--embeddings", random_embeddings,
                     "--checkpoint-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / checkpoints.CHECKPOINT) and os.path.isfile(tmp_path / checkpoints.BEST)
    (record,) = read_metrics(tmp_path / runs.METRICS_LOG)
    assert record["epoch"] == 1 and record["split"] == "test" and record["loss"] > 0
    expected_keys = set(compute_metrics(np.zeros((2, 20)), np.ones((2, 20))))
    assert expected_keys <= set(record) and len(record["AP"]) == 20
    assert f"mAP {record['mAP']:.2f}" in result.stdout
    assert "CF1_top3" not in result.stdout and "top-3: CP" in result.stdout
    assert "| table |" in result.stdout  # the paper-style table, with its short class names
    assert result.stdout.count("table") == 1  # the per-class AP once per evaluation
    assert f"epoch 1/1: train loss {record['train_loss']:.4f}, test mAP {record['mAP']:.2f}" in result.stdout
    assert "learning rates: trunk 0.001, dictionary 0.01" in result.stdout


def test_a_metric_added_to_compute_metrics_is_printed_and_logged_with_no_other_change(
        voc_root, random_embeddings, tmp_path, monkeypatch, capsys):
    def with_a_new_metric(scores, labels, *rest):
        metrics = compute_metrics(scores, labels, *rest)
        metrics["hamming_accuracy"] = 100 * float(np.mean((scores >= 0) == (labels > 0)))
        return metrics

    monkeypatch.setattr(engine, "compute_metrics", with_a_new_metric)
    root, _ = voc_root
    run(parse(root, random_embeddings, tmp_path, "--epochs", "1"))
    (record,) = read_metrics(tmp_path / runs.METRICS_LOG)
    assert 0 <= record["hamming_accuracy"] <= 100
    assert f"hamming_accuracy {record['hamming_accuracy']:.2f}" in capsys.readouterr().out


def test_cli_missing_dataset_offline_is_a_clear_error(offline, tmp_path, capsys):
    result = command(capsys, str(tmp_path / "nowhere"), *SMALL, "--checkpoint-dir", str(tmp_path / "ck"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "VOCtrainval_06-Nov-2007.tar" in result.stderr and "VOCdevkit" in result.stderr


def test_cli_missing_resume_file_is_an_error_not_a_fresh_start(voc_root, random_embeddings, tmp_path, capsys):
    root, _ = voc_root
    result = command(capsys, root, *SMALL, "--embeddings", random_embeddings, "--checkpoint-dir", str(tmp_path / "ck"),
                 "--resume", str(tmp_path / "missing.pth.tar"))
    assert result.returncode == 1 and "missing.pth.tar: no such file" in result.stderr
    assert not os.path.exists(tmp_path / "ck")


def test_cli_embeddings_of_the_wrong_shape_are_an_error(voc_root, tmp_path, capsys):
    root, _ = voc_root
    path = tmp_path / "wrong.npy"
    np.save(path, np.ones((19, 300), np.float32))  # one row short (any width is fine)
    result = command(capsys, root, *SMALL, "--embeddings", str(path), "--checkpoint-dir", str(tmp_path / "ck"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "wrong.npy" in result.stderr and "(19, 300)" in result.stderr


def test_cli_checkpoint_for_another_number_of_classes_is_an_error(voc_root, random_embeddings, tmp_path, capsys):
    root, _ = voc_root
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False)
    path = tmp_path / "five.pth.tar"
    torch.save({"model": model.state_dict(), "epoch": 3, "best_score": 50.0,
                "classes": [f"class{i}" for i in range(5)], "semantics": model.semantics}, path)
    result = command(capsys, root, *SMALL, "--embeddings", random_embeddings, "-e", "--resume", str(path),
                 "--checkpoint-dir", str(tmp_path / "ck"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "5 classes" in result.stderr and "20" in result.stderr


def test_cli_checkpoint_for_another_feature_size_is_an_error(voc_root, random_embeddings, tmp_path, capsys):
    root, _ = voc_root
    model = DSDL(20, torch.randn(20, 300), 10.0, arch="resnet18", pretrained=False)
    path = tmp_path / "r18.pth.tar"
    torch.save({"state_dict": model.state_dict()}, path)
    result = command(capsys, root, *SMALL[:1], "resnet50", *SMALL[2:], "--embeddings", random_embeddings, "-e",
                 "--resume", str(path), "--checkpoint-dir", str(tmp_path / "ck"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "feature size 512" in result.stderr and "resnet50 has feature size 2048" in result.stderr


def test_resuming_with_a_new_learning_rate_uses_it(voc_root, random_embeddings, tmp_path):
    root, _ = voc_root
    run(parse(root, random_embeddings, tmp_path, "--epochs", "1"))
    with pytest.warns(UserWarning, match="lr: 0.01 -> 0.05"):
        run(parse(root, random_embeddings, tmp_path, "--epochs", "2", "--lr", "0.05",
                  "--resume", str(tmp_path / checkpoints.CHECKPOINT)))
    groups = torch.load(tmp_path / checkpoints.CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.05])  # trunk lr * lrp, dictionary lr


@pytest.mark.parametrize("start_epoch", [0, 1, 2, 3, 5, 7])
def test_the_step_schedule_at_any_start_epoch_is_the_uninterrupted_one(start_epoch):
    """Also for the release's checkpoints, which carry an epoch but no optimizer state."""
    model = DSDL(3, torch.randn(3, 300), 10.0, arch="resnet18", pretrained=False)
    args = main_voc2007.get_args_parser().parse_args(["data", "--epoch_step", "2", "5"])
    # the uninterrupted run: lr x 0.1 once epoch 2, then epoch 5, is reached (0-based epochs)
    expected = [[1e-3 * f, 1e-2 * f] for f in (1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01)]
    optimizer = torch.optim.SGD(model.parameter_groups(args.lr, args.lrp), lr=args.lr)
    schedule = recipes.Schedule(optimizer, model, args, start_epoch, steps_per_epoch=3)
    assert isinstance(schedule.scheduler, torch.optim.lr_scheduler.MultiStepLR)  # the release's
    for epoch in range(start_epoch, 8):
        for _ in range(3):  # stepped per epoch, not per optimizer step
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected[epoch], rel=1e-12)
            optimizer.step()
            schedule.after_step()
        schedule.after_epoch()


def test_cli_a_broken_image_read_by_a_loader_worker_is_named_without_a_traceback(voc_root, random_embeddings,
                                                                                 tmp_path):
    root, written = voc_root
    path = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", written["trainval"][0][0] + ".jpg")
    with open(path, "r+b") as f:
        f.truncate(100)
    result = cli(root, *SMALL, "-j", "1", "--epochs", "1", "--embeddings", random_embeddings,
                 "--checkpoint-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"error: cannot read image {path}" in result.stderr
    assert "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr


def test_augmentation_does_not_depend_on_the_number_of_loader_workers(voc_root, random_embeddings, tmp_path):
    """Image i of epoch e is augmented from the seed (seed, e, i), whichever worker loads it."""
    root, _ = voc_root
    for workers in ("0", "2"):
        run(parse(root, random_embeddings, tmp_path / workers, "--epochs", "1", "-j", workers))
    zero, two = (torch.load(tmp_path / w / checkpoints.CHECKPOINT, weights_only=True)["model"] for w in ("0", "2"))
    for key, value in zero.items():
        assert torch.equal(value, two[key]), key


def test_epoch_seeded_augmentation_follows_the_epoch_and_the_image():
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.rand(2)

    data = dataset.EpochSeeded(Draws(), seed=7)
    first = [data[i] for i in range(3)]
    assert torch.equal(torch.stack([data[i] for i in reversed(range(3))]), torch.stack(first[::-1]))
    data.epoch.fill_(1)
    seen = [data[i] for i in range(3)]
    assert not any(torch.equal(a, b) for a, b in zip(first, seen))  # another epoch, other crops
    data.epoch.fill_(0)
    assert all(torch.equal(a, data[i]) for i, a in enumerate(first))


def test_unknown_labels_of_a_partial_split_get_no_gradient():
    """An unknown pair (-2) of a split with `partial` labels counts in no loss term: the loss's
    gradient with respect to its score is 0; the known pairs' are not."""
    class Partial(torch.utils.data.Dataset):
        partial = True

        def __len__(self):
            return 4

    labels = torch.tensor([[1, -2, -1], [-2, 1, -1], [-1, -1, 1], [1, 1, -2]])
    wrapped = torch.utils.data.Subset(dataset.EpochSeeded(Partial(), 0), range(4))
    assert engine.has_partial_labels(torch.utils.data.DataLoader(wrapped))
    assert not engine.has_partial_labels(torch.utils.data.DataLoader(VOC2007.__new__(VOC2007)))
    # (DSDL with beta 0: its reconstruction and sparsity terms use no label)
    for loss_fn in (models.DSDLLoss(10.0, 0.0), models.BaselineLoss()):
        torch.manual_seed(0)
        model = DSDL(3, torch.randn(3, 300), 10.0, arch="resnet18", pretrained=False).eval()
        output = model(torch.randn(4, 3, 32, 32))
        scores = output.scores.detach().requires_grad_()
        output = output._replace(scores=scores)
        engine.labelled_loss(loss_fn, output, labels, True).backward()
        assert (scores.grad[labels == -2] == 0).all()
        assert (scores.grad[labels != -2] != 0).all()


def test_an_evaluation_gathers_the_labels_as_int8_and_scores_the_loss_of_the_loaders_labels():
    """Issue 26: the N x C labels of an evaluation are int8 (an eighth of int64's memory: Open
    Images' 125,000 x 9,605 would be 9.6 GB), with the loader's values; the loss is unchanged."""
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([[1, -2, -1], [-2, 1, -1], [-1, -1, 1], [1, 0, -2], [-1, 1, 1], [-2, -2, 1]])

    class Partial(torch.utils.data.Dataset):
        partial, labelled = True, True

        def __len__(self):
            return 6

        def __getitem__(self, index):
            return images[index], labels[index], str(index)

    model = DSDL(3, torch.randn(3, 300), 10.0, arch="resnet18", pretrained=False).eval()
    loss_fn = models.DSDLLoss(10.0, 1e-4)
    result = engine.evaluate(model, loss_fn, torch.utils.data.DataLoader(Partial(), batch_size=4),
                             torch.device("cpu"))
    assert result.labels.dtype == np.int8 and np.array_equal(result.labels, labels.numpy())
    with torch.no_grad():  # the loss of the int64 labels, batch by batch (4, then 2 images)
        expected = sum(len(part) * engine.labelled_loss(loss_fn, model(images[part]), labels[part], True).item()
                       for part in (range(0, 4), range(4, 6))) / 6
    assert result.loss == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(result.scores, model(images).scores.detach().numpy(), rtol=1e-5, atol=1e-6)
