"""What predict.py, export.py and make_embeddings.py write, and what they never overwrite: an
input of the command (an image being labelled, a label CSV, the checkpoint, the word vectors)
or an existing file that is not the option's own earlier output (a photo, a checkpoint, a run's
log). A shell glob that hands a photo to --json (`--json *.jpg`) is one error line, not a lost
photo.
"""
import json
import os

from checkpoints import describe_file
from util import DSDLError, write_error


def check_writable(option, path, folder=False):
    """An output that cannot be written is an error now, before the model loads or an image is
    scored: a file option given a folder (or the reverse), a missing or read-only folder."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise DSDLError(f"{option} {path} is a file; {option} takes a folder (made if absent)")
    if not folder and os.path.isdir(path):
        raise DSDLError(f"{option} {path} is a folder; {option} takes a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DSDLError(f"{option} {path}: the folder {parent} does not exist")
    where = path if os.path.isdir(path) else parent
    error = write_error(where)
    if error is not None:
        raise DSDLError(f"{option} {path} cannot be written ({error.strerror}: {where})") from error
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        raise DSDLError(f"{option} {path} cannot be written: the file is read-only")


def check_output(option, path, inputs=(), own=None):
    """`path` may be written by `option`: writable (check_writable), not one of the command's
    `inputs` (the same file by any path or link), and if it exists, this option's own earlier
    output (`own(path)` says so), which it replaces; anything else is one error and stays."""
    check_writable(option, path)
    if not os.path.isfile(path):
        return
    for given in inputs:
        if given and os.path.exists(given) and os.path.samefile(path, given):
            raise DSDLError(f"{option} {path} is also an input of this command ({given}), which "
                            f"writing it would destroy; give {option} another file name")
    if own is not None and not own(path):
        raise DSDLError(f"{option} {path} exists and is {describe_file(path)}, not an earlier "
                        f"output of {option}: it is left as it is; give {option} a new file name "
                        f"(or remove that file first)")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_predictions_json(path):
    """predict.py --json's file: a list of {"image": ..., "predictions": ...}."""
    content = read_json(path)
    return isinstance(content, list) and all(isinstance(item, dict) and "image" in item
                                              for item in content)


PREDICTIONS_CSV_HEADER = "image,label,probability,score"


def is_predictions_csv(path):
    """predict.py --csv's file: its header first."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() == PREDICTIONS_CSV_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def is_class_list_json(path):
    """export.py's FILE.classes.json: a dict with the classes."""
    content = read_json(path)
    return isinstance(content, dict) and "classes" in content


def is_export(path):
    """export.py's model file: its classes.json lies beside it."""
    return is_class_list_json(path + ".classes.json")


def is_class_vectors(path):
    """make_embeddings.py's file: C x d class vectors that load."""
    from embeddings import load_embeddings  # torch: only when such a file is there
    try:
        load_embeddings(path)
    except DSDLError:
        return False
    return True
