"""What a run reports: the pictures of its log (curves.png, per_class_ap.png) and the record of
what produced it (in checkpoints, in metrics.jsonl, and `python report.py FOLDER`)."""
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import checkpoints
import runs
import main_voc2007
import report
import util
from conftest import ROOT, SMALL, call_main, fill_disk
from report import append_record, curves_figure, per_class_ap_figure, plot_curves, read_metrics

CLASSES = ["cat", "dog", "red car", "tree"]


def write_log(path, epochs=3, splits=("test",)):
    """A metrics.jsonl as engine.run writes it; returns the records per (epoch, split)."""
    rng = np.random.default_rng(0)
    written = {}
    for epoch in range(1, epochs + 1):
        train_loss = float(1.0 / epoch + rng.random() * 0.1)
        for split in splits:
            ap = [float(v) for v in rng.uniform(20, 100, len(CLASSES))]
            ap[3] = math.nan  # a class without positives
            record = {"epoch": epoch, "split": split, "loss": float(rng.random()),
                      "train_loss": train_loss, "mAP": float(np.nanmean(ap)), "AP": ap}
            append_record(path, record)
            written[epoch, split] = record
    return written


def pixels(source):
    with Image.open(source) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGBA"))


def rendered(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return pixels(buffer)


def test_curves_plot_train_loss_and_each_splits_map_per_epoch(tmp_path):
    log = tmp_path / "metrics.jsonl"
    written = write_log(log, epochs=5, splits=("val", "test"))
    loss_axes, map_axes = curves_figure(read_metrics(log)).axes
    (loss_line,) = loss_axes.get_lines()
    assert list(loss_line.get_xdata()) == [1, 2, 3, 4, 5]
    assert list(loss_line.get_ydata()) == [written[e, "test"]["train_loss"] for e in range(1, 6)]
    lines = {line.get_label(): line for line in map_axes.get_lines()}
    assert set(lines) == {"val", "test"}
    for split, line in lines.items():
        assert list(line.get_xdata()) == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(line.get_ydata(), [written[e, split]["mAP"] for e in range(1, 6)])
    # The epoch axis has whole-epoch ticks covering the five epochs.
    ticks = [t for t in loss_axes.get_xticks() if loss_axes.get_xlim()[0] <= t <= loss_axes.get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks) and min(ticks) <= 1 and max(ticks) >= 5


def test_per_class_ap_shows_the_last_evaluation_with_class_names(tmp_path):
    log = tmp_path / "metrics.jsonl"
    written = write_log(log, epochs=3)
    append_record(log, {**written[3, "test"], "AP": [50.0, 60.0, 70.0, 80.0], "mAP": 65.0})
    last = read_metrics(log)[-1]  # the re-evaluation of epoch 3 replaces the first one
    axes = per_class_ap_figure(last, CLASSES).axes[0]
    heights = [bar.get_height() for bar in axes.patches]
    assert heights == [50.0, 60.0, 70.0, 80.0]
    assert [label.get_text() for label in axes.get_xticklabels()] == CLASSES
    assert "epoch 3" in axes.get_title() and "65.00" in axes.get_title()
    # An undefined AP (no positive) is no bar, marked n/a.
    first = per_class_ap_figure(written[1, "test"], CLASSES).axes[0]
    assert math.isnan(first.patches[3].get_height())
    assert [text.get_text() for text in first.texts] == ["n/a"]


def test_plot_curves_writes_the_pngs_of_the_log_next_to_it(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_log(log, epochs=4)
    curves, per_class = plot_curves(log, tmp_path, CLASSES)
    assert (curves, per_class) == (str(tmp_path / "curves.png"), str(tmp_path / "per_class_ap.png"))
    records = read_metrics(log)
    np.testing.assert_array_equal(pixels(curves), rendered(curves_figure(records)))
    np.testing.assert_array_equal(pixels(per_class),
                                  rendered(per_class_ap_figure(records[-1], CLASSES)))
    assert pixels(curves).shape[:2] == (400, 1000)
    # A longer log gives another picture: the file follows the log.
    write_log(log, epochs=6)
    plot_curves(log, tmp_path, CLASSES)
    assert not np.array_equal(pixels(curves), rendered(curves_figure(records)))
    np.testing.assert_array_equal(pixels(curves), rendered(curves_figure(read_metrics(log))))


def test_every_record_and_checkpoint_says_what_produced_it(voc_root, random_embeddings, tmp_path,
                                                           monkeypatch):
    root, _ = voc_root
    argv = ["main_voc2007.py", root, *SMALL, "--embeddings", random_embeddings, "--epochs", "2",
            "--checkpoint-dir", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    assert call_main(main_voc2007.main, argv[1:]) == 0
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    records = read_metrics(tmp_path / "run" / runs.METRICS_LOG)
    checkpoint = torch.load(tmp_path / "run" / checkpoints.CHECKPOINT, weights_only=True)
    for run in [record["run"] for record in records] + [checkpoint["provenance"]]:
        assert run["command"].endswith(" ".join(argv))
        assert run["commit"].removesuffix("+changes") == commit  # a git checkout here
        assert (run["torch"], run["torchvision"]) == (torch.__version__, torchvision.__version__)
        assert run["gpus"] == 0 and run["gpu"] is None and run["cuda"] is None  # on the CPU
    assert all(record["epoch_seconds"] > 0 for record in records)
    assert [record["images"] for record in records] == [16, 16]  # what each mAP is over
    assert records[0]["settings"]["arch"] == "resnet18" and records[0]["settings"]["image_size"] == 64


def test_report_prints_the_record_the_best_and_last_epochs_and_the_papers_row(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    classes = ["aeroplane", "bicycle"] + [f"c{i}" for i in range(18)]
    run = {"command": "python main_voc2007.py data/voc2007", "commit": "abc123", "torch": "2.11.0",
           "torchvision": "0.26.0", "cuda": "12.8", "cudnn": "91000", "gpu": "NVIDIA H100", "gpus": 1}
    settings = {"dataset": "VOC 2007", "benchmark": "voc2007", "arch": "resnet101", "image_size": 448}
    for epoch, score in ((1, 90.0), (2, 94.0), (3, 93.0)):
        append_record(folder / runs.METRICS_LOG, {
            "epoch": epoch, "split": "test", "mAP": score, "AP": [score] * 20, "classes": classes,
            "epoch_seconds": 600.0, "run": run, "settings": settings,
            **{name + suffix: 50.0 for name in report.THRESHOLDED for suffix in ("", "_top3")}})
    assert report.main([str(folder)]) == 0
    block = capsys.readouterr().out
    assert block.startswith("### DSDL run: VOC 2007, resnet101 at 448 px")
    for line in ("- command: `python main_voc2007.py data/voc2007`", "- commit: `abc123`",
                 "- gpu: `NVIDIA H100`", "- torch: `2.11.0`", "epochs logged: 3, median epoch time 10 min"):
        assert line in block
    best, last = block.split("best epoch: 2 (test)")[1].split("last epoch: 3 (test)")

    def map_column(table):  # row name -> its last cell, the mAP
        return {line.split("|")[1].strip(): line.split("|")[-2].strip()
                for line in table.splitlines() if line.startswith("| ") and not line.startswith("| |")}

    # our mAP, the paper's 94.4 (ResNet-101 at 448 px on VOC 2007 test) and the difference
    assert map_column(best) == {"ours": "94.0", "DSDL paper": "94.4", "difference": "-0.4"}
    assert map_column(last) == {"ours": "93.0", "DSDL paper": "94.4", "difference": "-1.4"}


def test_report_of_a_folder_without_a_log_is_one_error_line(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path} holds no metrics.jsonl: pass the "
                                       f"--checkpoint-dir of a training run\n")


def test_report_of_a_path_that_does_not_exist_says_so(tmp_path, capsys):
    assert report.main([str(tmp_path / "typo")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'typo'}: no such folder; pass the "
                                       f"--checkpoint-dir of a training run\n")


def test_a_record_or_plot_that_does_not_fit_on_the_disk_leaves_the_log_and_pictures_as_they_were(
        tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    write_log(log, epochs=2)
    plot_curves(log, tmp_path, CLASSES)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    record = {"epoch": 3, "split": "test", "mAP": 50.0, "AP": [50.0] * len(CLASSES)}
    fill_disk(monkeypatch, report, 10)  # the record's line: 10 bytes of it fit
    with pytest.raises(OSError, match="No space left on device"):
        append_record(log, record)
    fill_disk(monkeypatch, util, 1000)  # the pictures: a thousand bytes of one
    with pytest.raises(OSError, match="No space left on device"):
        plot_curves(log, tmp_path, CLASSES)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_classes_without_a_positive_are_one_line_in_the_printout_and_keep_their_place_elsewhere():
    """Issue 26: 2,000 Open Images classes printed ~2,000 "undefined" lines per epoch."""
    classes = [f"class {c}" for c in range(30)]
    ap = [float(40 + c) for c in range(30)]
    for c in (3, 7, 11, 20, 25, 29):
        ap[c] = math.nan
    metrics = {"mAP": float(np.nanmean(ap)), "AP": ap, "num_classes_ap": 24,
               **{name + suffix: 50.0 for name in report.THRESHOLDED for suffix in ("", "_top3")}}
    text = report.format_metrics(metrics, classes, per_class=True)
    assert text.count("no positive") == 1 and "undefined (no positive)" not in text
    assert ("no positive in this split, AP undefined: 6 classes "
            "(class 3, class 7, class 11, class 20, class 25, ...)") in text
    per_class = text.split("per-class AP:\n")[1].splitlines()
    assert per_class == [f"  {name:<8}  {value:6.2f}" for name, value in zip(classes, ap) if not math.isnan(value)]
    one = report.format_metrics({**metrics, "AP": [math.nan] + ap[:3]}, classes[:4])
    assert "AP undefined: 1 class (class 0)" in one
    # the table of up to 20 classes keeps each class's cell: "–" for an undefined AP
    table = report.results_table({**metrics, "AP": ap[:20]}, classes[:20])
    cells = next(line for line in table.splitlines() if line.startswith("| ours")).split("|")[2:-2]
    assert [cell.strip() == "–" for cell in cells] == [math.isnan(value) for value in ap[:20]]
