"""torchrun with 2 CPU processes (gloo): evaluation counts every image once, training checkpoints resume."""
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import checkpoints
import runs
import main_voc2007
from conftest import ROOT, SMALL, call_main, offline_environment, write_voc_tree
from report import read_metrics



def launch(processes, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", os.path.join(ROOT, "main_voc2007.py")]
    result = subprocess.run(command + list(args), capture_output=True, text=True,
                            env=offline_environment(), timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """17 test images: 2 processes get 9 and 8, so a padded sampler would count one twice."""
    root = str(tmp_path_factory.mktemp("dist") / "voc")
    write_voc_tree(root, splits={"trainval": 16, "test": 17}, seed=5)
    return root


@pytest.fixture(scope="module")
def two_process_run(odd_tree, tmp_path_factory):
    """One epoch trained by 2 processes, then resumed by 2 processes to epoch 2; the checkpoint
    of epoch 1 is kept aside."""
    folder = tmp_path_factory.mktemp("two")
    embeddings = str(folder / "embeddings.npy")
    np.save(embeddings, np.random.default_rng(1).standard_normal((20, 300)).astype(np.float32))
    common = [odd_tree, *SMALL, "--embeddings", embeddings]
    run = folder / "run"
    launch(2, *common, "--epochs", "1", "--checkpoint-dir", str(run))
    shutil.copy(run / checkpoints.CHECKPOINT, folder / "epoch1.pth.tar")
    evaluated = launch(2, *common, "-e", "--resume", str(folder / "epoch1.pth.tar"),
                       "--checkpoint-dir", str(folder / "two"))
    # torchrun with one process runs the distributed code too (one GPU: NCCL, DDP, gathering)
    launch(1, *common, "-e", "--resume", str(folder / "epoch1.pth.tar"),
           "--checkpoint-dir", str(folder / "torchrun_one"))
    launch(2, *common, "--epochs", "2", "--resume", str(run / checkpoints.CHECKPOINT))
    return types.SimpleNamespace(folder=folder, run=run, common=common, evaluated=evaluated)


def test_two_processes_evaluate_every_image_once_and_match_one_process(two_process_run, capsys):
    folder = two_process_run.folder
    code = call_main(main_voc2007.main, [*two_process_run.common, "-e", "--resume",
                                         str(folder / "epoch1.pth.tar"), "--checkpoint-dir", str(folder / "one")])
    assert code == 0
    (one,) = read_metrics(folder / "one" / "eval_test.jsonl")
    (two,) = read_metrics(folder / "two" / "eval_test.jsonl")
    (torchrun_one,) = read_metrics(folder / "torchrun_one" / "eval_test.jsonl")
    assert torchrun_one["mAP"] == pytest.approx(one["mAP"], abs=1e-6)
    assert two["mAP"] == pytest.approx(one["mAP"], abs=1e-6)
    assert two["AP"] == pytest.approx(one["AP"], abs=1e-6, nan_ok=True)
    assert two["OP"] == pytest.approx(one["OP"]) and two["CF1_top3"] == pytest.approx(one["CF1_top3"])
    # (the loss is not compared: its norms are over a batch, and the per-process batch is halved)
    assert two_process_run.evaluated.stdout.count("| ours |") == 1  # only rank 0 prints
    # The mAP the 2-process training logged is that of the weights and BatchNorm statistics it saved.
    logged = read_metrics(two_process_run.run / runs.METRICS_LOG)[0]
    assert logged["epoch"] == 1 and logged["mAP"] == pytest.approx(one["mAP"], abs=1e-6)


def test_two_process_training_writes_one_checkpoint_that_resumes(two_process_run):
    run = two_process_run.run
    assert sorted(name for name in os.listdir(run) if name.endswith(".tar")) == [
        checkpoints.CHECKPOINT, checkpoints.BEST]
    first = torch.load(two_process_run.folder / "epoch1.pth.tar", weights_only=True)
    second = torch.load(run / checkpoints.CHECKPOINT, weights_only=True)
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert not torch.equal(first["model"]["W2"], second["model"]["W2"])  # it trained on
    assert [r["epoch"] for r in read_metrics(run / runs.METRICS_LOG)] == [1, 2]  # one writer


def test_a_global_batch_that_does_not_divide_is_refused_before_the_processes_meet(
        odd_tree, random_embeddings, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each of 2 processes
    code = call_main(main_voc2007.main, [odd_tree, *SMALL, "-b", "7", "--embeddings", random_embeddings,
                                         "--checkpoint-dir", str(tmp_path / "ck")])
    assert code == 1
    assert ("error: --batch-size 7 (the global batch) does not divide over 2 processes; pass a "
            "multiple of 2") in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_a_mistake_found_by_rank_0_stops_every_process_with_one_error_line(two_process_run):
    """A fresh run into the folder of a run: rank 0 finds it, and every rank stops with it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "main_voc2007.py"), *two_process_run.common,
               "--checkpoint-dir", str(two_process_run.run)]
    result = subprocess.run(command, capture_output=True, text=True, env=offline_environment(),
                            timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already holds a run" in errors[0]
    # No rank fails on its own (a closed connection, a traceback from this project's code);
    # what torchrun itself prints about a child that exited with 1 is torchrun's.
    assert not re.search(rf'File "{re.escape(ROOT)}/\w+\.py"', result.stderr)  # no frame of ours
    assert "[rank" not in result.stderr
    assert "Connection closed" not in result.stderr
