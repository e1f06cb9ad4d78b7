"""What an adversarial user met and what it does now: nothing a user owns is overwritten, no
label change goes unseen, and each mistake is one `error:` line (issue 25's cases, one test or
more each)."""
import os

import numpy as np
import pytest
import torch

import custom
import main_voc2007
import options
import report
from conftest import SMALL, call_main
from util import DSDLError


def error_line(capsys):
    """The one `error:` line a command ended with (and nothing after it)."""
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and errors == err[-1:], err
    return errors[0]


# --------------------------------------------------------------------------------------------
# Small refusals
# --------------------------------------------------------------------------------------------

def test_a_seed_numpy_and_torch_cannot_take_is_refused_by_the_parser(capsys):
    parser = main_voc2007.get_args_parser()
    assert options.parse_args(parser, ["data", "--seed", str(2 ** 64 - 1)]).seed == 2 ** 64 - 1
    with pytest.raises(SystemExit) as stopped:
        options.parse_args(parser, ["data", "--seed", str(2 ** 64)])
    assert stopped.value.code == 1
    assert "argument --seed: must be below 2^64" in capsys.readouterr().err


def test_a_repeated_nuswide_concept_is_refused_like_a_repeated_class(tmp_path):
    from test_nuswide import write_nuswide_tree
    from nuswide import NUSWIDE
    root = str(tmp_path / "nuswide")
    write_nuswide_tree(root)
    with open(os.path.join(root, "Concepts81.txt"), "a", newline="") as f:
        f.write("car\r\n")
    with pytest.raises(DSDLError, match=r"Concepts81.txt names car more than once"):
        NUSWIDE(root, "test")


def test_a_doubled_question_mark_is_a_problem_with_its_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image,labels\na.jpg,dog;??cat\nb.jpg,?dog\n")
    rows, problems = custom.read_label_csv(str(path))
    assert problems == [f"{path}, line 2: '??cat' has more than one '?' (write '?name' for a "
                        f"label nobody checked)"]
    assert [(line, names, unchecked) for line, _, names, unchecked in rows] == [(3, [], ["dog"])]


def test_a_class_name_with_a_bar_keeps_the_markdown_table_whole():
    classes = ["cat|dog", "bird"]
    table = report.results_table({"AP": [50.0, 25.0], "mAP": 37.5}, classes)
    header, rule, ours = table.splitlines()
    # Markdown splits a row at the bars that are not escaped: as many cells as columns
    cells = [len([part for part in line.replace("\\|", "").split("|")[1:-1]]) for line in (header, rule, ours)]
    assert cells == [4, 4, 4]
    assert "cat\\|dog" in header


def test_make_embeddings_strips_a_byte_order_mark_and_refuses_non_finite_vectors(tmp_path, capsys):
    import make_embeddings
    glove = tmp_path / "glove.txt"
    glove.write_bytes(b"\xef\xbb\xbfcat 0.5 1.0 -2.0\ndog 1.5 2.0 0.0\n")
    out = tmp_path / "vectors.npy"
    make_embeddings.main(["--classes", "cat", "dog", "--vectors", str(glove), "-o", str(out)])
    np.testing.assert_array_equal(np.load(out), np.array([[0.5, 1.0, -2.0], [1.5, 2.0, 0.0]], np.float32))
    glove.write_text("cat 0.5 nan -2.0\ndog 1.5 inf 0.0\n")
    with pytest.raises(SystemExit):
        make_embeddings.main(["--classes", "cat", "dog", "--vectors", str(glove), "-o", str(out)])
    assert error_line(capsys) == (f"error: {glove}, line 1: the vector of 'cat' holds NaN or "
                                  f"infinite values; repair or re-download the file")
    np.testing.assert_array_equal(np.load(out)[0], [0.5, 1.0, -2.0])  # the earlier file stays


