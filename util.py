"""What the release's util.py held: the metrics and the transforms, with image decoding and the
project's error type. Downloads are in downloads.py, class vectors in embeddings.py, the
torchrun set-up in distributed.py; what a run reports is in report.py."""
import contextlib
import functools
import io
import os
import tempfile
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import v2
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

# The label of an image for a class, in every dataset: present, difficult (VOC: a positive of
# the loss that no AP counts), absent, and unknown (never checked: it counts neither in the loss
# nor in any metric; partial labels such as Open Images' unverified ones).
PRESENT, DIFFICULT, ABSENT, UNKNOWN = 1, 0, -1, -2

# What predict.py finds in a folder, and what an image file may be called.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

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

# The metrics read the N x C scores and labels a block at a time (Open Images: 125,000 x 9,605
# would not fit in memory a few times over): blocks of images for the thresholded metrics (each
# image's top k), groups of classes for the AP and the thresholds (each class's ranking).
# BLOCK_SIZE is how many image-class pairs a block holds; beyond the inputs, about 50 bytes a
# pair are made (200 MB), whatever N x C is.
BLOCK_SIZE = 2 ** 22


def _blocks(length, width):
    """Slices that cover range(length), each holding at most BLOCK_SIZE rows of `width` (or one)."""
    step = max(1, BLOCK_SIZE // max(width, 1))
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def metric_inputs(scores, labels):
    """`scores` and `labels` as N x C numpy arrays, not copied where they are one already (a
    tensor on a GPU is read to the host). One ValueError for a wrong shape or label."""
    scores, labels = (value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
                      for value in (scores, labels))
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be N x C")
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    if labels.dtype.kind == "f" and np.array_equal(labels, labels.astype(np.int8)):
        labels = labels.astype(np.int8)  # whole numbers written as floats
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < UNKNOWN
                        or labels.max() > PRESENT):
        raise ValueError(f"labels must be {PRESENT} (present), {DIFFICULT} (difficult), {ABSENT} "
                         f"(absent) or {UNKNOWN} (unknown); got {labels.dtype} labels from "
                         f"{labels.min()} to {labels.max()}")
    return scores, labels


def _ranked(labels):
    """Booleans: which labels a class's ranking holds (present and absent, not difficult or unknown)."""
    return (labels == PRESENT) | (labels == ABSENT)


