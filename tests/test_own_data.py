"""Own data done right: a validation split, tuned thresholds, partial labels (`?name`), CSV
sanity, and zero-shot evaluation."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoints
import main_custom
import runs
from conftest import call_main
from report import read_metrics
from test_custom import CLASSES, COMMON, write_dataset



@pytest.fixture(scope="module")
def with_val(tmp_path_factory):
    """Two epochs on a CSV dataset with a validation CSV (--val)."""
    root = tmp_path_factory.mktemp("own")
    write_dataset(root, counts=(("train", 8), ("val", 6), ("test", 6)))
    np.save(root / "classes.npy", np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32))
    run_dir = root / "run"
    main_custom.main([str(root), *COMMON, "--embeddings", str(root / "classes.npy"), "--epochs", "2",
                      "--val", str(root / "val.csv"), "--checkpoint-dir", str(run_dir)])
    return root, run_dir


def test_with_a_validation_split_the_best_model_is_chosen_on_it_and_scores_test_once(with_val):
    root, run_dir = with_val
    log = read_metrics(run_dir / runs.METRICS_LOG)
    assert [(r["epoch"], r["split"]) for r in log] == [(1, "val"), (2, "val")]
    best = torch.load(run_dir / checkpoints.BEST, weights_only=True)
    assert best["best_score"] == pytest.approx(max(r["mAP"] for r in log))
    (final,) = [json.loads(line) for line in open(run_dir / "eval_test.jsonl")]
    assert (final["split"], final["selected_on"], final["used_for_selection"]) == ("test", "val", False)
    assert final["epoch"] == best["epoch"] and final["images"] == 6


def test_thresholds_are_tuned_on_the_validation_split_and_reported_beside_the_fixed_ones(with_val):
    root, run_dir = with_val
    best = torch.load(run_dir / checkpoints.BEST, weights_only=True)
    assert len(best["thresholds"]) == len(CLASSES)
    assert all(0 < t <= 1 for t in best["thresholds"])
    (final,) = [json.loads(line) for line in open(run_dir / "eval_test.jsonl")]
    assert {"CF1_tuned", "OF1_tuned", "CF1", "OF1"} <= final.keys()
    record = read_metrics(run_dir / runs.METRICS_LOG)[best["epoch"] - 1]
    assert "CF1_tuned" in record  # the epoch's own thresholds on val


def test_without_a_validation_split_the_run_says_it_selects_on_test(tmp_path, capsys):
    write_dataset(tmp_path)
    np.save(tmp_path / "c.npy", np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32))
    main_custom.main([str(tmp_path), *COMMON, "--embeddings", str(tmp_path / "c.npy"), "--epochs", "1",
                      "--checkpoint-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "model_best is chosen on test, the split its numbers are measured on" in out
    assert "pass --val VAL.csv" in out
    assert not (tmp_path / "run" / "eval_test.jsonl").exists()


def test_unchecked_labels_are_read_as_unknown_and_make_the_split_partial(tmp_path):
    import custom
    os.makedirs(tmp_path / "images")
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"")
    (tmp_path / "train.csv").write_text("image,labels\na.jpg,cat;?dog\nb.jpg,dog\n")
    (tmp_path / "test.csv").write_text("image,labels\nb.jpg,cat\n")
    train, test, val = custom.load_splits(str(tmp_path / "train.csv"), str(tmp_path / "test.csv"),
                                          str(tmp_path / "images"))
    assert train.classes == ["cat", "dog"] and val is None
    assert train.labels.tolist() == [[1, -2], [-1, 1]]
    assert train.partial and not test.partial


@pytest.mark.parametrize("labels", ["1;0;1", "0;1"])
def test_labels_written_as_a_0_1_vector_are_refused_with_the_format(tmp_path, capsys, labels):
    write_dataset(tmp_path)
    (tmp_path / "train.csv").write_text(f"image,labels\ntrain/000.jpg,{labels}\ntrain/001.jpg,1;1\n")
    code = call_main(main_custom.main, [str(tmp_path), *COMMON, "--epochs", "1",
                                        "--checkpoint-dir", str(tmp_path / "run")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and line.startswith(f"error: {tmp_path / 'train.csv'}: the labels look like a 0/1 vector")
    assert "train/000.jpg,dog;person" in line


def test_class_names_differing_only_in_case_or_spacing_are_reported(tmp_path):
    import custom
    os.makedirs(tmp_path / "images")
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"")
    (tmp_path / "a.csv").write_text("image,labels\na.jpg,Dog;traffic light\nb.jpg,dog;traffic_light\n")
    (tmp_path / "b.csv").write_text("image,labels\nb.jpg,dog\n")
    with pytest.warns(UserWarning, match="'Dog' and 'dog'; 'traffic light' and 'traffic_light'"):
        train, _, _ = custom.load_splits(str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                                         str(tmp_path / "images"))
    assert train.classes == ["Dog", "dog", "traffic light", "traffic_light"]


def test_a_missing_validation_csv_is_one_line(tmp_path, capsys, monkeypatch):
    write_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "c.npy", np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32))
    code = call_main(main_custom.main, [str(tmp_path), *COMMON, "--embeddings", "c.npy",
                                        "--checkpoint-dir", "run", "--val", "missing.csv"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines == ["error: label file not found: missing.csv"]


def test_a_validation_csv_under_evaluation_is_one_line_not_ignored(with_val, capsys):
    root, run_dir = with_val
    code = call_main(main_custom.main, [str(root), "-e", "--resume", str(run_dir / checkpoints.BEST),
                                        "--val", str(root / "val.csv"), "-j", "0", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "--val chooses the best model while training" in lines[0]


def test_a_val_class_the_train_csv_lacks_is_one_line(tmp_path, capsys):
    write_dataset(tmp_path, counts=(("train", 4), ("val", 2), ("test", 2)))
    (tmp_path / "val.csv").write_text("image,labels\nval/000.jpg,zebra\n")
    code = call_main(main_custom.main, [str(tmp_path), *COMMON, "--val", str(tmp_path / "val.csv"),
                                        "--checkpoint-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "val.csv, line 2: unknown class 'zebra'" in err
    assert err.startswith("error: ") and "Traceback" not in err


# ---- zero-shot ----------------------------------------------------------------------------------

def test_zero_shot_scores_classes_the_checkpoint_was_not_trained_on(with_val, tmp_path, capsys):
    root, run_dir = with_val
    unseen = ["apple", "boat", "cloud", "desk", "egg", "fox"]
    images = sorted(os.listdir(root / "images" / "test"))
    rng = np.random.default_rng(2)
    rows = [(f"test/{name}", [unseen[i % 6], unseen[(i + 3) % 6]]) for i, name in enumerate(images)]
    (tmp_path / "unseen.csv").write_text("image,labels\n" + "".join(
        f"{image},{';'.join(names)}\n" for image, names in rows))
    np.save(tmp_path / "unseen.npy", rng.standard_normal((6, 300)).astype(np.float32))
    capsys.readouterr()
    code = call_main(main_custom.main, [str(root), "-e", "--zero-shot", "--resume",
                                        str(run_dir / checkpoints.BEST), "--test-csv",
                                        str(tmp_path / "unseen.csv"), "--embeddings",
                                        str(tmp_path / "unseen.npy"), "-j", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    (record,) = [json.loads(line) for line in open(run_dir / "eval_unseen.jsonl")]
    assert record["zero_shot"] and record["settings"]["model"] == "dsdl"
    for name in ("P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5"):
        assert 0 <= record[name] <= 100 and f"{name} {record[name]:.2f}" in out
    assert record["images"] == len(images)


@pytest.mark.parametrize("extra, message", [
    ([], "--zero-shot evaluates a trained checkpoint: add -e --resume CHECKPOINT"),
    (["-e", "--resume", "RUN"], "--zero-shot scores the split's classes from their vectors"),
])
def test_zero_shot_mistakes_are_one_line(with_val, capsys, extra, message):
    root, run_dir = with_val
    extra = [str(run_dir / checkpoints.BEST) if item == "RUN" else item for item in extra]
    code = call_main(main_custom.main, [str(root), "--zero-shot", *extra, "-j", "0", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and message in lines[0], lines


# ---- tuned thresholds in predict.py and export.py -----------------------------------------------

def test_predict_uses_the_checkpoints_thresholds_unless_a_threshold_is_given(with_val, tmp_path, capsys):
    import predict
    root, run_dir = with_val
    best = torch.load(run_dir / checkpoints.BEST, weights_only=True)
    chosen = predict.select([0.0, 0.0, 0.0], CLASSES, thresholds=[0.4, 0.5, 0.6])  # p = 0.5 each
    assert [p["label"] for p in chosen] == ["cat", "dog"]
    assert [p["label"] for p in predict.select([0.0] * 3, CLASSES, threshold=0.6,
                                               thresholds=[0.4, 0.5, 0.6])] == []
    images = sorted(str(path) for path in (root / "images" / "test").iterdir())
    code = predict.main([*images, "--resume", str(run_dir / checkpoints.BEST), "--json",
                         str(tmp_path / "p.json"), "-j", "0", "--device", "cpu"])
    assert code == 0 and "each class's own threshold" in capsys.readouterr().err
    results = json.loads((tmp_path / "p.json").read_text())
    cuts = dict(zip(CLASSES, best["thresholds"]))
    for result in results:
        assert all(p["probability"] >= cuts[p["label"]] for p in result["predictions"])
    code = predict.main([*images, "--resume", str(run_dir / checkpoints.BEST), "--threshold", "0",
                         "--json", str(tmp_path / "all.json"), "-j", "0", "--device", "cpu"])
    assert all(len(r["predictions"]) == 3 for r in json.loads((tmp_path / "all.json").read_text()))


def test_export_writes_the_thresholds_into_its_classes_json(with_val, tmp_path):
    import export
    root, run_dir = with_val
    best = torch.load(run_dir / checkpoints.BEST, weights_only=True)
    assert export.main(["--resume", str(run_dir / checkpoints.BEST), "--format", "torchscript",
                        "-o", str(tmp_path / "m.pt")]) == 0
    described = json.loads((tmp_path / "m.pt.classes.json").read_text())
    assert described["classes"] == CLASSES and described["thresholds"] == best["thresholds"]


def test_zero_shot_on_nuswide_scores_its_concepts_with_a_model_trained_on_other_labels(
        with_val, tmp_path, capsys):
    import main_nuswide
    from test_nuswide import CONCEPTS, write_nuswide_tree
    root, run_dir = with_val  # trained on cat, dog, red car
    write_nuswide_tree(str(tmp_path / "nus"))
    np.save(tmp_path / "concepts.npy", np.random.default_rng(3).standard_normal((4, 300)).astype(np.float32))
    capsys.readouterr()
    own = {name: (run_dir / name).read_bytes() for name in ("eval_test.jsonl", "eval_test.md")}
    code = call_main(main_nuswide.main, [str(tmp_path / "nus"), "-e", "--zero-shot", "--resume",
                                         str(run_dir / checkpoints.BEST), "--embeddings",
                                         str(tmp_path / "concepts.npy"), "-j", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    # beside the run's own evaluation of its test CSV, never over it
    assert {name: (run_dir / name).read_bytes() for name in own} == own
    (record,) = [json.loads(line) for line in open(run_dir / "eval_nus-wide_test.jsonl")][-1:]
    assert record["zero_shot"] and record["images"] == 5 and len(record["AP"]) == len(CONCEPTS)
    assert "P@3" in record and "F1@5" in record and record["dataset"] == "NUS-WIDE"
    assert os.path.isfile(run_dir / "eval_nus-wide_test.md")
    assert json.loads(own["eval_test.jsonl"].splitlines()[-1])["dataset"] == os.path.basename(root)


def test_resuming_a_validation_run_without_its_validation_csv_says_to_pass_it(with_val, capsys):
    root, run_dir = with_val
    code = call_main(main_custom.main, [str(root), "--resume", str(run_dir / checkpoints.CHECKPOINT),
                                        "--epochs", "3", "-j", "0", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1
    assert "chose its best model on the split 'val'" in lines[0] and "pass it again with --val" in lines[0]


def test_changing_the_optimizer_on_resume_is_refused_pointing_to_init_from(with_val, capsys):
    root, run_dir = with_val
    code = call_main(main_custom.main, [str(root), "--resume", str(run_dir / checkpoints.CHECKPOINT),
                                        "--val", str(root / "val.csv"), "--optimizer", "adamw",
                                        "--epochs", "3", "-j", "0", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert code == 1 and len(lines) == 1
    assert "was trained with --optimizer sgd" in lines[0] and "--init-from" in lines[0]


def test_a_question_mark_without_a_name_is_a_problem_with_its_line(tmp_path):
    import custom
    (tmp_path / "a.csv").write_text("image,labels\na.jpg,dog;?\n")
    rows, problems = custom.read_label_csv(str(tmp_path / "a.csv"))
    assert rows == [] and problems == [f"{tmp_path / 'a.csv'}, line 2: '?' without a class name "
                                       f"(write '?name' for a label nobody checked)"]


def test_classes_really_named_0_and_1_are_read_when_classes_names_them(tmp_path):
    import custom
    os.makedirs(tmp_path / "images")
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"")
    (tmp_path / "train.csv").write_text("image,labels\na.jpg,0;1\nb.jpg,1\n")
    (tmp_path / "test.csv").write_text("image,labels\nb.jpg,0\n")
    train, _, _ = custom.load_splits(str(tmp_path / "train.csv"), str(tmp_path / "test.csv"),
                                     str(tmp_path / "images"), classes=["0", "1"])
    assert train.labels.tolist() == [[1, 1], [-1, 1]]
