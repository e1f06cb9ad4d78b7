"""Small shared pieces: metrics, transforms, image loading, files (atomic writes, downloads, safe
extraction, label embeddings) and the distributed set-up. What a run reports is in report.py."""
import contextlib
import datetime
import functools
import hashlib
import http.client
import io
import os
import pickle
import shutil
import stat
import tarfile
import tempfile
import urllib.request
import zipfile

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DSDLError(RuntimeError):
    """A problem the user can fix (missing file, wrong shape ...); printed without a traceback."""


def user_message(error):
    """The message of a DSDLError, also of one raised in a DataLoader worker: the loader raises
    it again in the main process as DSDLError("Caught DSDLError in DataLoader worker process
    0. Original Traceback ... util.DSDLError: <message>"), of which only the message is for the user."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.rsplit("DSDLError: ", 1)[-1].strip()
    return message


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
    # The release counts a class that is never predicted as Np = 1 (spec 6), in CP (its
    # precision is 0) and in the sum of Np that OP divides by.
    num_predicted = np.maximum(num_predicted, 1)
    cp = np.mean(correct / num_predicted)
    has_truth = num_truth > 0
    cr = np.mean(correct[has_truth] / num_truth[has_truth]) if has_truth.any() else 0.0
    op = correct.sum() / num_predicted.sum()
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


def train_resize(image_size):
    """The side the release resizes training images to before cropping: 512 for 448 (8/7)."""
    return round(image_size * 8 / 7)


class TensorTransform:
    """A `--fast-pipeline` transform: a uint8 image in, an H x W x 3 uint8 tensor out.

    The input is a 3 x H x W uint8 tensor (`read_image` decodes JPEGs straight into one) or a
    PIL image. The output is normalised on the device, batch by batch (`normalize_on_device`).
    Subclasses resample with torchvision's uint8 kernels, which follow PIL's antialiased
    bilinear filter: the pixels are the release's within a grey level or two (tested).
    """

    def transform(self, image):
        raise NotImplementedError

    def __call__(self, image):
        if isinstance(image, Image.Image):
            image = F.pil_to_tensor(image)
        return self.transform(image).permute(1, 2, 0).contiguous()  # H x W x 3


def _packed(image):
    """The 3 x H x W view of an H x W x 3 copy: torch resamples uint8 images fastest in that layout."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


class FastTrainTransform(TensorTransform):
    """The release's train transform on uint8 tensors: the same steps and the same random draws.

    Resize to 8/7 of the input size, the crop box drawn by `MultiScaleCrop` on that image, the
    crop resized to the input size, a horizontal flip with probability 1/2 (the draw of
    transforms.RandomHorizontalFlip). Seeded alike, this and `train_transform()` take the same
    box and the same flip.
    """

    def __init__(self, image_size):
        self.resize = train_resize(image_size)
        self.crop = MultiScaleCrop(image_size)

    def transform(self, image):
        image = F.resize(image, [self.resize, self.resize], antialias=True)
        x0, y0, x1, y1 = self.crop.draw(self.resize, self.resize)
        # Crop, then resize a packed copy: F.resized_crop resamples the crop's strided view,
        # which takes torch's slower uint8 path (measured 3x the time of this copy and resize).
        image = _packed(F.crop(image, y0, x0, y1 - y0, x1 - x0))
        image = F.resize(image, [self.crop.size, self.crop.size], antialias=True)
        if torch.rand(1) < 0.5:
            image = F.horizontal_flip(image)
        return image

    def __repr__(self):
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop})"


class FastEvalTransform(TensorTransform):
    """The release's test transform on uint8 tensors: resize to image_size x image_size."""

    def __init__(self, image_size):
        self.size = image_size

    def transform(self, image):
        return F.resize(image, [self.size, self.size], antialias=True)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size})"


