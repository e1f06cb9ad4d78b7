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

import numpy as np
import torch
from torch.utils.data import Dataset

from util import DSDLError, load_image

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


def check_rows(path, rows, images_dir, classes):
    """Problems of parsed rows: labels outside `classes`, images that are not files."""
    known = set(classes)
    problems = []
    for line, image, names in rows:
        unknown = [name for name in names if name not in known]
        if unknown:
            problems.append(f"{path}, line {line}: unknown class {', '.join(map(repr, unknown))} "
                            f"(not in --classes)")
        if not os.path.isfile(os.path.join(images_dir, image)):
            problems.append(f"{path}, line {line}: image not found: "
                            f"{os.path.join(images_dir, image)}")
    return problems


def problems_error(problems):
    """One error listing the problems (the first MAX_PROBLEMS_SHOWN of them)."""
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    return DSDLError(f"{len(problems)} problem(s) in the label files, fix them and run again:\n  "
                     + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))


def classes_from_csv(*paths, skip_malformed=False):
    """Every label named in the CSVs, sorted: the class list when none is given.

    Malformed rows are an error, or skipped with `skip_malformed` (by `load_split`, which
    reports them together with the other problems).
    """
    names, problems = set(), []
    for path in paths:
        rows, found = read_label_csv(path)
        problems += found
        names.update(name for _, _, row_names in rows for name in row_names)
    if problems and not skip_malformed:
        raise problems_error(problems)
    if not names:
        raise DSDLError(f"no labels in {', '.join(paths)}")
    return sorted(names)


class LabelCSV(Dataset):
    """A split given as a label CSV. `dataset[i]` is `(image, labels, image path)`, labels an
    int vector of 1 (present) and -1 (absent), in the order of `classes`."""

    labelled = True

    def __init__(self, csv_path, images_dir, classes, split, transform=None):
        rows, problems = read_label_csv(csv_path)
        problems += check_rows(csv_path, rows, images_dir, classes)
        if problems:
            raise problems_error(problems)
        if not rows:
            raise DSDLError(f"{csv_path} lists no images")
        self.images_dir = images_dir
        self.classes = list(classes)
        self.split = split
        self.transform = transform
        self.images = [image for _, image, _ in rows]
        column = {name: c for c, name in enumerate(self.classes)}
        self.labels = np.full((len(rows), len(self.classes)), -1, dtype=np.int64)  # N x C
        for i, (_, _, names) in enumerate(rows):
            self.labels[i, [column[name] for name in names]] = 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = load_image(os.path.join(self.images_dir, self.images[index]), upright=True)
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.labels[index]), self.images[index]


def split_files(args):
    """(train CSV, test CSV, images folder) of the command line, defaults inside `data`."""
    return (args.train_csv or os.path.join(args.data, "train.csv"),
            args.test_csv or os.path.join(args.data, "test.csv"),
            args.images or os.path.join(args.data, "images"))


def class_list(args):
    """`--classes`, else every label of the train and test CSVs, sorted."""
    if args.classes:
        return parse_classes(args.classes)
    train_csv, test_csv, _ = split_files(args)
    # Evaluating needs no train CSV, but its labels, when it is there, keep the class list
    # the one the model was trained with.
    paths = [test_csv] + ([train_csv] if not args.evaluate or os.path.isfile(train_csv) else [])
    return classes_from_csv(*paths, skip_malformed=True)


def load_split(args, split, transform):
    """The `train` or `test` LabelCSV of the command line.

    Loading `train` (the first thing a training run does) also checks the test CSV, so that
    every malformed row of both files is reported before anything trains.
    """
    train_csv, test_csv, images = split_files(args)
    classes = class_list(args)
    if split == "train":
        problems = []
        for path in (train_csv, test_csv):
            rows, found = read_label_csv(path)
            problems += found + check_rows(path, rows, images, classes)
        if problems:
            raise problems_error(problems)
    return LabelCSV(train_csv if split == "train" else test_csv, images, classes, split, transform)
