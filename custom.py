"""Your own multi-label dataset: a CSV of `image,labels` per split and a folder of images.

    image,labels
    photos/0001.jpg,dog;person
    photos/0002.jpg,red car

Image paths are relative to the images folder; labels are class names separated by `;` (an
empty labels field is an image with none of the classes). The class list is given (`--classes`)
or is every label of the CSVs, sorted, so that it never depends on the order of the rows.
"""
import csv
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from util import DSDLError, read_image

HEADER = ["image", "labels"]
MAX_PROBLEMS_SHOWN = 50


def parse_classes(names):
    """The class list of `--classes`: names, or one file listing one name per line."""
    if len(names) == 1 and os.path.isfile(names[0]):
        with open(names[0], encoding="utf-8-sig") as f:
            try:
                names = [line.strip() for line in f if line.strip()]
            except UnicodeDecodeError as error:
                raise DSDLError(f"{names[0]} is not UTF-8 text ({error}); save it as UTF-8") from error
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise DSDLError(f"--classes lists {', '.join(repeated)} more than once")
    if not names:
        raise DSDLError("--classes is empty")
    return list(names)


def read_label_csv(path):
    """Rows (line number, image path, label names) of a label CSV, and its problems.

    Problems are strings naming the file and line: a row without exactly two fields, an empty
    image path (a file without the `image,labels` header is refused at once). Checks against
    classes and images come later (`check_rows`), so that every problem of every file is
    reported together.
    """
    if not os.path.isfile(path):
        raise DSDLError(f"label file not found: {path}")
    rows, problems = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if [field.strip() for field in header or []] != HEADER:
                raise DSDLError(f"{path}, line 1: the header must be 'image,labels', got "
                                f"{','.join(header or [])!r}")
            for fields in reader:
                line = reader.line_num
                if not fields or not any(field.strip() for field in fields):
                    continue  # blank line
                if len(fields) != 2:
                    problems.append(f"{path}, line {line}: expected 2 fields (image,labels), got "
                                    f"{len(fields)}: {','.join(fields)!r}")
                    continue
                image, labels = fields[0].strip(), fields[1]
                if not image:
                    problems.append(f"{path}, line {line}: empty image path")
                    continue
                names = list(dict.fromkeys(name.strip() for name in labels.split(";") if name.strip()))
                rows.append((line, image, names))
    except UnicodeDecodeError as error:
        raise DSDLError(f"{path} is not UTF-8 text ({error}); save it as \"CSV UTF-8\"") from error
    return rows, problems


def check_rows(path, rows, images_dir, classes, classes_from="--classes"):
    """Problems of parsed rows: labels outside `classes` (given by `classes_from`, in words),
    images that are not files."""
    known = set(classes)
    problems = []
    for line, image, names in rows:
        unknown = [name for name in names if name not in known]
        if unknown:
            problems.append(f"{path}, line {line}: unknown class {', '.join(map(repr, unknown))} "
                            f"(not in {classes_from})")
        if not os.path.isfile(os.path.join(images_dir, image)):
            problems.append(f"{path}, line {line}: image not found: "
                            f"{os.path.join(images_dir, image)}")
    return problems


def listing(lines):
    """The first MAX_PROBLEMS_SHOWN of `lines`, one per indented line, and how many more."""
    shown = lines[:MAX_PROBLEMS_SHOWN]
    more = len(lines) - len(shown)
    return "\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def problems_error(problems):
    """One error listing the problems."""
    return DSDLError(f"{len(problems)} problem(s) in the label files, fix them and run again:"
                     + listing(problems))


def classes_from_csv(*paths):
    """Every label named in the CSVs, sorted: the class list when none is given. Malformed
    rows are an error that lists them all."""
    parsed = [read_label_csv(path) for path in paths]
    problems = [problem for _, found in parsed for problem in found]
    if problems:
        raise problems_error(problems)
    return labels_of(paths, [rows for rows, _ in parsed])


def labels_of(paths, row_lists):
    names = sorted({name for rows in row_lists for _, _, row_names in rows for name in row_names})
    if not names:
        raise DSDLError(f"no labels in {', '.join(paths)}")
    return names


def warn_duplicates(parsed):
    """Warn (with line numbers) about images listed twice in a file or in two of the files."""
    first_seen = {}  # image -> (path, line) of its first row
    notes = []
    for path, rows in parsed.items():
        for line, image, _ in rows:
            if image in first_seen:
                where, first_line = first_seen[image]
                kind = "listed twice" if where == path else "in two splits"
                notes.append(f"{path}, line {line}: {image} {kind} (first at {where}, line {first_line})")
            else:
                first_seen[image] = (path, line)
    if notes:
        warnings.warn(f"{len(notes)} repeated image(s) in the label files; a test image that is "
                      f"also trained on inflates the test mAP:" + listing(notes), stacklevel=2)


class LabelCSV(Dataset):
    """A split given as a label CSV. `dataset[i]` is `(image, labels, image path)`, labels an
    int vector of 1 (present) and -1 (absent), in the order of `classes`. The split is named
    after the file (test.csv: "test")."""

    labelled = True
    benchmark = None  # not one of the paper's

    def __init__(self, rows, csv_path, images_dir, classes, name, transform=None):
        if not rows:
            raise DSDLError(f"{csv_path} lists no images")
        self.label_source = csv_path
        self.images_dir = images_dir
        self.classes = list(classes)
        self.name = name
        self.split = os.path.splitext(os.path.basename(csv_path))[0]
        self.transform = transform
        self.images = self.image_ids = [image for _, image, _ in rows]  # ids: what dataset[i] names
        column = {name: c for c, name in enumerate(self.classes)}
        self.labels = np.full((len(rows), len(self.classes)), -1, dtype=np.int64)  # N x C
        for i, (_, _, names) in enumerate(rows):
            self.labels[i, [column[name] for name in names]] = 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = read_image(os.path.join(self.images_dir, self.images[index]), self.transform,
                           upright=True)
        return image, torch.from_numpy(self.labels[index]), self.images[index]


def load_splits(train_csv, test_csv, images_dir, classes=None, name="custom",
                train_transform=None, test_transform=None, evaluate=False,
                classes_from="--classes"):
    """(train LabelCSV or None with `evaluate`, test LabelCSV), each CSV read once.

    The class list is `classes` (given by `classes_from`, in words), else every label of both
    files, sorted (when evaluating without the train CSV, the test file's). Every problem of every file that is used is
    reported together, before anything trains; repeated images are warned about.
    """
    paths = [test_csv] if evaluate and not os.path.isfile(train_csv) else [train_csv, test_csv]
    parsed, problems = {}, []
    for path in paths:
        parsed[path], found = read_label_csv(path)
        if not evaluate or path == test_csv:
            problems += found
    classes = classes or labels_of(paths, parsed.values())
    for path in ([test_csv] if evaluate else paths):
        problems += check_rows(path, parsed[path], images_dir, classes, classes_from)
    if problems:
        raise problems_error(problems)
    warn_duplicates(parsed if not evaluate else {test_csv: parsed[test_csv]})
    train = None if evaluate else LabelCSV(parsed[train_csv], train_csv, images_dir, classes, name,
                                           train_transform)
    return train, LabelCSV(parsed[test_csv], test_csv, images_dir, classes, name, test_transform)