def test_a_classes_file_that_does_not_exist_is_named_not_taken_for_a_class(tmp_path, capsys):
    import make_embeddings
    missing = str(tmp_path / "classes.txt")
    with pytest.raises(SystemExit):
        make_embeddings.main(["--classes", missing, "--vectors", str(tmp_path / "g.txt")])
    assert error_line(capsys) == (f"error: --classes {missing}: no such file (a file with a "
                                  f"class name per line; or give the class names themselves)")


# --------------------------------------------------------------------------------------------
# A file given in the wrong place says what it is and which file is expected
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wrong")
    with torch.no_grad():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(folder / "model.pt"))
    torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, folder / "checkpoint.pth.tar")
    (folder / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x032.9" + bytes(64))
    (folder / "train.csv").write_text("image,labels\na.jpg,cat\n")
    return folder


@pytest.mark.parametrize("name, what", [
    ("model.pt", "a TorchScript model (what export.py writes)"),
    ("model.onnx", "an ONNX model (what export.py writes)"),
    ("train.csv", "a text file (a CSV: label files go to the entry script)")])
def test_a_file_given_as_resume_says_what_it_is_and_what_is_expected(name, what, wrong_files, capsys):
    path = str(wrong_files / name)
    assert call_main(main_voc2007.main, ["data", "--device", "cpu", "-e", "--resume", path]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: --resume {path} is not a PyTorch checkpoint: it is {what}")
    assert "checkpoint.pth.tar or model_best.pth.tar" in line and "weights_only" not in line


@pytest.mark.parametrize("name, what", [("model.pt", "a TorchScript model"),
                                        ("checkpoint.pth.tar", "a PyTorch checkpoint"),
                                        ("train.csv", "a text file (a CSV")])
def test_a_file_given_as_embeddings_says_what_it_is_and_what_is_expected(name, what, wrong_files):
    from embeddings import load_embeddings
    with pytest.raises(DSDLError) as raised:
        load_embeddings(str(wrong_files / name))
    message = str(raised.value)
    assert f"{name}: it is {what}" in message and "make_embeddings.py writes one" in message
    assert "persistent" not in message and "MARK" not in message


@pytest.mark.parametrize("given", [["--lambd", "3"], ["--beta", "0.1"], ["--embeddings", "v.npy"],
                                   ["--lambd", "3", "--beta", "0.1"]])
def test_the_baseline_refuses_the_dsdl_options_it_would_ignore(given, capsys):
    code = call_main(main_voc2007.main, ["no-such-folder", "--device", "cpu", "--model", "baseline", *given])
    flags = [flag for flag in given if flag.startswith("--")]
    assert code == 1
    assert error_line(capsys) == (f"error: --model baseline does not use {' and '.join(flags)} "
                                  f"(DSDL's): leave {'it' if len(flags) == 1 else 'them'} out")


def test_entry_scripts_without_val_do_not_advise_it():
    import main_custom
    import main_nuswide
    import main_openimages
    from engine import Datasets
    own = type("Split", (), {"split": "test", "benchmark": None})()
    for script, has_val in ((main_nuswide, False), (main_openimages, False), (main_custom, True)):
        dests = {action.dest for action in script.get_args_parser()._actions}  # args' attributes
        note = report.selection_note(Datasets(None, own), can_validate="val" in dests)
        assert note.startswith("model_best is chosen on test") and ("--val" in note) == has_val


# --------------------------------------------------------------------------------------------
# Splits known by their role and their labels, not by their file's name
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labels_in_folders(tmp_path_factory):
    """A --val run of one epoch on train/labels.csv, val/labels.csv and test/labels.csv."""
    from test_custom import COMMON, write_dataset
    import main_custom
    root = tmp_path_factory.mktemp("folders")
    write_dataset(root, counts=(("train", 8), ("val", 6), ("test", 6)))
    for split in ("train", "val", "test"):
        os.makedirs(root / split)
        os.rename(root / f"{split}.csv", root / split / "labels.csv")
    np.save(root / "classes.npy", np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32))
    argv = [str(root), *COMMON, "--embeddings", str(root / "classes.npy"), "--train-csv",
            str(root / "train" / "labels.csv"), "--test-csv", str(root / "test" / "labels.csv")]
    run = root / "run"
    assert call_main(main_custom.main, [*argv, "--val", str(root / "val" / "labels.csv"),
                                        "--epochs", "1", "--checkpoint-dir", str(run)]) == 0
    return root, argv, run


def test_three_csvs_of_one_name_keep_three_split_records(labels_in_folders):
    root, _, run = labels_in_folders
    record = torch.load(run / "checkpoint.pth.tar", weights_only=True)["dataset"]
    assert record["roles"] == {"train": "train-labels", "val": "val-labels", "test": "test-labels"}
    assert record["sizes"] == {"train": 8, "val": 6, "test": 6} and record["evaluated"] == "val"
    assert len(set(record["fingerprints"].values())) == 3
    assert os.path.isfile(run / "results_val-labels.md") and os.path.isfile(run / "eval_test-labels.jsonl")


def test_resuming_a_val_run_without_val_is_refused_whatever_the_names(labels_in_folders, tmp_path,
                                                                      capsys):
    import shutil
    import main_custom
    root, argv, run = labels_in_folders
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code = call_main(main_custom.main, [*argv, "--resume", str(copy / "checkpoint.pth.tar"),
                                        "--epochs", "2"])
    assert code == 1
    line = error_line(capsys)
    assert "chose its best model on the split 'val-labels'" in line
    assert "the validation CSV is not given now: pass it again with --val" in line


def test_resuming_after_the_evaluated_splits_labels_changed_is_refused(voc_root, random_embeddings,
                                                                      tmp_path, capsys):
    from conftest import rewrite_split_files
    root, _ = voc_root
    run = tmp_path / "run"
    argv = [root, *SMALL, "--embeddings", random_embeddings]
    assert call_main(main_voc2007.main, [*argv, "--epochs", "1", "--checkpoint-dir", str(run)]) == 0
    # one label of one test image flips from absent to present; the image ids stay

    def flip_first_absent(name, lines):
        if name != "cat":
            return lines
        first = next(i for i, line in enumerate(lines) if line.split()[1] == "-1")
        return [*lines[:first], lines[first].replace("-1", " 1"), *lines[first + 1:]]
    rewrite_split_files(root, "test", flip_first_absent)
    code = call_main(main_voc2007.main, [*argv, "--epochs", "2", "--resume",
                                         str(run / "checkpoint.pth.tar")])
    assert code == 1
    assert ("the evaluation split differs from the one" in (line := error_line(capsys))
            and "the same 16 images, but their labels changed" in line)


def test_a_tensorboard_run_resumes_where_tensorboard_is_missing(voc_root, random_embeddings,
                                                                tmp_path, monkeypatch, capsys):
    import importlib.util
    root, _ = voc_root
    run = tmp_path / "run"
    argv = [root, *SMALL, "--embeddings", random_embeddings]
    assert call_main(main_voc2007.main, [*argv, "--epochs", "1", "--checkpoint-dir", str(run)]) == 0
    checkpoint = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    checkpoint["args"]["tensorboard"] = True  # as a run trained with --tensorboard records it
    torch.save(checkpoint, run / "checkpoint.pth.tar")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else real(name, *rest))
    resume = [*argv, "--resume", str(run / "checkpoint.pth.tar")]
    with pytest.warns(UserWarning, match="trained with --tensorboard, but the tensorboard package "
                                         "is not installed here"):
        assert call_main(main_voc2007.main, [*resume, "--epochs", "2"]) == 0
    assert not [name for name in os.listdir(run) if name.startswith("events.")]
    assert call_main(main_voc2007.main, [*resume, "--epochs", "3", "--no-tensorboard"]) == 0
    # asked for on the command line, it is still refused with the way to install it
    assert call_main(main_voc2007.main, [*resume, "--epochs", "4", "--tensorboard"]) == 1
    assert "--tensorboard needs the tensorboard package" in error_line(capsys)