def train_transform(image_size=448, fast=False):
    """Resize to 512 (for 448; 8/7 of the input size in general), multi-scale crop, flip.

    `fast`: the same steps and crops on uint8 tensors (`FastTrainTransform`), normalised on the device.
    """
    if fast:
        return FastTrainTransform(image_size)
    resize = train_resize(image_size)
    return transforms.Compose([
        transforms.Resize((resize, resize)),
        MultiScaleCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size=448, fast=False):
    """Resize to image_size x image_size, ignoring the aspect ratio (the release's 'Warp').

    `fast`: the same resize on uint8 tensors (`FastEvalTransform`), normalised on the device.
    """
    if fast:
        return FastEvalTransform(image_size)
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _unreadable(path, error, upright):
    """The error for an image file that exists but cannot be decoded."""
    if isinstance(error, Image.DecompressionBombError):
        return DSDLError(f"cannot read image {path} ({error}). The image is larger than PIL's "
                         f"limit of Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS:,}) pixels (PIL "
                         f"refuses twice that, a guard against decompression bombs); downscale it.")
    if upright:  # the user's own file (predict.py, CSV datasets): no archive to restore it from
        fix = "check that it opens in an image viewer, then copy or export it again"
    else:
        fix = "restore it from the original archive"
    return DSDLError(f"cannot read image {path} ({error}). The file is truncated or not an "
                     f"image; {fix}.")


def _scaled_to_8_bits(image):
    """A 16-bit grey image (PIL mode I;16 or I, e.g. a 16-bit PNG) as 8-bit grey: 65535 -> 255.

    PIL's convert("RGB") would clip such values at 255 (almost white). PIL already reads 16-bit
    RGB files as 8-bit RGB.
    """
    pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.round(pixels / 257).astype(np.uint8))


def load_image(path, upright=False):
    """An RGB PIL image; grey-scale, CMYK, 16-bit and PNG-in-.jpg files are converted. Errors
    name the file and say what to do.

    `upright`: turn the image as its EXIF orientation says (phone photos). Off for VOC and COCO,
    whose images the release read as stored; on for your own images (predict.py, CSV datasets).
    """
    if not os.path.isfile(path):
        fix = ("Check the path." if upright else  # the user's own file
               "The dataset folder is incomplete; delete it to download it again, or restore the file.")
        raise DSDLError(f"image not found: {path}. {fix}")
    try:
        with Image.open(path) as image:
            if upright:
                image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # I;16, I;16B ..., I: 16-bit grey
                image = _scaled_to_8_bits(image)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _unreadable(path, error, upright) from error


def load_image_tensor(path, upright=False):
    """The image at `path` as a 3 x H x W uint8 RGB tensor (the fast transforms' input).

    JPEGs are decoded straight into a tensor by torchvision (libjpeg-turbo, as PIL: the same
    pixels; grey and CMYK converted to RGB; the EXIF orientation applied when `upright`, as
    `load_image` does). Other files (PNG ..., or a JPEG name on other bytes), and JPEGs that
    torchvision cannot decode, go through `load_image`, which accepts or refuses a file as the
    release's pipeline does and says why.
    """
    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError:  # missing, a folder ...: load_image says what is wrong
        data = None
    if data is not None and data[:3].tolist() == [0xFF, 0xD8, 0xFF] and within_pil_limit(data):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=upright)
        except RuntimeError:  # truncated, corrupt, or a JPEG flavour libjpeg-turbo lacks
            pass
    return F.pil_to_tensor(load_image(path, upright))  # with PIL's rules and errors


def within_pil_limit(data):
    """Whether the image whose encoded bytes are `data` has at most Image.MAX_IMAGE_PIXELS
    pixels, PIL's guard against decompression bombs (from its header; False if unreadable)."""
    try:
        with Image.open(io.BytesIO(data.numpy())) as header:
            return not Image.MAX_IMAGE_PIXELS or header.size[0] * header.size[1] <= Image.MAX_IMAGE_PIXELS
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def read_image(path, transform=None, upright=False):
    """The image at `path` as a dataset item, passed through `transform`: a PIL image
    (`load_image`), or for the fast transforms (`TensorTransform`) a uint8 tensor
    (`load_image_tensor`, which decodes JPEGs without PIL)."""
    if isinstance(transform, TensorTransform):
        return transform(load_image_tensor(path, upright))
    image = load_image(path, upright)
    return image if transform is None else transform(image)


# --------------------------------------------------------------------------------------------
# Files: checksums, downloads, safe extraction, label embeddings
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open `path` for writing so that readers only ever see the old file or the whole new one.

    The bytes go to `<path>.tmp` (one fixed name per target: a write killed half-way leaves it,
    and the next write of the same target simply starts it again), are flushed to the disk, and
    the file is renamed over `path` when the block ends. If the block raises, the temporary file
    is removed and `path` is left as it was.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    try:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


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
    is written; a file that already exists in `target` is kept, never overwritten. The archive
    is unpacked into a staging folder inside `target` and then moved in place; the staging
    folder is removed only once everything is in place, so an extraction cut short (killed,
    Ctrl-C) stays visible to `interrupted_extraction` and is redone instead of leaving a tree
    that looks whole.
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
            if not os.path.exists(os.path.join(destination, name)):  # never over a user's file
                os.replace(os.path.join(folder, name), os.path.join(destination, name))
    shutil.rmtree(staging)


