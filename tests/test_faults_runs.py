"""Faults during a long run: kills, a full disk, a diverging loss, hostile files, changed settings.

Every run here is main_voc2007.py on the tiny tree of conftest (24 trainval, 16 test images at
64 px), ResNet-18 from random weights, on the CPU with one thread, no loader workers and a fixed
seed: the same numbers in every process, so weights are compared bit for bit. Runs that must be
killed run in a child process (`run_cli`) that SIGKILLs itself at a chosen moment, and the run
that finishes them is the real command line; runs that only need to fail run in this process.
"""
import builtins
import json
import multiprocessing
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import checkpoints
import runs
from report import append_record, read_metrics
import main_voc2007
from conftest import ROOT, SMALL, offline_environment, write_voc_tree
from models import DSDLLoss
from util import DSDLError
from voc import VOC_CLASSES

EPOCHS = ["--epochs", "2"]
MB = 1 << 20



def run_cli(arguments, log, moment="never", count=0, snapshot=None):
    """In a child process: main_voc2007.py with `arguments`, SIGKILLed at one moment.

    `moment` "train" / "evaluate": at the `count`-th batch of training / of evaluation (its
    loss); a file name: after `count` bytes of the first write to a file whose name starts with
    it (the checkpoints' temporary files, metrics.jsonl); "never": not killed. With `snapshot`,
    the checkpoint folder is copied there after each checkpoint write of epoch 1.
    """
    output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(output, 1)
    os.dup2(output, 2)
    torch.set_num_threads(1)  # as every run of this file: the same numbers in every process
    os.environ.update(offline_environment())

    def die():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if moment in ("train", "evaluate"):
        forward, seen = DSDLLoss.forward, [0]

        def forward_or_die(self, output, targets):
            if torch.is_grad_enabled() == (moment == "train"):
                seen[0] += 1
                if seen[0] == count:
                    die()
            return forward(self, output, targets)

        DSDLLoss.forward = forward_or_die
    elif moment != "never":
        real_open = builtins.open

        class DyingFile:
            def __init__(self, f):
                self.f, self.written = f, 0

            def write(self, data):
                data = data if isinstance(data, str) else memoryview(data).cast("B")
                if self.written + len(data) >= count:
                    self.f.write(data[:count - self.written])
                    self.f.flush()
                    os.fsync(self.f.fileno())
                    die()
                self.written += len(data)
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        def open_or_die(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if os.path.basename(str(file)).startswith(moment) and ("w" in mode or "a" in mode):
                return DyingFile(f)
            return f

        builtins.open = open_or_die
    if snapshot is not None:
        save = checkpoints.save_checkpoint

        def save_and_copy(state, path):
            save(state, path)
            if state["epoch"] == 1:
                shutil.copytree(os.path.dirname(os.path.abspath(path)), snapshot, dirs_exist_ok=True)

        checkpoints.save_checkpoint = save_and_copy
    sys.argv = ["main_voc2007.py", *arguments]
    main_voc2007.main()


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """Starts `run_cli` in a fresh process and returns (exit code, its output).

    The children fork from a server that imported torch and this project once (no thread pool
    started yet, so forking is safe): a killed run costs its work, not seconds of imports.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "engine", "main_voc2007", __name__])
    logs = tmp_path_factory.mktemp("logs")

    def start(arguments, **kwargs):
        log = logs / f"run{len(os.listdir(logs))}.log"
        process = context.Process(target=run_cli, args=(arguments, str(log)), kwargs=kwargs)
        process.start()
        process.join(timeout=300)
        if process.exitcode is None:
            process.kill()
        return process.exitcode, log.read_text()

    return start


@pytest.fixture(scope="module")
def reference(tmp_path_factory, child):
    """An uninterrupted two-epoch run, and a copy of its checkpoint folder as epoch 1 left it."""
    folder = tmp_path_factory.mktemp("faults")
    root = str(folder / "voc2007")
    write_voc_tree(root)
    embeddings = str(folder / "embeddings.npy")
    np.save(embeddings, np.random.default_rng(1).standard_normal((20, 300)).astype(np.float32))
    final, after_epoch_1 = folder / "uninterrupted", folder / "after_epoch_1"
    code, output = child([root, *SMALL, *EPOCHS, "--embeddings", embeddings,
                          "--checkpoint-dir", str(final)], snapshot=str(after_epoch_1))
    assert code == 0, output[-3000:]
    assert load(after_epoch_1 / checkpoints.CHECKPOINT)["epoch"] == 1
    return types.SimpleNamespace(root=root, embeddings=embeddings, final=final,
                                 after_epoch_1=after_epoch_1)


def load(path):
    """A checkpoint as --resume reads it (weights_only): proves the file is whole."""
    return checkpoints.load_checkpoint(str(path))


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def assert_same_weights(path, reference_path):
    ours, theirs = load(path), load(reference_path)
    assert ours["epoch"] == theirs["epoch"] and ours["best_score"] == theirs["best_score"]
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), f"{path}: {key} differs"
    for index, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][index]["momentum_buffer"],
                           state["momentum_buffer"]), f"{path}: momentum of parameter {index}"


def temporaries(folder):
    return sorted(name for name in os.listdir(folder) if ".tmp" in name)


def cli_arguments(reference, checkpoint_dir, *extra):
    return [reference.root, *SMALL, "--embeddings", reference.embeddings,
            "--checkpoint-dir", str(checkpoint_dir), *extra]


def resume_arguments(reference, checkpoint_dir, *extra):
    return cli_arguments(reference, checkpoint_dir, *EPOCHS, "--resume",
                         str(checkpoint_dir / checkpoints.CHECKPOINT), *extra)


def copy_of_epoch_1(reference, folder):
    shutil.copytree(reference.after_epoch_1, folder)
    return folder


def main_in_process(monkeypatch, arguments):
    """main_voc2007.py in this process; a user error ends it with SystemExit(1)."""
    monkeypatch.setattr(sys, "argv", ["main_voc2007.py", *arguments])
    main_voc2007.main()


# ---- kills (SIGKILL) --------------------------------------------------------------------------

KILLS = [  # (moment, count, where the run is when it dies)
    ("train", 2, "epoch 2, training batch 2"),
    ("evaluate", 2, "epoch 2, evaluation batch 2"),
    (runs.METRICS_LOG, 40, "epoch 2, 40 characters into its line of metrics.jsonl"),
    (checkpoints.BEST, 10 * MB, "epoch 2, 10 MB into writing model_best.pth.tar"),
    (checkpoints.CHECKPOINT, 10 * MB, "epoch 2, 10 MB into writing checkpoint.pth.tar"),
]


def test_a_run_killed_again_and_again_loses_nothing_and_resumes_to_the_uninterrupted_weights(
        reference, child, tmp_path):
    """Killed at five moments of epoch 2 in turn, each time resumed with --resume; then a plain
    command-line resume finishes it. After every kill both checkpoints load and hold epoch 1
    (model_best: epoch 2 once it was written whole); the end is the uninterrupted run bit for bit."""
    # Epoch 2 improves on epoch 1 here, so it writes model_best; were it not, there would be no
    # such write to kill (and model_best would stay epoch 1's, as the assertions below allow).
    improved = load(reference.final / checkpoints.BEST)["epoch"] == 2
    folder = copy_of_epoch_1(reference, tmp_path / "ck")
    epoch_1 = reference.after_epoch_1
    for moment, count, where in [kill for kill in KILLS if improved or kill[0] != checkpoints.BEST]:
        code, output = child(resume_arguments(reference, folder), moment=moment, count=count)
        assert code == -signal.SIGKILL, f"not killed at {where}:\n{output[-3000:]}"
        assert same_bytes(folder / checkpoints.CHECKPOINT, epoch_1 / checkpoints.CHECKPOINT), where
        assert load(folder / checkpoints.CHECKPOINT)["epoch"] == 1, where
        if moment == checkpoints.CHECKPOINT:  # model_best (if epoch 2 is best) was written whole before
            assert_same_weights(folder / checkpoints.BEST, reference.final / checkpoints.BEST)
        else:
            assert same_bytes(folder / checkpoints.BEST, epoch_1 / checkpoints.BEST), where
        records = read_metrics(folder / runs.METRICS_LOG)
        logged = [record["epoch"] for record in records]
        assert logged == ([1] if moment in ("train", "evaluate", runs.METRICS_LOG) else [1, 2]), where
        if moment in (checkpoints.BEST, checkpoints.CHECKPOINT):  # the kill came mid-write
            (partial,) = [name for name in temporaries(folder) if name.startswith(moment)]
            assert os.path.getsize(folder / partial) == count, where
            assert len(temporaries(folder)) == 1, where  # an earlier kill's file was cleaned up
        if moment == runs.METRICS_LOG:  # the kill left half a line, which is not read
            with open(folder / runs.METRICS_LOG) as f:
                assert not f.read().endswith("\n")

    # The plain command line, with the killed runs' partial temporary files still there.
    assert temporaries(folder), "the kills mid-write should have left a partial temporary file"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "main_voc2007.py"),
                             *resume_arguments(reference, folder)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env=offline_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(folder / checkpoints.CHECKPOINT, reference.final / checkpoints.CHECKPOINT)
    assert_same_weights(folder / checkpoints.BEST, reference.final / checkpoints.BEST)
    assert temporaries(folder) == []

    def measured(records):  # without what differs between any two runs: the command, the time
        return [{key: value for key, value in record.items() if key not in ("run", "epoch_seconds")}
                for record in records]

    assert measured(read_metrics(folder / runs.METRICS_LOG)) == \
        measured(read_metrics(reference.final / runs.METRICS_LOG))
    with open(folder / runs.METRICS_LOG) as f:
        for line in f:
            json.loads(line)  # every line whole: the half line of the kill was dropped


def test_a_metrics_log_cut_mid_line_reads_and_takes_new_records_cleanly(tmp_path):
    log = tmp_path / runs.METRICS_LOG
    for epoch in (1, 2):
        append_record(log, {"epoch": epoch, "split": "test", "mAP": 10.0 * epoch})
    with open(log, "a") as f:
        f.write('{"epoch": 3, "split": "test", "mA')  # a kill in the middle of the write
    assert [r["epoch"] for r in read_metrics(log)] == [1, 2]
    append_record(log, {"epoch": 3, "split": "test", "mAP": 30.0})  # the resumed run
    assert [(r["epoch"], r["mAP"]) for r in read_metrics(log)] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert [json.loads(line)["epoch"] for line in open(log)] == [1, 2, 3]
    with open(log, "a") as f:  # damage that no kill makes (not at the end) is an error, not skipped
        f.write("garbage\n")
        f.write(json.dumps({"epoch": 4, "split": "test", "mAP": 40.0}) + "\n")
    with pytest.raises(DSDLError, match=r"line 4 is not a JSON record"):
        read_metrics(log)


# ---- a checkpoint write that fails part-way -----------------------------------------------------

def test_a_checkpoint_write_that_fails_part_way_keeps_the_previous_one_and_says_so(
        reference, tmp_path, monkeypatch, capsys):
    """The kernel refuses writes past 20 MB (RLIMIT_FSIZE), as a full disk does part-way
    through a 96 MB checkpoint; the run stops with a message, the epoch-1 files untouched."""
    folder = copy_of_epoch_1(reference, tmp_path / "ck")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 * MB, hard))
    try:
        with pytest.raises(SystemExit) as stopped:
            main_in_process(monkeypatch, resume_arguments(reference, folder))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert "could not write checkpoint" in message and "File too large" in message
    # model_best.pth.tar is written first, and is the write that fails
    assert "the previous model_best.pth.tar there is intact" in message and "--resume" in message
    assert "Traceback" not in message
    for name in (checkpoints.CHECKPOINT, checkpoints.BEST):
        assert same_bytes(folder / name, reference.after_epoch_1 / name)
        assert load(folder / name)["epoch"] == 1
    assert temporaries(folder) == []


# ---- a loss that is no longer finite -----------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_non_finite_loss_stops_the_run_naming_epoch_and_batch_and_keeps_both_checkpoints(
        reference, tmp_path, monkeypatch, capsys, value):
    folder = copy_of_epoch_1(reference, tmp_path / "ck")
    forward, seen = DSDLLoss.forward, []

    def diverging(self, output, targets):
        loss = forward(self, output, targets)
        seen.append(torch.is_grad_enabled())
        return loss + float(value) if seen.count(True) == 3 else loss

    monkeypatch.setattr(DSDLLoss, "forward", diverging)
    with pytest.raises(SystemExit) as stopped:
        main_in_process(monkeypatch, resume_arguments(reference, folder))
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert f"the loss became {value} at epoch 2, batch 3" in message
    assert f"{folder / checkpoints.CHECKPOINT} is intact: lower --lr and continue with --resume" in message
    for name in (checkpoints.CHECKPOINT, checkpoints.BEST):
        assert same_bytes(folder / name, reference.after_epoch_1 / name)
    assert [r["epoch"] for r in read_metrics(folder / runs.METRICS_LOG)] == [1]


# ---- resuming with other settings ---------------------------------------------------------------

def test_resuming_with_other_hyper_parameters_warns_with_each_difference_and_only_those(
        reference, tmp_path, monkeypatch):
    folder = copy_of_epoch_1(reference, tmp_path / "ck")
    # --epochs 1: the checkpoint is at epoch 1, nothing is left to train; only the resume runs.
    arguments = cli_arguments(reference, folder, "--epochs", "1", "--resume",
                              str(folder / checkpoints.CHECKPOINT), "--lambd", "5", "--momentum", "0.5",
                              "--epoch_step", "1", "--seed", "7", "-b", "4")
    with pytest.warns(UserWarning, match="other hyper-parameters") as caught:
        main_in_process(monkeypatch, arguments)
    (message,) = [str(w.message) for w in caught if "hyper-parameters" in str(w.message)]
    listed = sorted(line.split(":")[0].strip() for line in message.splitlines()[1:])
    assert listed == ["batch_size", "epoch_step", "lambd", "momentum", "seed"]
    for change in ("lambd: 10.0 -> 5.0", "momentum: 0.9 -> 0.5", "epoch_step: [40] -> [1]",
                   "seed: 0 -> 7", "batch_size: 8 -> 4"):
        assert change in message
    # the other checkpoint folder, --resume and --epochs changed too: where and how long, not what


# ---- evaluation splits where a class has no positive ---------------------------------------------

def rewrite_test_flags(root, change):
    """Apply `change(name, flags)` to every class's test split file of the tree at `root`."""
    main = os.path.join(root, "VOCdevkit", "VOC2007", "ImageSets", "Main")
    all_flags = []
    for name in VOC_CLASSES:
        path = os.path.join(main, f"{name}_test.txt")
        with open(path) as f:
            ids, flags = zip(*(line.split() for line in f if line.strip()))
        flags = change(name, np.array([int(v) for v in flags]))
        with open(path, "w") as f:
            f.writelines(f"{i} {v:2d}\n" for i, v in zip(ids, flags))
        all_flags.append(flags)
    return np.stack(all_flags, axis=1)


@pytest.mark.parametrize("split", ["cow and dog without positives", "no positive at all"])
def test_a_class_without_positives_is_reported_undefined_and_the_map_says_over_how_many(
        reference, tmp_path, monkeypatch, capsys, split):
    root = str(tmp_path / "voc2007")
    shutil.copytree(reference.root, root)

    def change(name, flags):
        if split == "no positive at all" or name == "cow":
            return np.full_like(flags, -1)
        if name == "dog":  # positives flagged difficult only: none counts in the AP
            return np.where(flags == 1, 0, flags)
        return flags

    flags = rewrite_test_flags(root, change)
    defined = (flags == 1).any(axis=0)
    folder = tmp_path / "ck"
    main_in_process(monkeypatch, [root, *SMALL, "--embeddings", reference.embeddings, "-e",
                                  "--resume", str(reference.after_epoch_1 / checkpoints.BEST),
                                  "--checkpoint-dir", str(folder)])
    out = capsys.readouterr().out
    assert f"(over {defined.sum()} of 20 classes)" in out
    (record,) = read_metrics(folder / "eval_test.jsonl")
    assert record["num_classes_ap"] == defined.sum()
    assert [ap is not None for ap in record["AP"]] == defined.tolist()
    if defined.any():
        assert record["mAP"] == pytest.approx(np.mean([ap for ap in record["AP"] if ap is not None]))
        assert not defined[VOC_CLASSES.index("cow")] and not defined[VOC_CLASSES.index("dog")]
    else:
        assert record["mAP"] is None and "mAP undefined (over 0 of 20 classes)" in out
    table = open(folder / "eval_test.md").read().splitlines()
    ours = [cell.strip() for cell in next(line for line in table if line.startswith("| ours")).split("|")[2:-2]]
    assert [cell != "–" for cell in ours] == defined.tolist()  # an undefined AP is "–"
    assert "\n".join(table) in out


# ---- hostile and broken files given to a run --------------------------------------------------

class Payload:
    """Unpickling this object calls `function(*arguments)`: it would create a marker file."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def payloads(marker):
    return {"open": Payload(open, str(marker), "w"),
            "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
            "os.system": Payload(os.system, f"touch '{marker}'")}


@pytest.mark.parametrize("payload", ["open", "exec", "os.system"])
def test_a_checkpoint_that_needs_arbitrary_unpickling_is_refused_without_running_it(
        reference, tmp_path, monkeypatch, capsys, payload):
    marker = tmp_path / "code-was-run"
    hostile = tmp_path / "hostile.pth.tar"
    weights = load(reference.after_epoch_1 / checkpoints.BEST)["model"]
    torch.save({"model": weights, "epoch": 1, "payload": payloads(marker)[payload]}, hostile)
    with pytest.raises(SystemExit) as stopped:
        main_in_process(monkeypatch, cli_arguments(reference, tmp_path / "ck", "-e", "--resume", str(hostile)))
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert f"refusing to load {hostile}" in message and "arbitrary unpickling" in message
    assert "Traceback" not in message
    assert not marker.exists()  # no fallback to unsafe loading happened either


@pytest.mark.parametrize("payload", ["open", "exec", "os.system", "object array"])
def test_an_embeddings_pickle_that_would_run_code_stops_the_run_before_anything_runs(
        reference, tmp_path, monkeypatch, capsys, payload):
    marker = tmp_path / "code-was-run"
    hostile = tmp_path / "embeddings.pkl"
    content = (np.array([["x"] * 300] * 20, dtype=object) if payload == "object array"
               else [payloads(marker)[payload], np.zeros((20, 300), np.float32)])
    with open(hostile, "wb") as f:
        pickle.dump(content, f)
    folder = tmp_path / "ck"
    with pytest.raises(SystemExit) as stopped:
        main_in_process(monkeypatch, [reference.root, *SMALL, *EPOCHS, "--embeddings", str(hostile),
                                      "--checkpoint-dir", str(folder)])
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert str(hostile) in message and "Traceback" not in message
    assert ("not allowed" in message) if payload != "object array" else ("expected numbers" in message)
    assert not marker.exists()
    assert not os.path.exists(folder / checkpoints.CHECKPOINT)


def test_a_standard_embeddings_file_swapped_for_a_hostile_one_is_refused_by_its_checksum(
        reference, tmp_path, monkeypatch, capsys):
    """data/voc_glove_word2vec.pkl (where the run downloads it) replaced by a hostile pickle."""
    marker = tmp_path / "code-was-run"
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    with open(os.path.join("data", "voc_glove_word2vec.pkl"), "wb") as f:
        pickle.dump(payloads(marker)["os.system"], f)

    def no_network(*args, **kwargs):
        raise AssertionError("the file is there: nothing should be downloaded")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(SystemExit):
        main_in_process(monkeypatch, [reference.root, *SMALL, *EPOCHS, "--checkpoint-dir", "ck"])
    message = capsys.readouterr().err
    assert "voc_glove_word2vec.pkl has md5" in message and "delete it to download it again" in message
    assert not marker.exists()
