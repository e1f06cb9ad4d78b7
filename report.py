"""What a run reports: the printout of an evaluation, the paper's tables, the metrics log
(written and read), the training curves, and the record of what produced a result.

    python report.py checkpoints/voc2007     # the Markdown block to paste in a reproduction report
"""
import options

if __name__ == "__main__":  # parse before importing torch: --help and mistakes answer at once
    options.report_parser().parse_args()

import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from models import model_title
from options import PAPER_ARCH, PAPER_IMAGE_SIZE, recorded_settings
from util import DSDLError, atomic_write

METRICS_LOG = "metrics.jsonl"   # one record per evaluation of a training run
THRESHOLDED = ("CP", "CR", "CF1", "OP", "OR", "OF1")
UNDEFINED_SHOWN = 5  # the classes without a positive named in the printout; the log has them all


# --------------------------------------------------------------------------------------------
# The printout of one evaluation
# --------------------------------------------------------------------------------------------

def format_metrics(metrics, classes, per_class=False):
    """mAP, the six thresholded metrics and their top-3 forms; the per-class AP on request
    (the paper-style table, printed with it, already has them for up to 20 classes). The
    classes without a positive are one line (how many, the first few), not one line each."""
    mean = "undefined" if np.isnan(metrics["mAP"]) else f"{metrics['mAP']:.2f}"  # no positive at all
    lines = [f"mAP {mean} (over {metrics['num_classes_ap']} of {len(classes)} classes)"]
    undefined = [name for name, ap in zip(classes, metrics["AP"]) if np.isnan(ap)]
    if undefined:  # one line, not one per class: Open Images splits lack positives of hundreds
        shown = ", ".join(map(str, undefined[:UNDEFINED_SHOWN]))
        shown += ", ..." if len(undefined) > UNDEFINED_SHOWN else ""
        lines.append(f"no positive in this split, AP undefined: {len(undefined)} "
                     f"{'class' if len(undefined) == 1 else 'classes'} ({shown})")
    for suffix, title in (("", "all"), ("_top3", "top-3")):
        lines.append(f"{title:>6}: " + "  ".join(
            f"{name} {metrics[name + suffix]:.2f}" for name in THRESHOLDED))
    shown = {"mAP", "AP", "num_classes_ap", *THRESHOLDED, *(name + "_top3" for name in THRESHOLDED)}
    others = [key for key, value in metrics.items() if key not in shown and np.isscalar(value)]
    if others:  # whatever else compute_metrics returns
        lines.append(" other: " + "  ".join(f"{key} {metrics[key]:.2f}" for key in others))
    if per_class:
        width = max(len(name) for name in classes)
        lines.append("per-class AP:")
        lines.extend(f"  {name:<{width}}  {ap:6.2f}" for name, ap in zip(classes, metrics["AP"])
                     if not np.isnan(ap))
    return "\n".join(lines)


