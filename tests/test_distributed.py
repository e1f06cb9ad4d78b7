"""torchrun with 2 CPU processes (gloo): evaluation counts every image once, training checkpoints
resume; the process group's timeouts; --sync-bn's conversion as far as the CPU can run it."""
import argparse
import copy
import datetime
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import checkpoints
import distributed
import models
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
    """One epoch trained by 2 processes (whose evaluation is the 2-process one compared), then
    resumed by 2 processes to epoch 2; the checkpoint of epoch 1 is kept aside."""
    folder = tmp_path_factory.mktemp("two")
    embeddings = str(folder / "embeddings.npy")
    np.save(embeddings, np.random.default_rng(1).standard_normal((20, 300)).astype(np.float32))
    common = [odd_tree, *SMALL, "--embeddings", embeddings]
    run = folder / "run"
    evaluated = launch(2, *common, "--epochs", "1", "--checkpoint-dir", str(run))
    shutil.copy(run / checkpoints.CHECKPOINT, folder / "epoch1.pth.tar")
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
    # epoch 1 as the 2-process training scored it: the weights and BatchNorm statistics it saved
    two = read_metrics(two_process_run.run / runs.METRICS_LOG)[0]
    assert two["epoch"] == 1
    (torchrun_one,) = read_metrics(folder / "torchrun_one" / "eval_test.jsonl")
    assert torchrun_one["mAP"] == pytest.approx(one["mAP"], abs=1e-6)
    assert two["mAP"] == pytest.approx(one["mAP"], abs=1e-6)
    assert two["AP"] == pytest.approx(one["AP"], abs=1e-6, nan_ok=True)
    assert two["OP"] == pytest.approx(one["OP"]) and two["CF1_top3"] == pytest.approx(one["CF1_top3"])
    # (the loss is not compared: its norms are over a batch, and the per-process batch is halved)
    assert two["images"] == one["images"] == 17  # every image once
    assert two_process_run.evaluated.stdout.count("| ours |") == 1  # only rank 0 prints


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


def run_two_ranks(target, tmp_path, *extra, context=None):
    """`target(rank, port, folder, *extra)` in two forked processes (torch is imported already:
    no second import) on a free port; a process that hangs is killed after 2 minutes."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    context = context or multiprocessing.get_context("fork")
    processes = [context.Process(target=target, args=(rank, port, str(tmp_path), *extra))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        if process.exitcode is None:
            process.kill()


def waiting_and_hanging_rank(rank, port, folder, gave_up):
    """One of 2 gloo processes of init_distributed with a 2-second collective timeout: rank 0
    "downloads" for 3 s while rank 1 waits in rank_zero_first, then rank 0 hangs in training
    until rank 1's collective has given up. Each rank writes what happened to `folder`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=2)
    distributed.DOWNLOAD_TIMEOUT = datetime.timedelta(seconds=120)
    events = []
    try:
        distributed.init_distributed("cpu")
        with distributed.rank_zero_first():
            if rank == 0:
                time.sleep(3)  # longer than a collective may wait
        events.append("waited for rank 0")
        if rank == 0:
            gave_up.wait(120)  # a hung rank
        try:
            torch.distributed.all_reduce(torch.ones(1))
            events.append("reduced")
        except RuntimeError as error:  # gloo: "Timed out waiting ... for recv operation"
            events.append(f"gave up: {error}")
            gave_up.set()
    except Exception as error:
        events.append(f"failed: {type(error).__name__}: {error}")
    finally:
        with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(events))
        os._exit(0)  # no process-group teardown with a peer gone


def test_rank_zero_downloads_may_take_longer_than_a_training_collective_waits(tmp_path):
    context = multiprocessing.get_context("fork")  # torch is imported already: no second import
    gave_up = context.Event()
    run_two_ranks(waiting_and_hanging_rank, tmp_path, gave_up, context=context)
    rank1 = (tmp_path / "rank1.txt").read_text().splitlines()
    assert rank1[0] == "waited for rank 0"  # 3 s in rank_zero_first: on the download group
    assert rank1[1].startswith("gave up:") and "timed out" in rank1[1].lower(), rank1
    assert (tmp_path / "rank0.txt").read_text().startswith("waited for rank 0")