@pytest.mark.parametrize("cause", ["vectors", "beta"])
def test_a_non_finite_loss_names_the_class_vectors_or_beta_when_they_are_out_of_range(
        cause, voc_root, tmp_path, capsys):
    root, _ = voc_root
    vectors = tmp_path / "vectors.npy"
    scale = 1e25 if cause == "vectors" else 1.0
    np.save(vectors, (scale * np.random.default_rng(1).standard_normal((20, 300))).astype(np.float32))
    extra = ["--beta", "1e38"] if cause == "beta" else []
    code = call_main(main_voc2007.main, [root, *SMALL, "--embeddings", str(vectors), "--epochs", "1",
                                         "--checkpoint-dir", str(tmp_path / "run"), *extra])
    assert code == 1
    line = error_line(capsys)
    assert "the loss became" in line and "lower --lr" in line
    said = ("the class vectors hold values up to" if cause == "vectors" else "--beta 1e+38 is large")
    assert said in line


# --------------------------------------------------------------------------------------------
# Ctrl-C in the commands that write one result
# --------------------------------------------------------------------------------------------

def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["predict", "export", "make_embeddings"])
def test_ctrl_c_in_a_one_result_command_is_one_line_and_exit_status_130(command, tmp_path,
                                                                        monkeypatch, capsys):
    import export
    import make_embeddings
    import predict
    module = {"predict": predict, "export": export, "make_embeddings": make_embeddings}[command]
    if command == "make_embeddings":
        monkeypatch.setattr(make_embeddings, "class_vectors", interrupt)
        (tmp_path / "g.txt").write_text("cat 1 2\n")
        argv = ["--classes", "cat", "--vectors", str(tmp_path / "g.txt"), "-o", str(tmp_path / "v.npy")]
    else:
        monkeypatch.setattr(module, "load_model", interrupt)
        argv = ["--resume", "model.pth.tar", *(["a.jpg"] if command == "predict" else
                                               ["--format", "torchscript", "-o", str(tmp_path / "m.pt")])]
    assert module.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted; ") and "run the same command again" in err[0]


