"""Open Images V6 / V7: the human-verified image-level labels, as partial labels.

    ROOT/oidv7-class-descriptions.csv                 LabelName,DisplayName (V6: oidv6-...; or the
                                                      headerless class-descriptions-boxable.csv)
    ROOT/oidv7-train-annotations-human-imagelabels.csv   ImageID,Source,LabelName,Confidence
    ROOT/oidv7-val-annotations-human-imagelabels.csv     (V6: oidv6-train-..., validation-...,
    ROOT/oidv7-test-annotations-human-imagelabels.csv     test-annotations-human-imagelabels.csv)
    ROOT/train/<ImageID>.jpg, ROOT/validation/..., ROOT/test/...   the images

A human verified each labelled image-class pair: Confidence 1 is PRESENT, Confidence 0 ABSENT,
and a pair nobody verified is UNKNOWN (util.py), which counts neither in the loss nor in the
metrics. The classes are chosen (`classes`: MIDs or display names); an image with no verified
label for any of them is not part of the split, nor is one whose file is not in the images
folder (one warning says how many were used). Nothing is downloaded (OPEN_IMAGES_PAGE).
"""
import array
import collections
import csv
import difflib
import hashlib
import os
import re
import warnings

import numpy as np

from dataset import MultiLabelDataset
from util import ABSENT, PRESENT, UNKNOWN, DSDLError, cached_arrays

OPEN_IMAGES_PAGE = "https://storage.googleapis.com/openimages/web/download_v7.html"
# The class descriptions, first found wins: the full lists (V7, V6, V4/V5), then the boxable ones.
DESCRIPTIONS = ("oidv7-class-descriptions.csv", "oidv6-class-descriptions.csv", "class-descriptions.csv",
                "oidv7-class-descriptions-boxable.csv", "class-descriptions-boxable.csv")
DESCRIPTIONS_HEADER = ["LabelName", "DisplayName"]
# split -> its human-verified image labels, first found wins: V7, V6 (and V4), the V5 boxable subset
ANNOTATIONS = {
    "train": ("oidv7-train-annotations-human-imagelabels.csv", "oidv6-train-annotations-human-imagelabels.csv",
              "train-annotations-human-imagelabels.csv", "train-annotations-human-imagelabels-boxable.csv"),
    "validation": ("oidv7-val-annotations-human-imagelabels.csv", "validation-annotations-human-imagelabels.csv",
                   "validation-annotations-human-imagelabels-boxable.csv"),
    "test": ("oidv7-test-annotations-human-imagelabels.csv", "test-annotations-human-imagelabels.csv",
             "test-annotations-human-imagelabels-boxable.csv"),
}
ANNOTATIONS_HEADER = b"ImageID,Source,LabelName,Confidence"
CONFIDENCE = {b"1": PRESENT, b"1.0": PRESENT, b"0": ABSENT, b"0.0": ABSENT}
CACHE_VERSION = 3  # 2: util.cached_arrays' layout; 3: quoted fields read (they were skipped)
MAX_PROBLEMS_SHOWN = 10


def find_file(root, names, what):
    """The first of `names` in `root`, or an error that lists them and says where to get them."""
    for name in names:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DSDLError(f"Open Images: no {what} in {root} (looked for {', '.join(names)}); download it "
                    f"from {OPEN_IMAGES_PAGE} into {root} (this code downloads nothing)")