def duration(seconds):
    """'42 s', '12 min', '3.4 h' or '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def epoch_line(epoch, epochs, train_loss, split, score, best, seconds, is_best, raw_score=None):
    """The one line a training epoch ends with (`raw_score`: with --ema, the mAP of the trained
    weights, `score` being the average's)."""
    left = duration(seconds * (epochs - epoch))
    mean = "undefined" if np.isnan(score) else f"{score:.2f}"
    if raw_score is not None:
        mean += f" (EMA; the trained weights' {raw_score:.2f})"
    line = (f"epoch {epoch}/{epochs}: train loss {train_loss:.4f}, {split} mAP {mean}, "
            f"best {'none' if math.isinf(best) else f'{best:.2f}'}, {duration(seconds)}, "
            f"about {left} left")
    if np.isnan(score):
        line += (f"; no class has a positive in {split}, so no model can be selected "
                 f"(model_best.pth.tar is not written)")
    return line + "; saved" + (", new best" if is_best else "")


# --------------------------------------------------------------------------------------------
# The paper's tables (spec section 1)
# --------------------------------------------------------------------------------------------

# benchmark -> the paper's DSDL row (ResNet-101 at 448 px); "AP" in the dataset's class order.
PAPER_RESULTS = {
    "voc2007": {
        "setting": "VOC 2007 test", "split": "test",
        "mAP": 94.4,
        "AP": [99.8, 98.7, 98.4, 97.9, 81.9, 95.4, 97.6, 98.3, 83.3, 95.0,
               88.6, 98.0, 97.9, 95.8, 99.0, 86.6, 95.9, 86.4, 98.6, 94.4],
    },
    "voc2012": {
        "setting": "VOC 2012 test, scored by the evaluation server", "split": "test",
        "mAP": 93.2,
        "AP": [99.4, 95.3, 97.6, 95.7, 83.5, 94.8, 93.9, 98.5, 85.7, 94.5,
               83.8, 98.4, 97.7, 95.9, 98.5, 80.6, 95.7, 82.3, 98.2, 93.2],
    },
    "coco2014": {
        "setting": "COCO 2014 val", "split": "val",
        "mAP": 81.7, "CP": 84.1, "CR": 70.4, "CF1": 76.7, "OP": 85.1, "OR": 73.9, "OF1": 79.1,
        "CP_top3": 88.1, "CR_top3": 62.9, "CF1_top3": 73.4,
        "OP_top3": 89.6, "OR_top3": 65.3, "OF1_top3": 75.6,
    },
}
# benchmark -> the paper's ResNet-101 baseline row (448 px): mAP only.
PAPER_BASELINE = {"voc2007": {"mAP": 89.9}, "coco2014": {"mAP": 77.3}}
# The paper's VOC tables abbreviate these class names.
SHORT_CLASS_NAMES = {"aeroplane": "aero", "bicycle": "bike", "diningtable": "table",
                     "motorbike": "mbike", "pottedplant": "plant", "tvmonitor": "tv"}


def results_table(metrics, classes, benchmark=None, setting=(None, None, None, None), title=None):
    """One evaluation laid out like the paper's table, in Markdown.

    A per-class benchmark (VOC) gets one AP column per class and mAP; COCO gets mAP, the six
    thresholded metrics and their top-3 variants. `setting` is (model, arch, image size, split):
    when the benchmark, arch and image size are the paper's, the paper's row of that model (DSDL,
    or its ResNet-101 baseline) follows ours, and when the split is the paper's too, our
    difference to it (VOC 2012's val is compared with nothing: the paper's numbers are the test
    server's). The paper gives only the mAP of its baseline: its other cells are empty.
    """
    model, arch, image_size, split = setting
    known = PAPER_RESULTS.get(benchmark)
    per_class = "AP" in known if known else len(classes) <= 20
    if per_class:
        headers = [SHORT_CLASS_NAMES.get(name, name) for name in classes] + ["mAP"]
        keys = [("AP", c) for c in range(len(classes))] + [("mAP", None)]
    else:
        headers = ["mAP", *THRESHOLDED, *(f"top-3 {name}" for name in THRESHOLDED)]
        keys = [("mAP", None), *((name, None) for name in THRESHOLDED),
                *((name + "_top3", None) for name in THRESHOLDED)]

    def row(source):
        return [np.nan if key not in source else source[key] if index is None else source[key][index]
                for key, index in keys]

    def cells(values, sign=""):
        return ["–" if np.isnan(v) else f"{v:{sign}.1f}" for v in np.asarray(values, dtype=float)]

    ours = row(metrics)
    rows = [["ours", *cells(ours)]]
    papers = {"dsdl": known, "baseline": PAPER_BASELINE.get(benchmark)}
    paper = (papers.get(model or "dsdl") if (arch, image_size) == (PAPER_ARCH, PAPER_IMAGE_SIZE)
             else None)
    name = model_title(model)
    if paper is not None:
        rows.append([f"{name} paper", *cells(row(paper))])
        if split == known["split"]:
            rows.append(["difference", *cells(np.subtract(ours, row(paper)), "+")])
    lines = [title, ""] if title else []
    headers = [markdown_cell(header) for header in headers]
    lines.append("| | " + " | ".join(headers) + " |")
    lines.append("|---|" + "---:|" * len(headers))
    lines.extend("| " + " | ".join(entries) + " |" for entries in rows)
    if paper is not None:
        lines += ["", f"Paper: Zhou, Huang, Xing, AAAI 2021, {name} with ResNet-101 at 448 px on "
                      f"{known['setting']}."]
        if split != known["split"]:
            lines[-1] += f" Ours is on {split}: no difference is shown."
    return "\n".join(lines)


def markdown_cell(text):
    """A table cell's text: a '|' in it would end the cell (a class named 'cat|dog')."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|")


def evaluation_name(dataset, checkpoint):
    """The name of -e's files of `dataset`: eval_<split>, or for another dataset than the one
    the checkpoint was trained on (--zero-shot on NUS-WIDE of a VOC run) eval_<dataset>_<split>,
    so that it never replaces the run's own evaluation."""
    trained_on = (checkpoint.get("dataset") or {}).get("name")
    if trained_on is None or trained_on == dataset.name:
        return f"eval_{dataset.split}"
    return f"eval_{re.sub(r'[^a-z0-9]+', '-', str(dataset.name).lower()).strip('-')}_{dataset.split}"


def write_table(path, table):
    with atomic_write(path, "w") as f:
        f.write(table + "\n")


def report_evaluation(metrics, classes, title, benchmark, setting, record, log_path, table_path):
    """Print one evaluation (the paper-style table and the thresholded metrics), append its
    record to the log at `log_path` and save the table as Markdown at `table_path`. `setting`
    is (model, arch, image size, split), as `results_table` takes it."""
    table = results_table(metrics, classes, benchmark, setting, title)
    print(f"{table}\n{format_metrics(metrics, classes, per_class=len(classes) > 20)}")
    append_record(log_path, record)
    write_table(table_path, table)


# --------------------------------------------------------------------------------------------
# What a training run or an evaluation reports, in its run folder
# --------------------------------------------------------------------------------------------

def describe_run(args, test_set, world_size, device):
    """What every record of this run says of it: its settings (options.RECORDED) and what
    produced it."""
    settings = recorded_settings(args)
    settings.update(dataset=test_set.name, benchmark=test_set.benchmark)
    return {"settings": settings, "run": provenance(device, world_size)}


def table_title(args, dataset, epoch, source):
    return (f"{model_title(args.model)} {args.arch} at {args.image_size} px, "
            f"epoch {epoch} of {source}, on {dataset.name} {dataset.split}")


def report_split(args, test_set, metrics, record, source, log, table):
    """Print one evaluation of the test split, append its record to the file `log` and save its
    table as `table`, both in the run folder; returns the log's path."""
    log = os.path.join(args.checkpoint_dir, log)
    record["images"] = len(test_set)  # what the scores are over: records stay comparable
    record["dataset"] = test_set.name
    report_evaluation(
        metrics, [str(name) for name in test_set.classes],
        table_title(args, test_set, record["epoch"], source), test_set.benchmark,
        (args.model, args.arch, args.image_size, test_set.split), record, log,
        table_path=os.path.join(args.checkpoint_dir, table))
    return log


def log_epoch(args, selection, metrics, record, board, rates):
    """An epoch's printout, its record in metrics.jsonl, its table, the curves and TensorBoard."""
    log = report_split(args, selection, metrics, record, "this run", METRICS_LOG,
                       f"results_{selection.split}.md")
    plot_curves(log, args.checkpoint_dir, record["classes"])
    if board is not None:
        board.write(record, rates)


def selection_note(datasets, can_validate=True):
    """What the run says at its start about the split model_best is chosen on (`can_validate`:
    the entry script has --val)."""
    test = datasets.test
    if datasets.val is not None:
        return (f"model_best is chosen on {datasets.val.split} ({len(datasets.val)} images), where "
                f"the per-class thresholds are tuned too; the best model scores {test.split} "
                f"once, at the end (eval_{test.split}.jsonl)")
    if test.benchmark is None:  # own data: the paper's benchmarks did select on test
        note = (f"model_best is chosen on {test.split}, the split its numbers are measured on "
                f"(as on the paper's benchmarks)")
        if can_validate:
            note += (f"; pass --val VAL.csv to choose on a validation split and score "
                     f"{test.split} once")
        return note
    return ""


# --------------------------------------------------------------------------------------------
# The metrics log (metrics.jsonl, eval_<split>.jsonl) and its pictures
# --------------------------------------------------------------------------------------------

def append_record(path, record):
    """Append one JSON line (NaN, e.g. an undefined AP, is written as null)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    line = memoryview((json.dumps({key: clean(value) for key, value in record.items()}) + "\n").encode())
    drop_partial_last_line(path)
    with open(path, "ab", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        try:
            while line:  # unbuffered: a write may take part of the line
                line = line[f.write(line):]
        except OSError:  # a full disk: the log as it was, not a half line
            os.ftruncate(f.fileno(), size)
            if size == 0:
                os.remove(path)
            raise


def nan_for_null(value):
    """A value read back from the log: the null that `append_record` wrote for NaN is NaN again."""
    if isinstance(value, list):
        return [nan_for_null(v) for v in value]
    return math.nan if value is None else value


def drop_partial_last_line(path):
    """Cut a line that a killed run left half-written, so the next record starts a line of its own.

    Its epoch has no checkpoint yet (the log is written first), so the resumed run logs it again.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)