# --------------------------------------------------------------------------------------------
# Outputs never land on what the user owns
# --------------------------------------------------------------------------------------------

from test_predict import trained  # noqa: E402,F401 (fixture: a checkpoint and three images)


@pytest.fixture
def owned(trained, tmp_path):
    """Copies of the user's files: a checkpoint, two photos, a label CSV, a run's log."""
    import shutil
    checkpoint = tmp_path / "model.pth.tar"
    shutil.copy(trained[0], checkpoint)
    photos = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for source, target in zip(trained[2], photos):
        shutil.copy(source, target)
    (tmp_path / "train.csv").write_text("image,labels\na.jpg,cat\n")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "mAP": 50.0}\n')
    files = [checkpoint, *photos, tmp_path / "train.csv", tmp_path / "metrics.jsonl"]
    return checkpoint, photos, {path: path.read_bytes() for path in files}


def unchanged(files):
    return all(path.read_bytes() == content for path, content in files.items())


@pytest.mark.parametrize("option, target, said", [
    ("--json", "a.jpg", "exists and is an image, not an earlier output of --json"),  # --json *.jpg
    ("--csv", "train.csv", "exists and is a text file (a CSV: label files go to the entry script), "
                           "not an earlier output of --csv"),
    ("--json", "metrics.jsonl", "not an earlier output of --json"),
    ("--json", "model.pth.tar", "is also an input of this command"),
    ("--csv", "b.jpg", "is also an input of this command")])
def test_predict_never_writes_onto_an_input_or_a_file_of_another_kind(option, target, said, owned,
                                                                       capsys):
    import predict
    checkpoint, photos, files = owned
    path = str(checkpoint.parent / target)
    if "also an input" not in said:  # as a shell glob hands it over: `--json *.jpg`
        photos = [photo for photo in photos if photo.name != target]
    code = predict.main(["--resume", str(checkpoint), option, path, *map(str, photos), "-j", "0"])
    assert code == 1 and said in error_line(capsys) and unchanged(files)


