"""Your own data (custom.py, main_custom.py): label CSVs, class lists, problems, training."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import custom
import checkpoints
import runs
import main_custom
from conftest import call_main, class_image
from models import DSDL
from report import plot_curves, read_metrics
from util import compute_metrics, eval_transform

CLASSES = ["cat", "dog", "red car"]  # sorted, as the class list taken from the files is
COMMON = ["--arch", "resnet18", "--no-pretrained", "--image-size", "64", "-j", "0", "-b", "4",
          "--device", "cpu"]


def write_dataset(root, counts=(("train", 8), ("test", 6)), seed=0):
    """`root/images/<split>/*.jpg` and `root/<split>.csv`; returns {split: [(image, names)]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in counts:
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        rows = []
        for i in range(count):
            present = sorted(rng.choice(3, size=rng.integers(0, 3), replace=False).tolist())
            image = f"{split}/{i:03d}.jpg"
            class_image(present, 64, rng).save(os.path.join(root, "images", image))
            rows.append((image, [CLASSES[c] for c in present]))
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("image,labels\n")
            f.writelines(f"{image},{';'.join(names)}\n" for image, names in rows)
        written[split] = rows
    return written


def splits(root, **options):
    """custom.load_splits on the default files of `root`."""
    return custom.load_splits(str(root / "train.csv"), str(root / "test.csv"), str(root / "images"),
                              **options)[:2]


def test_labels_are_read_from_the_csv(tmp_path):
    written = write_dataset(tmp_path)
    train, dataset = splits(tmp_path)
    assert dataset.classes == train.classes == CLASSES and dataset.split == "test"
    assert train.split == "train" and len(train) == 8
    expected = np.full((6, 3), -1)
    for i, (_, names) in enumerate(written["test"]):
        expected[i, [CLASSES.index(name) for name in names]] = 1
    np.testing.assert_array_equal(dataset.labels, expected)
    image, labels, name = dataset[2]
    assert name == written["test"][2][0] and labels.tolist() == expected[2].tolist()
    assert image.size == (64, 64)


def test_class_list_is_the_sorted_labels_of_the_files_or_the_given_one(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "images")
    for split, rows in (("train", ["a.jpg,zebra;ant", "b.jpg,"]), ("test", ["c.jpg,moth"])):
        (root / f"{split}.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        class_image([0]).save(root / "images" / name)
    assert splits(root)[1].classes == ["ant", "moth", "zebra"]
    assert splits(root, classes=["zebra", "ant", "moth", "bee"])[1].classes == ["zebra", "ant", "moth", "bee"]
    (tmp_path / "classes.txt").write_text("moth\nzebra\n\nant\n")
    assert custom.parse_classes([str(tmp_path / "classes.txt")]) == ["moth", "zebra", "ant"]
    # -e without the train CSV: the test file's labels
    os.remove(root / "train.csv")
    assert splits(root, evaluate=True)[1].classes == ["moth"]


def test_malformed_rows_are_reported_with_line_numbers_before_training(tmp_path, capsys):
    written = write_dataset(tmp_path)
    first = len(written["train"]) + 2  # the header is line 1
    with open(tmp_path / "train.csv", "a") as f:
        f.write("train/000.jpg,cat;bird\n"      # unknown class
                ",dog\n"                        # empty path
                "train/999.jpg,dog\n"           # missing image
                "train/001.jpg,dog,cat\n")      # three fields
    with open(tmp_path / "test.csv", "a") as f:
        f.write("\n"                            # blank, ignored
                "test/404.jpg,cat\n")           # missing image
    run_dir = tmp_path / "checkpoints"
    with pytest.raises(SystemExit) as exit_info:
        main_custom.main([str(tmp_path), *COMMON, "--classes", *CLASSES, "--epochs", "1",
                          "--embeddings", "unused.npy", "--checkpoint-dir", str(run_dir)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    for expected in (f"{train}, line {first}: unknown class 'bird'",
                     f"{train}, line {first + 1}: empty image path",
                     f"{train}, line {first + 2}: image not found",
                     f"{train}, line {first + 3}: expected 2 fields",
                     f"{test}, line {len(written['test']) + 3}: image not found"):
        assert expected in err
    assert "5 problem(s)" in err
    assert not run_dir.exists() or not os.listdir(run_dir)  # nothing written
    # Without --classes (the classes taken from the files), the other four are still reported
    # together, and the class 'bird' of a well-formed row is simply one more class.
    with pytest.raises(SystemExit):
        main_custom.main([str(tmp_path), *COMMON, "--epochs", "1", "--embeddings", "unused.npy",
                          "--checkpoint-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert "4 problem(s)" in err and f"line {first + 3}: expected 2 fields" in err
    assert "bird" not in err and not run_dir.exists()  # made, and removed again with nothing in it


def test_own_dataset_needs_class_vectors(tmp_path, capsys):
    write_dataset(tmp_path)
    with pytest.raises(SystemExit):
        main_custom.main([str(tmp_path), *COMMON, "--epochs", "1",
                          "--checkpoint-dir", str(tmp_path / "checkpoints")])
    err = capsys.readouterr().err
    assert "--embeddings" in err and "make_embeddings.py" in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch on a CSV dataset, then a resumption to epoch 2 (with another train CSV path)."""
    root = tmp_path_factory.mktemp("custom")
    written = write_dataset(root)
    np.save(root / "classes.npy", np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32))
    run_dir = root / "checkpoints"
    base = [str(root), *COMMON, "--embeddings", str(root / "classes.npy"),
            "--checkpoint-dir", str(run_dir)]
    main_custom.main([*base, "--epochs", "1"])
    first = torch.load(run_dir / checkpoints.CHECKPOINT, weights_only=True)
    os.replace(root / "train.csv", root / "renamed.csv")
    main_custom.main([*base, "--epochs", "2", "--train-csv", str(root / "renamed.csv"),
                      "--resume", str(run_dir / checkpoints.CHECKPOINT)])
    return root, written, base, first


def test_training_on_a_csv_saves_its_classes_and_resumes(trained):
    root, _, _, first = trained
    assert first["classes"] == CLASSES and first["epoch"] == 1
    last = torch.load(root / "checkpoints" / checkpoints.CHECKPOINT, weights_only=True)
    assert last["classes"] == CLASSES and last["epoch"] == 2
    assert [(r["epoch"], r["split"]) for r in read_metrics(root / "checkpoints" / runs.METRICS_LOG)] \
        == [(1, "test"), (2, "test")]


def test_evaluation_on_a_csv_scores_the_csv_labels(trained, capsys):
    root, written, base, _ = trained
    checkpoint = root / "checkpoints" / checkpoints.CHECKPOINT
    main_custom.main([*base, "-e", "--resume", str(checkpoint), "--train-csv",
                      str(root / "renamed.csv")])
    logged = read_metrics(root / "checkpoints" / runs.METRICS_LOG)[-1]
    # The same numbers from the checkpoint's model and the CSV's labels, computed here.
    state = torch.load(checkpoint, weights_only=True)
    model = DSDL(3, state["semantics"], 10.0, arch="resnet18", pretrained=False)
    model.load_state_dict(state["model"])
    model.eval()
    transform = eval_transform(64)
    images = torch.stack([transform(Image.open(root / "images" / image).convert("RGB"))
                          for image, _ in written["test"]])
    with torch.no_grad():
        scores = model(images).scores.numpy()
    labels = np.array([[1 if name in names else -1 for name in CLASSES] for _, names in written["test"]])
    expected = compute_metrics(scores, labels)
    assert logged["epoch"] == 2
    assert logged["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert logged["OF1"] == pytest.approx(expected["OF1"], abs=1e-6)


def test_training_draws_the_curves_of_its_log_next_to_the_checkpoints(trained, tmp_path):
    root, _, _, _ = trained
    run_dir = root / "checkpoints"
    log = run_dir / runs.METRICS_LOG
    # Redrawn from the log here, the pictures are the very files training wrote.
    plot_curves(log, tmp_path, CLASSES)
    for name in ("curves.png", "per_class_ap.png"):
        with Image.open(run_dir / name) as written, Image.open(tmp_path / name) as redrawn:
            assert written.format == "PNG"
            np.testing.assert_array_equal(np.asarray(written), np.asarray(redrawn))


def test_class_vectors_of_another_length_are_refused(tmp_path, capsys):
    write_dataset(tmp_path)
    np.save(tmp_path / "wrong.npy", np.zeros((4, 300), dtype=np.float32))
    with pytest.raises(SystemExit):
        main_custom.main([str(tmp_path), *COMMON, "--epochs", "1", "--embeddings",
                          str(tmp_path / "wrong.npy"), "--checkpoint-dir", str(tmp_path / "ck")])
    assert "have shape (4, 300); expected (3, 300)" in capsys.readouterr().err
    assert not (tmp_path / "ck" / checkpoints.CHECKPOINT).exists()


def test_a_class_file_with_a_byte_order_mark_and_a_non_utf8_csv(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffcat\r\ndog\r\n".encode("utf-8"))  # as Windows editors save it
    assert custom.parse_classes([str(classes)]) == ["cat", "dog"]
    latin = tmp_path / "train.csv"
    latin.write_bytes("image,labels\ncaf\xe9.jpg,cat\n".encode("cp1252"))  # Excel's "CSV"
    with pytest.raises(custom.DSDLError, match=r"train\.csv is not UTF-8.*CSV UTF-8"):
        custom.read_label_csv(str(latin))


def test_evaluation_takes_the_checkpoints_class_list_when_the_test_csv_lacks_a_class(
        trained, tmp_path):
    root, written, base, _ = trained
    only_cats = tmp_path / "cats.csv"  # 'dog' and 'red car' appear nowhere in this file
    only_cats.write_text("image,labels\n" + "".join(
        f"{image},{'cat' if 'cat' in names else ''}\n" for image, names in written["test"]))
    code = main_custom.main([str(root), *COMMON, "-e", "--resume", str(root / "checkpoints" / checkpoints.CHECKPOINT),
                             "--train-csv", str(tmp_path / "absent.csv"), "--test-csv", str(only_cats),
                             "--checkpoint-dir", str(tmp_path / "out")])
    assert code is None
    (record,) = read_metrics(tmp_path / "out" / "eval_cats.jsonl")  # named after the CSV
    assert len(record["AP"]) == len(CLASSES) and record["num_classes_ap"] == 1  # only cat has positives


def test_a_label_outside_the_checkpoints_classes_names_the_checkpoint_not_classes(
        trained, tmp_path, capsys):
    root, written, _, _ = trained
    checkpoint = root / "checkpoints" / checkpoints.CHECKPOINT
    horses = tmp_path / "horses.csv"
    horses.write_text(f"image,labels\n{written['test'][0][0]},horse\n")
    assert call_main(main_custom.main, [str(root), *COMMON, "-e", "--resume", str(checkpoint),
                                        "--test-csv", str(horses),
                                        "--checkpoint-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{horses}, line 2: unknown class 'horse' (not in the class list of {checkpoint})" in err
    assert "--classes" not in err and not (tmp_path / "out").exists()
