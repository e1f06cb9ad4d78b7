"""Your own multi-label dataset: a CSV of `image,labels` per split and a folder of images.

    image,labels
    photos/0001.jpg,dog;person
    photos/0002.jpg,red car;?person

Image paths are relative to the images folder; labels are class names separated by `;` (an
empty labels field is an image with none of the classes). A name after `?` is a label nobody
checked (partial labels): it counts neither way, in the loss or in any metric. The class list
is given (`--classes`) or is every label of the CSVs, sorted, so that it never depends on the
order of the rows.
"""
import csv
import os
import warnings

import numpy as np

from dataset import MultiLabelDataset
from util import ABSENT, PRESENT, UNKNOWN, DSDLError

HEADER = ["image", "labels"]
MAX_PROBLEMS_SHOWN = 50
UNCHECKED = "?"  # before a label name: nobody checked that label of that image


def parse_classes(names):
    """The class list of `--classes`: names, or one file listing one name per line."""
    if len(names) == 1 and not os.path.isfile(names[0]) and (
            os.sep in names[0] or names[0].lower().endswith((".txt", ".csv", ".lst"))):
        raise DSDLError(f"--classes {names[0]}: no such file (a file with a class name per line; "
                        f"or give the class names themselves)")
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
    """Rows (line number, image path, label names, unchecked label names) of a label CSV, and
    its problems.

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
                fields = [name.strip() for name in labels.split(";") if name.strip()]
                if any(name[1:].strip() == "" for name in fields if name.startswith(UNCHECKED)):
                    problems.append(f"{path}, line {line}: '{UNCHECKED}' without a class name "
                                    f"(write '{UNCHECKED}name' for a label nobody checked)")
                    continue
                doubled = [name for name in fields if name[1:].lstrip().startswith(UNCHECKED)
                           and name.startswith(UNCHECKED)]
                if doubled:
                    problems.append(f"{path}, line {line}: {doubled[0]!r} has more than one "
                                    f"'{UNCHECKED}' (write '{UNCHECKED}name' for a label nobody "
                                    f"checked)")
                    continue
                unchecked = list(dict.fromkeys(name[1:].strip() for name in fields
                                               if name.startswith(UNCHECKED)))
                names = list(dict.fromkeys(name for name in fields if not name.startswith(UNCHECKED)))
                rows.append((line, image, names, [name for name in unchecked if name not in names]))
    except UnicodeDecodeError as error:
        raise DSDLError(f"{path} is not UTF-8 text ({error}); save it as \"CSV UTF-8\"") from error
    return rows, problems


def check_not_a_vector(path, rows):
    """Refuse labels written as a 0/1 vector (`a.jpg,1;0;1`): they would be read as two classes
    named "0" and "1", and train to a plausible mAP on nothing. (Classes really named "0" and
    "1" are read as such when --classes names them.)"""
    names = {name for row in rows for name in row[2] + row[3]}
    if names and names <= {"0", "1"} and any(len(row[2]) + len(row[3]) > 1 for row in rows):
        line, image = rows[0][0], rows[0][1]
        raise DSDLError(f"{path}: the labels look like a 0/1 vector (line {line}: {image}), not "
                        f"class names. Write the names of the classes present, separated by "
                        f"';', e.g. '{image},dog;person' (if your classes are named 0 and 1, "
                        f"say so with --classes 0 1)")


def same_name_groups(names):
    """Groups of class names that differ only in case, spacing or underscores ("Dog", "dog";
    "traffic light", "traffic_light"): one name to a reader, and one word vector to GloVe."""
    groups = {}
    for name in names:
        groups.setdefault(" ".join(name.replace("_", " ").lower().split()), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def warn_same_names(names, where):
    groups = same_name_groups(names)
    if groups:
        warnings.warn(f"{where}: class names that differ only in case or spacing are different "
                      f"classes here: " + "; ".join(" and ".join(map(repr, group)) for group in groups)
                      + ". Write each class one way if they are the same", stacklevel=3)


def check_rows(path, rows, images_dir, classes, classes_from="--classes"):
    """Problems of parsed rows: labels outside `classes` (given by `classes_from`, in words),
    images that are not files."""
    known = set(classes)
    problems = []
    for line, image, names, unchecked in rows:
        unknown = [name for name in names + unchecked if name not in known]
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
    for path, (rows, _) in zip(paths, parsed):
        check_not_a_vector(path, rows)
    return labels_of(paths, [rows for rows, _ in parsed])


def labels_of(paths, row_lists):
    names = sorted({name for rows in row_lists for _, _, checked, unchecked in rows
                    for name in checked + unchecked})
    if not names:
        raise DSDLError(f"no labels in {', '.join(paths)}")
    return names


def warn_duplicates(parsed):
    """Warn (with line numbers) about images listed twice in a file or in two of the files."""
    first_seen = {}  # image -> (path, line) of its first row
    notes = []
    for path, rows in parsed.items():
        for line, image, *_ in rows:
            if image in first_seen:
                where, first_line = first_seen[image]
                kind = "listed twice" if where == path else "in two splits"
                notes.append(f"{path}, line {line}: {image} {kind} (first at {where}, line {first_line})")
            else:
                first_seen[image] = (path, line)
    if notes:
        warnings.warn(f"{len(notes)} repeated image(s) in the label files; a test image that is "
                      f"also trained on inflates the test mAP:" + listing(notes), stacklevel=2)


class LabelCSV(MultiLabelDataset):
    """A split given as a label CSV. `dataset[i]` is `(image, labels, image path)`, labels an
    int vector of 1 (present), -1 (absent) and -2 (unchecked: `?name`), in the order of
    `classes`; `partial` says whether any label is unchecked. The split is named after the file
    (test.csv: "test")."""

    upright = True  # own photos: as the camera held them

    def __init__(self, rows, csv_path, images_dir, classes, name, transform=None, split=None):
        if not rows:
            raise DSDLError(f"{csv_path} lists no images")
        self.label_source = csv_path
        self.images_dir = images_dir
        self.classes = list(classes)
        self.name = name
        self.split = split or os.path.splitext(os.path.basename(csv_path))[0]
        # The name checkpoints of before split_names knew this split by: the file's alone.
        self.file_name_split = os.path.splitext(os.path.basename(csv_path))[0]
        self.transform = transform
        self.images = self.image_ids = [image for _, image, *_ in rows]  # what dataset[i] names
        column = {name: c for c, name in enumerate(self.classes)}
        self.labels = np.full((len(rows), len(self.classes)), ABSENT, dtype=np.int64)  # N x C
        for i, (_, _, names, unchecked) in enumerate(rows):
            self.labels[i, [column[name] for name in unchecked]] = UNKNOWN
            self.labels[i, [column[name] for name in names]] = PRESENT
        self.partial = bool((self.labels == UNKNOWN).any())

    def image_path(self, index):
        return os.path.join(self.images_dir, self.images[index])


def load_splits(train_csv, test_csv, images_dir, classes=None, name="custom",
                train_transform=None, test_transform=None, evaluate=False,
                classes_from="--classes", val_csv=None):
    """(train LabelCSV or None with `evaluate`, test LabelCSV, validation LabelCSV or None),
    each CSV read once.

    The class list is `classes` (given by `classes_from`, in words), else every label of the
    train and test files, sorted (when evaluating without the train CSV, the test file's); the
    validation file (`val_csv`, --val) must use those classes. Every problem of every file that
    is used is reported together, before anything trains; repeated images are warned about.
    """
    if evaluate and val_csv:
        raise DSDLError("--val chooses the best model while training; -e evaluates one "
                        "checkpoint on the test CSV: drop --val")
    paths = [test_csv] if evaluate and not os.path.isfile(train_csv) else [train_csv, test_csv]
    parsed, problems = {}, []
    for path in paths + ([val_csv] if val_csv else []):
        if path in parsed:
            raise DSDLError(f"{path} is given as two splits; the validation CSV must be a file "
                            f"of its own")
        parsed[path], found = read_label_csv(path)
        if not evaluate or path == test_csv:
            problems += found
    if not classes:
        for path in parsed:
            check_not_a_vector(path, parsed[path])
        classes = labels_of(paths, [parsed[path] for path in paths])
        warn_same_names(classes, ", ".join(paths))
    for path in ([test_csv] if evaluate else list(parsed)):
        problems += check_rows(path, parsed[path], images_dir, classes, classes_from)
    if problems:
        raise problems_error(problems)
    warn_duplicates(parsed if not evaluate else {test_csv: parsed[test_csv]})
    split = split_names([train_csv, test_csv] + ([val_csv] if val_csv else []))
    train = None if evaluate else LabelCSV(parsed[train_csv], train_csv, images_dir, classes, name,
                                           train_transform, split[train_csv])
    val = (LabelCSV(parsed[val_csv], val_csv, images_dir, classes, name, test_transform,
                    split[val_csv]) if val_csv else None)
    return train, LabelCSV(parsed[test_csv], test_csv, images_dir, classes, name, test_transform,
                           split[test_csv]), val


def split_names(paths):
    """A split name per CSV: its file's name without .csv, or where two files share one
    (train/labels.csv, test/labels.csv) their folder's name before it (train-labels,
    test-labels), so that the splits' records and files stay apart."""
    stems = {path: os.path.splitext(os.path.basename(path))[0] for path in paths}
    shared = {stem for stem in stems.values() if list(stems.values()).count(stem) > 1}
    return {path: (f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}-{stem}"
                   if stem in shared else stem) for path, stem in stems.items()}
