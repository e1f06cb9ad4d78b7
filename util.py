"""Small shared pieces: metrics, transforms, label embeddings, downloads and safe extraction,
the training log and its pictures."""
import contextlib
import functools
import hashlib
import http.client
import json
import os
import pickle
import shutil
import stat
import tarfile
import urllib.request
import zipfile

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps
from torchvision import transforms
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DSDLError(RuntimeError):
    """A problem the user can fix (missing file, wrong shape ...); printed without a traceback."""


# --------------------------------------------------------------------------------------------
# Metrics (spec section 6)
# --------------------------------------------------------------------------------------------

def average_precision(scores, labels):
    """Per-class non-interpolated AP of N x C `scores` against `labels` in {1, 0, -1}.

    Images flagged 0 (difficult) for a class are left out of that class's ranking. A class
    without any positive has no AP: NaN.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        kept = labels[:, c] != 0
        order = np.argsort(-scores[kept, c], kind="stable")
        positives = labels[kept, c][order] == 1
        if positives.any():
            precision_at_rank = np.cumsum(positives) / np.arange(1, positives.size + 1)
            ap[c] = precision_at_rank[positives].mean()
    return ap


def _thresholded(predicted, truth):
    """CP, CR, CF1, OP, OR, OF1 (fractions) from boolean N x C predictions and ground truth."""
    correct = (predicted & truth).sum(0).astype(np.float64)   # Nc
    num_predicted = predicted.sum(0).astype(np.float64)       # Np
    num_truth = truth.sum(0).astype(np.float64)               # Ng
    # The release counts a class that is never predicted as Np = 1 (its precision is 0).
    cp = np.mean(correct / np.maximum(num_predicted, 1))
    has_truth = num_truth > 0
    cr = np.mean(correct[has_truth] / num_truth[has_truth]) if has_truth.any() else 0.0
    op = correct.sum() / max(num_predicted.sum(), 1)
    orr = correct.sum() / max(num_truth.sum(), 1)

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orr, "OF1": f1(op, orr)}


def compute_metrics(scores, labels):
    """mAP, per-class AP and the thresholded metrics of spec section 6, all in percent.

    `scores` (N x C) are logits; `labels` (N x C) are 1 (present), 0 (difficult), -1 (absent).
    A label counts as predicted when its score >= 0; the top-3 variants allow at most the 3
    highest-scoring labels of each image. Difficult labels count as negatives there. CR is the
    mean over the classes that have ground truth (the release's would be NaN otherwise).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be N x C")
    ap = average_precision(scores, labels)
    defined = ~np.isnan(ap)
    metrics = {
        "mAP": 100 * float(ap[defined].mean()) if defined.any() else float("nan"),
        "AP": [100 * float(v) for v in ap],  # NaN for a class without positives
        "num_classes_ap": int(defined.sum()),  # how many classes the mAP is taken over
    }
    truth = labels == 1
    predicted = scores >= 0
    for name, value in _thresholded(predicted, truth).items():
        metrics[name] = 100 * float(value)
    k = min(3, scores.shape[1])
    top = np.zeros_like(predicted)
    np.put_along_axis(top, np.argsort(-scores, axis=1, kind="stable")[:, :k], True, axis=1)
    for name, value in _thresholded(predicted & top, truth).items():
        metrics[name + "_top3"] = 100 * float(value)
    return metrics


def format_metrics(metrics, classes):
    """The printout of one evaluation: mAP, the thresholded six, their top-3 and per-class AP."""
    mean = "undefined" if np.isnan(metrics["mAP"]) else f"{metrics['mAP']:.2f}"  # no positive at all
    lines = [f"mAP {mean} (over {metrics['num_classes_ap']} of {len(classes)} classes)"]
    for suffix, title in (("", "all"), ("_top3", "top-3")):
        lines.append(f"{title:>6}: " + "  ".join(
            f"{name} {metrics[name + suffix]:.2f}" for name in ("CP", "CR", "CF1", "OP", "OR", "OF1")))
    width = max(len(name) for name in classes)
    lines.append("per-class AP:")
    for name, ap in zip(classes, metrics["AP"]):
        lines.append(f"  {name:<{width}}  " + ("undefined (no positive)" if np.isnan(ap) else f"{ap:6.2f}"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The paper's tables (spec section 1)
# --------------------------------------------------------------------------------------------

PAPER_ARCH = "resnet101"
PAPER_THRESHOLDED = ("CP", "CR", "CF1", "OP", "OR", "OF1")
# benchmark -> the paper's DSDL row (ResNet-101 at 448 px); "AP" in the dataset's class order.
PAPER_RESULTS = {
    "voc2007": {
        "setting": "VOC 2007 test",
        "mAP": 94.4,
        "AP": [99.8, 98.7, 98.4, 97.9, 81.9, 95.4, 97.6, 98.3, 83.3, 95.0,
               88.6, 98.0, 97.9, 95.8, 99.0, 86.6, 95.9, 86.4, 98.6, 94.4],
    },
    "voc2012": {
        "setting": "VOC 2012 test, scored by the evaluation server",
        "mAP": 93.2,
        "AP": [99.4, 95.3, 97.6, 95.7, 83.5, 94.8, 93.9, 98.5, 85.7, 94.5,
               83.8, 98.4, 97.7, 95.9, 98.5, 80.6, 95.7, 82.3, 98.2, 93.2],
    },
    "coco2014": {
        "setting": "COCO 2014 val",
        "mAP": 81.7, "CP": 84.1, "CR": 70.4, "CF1": 76.7, "OP": 85.1, "OR": 73.9, "OF1": 79.1,
        "CP_top3": 88.1, "CR_top3": 62.9, "CF1_top3": 73.4,
        "OP_top3": 89.6, "OR_top3": 65.3, "OF1_top3": 75.6,
    },
}
# The paper's VOC tables abbreviate these class names.
SHORT_CLASS_NAMES = {"aeroplane": "aero", "bicycle": "bike", "diningtable": "table",
                     "motorbike": "mbike", "pottedplant": "plant", "tvmonitor": "tv"}


def results_table(metrics, classes, benchmark=None, arch=None, title=None):
    """One evaluation laid out like the paper's table, in Markdown.

    A per-class benchmark (VOC) gets one AP column per class and mAP; COCO gets mAP, the six
    thresholded metrics and their top-3 variants. When `benchmark` and `arch` are the paper's
    setting, the paper's row and our difference to it follow our row.
    """
    known = PAPER_RESULTS.get(benchmark)
    per_class = "AP" in known if known else len(classes) <= 20
    if per_class:
        headers = [SHORT_CLASS_NAMES.get(name, name) for name in classes] + ["mAP"]
        keys = [("AP", c) for c in range(len(classes))] + [("mAP", None)]
    else:
        headers = ["mAP", *PAPER_THRESHOLDED, *(f"top-3 {name}" for name in PAPER_THRESHOLDED)]
        keys = [("mAP", None), *((name, None) for name in PAPER_THRESHOLDED),
                *((name + "_top3", None) for name in PAPER_THRESHOLDED)]

    def row(source):
        return [source[key] if index is None else source[key][index] for key, index in keys]

    def cells(values, sign=""):
        return ["–" if np.isnan(v) else f"{v:{sign}.1f}" for v in np.asarray(values, dtype=float)]

    ours = row(metrics)
    rows = [["ours", *cells(ours)]]
    paper = known if known and arch == PAPER_ARCH else None
    if paper is not None:
        rows.append(["DSDL paper", *cells(row(paper))])
        rows.append(["difference", *cells(np.subtract(ours, row(paper)), "+")])
    lines = [title, ""] if title else []
    lines.append("| | " + " | ".join(headers) + " |")
    lines.append("|---|" + "---:|" * len(headers))
    lines.extend("| " + " | ".join(entries) + " |" for entries in rows)
    if paper is not None:
        lines += ["", f"Paper: Zhou, Huang, Xing, AAAI 2021, DSDL with ResNet-101 at 448 px on "
                      f"{paper['setting']}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Transforms (spec section 4)
# --------------------------------------------------------------------------------------------

class MultiScaleCrop:
    """The release's multi-scale corner crop, then a resize to `size` x `size`.

    Crop sides are min(w, h) * s for s in `scales`, chosen independently for width and height
    but at most `max_distort` steps apart in `scales`; a side within 3 px of `size` snaps to
    `size`. The crop's corner is one of 13 fixed positions on a grid of quarter steps.
    """

    def __init__(self, size, scales=(1.0, 0.875, 0.75, 0.66, 0.5), max_distort=2):
        self.size = size
        self.scales = scales
        self.max_distort = max_distort

    def crop_sizes(self, width, height):
        """Every (crop_w, crop_h) this crop may take for an image of that size."""
        base = min(width, height)
        sides = [int(base * s) for s in self.scales]
        sides = [self.size if abs(side - self.size) < 3 else side for side in sides]
        return [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides)
                if abs(i - j) <= self.max_distort]

    @staticmethod
    def offsets(width, height, crop_w, crop_h):
        """The 13 corner positions: 4 corners, centre, 4 edge centres, 4 quarter points."""
        w, h = (width - crop_w) // 4, (height - crop_h) // 4
        grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                (1, 1), (3, 1), (1, 3), (3, 3)]
        return [(i * w, j * h) for i, j in grid]

    def draw(self, width, height):
        """A random crop box (x0, y0, x1, y1) for an image of that size."""
        sizes = self.crop_sizes(width, height)
        crop_w, crop_h = sizes[torch.randint(len(sizes), ()).item()]
        offsets = self.offsets(width, height, crop_w, crop_h)
        x, y = offsets[torch.randint(len(offsets), ()).item()]
        return x, y, x + crop_w, y + crop_h

    def __call__(self, image):
        crop = image.crop(self.draw(*image.size))
        return crop.resize((self.size, self.size), Image.BILINEAR)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, scales={self.scales}, max_distort={self.max_distort})"


class WarpedMultiScaleCrop(MultiScaleCrop):
    """The release's resize to `warp` x `warp` then multi-scale crop, in a single resize.

    The crop box is drawn exactly as the release draws it on the `warp` x `warp` image (same
    random numbers, same 13 positions) and mapped back onto the original image, which is then
    resampled once. This halves the resampling work; the pixels differ from the two-step
    result only by the second interpolation's blur (under 0.6 grey levels on average and 2
    levels at the 99th percentile at VOC and COCO image sizes, tested).
    """

    def __init__(self, size, warp, **kwargs):
        super().__init__(size, **kwargs)
        self.warp = warp

    def __call__(self, image):
        x0, y0, x1, y1 = self.draw(self.warp, self.warp)
        sx, sy = image.size[0] / self.warp, image.size[1] / self.warp
        return image.resize((self.size, self.size), Image.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))


