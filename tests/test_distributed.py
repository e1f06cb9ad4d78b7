"""torchrun with 2 CPU processes (gloo): evaluation counts every image once, training checkpoints resume."""
import os
import subprocess
import sys

import pytest
import torch

import engine
from conftest import ROOT, write_voc_tree

SMALL = ["--arch", "resnet18", "--no-pretrained", "--image-size", "64", "-j", "0", "-b", "8"]


def launch(processes, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", os.path.join(ROOT, "main_voc2007.py")]
    if processes == 1:
        command = [sys.executable, os.path.join(ROOT, "main_voc2007.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", http_proxy="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")
    result = subprocess.run(command + list(args), capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """17 test images: 2 processes get 9 and 8, so a padded sampler would count one twice."""
    root = str(tmp_path_factory.mktemp("dist") / "voc")
    write_voc_tree(root, splits={"trainval": 16, "test": 17}, seed=5)
    return root


def test_two_processes_evaluate_every_image_once_and_match_one_process(odd_tree, random_embeddings, tmp_path):
    common = [odd_tree, *SMALL, "--embeddings", random_embeddings]
    launch(1, *common, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "train"))
    checkpoint = str(tmp_path / "train" / engine.CHECKPOINT)
    launch(1, *common, "-e", "--resume", checkpoint, "--checkpoint-dir", str(tmp_path / "one"))
    result = launch(2, *common, "-e", "--resume", checkpoint, "--checkpoint-dir", str(tmp_path / "two"))
    (one,) = engine.read_metrics(tmp_path / "one" / engine.METRICS_LOG)
    (two,) = engine.read_metrics(tmp_path / "two" / engine.METRICS_LOG)
    assert two["mAP"] == pytest.approx(one["mAP"], abs=1e-6)
    assert two["AP"] == pytest.approx(one["AP"], abs=1e-6, nan_ok=True)
    assert two["OP"] == pytest.approx(one["OP"]) and two["CF1_top3"] == pytest.approx(one["CF1_top3"])
    # (the loss is not compared: its norms are over a batch, and the per-process batch is halved)
    assert result.stdout.count("per-class AP") == 1  # only rank 0 prints


def test_two_process_training_writes_one_checkpoint_that_resumes(odd_tree, random_embeddings, tmp_path):
    common = [odd_tree, *SMALL, "--embeddings", random_embeddings, "--checkpoint-dir", str(tmp_path)]
    launch(2, *common, "--epochs", "1")
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".tar")) == [
        engine.CHECKPOINT, engine.BEST]
    (logged,) = engine.read_metrics(tmp_path / engine.METRICS_LOG)  # one writer
    # The mAP logged by the 2-process run is that of the weights and BatchNorm statistics it saved.
    launch(1, odd_tree, *SMALL, "--embeddings", random_embeddings, "-e", "--resume",
           str(tmp_path / engine.CHECKPOINT), "--checkpoint-dir", str(tmp_path / "check"))
    (evaluated,) = engine.read_metrics(tmp_path / "check" / engine.METRICS_LOG)
    assert logged["mAP"] == pytest.approx(evaluated["mAP"], abs=1e-6)
    first = torch.load(tmp_path / engine.CHECKPOINT, weights_only=True)
    launch(2, *common, "--epochs", "2", "--resume", str(tmp_path / engine.CHECKPOINT))
    second = torch.load(tmp_path / engine.CHECKPOINT, weights_only=True)
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert not torch.equal(first["model"]["W2"], second["model"]["W2"])  # it trained on
    assert [r["epoch"] for r in engine.read_metrics(tmp_path / engine.METRICS_LOG)] == [1, 2]


def test_a_global_batch_that_does_not_divide_is_refused(odd_tree, random_embeddings, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "main_voc2007.py"), odd_tree, *SMALL[:-1], "7",
               "--embeddings", random_embeddings, "--checkpoint-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert "--batch-size 7 (the global batch) does not divide over 2 processes" in result.stderr