def gathering_rank(rank, port, folder):
    """One of 2 gloo processes of `gather_shares`: rank r scores the images r, r + 2, ... of a
    split of 7 (4 and 3, no padding); it writes what it gathered to `folder`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        distributed.init_distributed("cpu")
        scores, labels = split_to_gather()
        positions = range(rank, 7, 2)
        gathered = distributed.gather_shares(
            positions, torch.from_numpy(scores[positions]), torch.from_numpy(labels[positions]),
            [f"image {i}" for i in positions], float(rank + 1), len(positions))
        np.savez(os.path.join(folder, f"rank{rank}.npz"), scores=gathered[0], labels=gathered[1],
                 ids=np.array(gathered[2]), total=gathered[3], count=gathered[4])
    finally:
        os._exit(0)


def split_to_gather():
    rng = np.random.default_rng(7)
    return (rng.standard_normal((7, 5)).astype(np.float32),
            rng.choice([1, 0, -1, -2], size=(7, 5)).astype(np.int8))


def test_the_shares_of_every_process_are_gathered_in_the_splits_order_as_float32_and_int8(tmp_path):
    run_two_ranks(gathering_rank, tmp_path)
    scores, labels = split_to_gather()
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as gathered:
            assert gathered["scores"].dtype == np.float32 and gathered["labels"].dtype == np.int8
            assert np.array_equal(gathered["scores"], scores) and np.array_equal(gathered["labels"], labels)
            assert gathered["ids"].tolist() == [f"image {i}" for i in range(7)]
            assert (gathered["total"], gathered["count"]) == (3.0, 7)


def dsdl_resnet18(seed=0):
    torch.manual_seed(seed)
    settings = argparse.Namespace(model="dsdl", arch="resnet18", pool="max", lambd=10.0, beta=1e-4)
    context = models.ModelContext([f"class {c}" for c in range(20)], 64, torch.randn(20, 300))
    return models.build_model(settings, context, pretrained=False)


def test_sync_bn_converts_every_batch_norm_and_keeps_the_weights_and_their_names():
    model = dsdl_resnet18()
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    batch_norms = [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
    assert len(batch_norms) == 20  # ResNet-18's
    assert type(converted) is type(model)  # the same model: parameter groups, trunk, folding
    assert [name for name, module in converted.named_modules() if isinstance(module, _BatchNorm)] == batch_norms
    assert all(isinstance(converted.get_submodule(name), torch.nn.SyncBatchNorm) for name in batch_norms)
    state, converted_state = model.state_dict(), converted.state_dict()
    assert list(converted_state) == list(state)  # checkpoints load either way
    assert all(torch.equal(converted_state[key], value) for key, value in state.items())


def test_a_converted_model_trains_and_evaluates_as_the_plain_one_in_one_process():
    """Without a process group SyncBatchNorm normalises with the batch's own statistics: the
    same numbers as BatchNorm, forward and backward, and the same running statistics."""
    images, targets = torch.randn(4, 3, 64, 64), (torch.rand(4, 20) > 0.7).float()
    loss_fn = models.DSDLLoss(10.0, 1e-4)
    results = []
    for convert in (False, True):
        model = dsdl_resnet18()
        if convert:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        loss = loss_fn(model.train()(images), targets)
        loss.backward()
        with torch.no_grad():
            scores = model.eval()(images).scores
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                        model.state_dict(), scores))
    (loss, gradients, state, scores), (loss_c, gradients_c, state_c, scores_c) = results
    assert torch.equal(loss_c, loss) and torch.equal(scores_c, scores)
    assert all(torch.equal(gradients_c[name], gradient) for name, gradient in gradients.items())
    assert all(torch.equal(state_c[key], value) for key, value in state.items())  # running statistics


def test_under_a_process_group_torch_evaluates_a_converted_model_on_the_cpu_but_does_not_train_it(tmp_path):
    """Why --sync-bn runs only in the GPU tier: torch's SyncBatchNorm refuses CPU tensors in
    training mode once a process group exists (gloo included); evaluation uses the running
    statistics and runs."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(dsdl_resnet18())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = dsdl_resnet18().eval()(images).scores
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                                         rank=0, world_size=1)
    try:
        with torch.no_grad():
            assert torch.equal(model.eval()(images).scores, expected)
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            model.train()(images)
    finally:
        torch.distributed.destroy_process_group()