def test_predict_replaces_its_own_earlier_outputs(owned, capsys):
    import predict
    checkpoint, photos, files = owned
    out = [str(checkpoint.parent / "labels.json"), str(checkpoint.parent / "labels.csv")]
    argv = ["--resume", str(checkpoint), "--json", out[0], "--csv", out[1], *map(str, photos), "-j", "0"]
    assert predict.main(argv) == 0 and predict.main([*argv, "--top-k", "1"]) == 0
    assert len(open(out[1]).read().splitlines()) == 1 + len(photos)  # the second run's rows
    assert unchanged(files)


def test_export_never_writes_onto_the_checkpoint_or_another_file_and_replaces_its_own(owned, capsys):
    import export
    checkpoint, photos, files = owned
    argv = ["--resume", str(checkpoint), "--format", "torchscript", "-o"]
    for target, said in ((checkpoint, "is also an input of this command"),
                         (photos[0], "exists and is an image")):
        assert export.main([*argv, str(target)]) == 1
        assert said in error_line(capsys) and unchanged(files)
    out = str(checkpoint.parent / "model.pt")
    assert export.main([*argv, out]) == 0 and export.main([*argv, out]) == 0  # its own: replaced


def test_make_embeddings_never_writes_onto_its_inputs_or_another_file(tmp_path, capsys):
    import make_embeddings
    glove = tmp_path / "glove.txt"
    glove.write_text("cat 0.5 1.0\ndog 1.5 2.0\n")
    (tmp_path / "train.csv").write_text("image,labels\na.jpg,cat\nb.jpg,dog\n")
    files = {path: path.read_bytes() for path in (glove, tmp_path / "train.csv")}
    argv = ["--vectors", str(glove)]
    for extra, said in ((["--classes", "cat", "dog", "-o", str(glove)], "is also an input"),
                        (["--csv", str(tmp_path / "train.csv"), "-o", str(tmp_path / "train.csv")],
                         "is also an input"),
                        (["--classes", "cat", "-o", str(tmp_path / "train.csv")], "not an earlier output")):
        with pytest.raises(SystemExit):
            make_embeddings.main([*argv, *extra])
        assert said in error_line(capsys) and unchanged(files)
    out = str(tmp_path / "vectors.npy")
    make_embeddings.main([*argv, "--classes", "cat", "dog", "-o", out])
    make_embeddings.main([*argv, "--classes", "dog", "cat", "-o", out])  # its own: replaced
    np.testing.assert_array_equal(np.load(out), [[1.5, 2.0], [0.5, 1.0]])


def test_classes_named_in_another_order_than_the_vector_rows_are_one_line_not_permuted(trained,
                                                                                     tmp_path, capsys):
    import predict
    from voc import VOC_CLASSES
    checkpoint, model, images = trained
    vectors = model.semantics.numpy()
    np.save(tmp_path / "rows.npy", vectors[[0, 1, 2]])  # aeroplane, bicycle, bird, in this order
    argv = ["--resume", checkpoint, "--embeddings", str(tmp_path / "rows.npy"), images[0], "-j", "0"]
    # the names in the rows' order: scored as trained
    assert predict.main([*argv, "--classes", *VOC_CLASSES[:3], "--threshold", "0"]) == 0
    capsys.readouterr()
    # the same rows, the names in another order: refused, never silently swapped
    assert predict.main([*argv, "--classes", VOC_CLASSES[1], VOC_CLASSES[0], VOC_CLASSES[2]]) == 1
    assert error_line(capsys) == (
        f"error: {tmp_path / 'rows.npy'}: row 1, given for 'bicycle', is the vector of 'aeroplane' "
        f"the checkpoint was trained with: its rows are not in the order of --classes. Put the rows "
        f"in the order of the names (or name the classes in the order of the rows)")


# --------------------------------------------------------------------------------------------
# Open Images' label files, read as the csv module reads them
# --------------------------------------------------------------------------------------------

