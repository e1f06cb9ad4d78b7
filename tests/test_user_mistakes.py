"""A user's mistakes never destroy a run, never report a wrong number, and end in one `error:`
line (exit status 1) before anything is lost. Each test makes one mistake as a user would, on
the command line of an entry script, and checks what that user sees: the exit status, the
message, and the files of the run folder byte for byte."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import custom
import checkpoints
import runs
import engine
import main_coco
import main_voc2007
import main_voc2012
import report
import util
from conftest import (ROOT, SMALL, call_main, fill_disk, offline_environment, rewrite_split_files,
                      unreadable, write_voc_tree)
from models import DSDL
from report import read_metrics
from util import DSDLError
from test_coco import CATEGORIES, write_coco_tree
from test_voc2012 import write_voc2012_tree


def fingerprint(folder):
    """{file name: sha256} of everything in `folder`."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch run, to copy: the tiny VOC tree, its class vectors and its folder."""
    base = tmp_path_factory.mktemp("trained")
    root = str(base / "voc2007")
    write_voc_tree(root)
    embeddings = str(base / "embeddings.npy")
    np.save(embeddings, np.random.default_rng(1).standard_normal((20, 300)).astype(np.float32))
    run = base / "run"
    common = [root, *SMALL, "--embeddings", embeddings]
    assert call_main(main_voc2007.main, [*common, "--epochs", "2", "--checkpoint-dir", str(run),
                                         "--lr", "0.1"]) == 0
    return types.SimpleNamespace(root=root, embeddings=embeddings, run=run, common=common)


@pytest.fixture
def run_folder(trained, tmp_path):
    """A copy of the finished run, to make mistakes on."""
    return shutil.copytree(trained.run, tmp_path / "run")


def main(*argv, script=main_voc2007):
    return call_main(script.main, [str(a) for a in argv])


# ---- lost work ---------------------------------------------------------------------------------

