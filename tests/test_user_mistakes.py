"""A user's mistakes never destroy a run, never report a wrong number, and end in one `error:`
line (exit status 1) before anything is lost. Each test makes one mistake as a user would, on
the command line of an entry script, and checks what that user sees: the exit status, the
message, and the files of the run folder byte for byte."""
import hashlib
import json
import os
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
from conftest import ROOT, SMALL, call_main, offline_environment, rewrite_split_files, write_voc_tree
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
    assert not os.listdir(tmp_path / "ck")


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
    assert not os.listdir(tmp_path / "ck")  # found before anything trained


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