def test_open_images_quoted_fields_are_read_and_every_confidence_is_checked(tmp_path):
    import csv
    from openimages import read_image_labels
    path = tmp_path / "labels.csv"
    lines = ["ImageID,Source,LabelName,Confidence",
             "img1,verification,/m/cat,1",
             '"img2","verification","/m/cat","0"',   # quoted: the same as unquoted
             'img3,"crowd, sourced",/m/dog,1']          # a comma inside a quoted field
    path.write_text("\n".join(lines) + "\n")
    ids, indptr, columns, values = read_image_labels(str(path), ["/m/cat", "/m/dog"])
    with open(path, newline="") as f:  # the official reader's view of the same file
        rows = list(csv.DictReader(f))
    expected = [(row["ImageID"], ["/m/cat", "/m/dog"].index(row["LabelName"]),
                 1 if row["Confidence"] == "1" else -1) for row in rows]
    ours = [(ids[i].decode(), int(columns[j]), int(values[j]))
            for i in range(len(ids)) for j in range(indptr[i], indptr[i + 1])]
    assert ours == expected
    # a Confidence that is neither 0 nor 1 is refused on any line, also of a class not kept
    path.write_text("\n".join([*lines, "img4,verification,/m/zebra,0.7"]) + "\n")
    with pytest.raises(DSDLError, match=r"line 5: Confidence must be 0 or 1, got '0.7'"):
        read_image_labels(str(path), ["/m/cat", "/m/dog"])


# --------------------------------------------------------------------------------------------
# A batch of one image where BatchNorm sees one value per channel
# --------------------------------------------------------------------------------------------