def fetch(archive, urls, md5, root, what, hint):
    """Make sure `archive` (a path in `root`) is there whole, downloading it when absent or
    when its md5 differs, and extract it into `root`. `what` names the data ("VOC 2007 test")
    and `hint` says how to put it in place by hand, in the error when the download fails."""
    if not (os.path.isfile(archive) and (md5 is None or md5sum(archive) == md5)):
        try:
            download(urls, archive, md5)
        except DSDLError as error:
            raise DSDLError(f"{what} is not in {root} and could not be downloaded.\n{error}\n"
                            f"{hint}") from error
    extract(archive, root)


def write_error(folder):
    """The OSError that writing a file in `folder` raises, or None. A real write: permission
    bits do not stop root, and a read-only mount stops everyone."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return error
    return None


def check_images_exist(paths, what):
    """One stat per image, when a dataset is built: a missing image is found before training."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DSDLError(f"{len(missing)} of the {len(paths)} images of {what} are missing, e.g. "
                        f"{', '.join(missing[:3])}. Restore them, or move the dataset folder "
                        f"away to download it again.")


def interrupted_extraction(archive, target):
    """Whether an extraction of `archive` (a name or path) into `target` was cut short (`extract`)."""
    return os.path.isdir(os.path.join(target, STAGING_PREFIX + os.path.basename(archive)))


# The standard GloVe class vectors (ML-GCN's, made from glove.840B.300d): name -> (urls, md5).
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
    # A NaN or an all-zero vector makes the loss NaN (cos(S, S_hat) is undefined): say which row.
    broken = [row for row in range(array.shape[0])
              if not np.isfinite(array[row]).all() or not np.any(array[row])]
    if broken:
        raise DSDLError(f"label embeddings {path}: row(s) {', '.join(map(str, broken[:10]))} "
                        f"{'are' if len(broken) > 1 else 'is'} all zeros or hold NaN/inf; every "
                        f"class needs a real 300-d vector (make_embeddings.py writes them)")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def standard_embeddings(name, folder="data"):
    """Path of a standard GloVe file in `folder`, downloaded (md5 checked) when absent."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        urls, md5 = STANDARD_EMBEDDINGS[name]
        try:
            download(urls, path, md5)
        except DSDLError as error:
            raise DSDLError(f"{error}\nOr pass a copy you have with --embeddings PATH.") from error
    return path


# --------------------------------------------------------------------------------------------
# Distributed training (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)
# --------------------------------------------------------------------------------------------

def resolve_device(device):
    """The device to run on: `device` (--device), else cuda when a GPU is available, else cpu;
    asking for cuda without a GPU is an error."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DSDLError(f"--device {device}, but no CUDA GPU is available; pass --device cpu")
    return device


def init_distributed(device):
    """Join the process group torchrun describes; returns (rank, world size, device).

    NCCL on GPUs, gloo on CPUs; each process drives the GPU of its LOCAL_RANK. Under torchrun
    the group is joined with one process too (so that `torchrun --nproc_per_node 1` runs the
    distributed code); without torchrun there is none.
    """
    if "RANK" not in os.environ:  # not started by torchrun
        return 0, 1, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # A long timeout: the other ranks wait while rank 0 downloads and extracts a dataset
        # (COCO: 19 GB), which takes longer than the default 10 minutes.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=12))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def is_main_process():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def rank_zero_first():
    """Under torchrun, rank 0 runs the block (checks, downloads, extraction) before the other
    ranks. A DSDLError raised there is raised by every rank (and printed by rank 0 only), so
    that the other ranks stop with it instead of waiting or failing on a closed connection."""
    if not torch.distributed.is_initialized():
        yield
        return
    if is_main_process():
        failure = [None]
        try:
            yield
        except DSDLError as error:
            failure = [str(error)]
            raise
        finally:
            torch.distributed.broadcast_object_list(failure, src=0)
    else:
        failure = [None]
        torch.distributed.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise DSDLError(failure[0])
        yield