def test_the_same_training_command_twice_is_refused_before_anything_is_written(trained, run_folder, capsys):
    before = fingerprint(run_folder)
    code = main(*trained.common, "--epochs", "2", "--checkpoint-dir", run_folder)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert "already holds a run (checkpoint.pth.tar, model_best.pth.tar, metrics.jsonl)" in err
    assert f"--resume {run_folder / checkpoints.CHECKPOINT}" in err and "another --checkpoint-dir" in err
    assert fingerprint(run_folder) == before


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(
        trained, run_folder, capsys):
    # Another process holds the folder's lock, as a run that trains there does.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.write(f'{os.getpid()} here\\n'); f.flush(); print('locked', flush=True); time.sleep(60)",
         str(run_folder / runs.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = fingerprint(run_folder)
        code = main(*trained.common, "--epochs", "3", "--resume", run_folder / checkpoints.CHECKPOINT)
        err = capsys.readouterr().err
        assert code == 1 and f"another run (process {holder.pid} on here) is writing into" in err
        assert fingerprint(run_folder) == before
    finally:
        holder.kill()
        holder.wait()
    # Its lock once the process is gone (killed: it wrote its pid and never released it):
    # taken over with a note, and the run goes on.
    code = main(*trained.common, "--epochs", "3", "--resume", run_folder / checkpoints.CHECKPOINT)
    out = capsys.readouterr().out
    assert code == 0 and f"taking over {run_folder / runs.LOCK}, left by process {holder.pid}" in out
    assert torch.load(run_folder / checkpoints.CHECKPOINT, weights_only=True)["epoch"] == 3
    assert not (run_folder / runs.LOCK).exists()  # released at the end


def test_resuming_an_older_checkpoint_into_its_folder_is_refused_but_may_branch_elsewhere(
        trained, run_folder, tmp_path, capsys):
    older = tmp_path / "epoch1.pth.tar"
    state = torch.load(run_folder / checkpoints.CHECKPOINT, weights_only=True)
    torch.save({**state, "epoch": 1}, older)  # the run as it stood after epoch 1
    os.replace(older, run_folder / "epoch1.pth.tar")
    before = fingerprint(run_folder)
    code = main(*trained.common, "--epochs", "3", "--resume", run_folder / "epoch1.pth.tar")
    err = capsys.readouterr().err
    assert code == 1 and "(epoch 1) is an older epoch of this run than" in err
    assert "--checkpoint-dir NEW_FOLDER" in err and fingerprint(run_folder) == before
    # Into another folder it is a branch, which overwrites nothing and selects its best model
    # among its own epochs (the first of them is its best so far, however good the original's).
    code = main(*trained.common, "--epochs", "2", "--resume", run_folder / "epoch1.pth.tar",
                "--checkpoint-dir", tmp_path / "branch")
    assert code == 0 and fingerprint(run_folder) == before
    (record,) = read_metrics(tmp_path / "branch" / runs.METRICS_LOG)
    branch_best = torch.load(tmp_path / "branch" / checkpoints.BEST, weights_only=True)
    assert record["epoch"] == 2 and branch_best["epoch"] == 2
    assert branch_best["best_score"] == pytest.approx(record["mAP"])
    assert "a new branch" in capsys.readouterr().out


def test_a_plain_resume_continues_with_the_runs_own_recipe(trained, run_folder, recwarn):
    # Trained with --lr 0.1, -b 8, ResNet-18 at 64 px from random weights; resumed with none of it.
    assert main(trained.root, "--resume", run_folder / checkpoints.CHECKPOINT, "--epochs", "3",
                "--embeddings", trained.embeddings, "-j", "0", "--device", "cpu") == 0
    resumed = torch.load(run_folder / checkpoints.CHECKPOINT, weights_only=True)
    assert resumed["epoch"] == 3
    assert {key: resumed["args"][key] for key in ("lr", "batch_size", "arch", "image_size", "no_pretrained")} \
        == {"lr": 0.1, "batch_size": 8, "arch": "resnet18", "image_size": 64, "no_pretrained": True}
    assert [group["lr"] for group in resumed["optimizer"]["param_groups"]] == pytest.approx([0.01, 0.1])
    assert not [w for w in recwarn if "hyper-parameters" in str(w.message)]


def test_evaluating_into_the_training_folder_leaves_every_training_file_as_it_was(
        trained, run_folder, capsys):
    before = fingerprint(run_folder)
    assert main(trained.root, "-e", "--resume", run_folder / checkpoints.BEST, "--embeddings",
                trained.embeddings, "-j", "0", "--device", "cpu") == 0
    after = fingerprint(run_folder)
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == ["eval_test.jsonl", "eval_test.md"]
    (record,) = read_metrics(run_folder / "eval_test.jsonl")
    logged = {r["epoch"]: r["mAP"] for r in read_metrics(run_folder / runs.METRICS_LOG)}
    assert record["mAP"] == pytest.approx(logged[record["epoch"]], abs=1e-9)
    assert record["checkpoint"] == str(run_folder / checkpoints.BEST)


# ---- numbers that must be the ones asked for ----------------------------------------------------

def test_an_input_size_other_than_the_checkpoints_is_used_with_a_warning(trained, run_folder, capsys):
    with pytest.warns(UserWarning, match=r"evaluating with other hyper-parameters than the "
                                         r"checkpoint's .*the command line's are used:\n  "
                                         r"image_size: 64 -> 96$"):
        assert main(trained.root, "-e", "--resume", run_folder / checkpoints.BEST, "--image-size", "96",
                    "--embeddings", trained.embeddings, "-j", "0", "--device", "cpu") == 0
    assert "resnet18 at 96 px" in capsys.readouterr().out


def test_resuming_a_voc2007_run_as_voc2012_is_refused(trained, run_folder, tmp_path, capsys):
    root = str(tmp_path / "voc2012")
    write_voc2012_tree(root)
    code = main(root, *SMALL, "--embeddings", trained.embeddings, "--epochs", "3", "--resume",
                run_folder / checkpoints.CHECKPOINT, "--checkpoint-dir", tmp_path / "ck", script=main_voc2012)
    err = capsys.readouterr().err
    assert code == 1 and "is a run on VOC 2007, not VOC 2012" in err
    assert f"--init-from {run_folder / checkpoints.CHECKPOINT}" in err
    assert not (tmp_path / "ck").exists()  # made, and removed again with nothing in it


@pytest.mark.filterwarnings("ignore:Detected call of")  # no step is taken here
def test_init_from_starts_a_voc_run_from_the_trunk_and_dictionary_of_a_coco_classes_model(
        trained, tmp_path, monkeypatch, capsys):
    torch.manual_seed(3)
    coco = DSDL(5, torch.randn(5, 300), 0.1, arch="resnet18", pretrained=False)
    source = tmp_path / "coco.pth.tar"
    torch.save({"model": coco.state_dict(), "epoch": 12, "best_score": 70.0, "args": {"arch": "resnet18",
                "image_size": 64}, "classes": sorted(CATEGORIES), "semantics": coco.semantics,
                "dataset": {"name": "COCO 2014"}, "optimizer": {"state": {}, "param_groups": []}}, source)
    started = {}

    def no_training(model, *args, **kwargs):  # what the first epoch starts from, untouched
        started.update({key: value.clone() for key, value in model.state_dict().items()})
        return 1.0

    monkeypatch.setattr(engine, "train_one_epoch", no_training)
    folder = tmp_path / "voc"
    assert main(trained.root, "--embeddings", trained.embeddings, "-j", "0", "--device", "cpu",
                "--epochs", "1", "--init-from", source, "--checkpoint-dir", folder) == 0
    for key, value in coco.state_dict().items():
        if key != "semantics":  # trunk, BatchNorm statistics, W1, W2
            assert torch.equal(started[key], value), key
    np.testing.assert_array_equal(started["semantics"].numpy(), np.load(trained.embeddings))
    saved = torch.load(folder / checkpoints.CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["classes"]) == 20  # epoch 0 + this one, VOC's classes
    assert saved["best_score"] == pytest.approx(read_metrics(folder / runs.METRICS_LOG)[0]["mAP"])
    assert all(not state for state in saved["optimizer"]["state"].values())  # fresh: no momentum
    assert "starting from the trunk and auto-encoder weights of" in capsys.readouterr().out


def test_coco_splits_with_other_category_names_are_refused(tmp_path, capsys):
    root = str(tmp_path / "coco")
    write_coco_tree(root)
    path = os.path.join(root, "annotations", "instances_val2014.json")
    with open(path) as f:
        data = json.load(f)
    data["categories"][0]["name"] = "zebra crossing"  # renamed in val only
    with open(path, "w") as f:
        json.dump(data, f)
    code = main(root, *SMALL, "--embeddings", "unused.npy", "--checkpoint-dir", tmp_path / "ck",
                script=main_coco)
    err = capsys.readouterr().err
    assert code == 1 and "instances_train2014.json and" in err and "instances_val2014.json differ" in err
    assert "only in train: zebra" in err and "only in val: zebra crossing" in err


def test_coco_duplicate_names_unknown_category_ids_and_repeated_images(tmp_path):
    root = str(tmp_path / "coco")
    write_coco_tree(root)
    path = os.path.join(root, "annotations", "instances_val2014.json")
    with open(path) as f:
        original = json.load(f)

    def load(change):
        data = json.loads(json.dumps(original))
        change(data)
        with open(path, "w") as f:
            json.dump(data, f)
        for cache in os.listdir(os.path.dirname(path)):
            if cache.endswith(".npz"):
                os.remove(os.path.join(os.path.dirname(path), cache))
        return main_coco_val(root)

    with pytest.raises(DSDLError, match="names two categories 'dog'"):
        load(lambda data: data["categories"].append({"id": 99, "name": "dog"}))
    with pytest.raises(DSDLError, match="has category id 999, which is not among its categories"):
        load(lambda data: data["annotations"][0].update(category_id=999))
    with pytest.raises(DSDLError, match="holds no annotations"):
        load(lambda data: data.update(annotations=[]))
    with pytest.warns(UserWarning, match=r"lists 1 image id\(s\) more than once \(e\.g\. 5000\)"):
        dataset = load(lambda data: data["images"].append(dict(data["images"][0])))
    assert len(dataset) == 9  # the 8 annotated images, one of them twice


def main_coco_val(root):
    from coco import COCO2014
    return COCO2014(root, "val", download=False)


def test_custom_csvs_report_repeated_rows_and_images_in_both_splits(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        from conftest import class_image
        class_image([0]).save(tmp_path / "images" / name)
    (tmp_path / "train.csv").write_text("image,labels\na.jpg,cat\nb.jpg,dog\na.jpg,cat\n")
    (tmp_path / "test.csv").write_text("image,labels\nc.jpg,cat\nb.jpg,dog\n")
    with pytest.warns(UserWarning) as caught:
        custom.load_splits(str(tmp_path / "train.csv"), str(tmp_path / "test.csv"), str(tmp_path / "images"))
    (message,) = [str(w.message) for w in caught]
    assert "2 repeated image(s)" in message
    assert f"{tmp_path / 'train.csv'}, line 4: a.jpg listed twice (first at {tmp_path / 'train.csv'}, line 2)" in message
    assert f"{tmp_path / 'test.csv'}, line 3: b.jpg in two splits (first at {tmp_path / 'train.csv'}, line 3)" in message


# ---- tracebacks that become one line -------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["-b", "0"], "argument -b/--batch-size: must be at least 1, got 0"),
    (["-j", "-1"], "argument -j/--workers: must be 0 or more, got -1"),
    (["--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["--beta", "-5"], "argument --beta: must be 0 or a positive number, got -5"),
    (["--device", "gpu"], "argument --device: 'gpu' is not a device: use cuda, cuda:N or cpu"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--lambda", "3"], "unrecognized arguments: --lambda 3"),
    (["--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
])
def test_an_impossible_option_value_is_one_error_line(argv, message, capsys):
    assert main("data/voc2007", *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message} (see ") and err.endswith(" --help)\n")
    assert err.count("\n") == 1


def test_a_batch_of_one_image_is_refused_for_training(trained, tmp_path, capsys):
    assert main(*trained.common, "-b", "1", "--checkpoint-dir", tmp_path / "ck") == 1
    assert "training needs at least 2 images per batch" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_epochs_the_checkpoint_already_reached_say_so_and_exit_0(trained, run_folder, capsys):
    before = fingerprint(run_folder)
    assert main(*trained.common, "--epochs", "2", "--resume", run_folder / checkpoints.CHECKPOINT) == 0
    assert "has already trained 2 epochs, and --epochs is 2: nothing to do" in capsys.readouterr().out
    assert fingerprint(run_folder) == before


@pytest.mark.parametrize("content, said", [
    (b"epoch 3, mAP 94.4\n", "is not a PyTorch checkpoint: it is a text file"),
    (b"<!DOCTYPE html><html><body>Not Found</body></html>", "it is an HTML or XML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0f\nsize 171\n", "a git-lfs pointer"),
    (bytes(range(7, 256)) * 3, "it is neither a zip archive nor a pickle"),
    (b"", "is empty (0 bytes): not a PyTorch checkpoint"),
    (b"PK\x03\x04" + bytes(60), "truncated or not a PyTorch checkpoint"),
    ("folder", "is a folder, not a PyTorch checkpoint"),
])
def test_a_resume_file_that_is_not_a_checkpoint_is_named_for_what_it_is(trained, tmp_path, capsys,
                                                                        content, said):
    path = tmp_path / "model.pth.tar"
    if content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(*trained.common, "-e", "--resume", path, "--checkpoint-dir", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and "Traceback" not in err
    assert "weights_only" not in err  # never the advice to load it unsafely


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_a_checkpoint_dir_that_cannot_be_a_folder_is_found_before_the_first_epoch(trained, tmp_path,
                                                                                  capsys, kind):
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" if kind == "a file" else tmp_path / "file" / "run"
    assert main(*trained.common, "--checkpoint-dir", folder) == 1
    err = capsys.readouterr().err
    assert f"--checkpoint-dir {folder}" in err and "Traceback" not in err


def test_ctrl_c_says_how_to_resume_and_exits_130(trained, run_folder, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    before = fingerprint(run_folder)
    assert main(*trained.common, "--epochs", "3", "--resume", run_folder / checkpoints.CHECKPOINT) == 130
    assert capsys.readouterr().err.strip() == \
        f"interrupted; continue with --resume {run_folder / checkpoints.CHECKPOINT}"
    assert fingerprint(run_folder) == before and not (run_folder / runs.LOCK).exists()


def test_ctrl_c_in_a_terminal_with_loader_workers_is_the_same_one_line(trained, run_folder):
    """Ctrl-C signals the whole foreground process group: the run and its loader workers."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main_voc2007.py"), *trained.common, "-j", "2",
         "--epochs", "50", "--resume", str(run_folder / checkpoints.CHECKPOINT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**offline_environment(), "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("training on"):  # the loaders and their workers start now
            break
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == \
        f"interrupted; continue with --resume {run_folder / checkpoints.CHECKPOINT}"
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_no_imagenet_weights_offline_is_the_advice_alone(offline, trained, tmp_path, capsys):
    argv = [a for a in trained.common if a != "--no-pretrained"]
    assert main(*argv, "--checkpoint-dir", tmp_path / "ck") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not download the ImageNet weights of resnet18")
    assert "--no-pretrained" in err and "Traceback" not in err


def test_empty_splits_are_errors_that_name_the_files(tmp_path, trained, capsys):
    root = str(tmp_path / "voc")
    write_voc_tree(root, splits={"trainval": 4, "test": 4})
    main_folder = rewrite_split_files(root, "trainval", lambda name, lines: [])
    assert main(root, *SMALL, "--embeddings", trained.embeddings, "--checkpoint-dir", tmp_path / "ck") == 1
    assert f"the trainval split files in {main_folder} list no images" in capsys.readouterr().err


def test_a_missing_test_image_is_found_before_the_first_epoch(trained, tmp_path, capsys):
    root = str(tmp_path / "voc")
    written = write_voc_tree(root)
    missing = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", written["test"][0][3] + ".jpg")
    os.remove(missing)
    assert main(root, *SMALL, "--embeddings", trained.embeddings, "--checkpoint-dir", tmp_path / "ck") == 1
    err = capsys.readouterr().err
    assert "1 of the 16 images of VOC 2007 test are missing" in err and missing in err
    assert not (tmp_path / "ck").exists()  # found before anything trained


@pytest.mark.parametrize("row", ["nan", "zeros"])
def test_class_vectors_with_nan_or_zeros_are_refused_at_load(trained, tmp_path, capsys, row):
    vectors = np.load(trained.embeddings)
    vectors[7] = np.nan if row == "nan" else 0
    path = tmp_path / "vectors.npy"
    np.save(path, vectors)
    assert main(trained.root, *SMALL, "--embeddings", path, "--checkpoint-dir", tmp_path / "ck") == 1
    err = capsys.readouterr().err
    assert "row(s) 7 is all zeros or hold NaN/inf" in err and "--lr" not in err


def test_a_failed_first_checkpoint_write_does_not_claim_an_intact_previous_one(trained, tmp_path,
                                                                              monkeypatch, capsys):
    def full_disk(state, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(*trained.common, "--epochs", "1", "--checkpoint-dir", tmp_path / "ck") == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert "no model_best.pth.tar was written" in err and "intact" not in err
    assert "start the run again (no epoch was saved yet)" in err
    # That advice works: a folder where no epoch was saved holds no run, and the same command
    # starts (here it is stopped as it begins to train).
    monkeypatch.setattr(torch, "save", torch.serialization.save)
    monkeypatch.setattr(engine, "train_one_epoch", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGINT))
    assert main(*trained.common, "--epochs", "1", "--checkpoint-dir", tmp_path / "ck") == 130
    assert "is the log of a run that saved no epoch" in capsys.readouterr().out
    assert not (tmp_path / "ck" / runs.METRICS_LOG).exists()


def test_a_split_without_positives_says_no_model_can_be_selected(trained, tmp_path, capsys):
    root = str(tmp_path / "voc")
    write_voc_tree(root, splits={"trainval": 8, "test": 4})
    rewrite_split_files(root, "test", lambda name, lines: [line.split()[0] + " -1\n" for line in lines])
    folder = tmp_path / "ck"
    assert main(root, *SMALL, "--embeddings", trained.embeddings, "--epochs", "1",
                "--checkpoint-dir", folder) == 0
    out = capsys.readouterr().out
    assert "test mAP undefined, best none" in out
    assert "no class has a positive in test, so no model can be selected" in out
    assert "best -inf" not in out and not (folder / checkpoints.BEST).exists()


def test_voc2012_trains_and_selects_on_val_without_the_test_archive(offline, trained, tmp_path, capsys):
    root = str(tmp_path / "voc2012")
    write_voc_tree(root, year="2012", splits={"train": 8, "val": 8})  # no test split at all

    folder = tmp_path / "ck"
    with pytest.warns(UserWarning, match="no evaluation-server submission will be written"):
        assert main(root, *SMALL, "--embeddings", trained.embeddings, "--epochs", "1",
                    "--checkpoint-dir", folder, script=main_voc2012) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1: train loss" in out and "val mAP" in out
    assert (folder / checkpoints.BEST).exists() and not (folder / "results.tar.gz").exists()


@pytest.mark.parametrize("script", ["main_voc2007.py", "main_voc2012.py", "main_coco.py",
                                    "main_custom.py", "main_nuswide.py", "main_openimages.py",
                                    "predict.py", "export.py", "report.py", "make_embeddings.py",
                                    "bench.py"])
def test_help_answers_before_torch_loads(script, tmp_path):
    fake = tmp_path / "torch"  # found before the real torch: importing it fails the command
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('imported torch')\n")
    for argv, code in ((["--help"], 0), (["--no-such-option"], 1)):
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_every_option_has_a_help_text_that_says_its_default_once():
    parser = main_voc2007.get_args_parser()
    for action in parser._actions:
        assert action.help and action.help.count("(default:") <= 1, action.option_strings
    assert "(default: None)" not in parser.format_help()


# ---- outside the command line: the disk, the data, the scheduler, the files (issue 18) --------

def test_a_lock_file_that_does_not_fit_on_the_disk_is_one_line_and_the_run_is_as_it_was(
        trained, run_folder, monkeypatch, capsys):
    before = fingerprint(run_folder)
    fill_disk(monkeypatch, runs, 0)
    assert main(*trained.common, "--epochs", "3", "--resume", run_folder / checkpoints.CHECKPOINT) == 1
    assert capsys.readouterr().err == (
        f"error: cannot write {run_folder / runs.LOCK} (No space left on device); free disk space "
        f"in {run_folder}, then run the same command again\n")
    assert fingerprint(run_folder) == before


def test_a_folder_without_room_for_an_epoch_is_refused_with_the_figures_before_it_trains(
        trained, run_folder, tmp_path, monkeypatch, capsys):
    before = fingerprint(run_folder)
    free = 5 * 2 ** 20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free))
    monkeypatch.setattr(engine, "train_one_epoch", lambda *args, **kwargs: pytest.fail("trained"))
    checkpoint = run_folder / checkpoints.CHECKPOINT
    assert main(*trained.common, "--epochs", "3", "--resume", checkpoint) == 1
    err = capsys.readouterr().err
    figures = re.fullmatch(
        rf"error: {re.escape(str(run_folder))} has 5 MB free, but an epoch of this run writes "
        rf"about (\d+) MB \(checkpoints of about (\d+) MB each: the weights and the optimizer's "
        rf"state\)\. Free disk space there, or pass a --checkpoint-dir on another disk\n", err)
    needed, each = map(int, figures.groups())
    assert each == pytest.approx(os.path.getsize(checkpoint) / 2 ** 20, rel=0.02)  # the estimate
    assert needed == each + 1  # both files there: one at a time beside its old self, and the log
    assert fingerprint(run_folder) == before
    # A new run: two checkpoints, and from its second epoch the temporary copy of one beside its
    # old self (a disk with room for the two alone fills up at epoch 2); the folder it made is
    # removed again.
    assert main(*trained.common, "--checkpoint-dir", tmp_path / "new" / "run") == 1
    needed = int(re.search(r"writes about (\d+) MB", capsys.readouterr().err)[1])
    assert abs(needed - (3 * each + 1)) <= 1  # rounded to whole MB
    assert not (tmp_path / "new").exists()


def test_a_full_disk_under_evaluation_is_one_line_and_the_training_files_are_as_they_were(
        trained, run_folder, monkeypatch, capsys):
    before = fingerprint(run_folder)
    fill_disk(monkeypatch, report, 0)  # the record of eval_test.jsonl
    fill_disk(monkeypatch, util, 0)    # the table
    assert main(*trained.common, "-e", "--resume", run_folder / checkpoints.BEST) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (  # after the progress bar
        f"error: could not write into {run_folder} (No space left on device); the files there "
        f"that were complete still are. Free disk space there (or pass a --checkpoint-dir on "
        f"another disk), then run the same command again")
    assert "Traceback" not in err
    assert fingerprint(run_folder) == before


@pytest.mark.parametrize("change, what", [
    (lambda lines: lines[:12], "16 images then, 12 now"),
    (lambda lines: ["000000" + lines[0][6:], *lines[1:]], "16 images then and now, but not the same ones"),
])
def test_resuming_on_another_test_split_is_refused_since_its_best_map_is_not_comparable(
        trained, run_folder, tmp_path, capsys, change, what):
    root = shutil.copytree(trained.root, tmp_path / "voc")
    rewrite_split_files(root, "test", lambda name, lines: change(lines))
    before = fingerprint(run_folder)
    checkpoint = run_folder / checkpoints.CHECKPOINT
    assert main(root, *trained.common[1:], "--epochs", "3", "--resume", checkpoint) == 1
    assert capsys.readouterr().err == (
        f"error: the evaluation split differs from the one {checkpoint} was selected on ({what}): "
        f"its best mAP is no longer comparable, so --resume cannot continue the run. To start a "
        f"new run from its weights on these images, use --init-from {checkpoint} --checkpoint-dir "
        f"NEW_FOLDER\n")
    assert fingerprint(run_folder) == before


def test_resuming_on_another_training_split_is_a_warning(trained, run_folder, tmp_path, monkeypatch):
    saved = torch.load(run_folder / checkpoints.CHECKPOINT, weights_only=True)["dataset"]
    assert saved["sizes"] == {"train": 24, "test": 16} and saved["evaluated"] == "test"  # by role
    assert saved["roles"] == {"train": "trainval", "test": "test"}
    assert set(saved["fingerprints"]) == set(saved["label_fingerprints"]) == {"train", "test"}
    assert [record["images"] for record in read_metrics(run_folder / runs.METRICS_LOG)] == [16, 16]
    root = shutil.copytree(trained.root, tmp_path / "voc")
    rewrite_split_files(root, "trainval", lambda name, lines: lines[:16])
    checkpoint = run_folder / checkpoints.CHECKPOINT
    monkeypatch.setattr(engine, "train_one_epoch", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGINT))
    with pytest.warns(UserWarning) as caught:  # then it trains: here stopped as it begins
        assert main(root, *trained.common[1:], "--epochs", "3", "--resume", checkpoint) == 130
    assert [str(w.message) for w in caught] == [
        f"the trainval split differs from the one {checkpoint} was trained on (24 images then, "
        f"16 now); training continues on this one"]


@pytest.mark.parametrize("evaluate", [True, False])
def test_class_vectors_other_than_the_checkpoints_are_refused_pointing_to_init_from(
        trained, run_folder, tmp_path, capsys, evaluate):
    other = tmp_path / "other.npy"
    np.save(other, np.load(trained.embeddings)[::-1])
    before = fingerprint(run_folder)
    checkpoint = run_folder / checkpoints.CHECKPOINT
    how = ["-e"] if evaluate else ["--epochs", "3"]
    assert main(trained.root, *SMALL, "--embeddings", other, *how, "--resume", checkpoint) == 1
    assert capsys.readouterr().err == (
        f"error: --embeddings {other} holds other class vectors than {checkpoint}: its dictionary "
        f"was learned from the checkpoint's vectors, which are kept; leave out --embeddings to "
        f"use them. To start a new run from its weights with these vectors, use --init-from "
        f"{checkpoint}\n")
    assert fingerprint(run_folder) == before


def test_a_schedulers_sigterm_says_how_to_resume_releases_the_lock_and_exits_143(trained, run_folder):
    """A scheduler signals every process of the job, the loader workers too."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main_voc2007.py"), *trained.common, "-j", "1",
         "--epochs", "50", "--resume", str(run_folder / checkpoints.CHECKPOINT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**offline_environment(), "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("training on"):
            break
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == \
        f"stopped by SIGTERM; continue with --resume {run_folder / checkpoints.CHECKPOINT}"
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert not (run_folder / runs.LOCK).exists()


def test_a_closed_terminal_stops_the_run_as_ctrl_c_does(trained, run_folder, monkeypatch, capsys):
    signum = signal.SIGHUP
    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        pytest.fail("the signal did not stop the run")

    monkeypatch.setattr(engine, "train_one_epoch", signalled)
    before = fingerprint(run_folder)
    checkpoint = run_folder / checkpoints.CHECKPOINT
    assert main(*trained.common, "--epochs", "3", "--resume", checkpoint) == 128 + signum
    assert capsys.readouterr().err.strip() == \
        f"stopped by {signal.Signals(signum).name}; continue with --resume {checkpoint}"
    assert fingerprint(run_folder) == before and not (run_folder / runs.LOCK).exists()


def test_an_unreadable_image_is_found_at_start_up_and_said_to_be_permission_denied(
        trained, tmp_path, monkeypatch, capsys):
    root = shutil.copytree(trained.root, tmp_path / "voc")
    locked = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", "000030.jpg")  # a test image
    unreadable(monkeypatch, locked)
    assert main(root, *trained.common[1:], "--checkpoint-dir", tmp_path / "ck") == 1
    assert capsys.readouterr().err == (
        f"error: cannot read {locked}: permission denied; make the images readable (chmod a+r) "
        f"or run as a user who may read them\n")
    assert not (tmp_path / "ck").exists()  # found before anything was written


def edited(checkpoint, damage):
    if damage == "class vectors":
        checkpoint["semantics"] = checkpoint["semantics"][:, :299]
    elif damage == "class count":
        checkpoint["semantics"] = checkpoint["semantics"][:19]
    elif damage == "epoch":
        checkpoint["epoch"] = 2.5
    else:
        checkpoint["model"]["features.0.weight"][0, 0, 0, 0] = float("nan")
    return checkpoint


@pytest.mark.parametrize("damage, message", [
    ("class vectors", "its class vectors ('semantics') are (20, 299), but its auto-encoder (W1, "
                      "(300, 1024)) takes 300-d vectors; use another checkpoint"),
    ("class count", "its class vectors ('semantics') are (19, 300), but it names 20 classes, "
                    "each with one class vector; use another checkpoint"),
    ("epoch", "its epoch is 2.5, not a number of finished epochs; use another checkpoint"),
    ("NaN weights", "1 of its weights hold NaN or infinite values (features.0.weight); it cannot "
                    "be trained on or evaluated. Use an earlier checkpoint of the run (its "
                    "model_best.pth.tar, or a copy)"),
])
def test_an_edited_or_damaged_checkpoint_is_one_line_when_it_is_loaded(
        trained, tmp_path, capsys, damage, message):
    path = tmp_path / "edited.pth.tar"
    torch.save(edited(torch.load(trained.run / checkpoints.CHECKPOINT, weights_only=True), damage), path)
    assert main(*trained.common, "--epochs", "3", "--resume", path) == 1
    assert capsys.readouterr().err == f"error: {path} is damaged or was edited: {message}\n"


def test_running_out_of_memory_in_training_names_the_settings_to_lower(
        trained, tmp_path, monkeypatch, capsys):
    def allocate(*args, **kwargs):  # what too large a batch does to the allocator
        return torch.empty(1 << 60, dtype=torch.uint8)

    monkeypatch.setattr(engine, "train_one_epoch", allocate)
    assert main(*trained.common, "--checkpoint-dir", tmp_path / "ck") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and len(err.splitlines()) == 1
    assert err.endswith("lower -b/--batch-size (now 8) or --image-size (now 64), then start the "
                        "run again (no epoch was saved yet)\n")
    assert not (tmp_path / "ck").exists()  # the folder it made, empty: removed again


def test_a_start_that_fails_leaves_no_empty_folders_in_the_working_directory(
        offline, trained, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default run folder checkpoints/voc2007 and data/ go here
    assert main(trained.root, *SMALL) == 1  # no class vectors offline
    assert "could not download" in capsys.readouterr().err
    assert os.listdir(work) == []