def read_metrics(path):
    """The records of metrics.jsonl; a later record for the same epoch and split wins.

    A last line without its newline is one that a killed run left half-written: it is skipped
    (that epoch is logged again when the run resumes). A broken line elsewhere is an error.
    """
    records = {}
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise DSDLError(f"{path}, line {number} is not a JSON record ({error}); "
                            f"delete that line") from error
        records[(record["epoch"], record["split"])] = record
    return list(records.values())


def curves_figure(records):
    """Train loss (left) and the mAP of each evaluated split (right) per epoch."""
    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axes, map_axes = figure.subplots(1, 2)
    # Every split evaluated after an epoch carries that epoch's train loss; plot it once.
    train_loss = {r["epoch"]: r["train_loss"] for r in records if r.get("train_loss") is not None}
    epochs = sorted(train_loss)
    loss_axes.plot(epochs, [train_loss[e] for e in epochs], marker="o")
    loss_axes.set(title="train loss", xlabel="epoch", ylabel="loss")
    for split in dict.fromkeys(r["split"] for r in records):
        points = sorted((r["epoch"], r["mAP"]) for r in records
                        if r["split"] == split and r.get("mAP") is not None)
        map_axes.plot([e for e, _ in points], [m for _, m in points], marker="o", label=split)
    map_axes.set(title="mAP", xlabel="epoch", ylabel="mAP (%)")
    map_axes.legend(title="split")
    for axes in (loss_axes, map_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def per_class_ap_figure(record, classes=None):
    """Bar chart of one evaluation's per-class AP; a class without positives has no bar (n/a)."""
    ap = np.array(nan_for_null(record["AP"]), dtype=np.float64)
    classes = list(classes) if classes is not None else [str(c) for c in range(len(ap))]
    figure = Figure(figsize=(max(6.0, 2.0 + 0.3 * len(ap)), 4.5), dpi=100)
    axes = figure.subplots()
    axes.bar(np.arange(len(ap)), ap)
    for c in np.flatnonzero(np.isnan(ap)):
        axes.text(c, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize="small")
    axes.set_xticks(np.arange(len(ap)), classes, rotation=90)
    title = f"per-class AP, {record['split']}, epoch {record['epoch']}"
    if record.get("mAP") is not None:
        axes.axhline(record["mAP"], color="black", linestyle="--", linewidth=1)
        title += f" (dashed: mAP {record['mAP']:.2f})"
    axes.set(title=title, ylabel="AP (%)", ylim=(0, 100), xlim=(-0.6, len(ap) - 0.4))
    figure.tight_layout()
    return figure


def plot_curves(log_path, out_dir, classes=None):
    """Draw `curves.png` and `per_class_ap.png` in `out_dir` from the log at `log_path`.

    The per-class AP is that of the last epoch's evaluation (the last one logged for it).
    Returns the two paths.
    """
    records = read_metrics(log_path)
    last = max(reversed(records), key=lambda record: record["epoch"])
    paths = os.path.join(out_dir, "curves.png"), os.path.join(out_dir, "per_class_ap.png")
    for figure, path in zip((curves_figure(records), per_class_ap_figure(last, classes)), paths):
        save_figure(figure, path)
    return paths


def save_figure(figure, path):
    """A figure as a PNG file, written whole or not at all (atomic_write)."""
    with atomic_write(path) as f:
        figure.savefig(f, format="png")


class TensorBoardLog:
    """--tensorboard: each epoch's numbers as TensorBoard events in the run folder (one scalar per
    number of its metrics.jsonl record: losses, mAP, thresholded metrics; and the learning
    rates). metrics.jsonl stays the record; this is for watching runs side by side."""

    def __init__(self, folder, start_epoch):
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is optional
        # A resumed run drops the events of the epochs it trains again.
        self.writer = SummaryWriter(folder, purge_step=start_epoch + 1)

    def write(self, record, learning_rates):
        """`learning_rates`: {"trunk": lr, "head": lr} as the epoch started."""
        epoch = record["epoch"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, epoch)
        for name, value in learning_rates.items():
            self.writer.add_scalar(f"learning_rate/{name}", value, epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()


# --------------------------------------------------------------------------------------------
# What produced a result: the reproduction record
# --------------------------------------------------------------------------------------------

def git_commit(folder=os.path.dirname(os.path.abspath(__file__))):
    """The code's git commit (with '+changes' when the work tree differs), or 'not a git checkout'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=folder, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return commit + ("+changes" if changed else "")


def provenance(device, world_size=1):
    """The command line, the code and the software and hardware that ran it on `device`."""
    cuda = device.type == "cuda"
    return {
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # plain str: checkpoints load weights_only
        "torchvision": str(torchvision.__version__),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": str(torch.backends.cudnn.version()) if cuda else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpus": world_size if cuda else 0,
        "host": socket.gethostname(),
    }


def reproduction_block(folder):
    """The Markdown a user pastes when they report a reproduction: what produced the run, its
    best and last epochs, and the paper's row with the difference."""
    log = os.path.join(folder, METRICS_LOG)
    if not os.path.isdir(folder):
        raise DSDLError(f"{folder}: no such folder; pass the --checkpoint-dir of a training run")
    if not os.path.isfile(log):
        raise DSDLError(f"{folder} holds no {METRICS_LOG}: pass the --checkpoint-dir of a training run")
    records = sorted(read_metrics(log), key=lambda record: record["epoch"])
    if not records:
        raise DSDLError(f"{log} holds no record yet: the run has not finished an epoch")
    last = records[-1]
    scored = [record for record in records if record.get("mAP") is not None]
    best = max(scored, key=lambda record: record["mAP"]) if scored else None
    run = last.get("run") or {}
    settings = last.get("settings") or {}
    classes = last.get("classes") or [str(c) for c in range(len(last["AP"]))]
    model = settings.get("model") or "dsdl"
    lines = [f"### {model_title(model)} run: {settings.get('dataset', 'unknown dataset')}, "
             f"{settings.get('arch', '?')} "
             f"at {settings.get('image_size', '?')} px", ""]
    first = records[0].get("run") or {}
    if first.get("command") not in (None, run.get("command")):  # resumed: how it began too
        lines.append(f"- first command: `{first['command']}`")
    for key in ("command", "commit", "torch", "torchvision", "cuda", "cudnn", "gpu", "gpus", "python"):
        lines.append(f"- {key}: `{run.get(key, 'not recorded')}`")
    lines.append("- settings: `" + " ".join(f"{key}={value}" for key, value in settings.items()
                                             if key not in ("dataset", "benchmark")) + "`")
    seconds = [record["epoch_seconds"] for record in records if record.get("epoch_seconds")]
    if seconds:
        lines.append(f"- epochs logged: {len(records)}, median epoch time {duration(float(np.median(seconds)))}")
    for name, record in (("best", best), ("last", last)):
        if record is None:
            lines += ["", f"{name} epoch: none (no mAP was defined)"]
            continue
        metrics = {key: nan_for_null(value) for key, value in record.items()}
        title = f"{name} epoch: {record['epoch']} ({record['split']})"
        setting = (model, settings.get("arch"), settings.get("image_size"), record["split"])
        lines += ["", results_table(metrics, classes, settings.get("benchmark"), setting, title)]
    return "\n".join(lines)


def main(argv=None):
    args = options.report_parser().parse_args(argv)
    try:
        print(reproduction_block(args.folder))
    except DSDLError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
