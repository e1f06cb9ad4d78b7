"""The pictures of the training log: curves.png and per_class_ap.png (util.plot_curves)."""
import io
import math

import numpy as np
from PIL import Image

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