def _ranked_by_class(scores, labels):
    """For each class in turn: (class, its scores in float64, its labels), over the images its
    ranking holds, in image order. Classes are taken in groups holding about BLOCK_SIZE such
    images in all (Open Images' partial labels: all classes at once), each read a block of
    images at a time, so that nothing N x C is made."""
    num_images, num_classes = scores.shape
    per_class = np.zeros(num_classes, dtype=np.int64)
    for rows in _blocks(num_images, num_classes):
        per_class += _ranked(labels[rows]).sum(0)
    before = np.cumsum(per_class) - per_class  # images of the classes before each class
    starts = np.flatnonzero(np.diff(before // BLOCK_SIZE, prepend=-1))
    for first, stop in zip(starts, [*starts[1:], num_classes]):
        images, classes = [], []
        for rows in _blocks(num_images, stop - first):
            found_images, found_classes = np.nonzero(_ranked(labels[rows, first:stop]))
            images.append(found_images + rows.start)
            classes.append(found_classes + first)
        images, classes = np.concatenate(images), np.concatenate(classes)
        order = np.argsort(classes, kind="stable")  # by class, each in image order
        group_scores = scores[images, classes][order].astype(np.float64)
        group_labels = labels[images, classes][order]
        ends = np.cumsum(per_class[first:stop])
        for c, start, end in zip(range(first, stop), ends - per_class[first:stop], ends):
            yield c, group_scores[start:end], group_labels[start:end]


def average_precision(scores, labels, device=None):
    """Per-class non-interpolated AP of N x C `scores` against `labels` in {1, 0, -1, -2}.

    Images flagged 0 (difficult) or -2 (unknown) for a class are left out of that class's
    ranking. A class without any positive has no AP: NaN. With a torch `device` (a GPU), the
    classes are ranked there, a block at a time (`_precisions_torch`): the same numbers, bit for bit.
    """
    scores, labels = metric_inputs(scores, labels)
    ap = np.full(scores.shape[1], np.nan)
    if device is None:
        for c, class_scores, class_labels in _ranked_by_class(scores, labels):
            order = np.argsort(-class_scores, kind="stable")
            positives = class_labels[order] == PRESENT
            if positives.any():
                precision_at_rank = np.cumsum(positives) / np.arange(1, positives.size + 1)
                ap[c] = precision_at_rank[positives].mean()
        return ap
    for block in _blocks(scores.shape[1], scores.shape[0]):
        precisions = _precisions_torch(scores[:, block], labels[:, block], device)
        if precisions is None:  # NaN scores (a diverged model): numpy ranks them last, as it did
            ap[block] = average_precision(scores[:, block], labels[:, block])
            continue
        for c, at_positives in zip(range(block.start, block.stop), precisions):
            if at_positives.size:
                ap[c] = at_positives.mean()
    return ap


def _precisions_torch(scores, labels, device):
    """For each class (column) of N x B `scores` and `labels`, the precision at the rank of each
    of its positives, in rank order, among its present and absent images, ranked on a torch
    `device`; None if a score is NaN.

    Every image is sorted (stably, so that the ranked images keep numpy's order among them) and
    the rank of a positive is the count of ranked images up to it. The precisions are whole
    counts divided in float64, as numpy divides them: the same values, to the last bit."""
    scores = torch.from_numpy(np.ascontiguousarray(scores)).to(device).double()
    labels = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
    if torch.isnan(scores).any():
        return None
    # 0 - score, not -score: a GPU's radix sort would put -0.0 ahead of +0.0; numpy ties them.
    order = torch.sort(0.0 - scores, dim=0, stable=True).indices  # N x B, each class's ranking
    ranked = labels.gather(0, order)
    positive = ranked == PRESENT
    precision = positive.cumsum(0, dtype=torch.float64) / _ranked(ranked).cumsum(0, dtype=torch.float64)
    at_positives = precision.t()[positive.t()].cpu().numpy()  # class by class, in rank order
    return np.split(at_positives, np.cumsum(positive.sum(0).cpu().numpy())[:-1])


def _thresholded(correct, predicted, truth):
    """CP, CR, CF1, OP, OR, OF1 (fractions) from the per-class counts Nc, Np and Ng over the
    known pairs (unknown labels count neither way)."""
    correct, num_predicted, num_truth = (np.asarray(count, dtype=np.float64)
                                         for count in (correct, predicted, truth))
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


def _prediction_counts(scores, labels, rules):
    """For each rule (name -> function of a block of scores giving booleans, the predictions),
    the per-class counts Nc, Np, Ng over the known pairs, summed over blocks of images."""
    num_classes = scores.shape[1]
    num_truth = np.zeros(num_classes, dtype=np.int64)
    counts = {name: np.zeros((2, num_classes), dtype=np.int64) for name in rules}  # Nc, Np
    for rows in _blocks(scores.shape[0], num_classes):
        truth, known = labels[rows] == PRESENT, labels[rows] != UNKNOWN
        num_truth += truth.sum(0)
        for name, rule in rules.items():
            predicted = rule(scores[rows]) & known
            counts[name][0] += (predicted & truth).sum(0)
            counts[name][1] += predicted.sum(0)
    return {name: (correct, predicted, num_truth) for name, (correct, predicted) in counts.items()}


def compute_metrics(scores, labels, thresholds=None, device=None):
    """mAP, per-class AP and the thresholded metrics of spec section 6, all in percent.

    `scores` (N x C) are logits; `labels` (N x C) are 1 (present), 0 (difficult), -1 (absent),
    -2 (unknown: counted nowhere). A label counts as predicted when its score >= 0; the top-3
    variants allow at most the 3 highest-scoring labels of each image. Difficult labels count
    as negatives there. CR is the mean over the classes that have ground truth (the release's
    would be NaN otherwise). With per-class `thresholds` (probabilities, `tune_thresholds`),
    also the metrics of predicting class c when its probability >= thresholds[c] ("_tuned").
    The AP's ranking runs on `device` when given (a GPU: `average_precision`), by default on
    the device of `scores` when they are a GPU tensor.
    """
    if device is None and torch.is_tensor(scores) and scores.device.type != "cpu":
        device = scores.device
    scores, labels = metric_inputs(scores, labels)
    ap = average_precision(scores, labels, device)
    defined = ~np.isnan(ap)
    metrics = {
        "mAP": 100 * float(ap[defined].mean()) if defined.any() else float("nan"),
        "AP": [100 * float(v) for v in ap],  # NaN for a class without positives
        "num_classes_ap": int(defined.sum()),  # how many classes the mAP is taken over
    }
    rules = {"": lambda block: block >= 0, "_top3": lambda block: (block >= 0) & top_k(block, 3)}
    if thresholds is not None:
        cuts = np.asarray(thresholds, dtype=np.float64)
        if cuts.shape != (scores.shape[1],):
            raise ValueError(f"{cuts.size} thresholds for {scores.shape[1]} classes")
        rules["_tuned"] = lambda block: probabilities(block) >= cuts
    for suffix, counts in _prediction_counts(scores, labels, rules).items():
        for name, value in _thresholded(*counts).items():
            metrics[name + suffix] = 100 * float(value)
    return metrics


def top_k(scores, k):
    """N x C booleans: the k highest scores of each image (fewer classes: all of them). Of equal
    scores the first classes are taken, and NaN comes last, as a stable sort ranks them."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros(scores.shape, dtype=bool)
    writeable = scores if scores.flags.writeable else scores.copy()  # as torch.from_numpy wants
    best = torch.topk(torch.from_numpy(writeable), k, dim=1).values.numpy()  # N x k, ties in any order
    kth = best[:, -1:]
    ahead, tied = scores > kth, scores == kth
    places = k - ahead.sum(1)  # left for the scores equal to the k-th: the first ones take them
    crowded = np.flatnonzero(tied.sum(1) > places)
    tied[crowded] &= np.cumsum(tied[crowded], axis=1) <= places[crowded, None]
    top = ahead | tied
    unordered = np.flatnonzero(np.isnan(best).any(1))  # torch ranks NaN first, a sort last
    if unordered.size:
        order = np.argsort(-scores[unordered], axis=1, kind="stable")[:, :k]
        top[unordered] = False
        top[unordered[:, None], order] = True
    return top


def probabilities(scores):
    return 1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64)))


def top_k_metrics(scores, labels, ks=(3, 5)):
    """Precision, recall and F1 (percent) of predicting exactly the k highest-scoring classes of
    each image, over all pairs (the zero-shot multi-label literature's P@k, R@k, F1@k).
    Difficult labels (0) count as negatives and unknown ones (-2) neither way, as in the top-3
    metrics of `compute_metrics` (the release's rule): with every score >= 0, P@3 and R@3 are
    its OP_top3 and OR_top3."""
    scores, labels = metric_inputs(scores, labels)
    correct, predicted, truth = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0), 0
    for rows in _blocks(scores.shape[0], scores.shape[1]):
        present, known = labels[rows] == PRESENT, labels[rows] != UNKNOWN
        truth += int(present.sum())
        for k in ks:
            chosen = top_k(scores[rows], k) & known
            correct[k] += int((chosen & present).sum())
            predicted[k] += int(chosen.sum())
    metrics = {}
    for k in ks:
        precision = correct[k] / max(predicted[k], 1)
        recall = correct[k] / max(truth, 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        metrics.update({f"P@{k}": 100 * float(precision), f"R@{k}": 100 * float(recall),
                        f"F1@{k}": 100 * float(f1)})
    return metrics


def tune_thresholds(scores, labels):
    """Per class, the probability threshold that maximises that class's F1 on these scores
    (predict class c when its probability >= the threshold); 0.5 for a class without positives.
    Difficult and unknown labels count neither way."""
    from sklearn.metrics import precision_recall_curve
    scores, labels = metric_inputs(scores, labels)
    thresholds = np.full(labels.shape[1], 0.5)
    for c, class_scores, class_labels in _ranked_by_class(scores, labels):
        truth = class_labels == PRESENT
        if not truth.any():
            continue
        precision, recall, cuts = precision_recall_curve(truth, probabilities(class_scores))
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds[c] = float(cuts[int(np.argmax(f1))])
    return thresholds.tolist()


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


AUGMENTATIONS = {"release": None, "randaugment": v2.RandAugment,
                 "trivialaugment": v2.TrivialAugmentWide}  # --augment, after crop and flip


def augmentation(augment):
    """--augment's extra policy (None for the release's crop and flip alone)."""
    policy = AUGMENTATIONS[augment]
    return policy() if policy else None


class FastTrainTransform(TensorTransform):
    """The release's train transform on uint8 tensors: the same steps and the same random draws.

    Resize to 8/7 of the input size, the crop box drawn by `MultiScaleCrop` on that image, the
    crop resized to the input size, a horizontal flip with probability 1/2 (the draw of
    transforms.RandomHorizontalFlip). Seeded alike, this and `train_transform()` take the same
    box and the same flip. Then, as `train_transform` does, --augment's policy and --cutout's
    erasing, on the uint8 image (the erased box gets the ImageNet mean, 0 once normalised).
    """

    def __init__(self, image_size, augment="release", cutout=0.0):
        self.resize = train_resize(image_size)
        self.crop = MultiScaleCrop(image_size)
        self.augment = augmentation(augment)
        mean = [round(255 * channel) for channel in IMAGENET_MEAN]
        self.cutout = v2.RandomErasing(cutout, value=mean) if cutout else None

    def transform(self, image):
        image = F.resize(image, [self.resize, self.resize], antialias=True)
        x0, y0, x1, y1 = self.crop.draw(self.resize, self.resize)
        # Crop, then resize a packed copy: F.resized_crop resamples the crop's strided view,
        # which takes torch's slower uint8 path (measured 3x the time of this copy and resize).
        image = _packed(F.crop(image, y0, x0, y1 - y0, x1 - x0))
        image = F.resize(image, [self.crop.size, self.crop.size], antialias=True)
        if torch.rand(1) < 0.5:
            image = F.horizontal_flip(image)
        if self.augment is not None:
            image = self.augment(image)
        if self.cutout is not None:
            image = self.cutout(image)
        return image

    def __repr__(self):
        return (f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, "
                f"augment={self.augment}, cutout={self.cutout})")


class FastEvalTransform(TensorTransform):
    """The release's test transform on uint8 tensors: resize to image_size x image_size."""

    def __init__(self, image_size):
        self.size = image_size

    def transform(self, image):
        return F.resize(image, [self.size, self.size], antialias=True)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size})"


def train_transform(image_size=448, fast=False, augment="release", cutout=0.0):
    """Resize to 512 (for 448; 8/7 of the input size in general), multi-scale crop, flip.

    `augment` (--augment) adds RandAugment or TrivialAugmentWide after the flip; `cutout`
    (--cutout) erases one random box with that probability (torchvision's RandomErasing, filled
    with the ImageNet mean). They draw from torch's generator, as the crop does, so that
    engine.EpochSeeded makes them the same with any number of workers and on resume.
    `fast`: the same steps and crops on uint8 tensors (`FastTrainTransform`), normalised on the device.
    """
    if fast:
        return FastTrainTransform(image_size, augment, cutout)
    resize = train_resize(image_size)
    steps = [transforms.Resize((resize, resize)), MultiScaleCrop(image_size),
             transforms.RandomHorizontalFlip()]
    if augment != "release":
        steps.append(augmentation(augment))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cutout:
        steps.append(v2.RandomErasing(cutout, value=0))
    return transforms.Compose(steps)


def train_transform_of(args):
    """The training transform the options of an entry script ask for."""
    return train_transform(args.image_size, args.fast_pipeline, args.augment, args.cutout)


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
    if isinstance(error, PermissionError):
        return DSDLError(f"cannot read {path}: permission denied; make it readable "
                         f"(chmod a+r) or run as a user who may read it")
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
# Files: atomic writes, writability, the images of a dataset
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


def cached_arrays(cache_file, source, build, version, key=(), when="once"):
    """The arrays (a dict of numpy arrays) that `build()` reads from the file `source`, kept in
    `cache_file` (.npz) so that later starts skip reading it. The cache serves while `source`
    keeps its size and modification time, `version` (of the cache's layout) and `key` (e.g. the
    class list the arrays are for); else it is rebuilt, and written whole or not at all
    (atomic_write). An unreadable cache is rebuilt and a folder that cannot take one (read-only
    data) is read each time, each with a warning. `when` says, in the message, when `source` is
    read."""
    stat = os.stat(source)
    stamp = np.array([version, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    key = np.array(list(key), dtype=str)
    try:
        with np.load(cache_file, allow_pickle=False) as cache:
            if np.array_equal(cache["source"], stamp) and np.array_equal(cache["key"], key):
                return {name: cache[name] for name in cache.files if name not in ("source", "key")}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        warnings.warn(f"ignoring the unreadable label cache {cache_file} ({error}); rebuilding it",
                      stacklevel=3)
    print(f"reading {source} ({when}; the labels are cached in {cache_file})")
    arrays = build()
    try:
        with atomic_write(cache_file) as f:
            np.savez(f, source=stamp, key=key, **arrays)
    except OSError as error:  # a read-only dataset folder: work without the cache
        warnings.warn(f"could not write the label cache {cache_file} ({error}); {source} will be "
                      f"read again at the next start", stacklevel=3)
    return arrays


def write_error(folder):
    """The OSError that writing a file in `folder` raises, or None. A real write: permission
    bits do not stop root, and a read-only mount stops everyone."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return error
    return None


def check_images_exist(paths, what):
    """One stat and one access check per image, when a dataset is built: a missing or unreadable
    image is found before training, not an epoch later."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DSDLError(f"{len(missing)} of the {len(paths)} images of {what} are missing, e.g. "
                        f"{', '.join(missing[:3])}. Restore them, or move the dataset folder "
                        f"away to download it again.")
    unreadable = [path for path in paths if not os.access(path, os.R_OK)]
    if unreadable:
        more = f" (and {len(unreadable) - 1} more of {what})" if len(unreadable) > 1 else ""
        raise DSDLError(f"cannot read {unreadable[0]}: permission denied{more}; make the images "
                        f"readable (chmod a+r) or run as a user who may read them")


MADE_FOLDERS = []  # folders this process created (make_folders), in the order made


def make_folders(path):
    """os.makedirs(path, exist_ok=True), remembering each folder it creates, so that a run that
    fails before writing anything leaves no empty folder behind (`remove_made_folders`)."""
    missing, head = [], os.path.abspath(path)
    while not os.path.exists(head):
        missing.append(head)
        head = os.path.dirname(head)
    os.makedirs(path, exist_ok=True)
    MADE_FOLDERS.extend(reversed(missing))


def remove_made_folders():
    """Remove the folders `make_folders` created that are still empty, deepest first."""
    for folder in reversed(MADE_FOLDERS):
        with contextlib.suppress(OSError):  # not empty: something was written there, keep it
            os.rmdir(folder)
    MADE_FOLDERS.clear()


def out_of_memory(error):
    """Whether `error` says that the CPU's or a GPU's memory ran out."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory_advice(error, batch_size=None, image_size=None):
    """What an out-of-memory `error` says, and which of the settings given to lower."""
    settings = ([f"-b/--batch-size (now {batch_size})"] if batch_size is not None else []) + (
        [f"--image-size (now {image_size})"] if image_size is not None else [])
    return f"out of memory ({str(error).splitlines()[0][:200]}); lower {' or '.join(settings)}"