def test_a_last_batch_of_one_image_with_a_one_by_one_map_is_left_out_with_a_note(
        voc_root, random_embeddings, tmp_path, capsys):
    root, _ = voc_root  # 24 training images; ResNet-18's last map at 32 px is 1 x 1
    argv = [root, *SMALL, "--image-size", "32", "--embeddings", random_embeddings, "--epochs", "1"]
    assert call_main(main_voc2007.main, [*argv, "-b", "23", "--checkpoint-dir", str(tmp_path / "a")]) == 0
    assert ("note: each epoch's last batch would hold 1 image(s) in parts of one, and at "
            "--image-size 32 the last map of --arch resnet18 is 1 x 1") in capsys.readouterr().out
    # parts of one image in every step: refused before training
    code = call_main(main_voc2007.main, [*argv, "-b", "4", "--accumulate", "4",
                                         "--checkpoint-dir", str(tmp_path / "b")])
    assert code == 1
    assert error_line(capsys).startswith("error: -b 4 with --accumulate 4 makes parts of one image")
    # where the map is larger, the release's batches are kept: nothing left out
    assert call_main(main_voc2007.main, [*argv[:-6], "--embeddings", random_embeddings, "--epochs", "1",
                                         "-b", "23", "--checkpoint-dir", str(tmp_path / "c")]) == 0
    assert "left out" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# demo.py on a read-only or full disk
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, what", [(28, "No space left on device"), (30, "Read-only file system")])
def test_the_demo_on_a_full_or_read_only_disk_is_one_line_naming_dir(code, what, tmp_path,
                                                                     monkeypatch, capsys):
    import demo

    def no_room(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(demo, "make_data", no_room)  # the first files the demo writes
    assert demo.main(["--dir", str(tmp_path / "demo")]) == 1
    assert error_line(capsys) == (f"error: could not write into {tmp_path / 'demo'} ({what}); pass "
                                  f"--dir with a new folder on a writable disk with room (the demo "
                                  f"writes a few hundred MB)")
    # a folder that cannot be written at all is said at once
    real = demo.tempfile.TemporaryFile
    monkeypatch.setattr(demo.tempfile, "TemporaryFile", lambda *args, **kwargs: no_room()
                        if kwargs.get("dir") == str(tmp_path / "ro") else real(*args, **kwargs))
    assert demo.main(["--dir", str(tmp_path / "ro")]) == 1
    assert error_line(capsys).startswith(f"error: cannot write into {tmp_path / 'ro'} ({what}); pass --dir")


def test_a_step_of_the_demo_that_fills_the_disk_names_dir(tmp_path, monkeypatch, capsys):
    import demo

    def full(args, paths):
        raise demo.StepFailed("step 2 (main_voc2007.py) ended with exit status 1; the end of its "
                              "output:\n  error: could not write into run (No space left on device)")
    monkeypatch.setattr(demo, "make_data", lambda args, paths: None)
    monkeypatch.setattr(demo, "train_and_resume", full)
    assert demo.main(["--dir", str(tmp_path / "demo")]) == 1
    assert capsys.readouterr().err.rstrip().endswith(
        f"The demo writes into {tmp_path / 'demo'}: pass --dir with a new folder on a writable disk "
        f"with room (the demo writes a few hundred MB)")


# --------------------------------------------------------------------------------------------
# A scheduler's SIGTERM to the whole process group, loader workers included
# --------------------------------------------------------------------------------------------

def test_sigterm_to_the_process_group_with_two_workers_ends_without_a_worker_traceback(
        voc_root, random_embeddings, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT, offline_environment
    root, _ = voc_root
    run = tmp_path / "run"
    argv = [root, "--arch", "resnet18", "--no-pretrained", "--image-size", "64", "-b", "8",
            "--device", "cpu", "-j", "2", "--embeddings",
            random_embeddings, "--epochs", "50", "--checkpoint-dir", str(run)]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_voc2007.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**offline_environment(), "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("epoch 1/"):  # the persistent workers are at work on epoch 2
            break
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM; continue with --resume")
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]


def test_evaluating_the_best_model_of_a_val_run_prints_what_the_run_wrote_for_its_test_split(
        labels_in_folders, capsys):
    """docs/training.md: -e prints the mAP and loss training logged for the same split."""
    import json
    import main_custom
    root, argv, run = labels_in_folders
    with open(run / "eval_test-labels.jsonl") as f:
        at_the_end = json.loads(f.readline())  # the best model on the test CSV, once
    capsys.readouterr()
    assert call_main(main_custom.main, [*argv, "-e", "--resume", str(run / "model_best.pth.tar"),
                                        "--checkpoint-dir", str(run)]) == 0
    out = capsys.readouterr().out
    with open(run / "eval_test-labels.jsonl") as f:
        evaluated = [json.loads(line) for line in f][-1]
    assert evaluated["mAP"] == pytest.approx(at_the_end["mAP"], abs=1e-9)
    assert evaluated["loss"] == pytest.approx(at_the_end["loss"], rel=1e-6)
    assert f"mAP {at_the_end['mAP']:.2f} (over" in out


# --------------------------------------------------------------------------------------------
# What a review of the changes found
# --------------------------------------------------------------------------------------------

def test_a_label_renamed_with_the_checkpoints_own_vectors_is_scored_not_refused(trained, tmp_path):
    import json
    import predict
    from voc import VOC_CLASSES
    checkpoint, model, images = trained
    np.save(tmp_path / "vectors.npy", model.semantics.numpy())
    names = [*VOC_CLASSES[:-1], "tv"]  # tvmonitor, renamed; its vector, in its place
    out = tmp_path / "out.json"
    assert predict.main(["--resume", checkpoint, "--embeddings", str(tmp_path / "vectors.npy"),
                         "--classes", *names, "--threshold", "0", "--json", str(out), images[0],
                         "-j", "0"]) == 0
    scores = {p["label"]: p["score"] for p in json.loads(out.read_text())[0]["predictions"]}
    with torch.no_grad():
        from test_predict import direct_scores
        expected = direct_scores(model, images[0])
    assert scores["tv"] == pytest.approx(expected[-1], rel=1e-4, abs=1e-5)


def test_an_open_images_label_cache_of_before_quoted_fields_were_read_is_rebuilt(tmp_path, monkeypatch):
    import openimages
    path = tmp_path / "labels.csv"
    path.write_text('ImageID,Source,LabelName,Confidence\n"img1","verification","/m/cat","1"\n'
                    "img2,verification,/m/cat,1\n")
    cache = str(tmp_path / "labels.npz")
    real = openimages.read_image_labels

    def skipping_quoted(csv_path, mids):  # what the reader of cache version 2 made of the file
        kept = tmp_path / "plain.csv"
        kept.write_text("".join(line for line in open(csv_path) if '"' not in line))
        return real(str(kept), mids)
    with monkeypatch.context() as patch:
        patch.setattr(openimages, "CACHE_VERSION", 2)
        patch.setattr(openimages, "read_image_labels", skipping_quoted)
        assert openimages.load_labels_cached(str(path), ["/m/cat"], cache)[0].tolist() == [b"img2"]
    assert openimages.load_labels_cached(str(path), ["/m/cat"], cache)[0].tolist() == [b"img1", b"img2"]


def test_a_run_of_before_split_roles_on_csvs_of_one_name_still_resumes(tmp_path):
    import checkpoints
    import runs
    from dataset import Datasets

    class Split:
        def __init__(self, split, file_name_split, ids):
            self.split, self.file_name_split, self.image_ids = split, file_name_split, ids

        def __len__(self):
            return len(self.image_ids)

    names = custom.split_names([str(tmp_path / "train" / "labels.csv"), str(tmp_path / "test" / "labels.csv")])
    assert sorted(names.values()) == ["test-labels", "train-labels"]
    train, test = Split("train-labels", "labels", ["a", "b", "c"]), Split("test-labels", "labels", ["d", "e"])
    # the record the code before roles wrote: keyed by split name, both splits called 'labels'
    record = {"name": "own", "benchmark": None, "evaluated": "labels", "sizes": {"labels": 2},
              "fingerprints": {"labels": checkpoints.image_fingerprint(test)}, "classes": ["x"]}
    runs.check_same_splits(record, Datasets(train, test), "run/checkpoint.pth.tar")  # no error
    changed = Split("test-labels", "labels", ["d", "f"])
    with pytest.raises(DSDLError, match="2 images then and now, but not the same ones"):
        runs.check_same_splits(record, Datasets(train, changed), "run/checkpoint.pth.tar")


def test_a_model_that_keeps_no_attribute_for_a_setting_is_one_line_when_built():
    import models

    class Forgetful(models.Baseline):
        name = "forgetful"

        def __init__(self, num_classes, arch="resnet18", pretrained=False, pool="max",
                     image_size=None, temperature=1.0):
            super().__init__(num_classes, arch, pretrained, pool, image_size)  # temperature: lost

    context = models.ModelContext(["a", "b"], 32)
    with pytest.raises(DSDLError, match="Forgetful keeps no attribute 'temperature'"):
        Forgetful.from_settings({"arch": "resnet18"}, context)


def test_the_data_record_of_a_run_is_fingerprinted_once_not_every_epoch(voc_root, random_embeddings,
                                                                       tmp_path, monkeypatch):
    import dataset
    calls = []
    real = dataset.MultiLabelDataset.label_fingerprint
    monkeypatch.setattr(dataset.MultiLabelDataset, "label_fingerprint",
                        lambda self: calls.append(self.split) or real(self))
    root, _ = voc_root
    assert call_main(main_voc2007.main, [root, *SMALL, "--embeddings", random_embeddings,
                                         "--epochs", "2", "--checkpoint-dir", str(tmp_path / "run")]) == 0
    assert sorted(calls) == ["test", "trainval"]
    record = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)["dataset"]
    assert record["label_fingerprints"]["test"] == real(__import__("voc").VOC2007(root, "test"))


def test_a_runs_metrics_log_given_as_resume_is_called_json_not_a_csv(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "split": "test", "mAP": 50.0}\n')
    assert call_main(main_voc2007.main, ["data", "--device", "cpu", "-e", "--resume", str(log)]) == 1
    line = error_line(capsys)
    assert "it is a JSON text file (a run's metrics.jsonl" in line and "CSV" not in line