def to_uint8_tensor(image):
    """H x W x 3 uint8 tensor of a PIL image: batches of these are channels-last on the device."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


@functools.lru_cache(maxsize=None)
def _normalisation(device):
    """ImageNet mean and std in 0..255 units, made once per device (no copy per batch)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize_on_device(images):
    """B x H x W x 3 uint8 batch -> B x 3 x H x W float, ImageNet-normalised (channels-last memory)."""
    mean, std = _normalisation(images.device)
    return (images.permute(0, 3, 1, 2).float() - mean) / std


def train_transform(image_size=448, fast=False):
    """Resize to 512 (for 448; 8/7 of the input size in general), multi-scale crop, flip.

    `fast`: the same crops in one resize, and uint8 output normalised on the device.
    """
    resize = round(image_size * 8 / 7)
    if fast:
        return transforms.Compose([WarpedMultiScaleCrop(image_size, resize),
                                   transforms.RandomHorizontalFlip(), to_uint8_tensor])
    return transforms.Compose([
        transforms.Resize((resize, resize)),
        MultiScaleCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size=448, fast=False):
    """Resize to image_size x image_size, ignoring the aspect ratio (the release's 'Warp').

    `fast`: uint8 output, normalised on the device (same pixels up to float rounding).
    """
    if fast:
        return transforms.Compose([transforms.Resize((image_size, image_size)), to_uint8_tensor])
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_image(path, upright=False):
    """An RGB PIL image; grey-scale, CMYK and PNG-in-.jpg files are converted. Errors name the file.

    `upright`: turn the image as its EXIF orientation says (phone photos). Off for VOC and COCO,
    whose images the release read as stored; on for your own images (predict.py, CSV datasets).
    """
    if not os.path.isfile(path):
        raise DSDLError(f"image not found: {path}. The dataset folder is incomplete; "
                        f"delete it to download it again, or restore the file.")
    try:
        with Image.open(path) as image:
            return (ImageOps.exif_transpose(image) if upright else image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DSDLError(f"cannot read image {path} ({error}). The file is truncated or not "
                        f"an image; restore it from the original archive.") from error


# --------------------------------------------------------------------------------------------
# Files: checksums, downloads, safe extraction, label embeddings
# --------------------------------------------------------------------------------------------

def md5sum(path, chunk=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(urls, path, md5=None):
    """Download the first of `urls` that works to `path`, with a progress bar.

    The bytes go to `path + '.part'` and are renamed only after the md5 matches, so a cut or
    corrupted download never looks complete; a bad partial file is removed.
    """
    if isinstance(urls, str):
        urls = [urls]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".part"
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
                received = out.tell()
        # no network, HTTP error, timeout, disk full, connection cut (http.client.IncompleteRead)
        except (OSError, http.client.HTTPException) as error:
            errors.append(f"{url}: {error}")
            if os.path.exists(partial):
                os.remove(partial)
                errors[-1] += "; the partial download has been removed"
            continue
        if total is not None and received != total:  # a connection closed early ends the stream
            os.remove(partial)
            errors.append(f"{url}: the download was cut short ({received} of {total} bytes) "
                          f"and has been removed")
            continue
        if md5 is not None and md5sum(partial) != md5:
            os.remove(partial)
            errors.append(f"{url}: checksum mismatch (expected md5 {md5}); the download was "
                          f"cut short or corrupted and has been removed")
            continue
        os.replace(partial, path)
        return path
    raise DSDLError(f"could not download {os.path.basename(path)} to {path}:\n  " + "\n  ".join(errors)
                    + f"\nRun the same command again to retry, or download it by hand and place it at "
                      f"{path}; check the network if it keeps failing.")


STAGING_PREFIX = ".extracting-"


def _check_member(target, name):
    resolved = os.path.realpath(os.path.join(target, name))
    if os.path.isabs(name) or os.path.commonpath([target, resolved]) != target:
        raise DSDLError(f"refusing archive member {name!r}: it would be written outside {target}")


def extract(archive, target):
    """Extract a .tar/.tar.gz/.zip into `target`, refusing members that escape it.

    Members with absolute paths, `..` that leads outside, and links are refused before anything
    is written. The archive is unpacked into a staging folder inside `target` and then moved in
    place; the staging folder is removed only once everything is in place, so an extraction cut
    short (killed, Ctrl-C) stays visible to `interrupted_extraction` and is redone instead of
    leaving a tree that looks whole.
    """
    target = os.path.realpath(target)
    staging = os.path.join(target, STAGING_PREFIX + os.path.basename(archive))
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(staging, info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise DSDLError(f"refusing link {info.filename!r} in {archive}")
                zf.extractall(staging)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _check_member(staging, member.name)
                    if member.issym() or member.islnk():
                        raise DSDLError(f"refusing link {member.name!r} in {archive}")
                tf.extractall(staging, filter="data")
    except tarfile.FilterError as error:  # device files and the like
        shutil.rmtree(staging, ignore_errors=True)
        raise DSDLError(f"refusing a member of {archive}: {error}") from error
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DSDLError(f"{archive} is not a valid archive ({error}); delete it and download "
                        f"it again") from error
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DSDLError(f"could not extract {archive} into {target} ({error}); free disk space "
                        f"and run again") from error
    except DSDLError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Merge the staged tree into the target (archives like VOC's share top folders).
    for folder, _, files in os.walk(staging):
        destination = os.path.join(target, os.path.relpath(folder, staging))
        os.makedirs(destination, exist_ok=True)
        for name in files:
            os.replace(os.path.join(folder, name), os.path.join(destination, name))
    shutil.rmtree(staging)


def interrupted_extraction(archive, target):
    """Whether an extraction of `archive` (a name or path) into `target` was cut short (`extract`)."""
    return os.path.isdir(os.path.join(target, STAGING_PREFIX + os.path.basename(archive)))


# The standard GloVe class vectors (label_embeddings/README.md): name -> (urls, md5).
STANDARD_EMBEDDINGS = {
    "voc_glove_word2vec.pkl": (
        ["https://github.com/megvii-research/ML-GCN/raw/master/data/voc/voc_glove_word2vec.pkl"],
        "214a91652f7e0533f9108683ffa15ab1"),
    "coco_glove_word2vec.pkl": (
        ["https://github.com/megvii-research/ML-GCN/raw/master/data/coco/coco_glove_word2vec.pkl"],
        "1977a47d8ba304e6f3f89788edf1ab9d"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles a plain numpy array and refuses every other global (so no code can run)."""

    def find_class(self, module, name):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")}:
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_embeddings(path, num_classes=None):
    """Load a C x 300 label-embedding file (.pkl of one numpy array, or .npy) safely.

    A file named like a standard one must match its md5; pickles are read by an unpickler that
    allows only numpy's array globals, so a hostile file is refused without running anything.
    """
    if not os.path.isfile(path):
        raise DSDLError(f"label embeddings not found: {path}")
    name = os.path.basename(path)
    if name in STANDARD_EMBEDDINGS and md5sum(path) != STANDARD_EMBEDDINGS[name][1]:
        raise DSDLError(f"{path} has md5 {md5sum(path)}, not the standard file's "
                        f"{STANDARD_EMBEDDINGS[name][1]}; delete it to download it again")
    try:
        if path.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            with open(path, "rb") as f:
                array = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, ValueError, EOFError, OSError) as error:
        raise DSDLError(f"cannot load label embeddings {path}: {error}. Expected a pickled "
                        f"numpy array or a .npy file of shape C x 300.") from error
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != 300 or (
            num_classes is not None and array.shape[0] != num_classes):
        shape = getattr(array, "shape", type(array).__name__)
        raise DSDLError(f"label embeddings {path} have shape {shape}; expected "
                        f"({num_classes if num_classes is not None else 'C'}, 300), one 300-d "
                        f"vector per class in the dataset's class order")
    if array.dtype.kind not in "fiu":  # e.g. an object array of strings: no code, but no vectors
        raise DSDLError(f"label embeddings {path} hold {array.dtype} values; expected numbers")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def standard_embeddings(name, folder="data"):
    """Path of a standard GloVe file in `folder`, downloaded (md5 checked) when absent."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        urls, md5 = STANDARD_EMBEDDINGS[name]
        download(urls, path, md5)
    return path


# --------------------------------------------------------------------------------------------
# The training log (metrics.jsonl) and its pictures
# --------------------------------------------------------------------------------------------

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
    ap = np.array([np.nan if v is None else v for v in record["AP"]], dtype=np.float64)
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
        figure.savefig(path)
    return paths


# --------------------------------------------------------------------------------------------
# Distributed training (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)
# --------------------------------------------------------------------------------------------

def init_distributed(device):
    """Join the process group torchrun describes; returns (rank, world size, device).

    NCCL on GPUs, gloo on CPUs; each process drives the GPU of its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world_size, device


def is_main_process():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def rank_zero_first():
    """Under torchrun, rank 0 runs the block (downloads, extraction) before the other ranks."""
    distributed = torch.distributed.is_initialized()
    if distributed and not is_main_process():
        torch.distributed.barrier()
    yield
    if distributed and is_main_process():
        torch.distributed.barrier()