def read_descriptions(path):
    """[(MID, display name)] of a class-descriptions CSV, with or without its header line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as error:
        raise DSDLError(f"{path} is not UTF-8 text ({error}); download it again") from error
    pairs = []
    for number, fields in enumerate(rows, 1):
        if not fields or (number == 1 and [field.strip() for field in fields] == DESCRIPTIONS_HEADER):
            continue
        if len(fields) != 2 or not fields[0].strip():
            raise DSDLError(f"{path}: row {number} is {','.join(fields)!r}, expected MID,DisplayName; "
                            f"download it again from {OPEN_IMAGES_PAGE}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise DSDLError(f"{path} describes no class; download it again from {OPEN_IMAGES_PAGE}")
    return pairs


def class_names(pairs):
    """{MID: the class's name}: its display name, followed by ` (MID)` where another MID has the
    same display name, so that every name says which class it is."""
    mids_of = {}
    for mid, name in pairs:
        mids_of.setdefault(name, []).append(mid)
    return {mid: name if len(mids_of[name]) == 1 else f"{name} ({mid})" for mid, name in pairs}


def class_tokens(classes):
    """The words of `classes`: as given, or the lines of one file (a name or MID per line, or
    `MID,DisplayName` lines such as class-descriptions-boxable.csv's; its header is skipped)."""
    if len(classes) != 1 or not os.path.isfile(classes[0]):
        return list(classes)
    with open(classes[0], newline="", encoding="utf-8-sig") as f:
        try:
            lines = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as error:
            raise DSDLError(f"{classes[0]} is not UTF-8 text ({error}); save it as UTF-8") from error
    tokens = []
    for line in lines:
        fields = next(csv.reader([line]))
        if [field.strip() for field in fields] == DESCRIPTIONS_HEADER:
            continue
        mid = fields[0].strip()
        tokens.append(mid if len(fields) == 2 and re.fullmatch(r"/[a-z]/\w+", mid) else line)
    if not tokens:
        raise DSDLError(f"{classes[0]} names no class")
    return tokens


def resolve_classes(classes, descriptions):
    """The MIDs of `classes` (MIDs, display names or `name (MID)`, or one file of them), in
    their order; every name that is unknown or ambiguous in `descriptions` is one error."""
    pairs = read_descriptions(descriptions)
    names = class_names(pairs)
    mid_of_name = {name: mid for mid, name in names.items()}
    mids_of_display = {}
    for mid, display in pairs:
        mids_of_display.setdefault(display, []).append(mid)
    mids, problems = [], []
    for token in class_tokens(classes):
        given_mid = re.fullmatch(r".* \((/[a-z]/\w+)\)", token)  # `name (MID)`
        if token in names:
            mids.append(token)
        elif given_mid and given_mid[1] in names:
            mids.append(given_mid[1])
        elif token in mid_of_name:
            mids.append(mid_of_name[token])
        elif token in mids_of_display:  # a display name that several MIDs share
            problems.append(f"{token!r} is the display name of {', '.join(mids_of_display[token])}: "
                            f"give the MID of the one you mean")
        else:
            close = difflib.get_close_matches(token, list(mid_of_name), n=3)
            problems.append(f"{token!r} is neither a MID nor a display name of {descriptions}"
                            + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    repeated = sorted(names[mid] for mid, count in collections.Counter(mids).items() if count > 1)
    if repeated:
        problems.append(f"{', '.join(map(repr, repeated))} listed more than once")
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise DSDLError("--classes: " + "; ".join(problems[:MAX_PROBLEMS_SHOWN])
                        + (f"; and {more} more" if more > 0 else ""))
    return mids, [names[mid] for mid in mids]


def read_image_labels(path, mids):
    """The verified labels of the classes `mids` in a `*-annotations-human-imagelabels.csv`.

    Returns the image ids as bytes (the images with a label of one of the classes, in the
    file's order)
    and their labels as compressed rows: image i's labels are `values[indptr[i]:indptr[i + 1]]`
    (PRESENT or ABSENT) for the classes `columns[indptr[i]:indptr[i + 1]]`. A pair verified
    twice is PRESENT if either says so.
    """
    column_of = {mid.encode(): c for c, mid in enumerate(mids)}
    index_of, images = {}, array.array("q")
    columns, values = array.array("i"), array.array("b")
    with open(path, "rb") as f:
        header = f.readline().strip().lstrip(b"\xef\xbb\xbf")
        if header != ANNOTATIONS_HEADER:
            raise DSDLError(f"{path}, line 1: expected the header {ANNOTATIONS_HEADER.decode()!r}, "
                            f"got {header.decode(errors='replace')!r}; is it a human-imagelabels file?")
        for number, line in enumerate(f, 2):
            fields = line.rstrip(b"\r\n").split(b",")
            if b'"' in line:  # quoted fields ("/m/0k4j"): read as the csv module reads them
                fields = [field.encode() for field in
                          next(csv.reader([line.decode("utf-8", errors="replace")]), [])]
            if len(fields) != 4:
                if not line.strip():
                    continue
                raise DSDLError(f"{path}, line {number}: expected ImageID,Source,LabelName,"
                                f"Confidence, got {line.strip().decode(errors='replace')!r}; "
                                f"download the file again from {OPEN_IMAGES_PAGE}")
            value = CONFIDENCE.get(fields[3])  # checked on every line, not only the classes kept
            if value is None:
                raise DSDLError(f"{path}, line {number}: Confidence must be 0 or 1, got "
                                f"{fields[3].decode(errors='replace')!r}; download the file again "
                                f"from {OPEN_IMAGES_PAGE}")
            column = column_of.get(fields[2])
            if column is None:
                continue
            images.append(index_of.setdefault(fields[0], len(index_of)))
            columns.append(column)
            values.append(value)
    if not index_of:
        return np.array([], dtype=bytes), np.zeros(1, np.int64), np.array([], np.int32), np.array([], np.int8)
    image_ids = np.array(list(index_of), dtype=bytes)  # ASCII ids, 16 bytes each
    key = np.frombuffer(images, dtype=np.int64) * len(mids) + np.frombuffer(columns, dtype=np.int32)
    key, inverse = np.unique(key, return_inverse=True)
    merged = np.full(len(key), ABSENT, dtype=np.int8)
    np.maximum.at(merged, inverse, np.frombuffer(values, dtype=np.int8))  # PRESENT wins
    indptr = np.searchsorted(key // len(mids), np.arange(len(image_ids) + 1))
    return image_ids, indptr, (key % len(mids)).astype(np.int32), merged


def load_labels_cached(path, mids, cache_file):
    """`read_image_labels`, kept in `cache_file` (.npz): later starts skip the CSV (gigabytes
    for train) until it changes (size, mtime) or the classes do."""
    names = ("image_ids", "indptr", "columns", "values")
    arrays = cached_arrays(cache_file, path,
                           lambda: dict(zip(names, read_image_labels(path, mids))),
                           CACHE_VERSION, key=mids, when="once for these classes")
    return tuple(arrays[name] for name in names)


class OpenImages(MultiLabelDataset):
    """Open Images `train`, `validation` or `test` with the verified labels of `classes`.

    `classes`: MIDs or display names (or one file listing them, e.g. class-descriptions-boxable.csv
    for the 600 boxable classes), in the order of the class vectors. `dataset[i]` is
    `(image, labels, ImageID)`, labels an int vector of PRESENT (1), ABSENT (-1) and UNKNOWN (-2);
    `classes` are the display names (with ` (MID)` where two classes share one), `mids` the MIDs.
    """

    name = "Open Images"
    partial = True  # UNKNOWN labels occur: the engine leaves them out of the loss and the metrics
    upright = True
    splits = tuple(ANNOTATIONS)

    def __init__(self, root, split, classes, transform=None):
        if split not in self.splits:
            raise ValueError(f"split must be one of {', '.join(self.splits)}, got {split!r}")
        if not os.path.isdir(root):
            raise DSDLError(f"Open Images not found: {root} is not a folder. Download the class "
                            f"descriptions, the human-verified image labels and the images from "
                            f"{OPEN_IMAGES_PAGE}; docs/datasets.md shows the layout")
        self.root = root
        self.split = split
        self.transform = transform
        self.descriptions = find_file(root, DESCRIPTIONS, "class descriptions")
        self.mids, self.classes = resolve_classes(classes, self.descriptions)
        self.label_source = find_file(root, ANNOTATIONS[split], f"{split} image labels")
        digest = hashlib.sha256("\n".join(self.mids).encode()).hexdigest()[:12]
        cache_file = os.path.splitext(self.label_source)[0] + f".{digest}.labels.npz"
        ids, self.indptr, self.columns, self.values = load_labels_cached(
            self.label_source, self.mids, cache_file)
        if not len(ids):
            raise DSDLError(f"{self.label_source} verifies none of the {len(self.mids)} classes "
                            f"({', '.join(self.classes[:3])}{', ...' if len(self.classes) > 3 else ''}) "
                            f"on any image; choose others with --classes")
        self.image_folder = os.path.join(root, split)
        self.rows = self._rows_on_disk(ids)
        # numpy arrays, no Python object per image: loader workers share them (millions of images)
        self.ids = ids[self.rows]

    @property
    def image_ids(self):
        return [image_id.decode() for image_id in self.ids]

    def _rows_on_disk(self, ids):
        """The rows of `ids` whose image is in the images folder; one warning for the others."""
        where = (f"put the {self.split} images there as <ImageID>.jpg, e.g. with `aws s3 "
                 f"--no-sign-request sync s3://open-images-dataset/{self.split} {self.image_folder}` "
                 f"(see {OPEN_IMAGES_PAGE})")
        if not os.path.isdir(self.image_folder):
            raise DSDLError(f"Open Images {self.split}: the images folder {self.image_folder} is "
                            f"missing; {where}")
        on_disk = {name[:-4].encode() for name in os.listdir(self.image_folder) if name.endswith(".jpg")}
        found = np.array([image_id in on_disk for image_id in ids.tolist()], dtype=bool)
        if not found.any():
            raise DSDLError(f"Open Images {self.split}: none of the {len(ids):,} images labelled in "
                            f"{self.label_source} is in {self.image_folder} (e.g. {ids[0].decode()}.jpg); "
                            f"{where}")
        if not found.all():
            gone = [image_id.decode() for image_id in ids[~found][:3]]
            warnings.warn(f"Open Images {self.split}: {int(found.sum()):,} of the {len(ids):,} images "
                          f"with a verified label of the {len(self.mids)} classes are in "
                          f"{self.image_folder} and used; the {int((~found).sum()):,} missing (e.g. "
                          f"{', '.join(gone[:3])}) are left out", stacklevel=3)
        return np.flatnonzero(found)

    def label_vector(self, index):
        """The C labels of image `index`: PRESENT / ABSENT where verified, UNKNOWN elsewhere."""
        row = self.rows[index]
        start, end = self.indptr[row], self.indptr[row + 1]
        labels = np.full(len(self.mids), UNKNOWN, dtype=np.int64)
        labels[self.columns[start:end]] = self.values[start:end]
        return labels

    @property
    def labels(self):
        """N x C labels (int8), made from the verified pairs on each call: the loader reads one
        image's (`label_vector`); this is for what needs them all (a model's context)."""
        labels = np.empty((len(self.rows), len(self.mids)), dtype=np.int8)
        for index in range(len(self.rows)):
            labels[index] = self.label_vector(index)
        return labels

    def label_fingerprint(self):
        """dataset.MultiLabelDataset's, from the verified pairs (no dense labels): the sorted
        ids, and each image's verified (class, value) pairs in class order."""
        order = np.argsort(self.ids, kind="stable")
        rows = self.rows[order]
        starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        picked = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        image = np.repeat(np.arange(len(rows)), lengths)
        picked = picked[np.lexsort((self.columns[picked], image))]  # by image, then class
        digest = hashlib.sha256(b"\0".join(self.ids[order].tolist()))
        for part in (lengths, self.columns[picked], self.values[picked]):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def image_path(self, index):
        return os.path.join(self.image_folder, self.ids[index].decode() + ".jpg")

    def __len__(self):
        return len(self.rows)

    def image_id(self, index):
        return self.ids[index].decode()  # one: image_ids decodes them all


def main(argv=None):
    """Print the class names of --classes, one per line: the input of make_embeddings.py."""
    import argparse
    parser = argparse.ArgumentParser(description="Print the names of Open Images classes, one per "
                                     "line, in the order given (for make_embeddings.py --classes).")
    parser.add_argument("root", help="the Open Images folder (its class descriptions are read)")
    parser.add_argument("--classes", nargs="+", required=True, metavar="NAME",
                        help="MIDs or display names, or one file of them (as main_openimages.py)")
    args = parser.parse_args(argv)
    try:
        _, names = resolve_classes(args.classes, find_file(args.root, DESCRIPTIONS, "class descriptions"))
    except DSDLError as error:
        parser.exit(1, f"error: {error}\n")
    print("\n".join(names))


if __name__ == "__main__":
    main()
