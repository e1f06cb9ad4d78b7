"""A trained model for inference, from its checkpoint: what predict.py, export.py and torch.hub
(hubconf.py) share. `load_model` reads the checkpoint, settles its classes, class vectors and
settings (the authors' released checkpoints store none of them: `--dataset` supplies them), and
rebuilds the model with models.from_checkpoint, as -e and --resume do.
"""
import sys
from typing import NamedTuple

import torch

import checkpoints
import custom
import make_embeddings
import models
from coco import COCO_CLASSES
from embeddings import (check_same_vectors, check_width, load_embeddings, standard_embeddings,
                        trained_width)
from options import PAPER_IMAGE_SIZE
from util import DSDLError
from voc import VOC_CLASSES


class KnownDataset(NamedTuple):
    classes: list
    embeddings: str  # the standard GloVe file (embeddings.STANDARD_EMBEDDINGS)
    lambd: float


DATASETS = {  # --dataset: what the authors' released checkpoints were trained with
    "voc": KnownDataset(list(VOC_CLASSES), "voc_glove_word2vec.pkl", 10.0),
    "coco": KnownDataset(COCO_CLASSES, "coco_glove_word2vec.pkl", 0.1),
}


def label_vectors(args, width=None):
    """The labels of `--classes` and their word vectors (C x d, float32), from `--embeddings`
    (rows in the order of the names) or read from a word-vector file (`--classes-from-glove`);
    `width`: the d of the checkpoint (trained_width), required when given."""
    names = custom.parse_classes(args.classes)
    if args.classes_from_glove:
        vectors = torch.from_numpy(make_embeddings.class_vectors(names, args.classes_from_glove))
    else:
        vectors = load_embeddings(args.embeddings, num_classes=len(names))
    check_width(vectors, width, args.classes_from_glove or args.embeddings, args.resume)
    return names, vectors


def check_rows_follow_names(names, vectors, trained, trained_vectors, path):
    """The rows of --embeddings are taken in the order of --classes: a row that is the
    checkpoint's vector of another trained class than the name it stands for (the standard file
    given with the names in another order) would score every label as another one. One error."""
    if trained is None or trained_vectors is None:
        return
    row_of = {name: row for row, name in enumerate(trained)}
    for given, (name, vector) in enumerate(zip(names, vectors)):
        same = [other for other in trained if other != name
                and torch.equal(vector, trained_vectors[row_of[other]].float())]
        # Another trained class's vector is a renamed label ("tv" for tvmonitor), unless this
        # name is a trained class of its own or that class is given too: then rows are swapped.
        swapped = name in row_of or any(other in names for other in same)
        if same and swapped:
            raise DSDLError(f"{path}: row {given + 1}, given for {name!r}, is the vector "
                            f"{'of ' + repr(same[0])} the checkpoint was trained with: its rows "
                            f"are not in the order of --classes. Put the rows in the order of the "
                            f"names (or name the classes in the order of the rows)")


def warn_zero_shot(labels, trained, path):
    """One line on stderr naming the labels the checkpoint was not trained on."""
    note = ("scored zero-shot, from their word vectors alone; the accuracy of zero-shot labels "
            "has not been measured in this project")
    if trained is None:
        print(f"warning: {path} does not list its training classes: those of --classes it was "
              f"not trained on are {note}", file=sys.stderr)
        return
    unseen = [label for label in labels if label not in trained]
    if unseen:
        shown = ", ".join(unseen[:10]) + (", ..." if len(unseen) > 10 else "")
        print(f"warning: {len(unseen)} label(s) the checkpoint was not trained on ({shown}) are "
              f"{note}", file=sys.stderr)


def checkpoint_setting(option, given, recorded):
    """The value the user gave (with a warning when the checkpoint records another), else the
    checkpoint's (None when it records none)."""
    if given is not None and recorded is not None and given != recorded:
        print(f"warning: {option} {given} differs from the checkpoint's {recorded}; using {given}",
              file=sys.stderr)
    return recorded if given is None else given


def load_model(args):
    """The model of `--resume` (options.add_checkpoint_options), in eval mode on the CPU, with
    `classes` (names in the order of its scores), `image_size` and `thresholds` (per class, tuned
    on a validation split, or None).

    With `--classes`, the model scores those labels instead of its training classes: their
    word vectors become the semantics S, the trained auto-encoder turns them into the dictionary
    D = encode(S), and the coefficients are the ridge solve over that D. The trunk and W1, W2 are
    the checkpoint's; labels it was not trained on are scored zero-shot.
    """
    if args.classes_from_glove and not args.classes:
        raise DSDLError("--classes-from-glove needs --classes NAME ...: the labels to look up")
    if args.classes and not (args.embeddings or args.classes_from_glove):
        raise DSDLError("--classes needs the labels' word vectors: --embeddings FILE (C x d, "
                        "rows in the order of the names) or --classes-from-glove GLOVE_FILE")
    checkpoint = checkpoints.load_checkpoint(args.resume)
    weights = checkpoints.checkpoint_weights(checkpoint)
    stored = models.stored_settings(checkpoint, infer=False)
    known = DATASETS.get(args.dataset)
    if known and checkpoint.get("classes") and list(checkpoint["classes"]) != known.classes:
        raise DSDLError(f"--dataset {args.dataset} names other classes than the "
                        f"{len(checkpoint['classes'])} {args.resume} was trained on "
                        f"({', '.join(checkpoint['classes'][:4])}, ...); leave out --dataset, "
                        f"which is for checkpoints that store no class names")
    trained = checkpoint.get("classes") or (known.classes if known else None)
    model_name = stored["model"]
    vectors = models.needs_class_vectors(model_name)
    if args.classes and not vectors:
        raise DSDLError(f"{args.resume} is a {model_name} model, which scores its training classes "
                        f"only: --classes needs a DSDL checkpoint (its labels come from word vectors)")
    unused = [option for option, value in (("--lambd", args.lambd), ("--embeddings", args.embeddings))
              if value is not None]
    if unused and not vectors:  # refused rather than ignored
        raise DSDLError(f"{args.resume} is a {model_name} model, which has no class vectors and no "
                        f"lambda: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} for DSDL "
                        f"checkpoints; leave {'it' if len(unused) == 1 else 'them'} out")
    if args.classes:
        classes, semantics = label_vectors(args, trained_width(checkpoint, weights))
        if args.embeddings:  # rows from a file; --classes-from-glove makes them from the names
            check_rows_follow_names(classes, semantics, trained,
                                    checkpoint.get("semantics", weights.get("semantics")),
                                    args.embeddings)
        warn_zero_shot(classes, trained, args.resume)
    else:
        classes, semantics = trained, checkpoint.get("semantics", weights.get("semantics"))
        if not classes:
            raise DSDLError(f"{args.resume} stores no class names (a checkpoint of the authors' "
                            f"release?); pass --dataset voc or --dataset coco")
        if semantics is not None and args.embeddings:
            check_same_vectors(args.embeddings, semantics, args.resume,
                               "to score labels from other vectors, name them with --classes")
        if semantics is None and vectors:  # the release stores none: the dataset's standard ones
            if not (args.embeddings or known):
                raise DSDLError(f"{args.resume} stores no class vectors; pass --embeddings or --dataset")
            path = args.embeddings or standard_embeddings(known.embeddings)
            semantics = load_embeddings(path, num_classes=len(classes))
            check_width(semantics, trained_width(checkpoint, weights), path, args.resume)
    settings = {
        "lambd": checkpoint_setting("--lambd", args.lambd, stored.get("lambd"))
        or (known.lambd if known else None),
        "arch": (checkpoint_setting("--arch", args.arch, stored.get("arch"))
                 or checkpoints.infer_arch(weights)),
        "image_size": (checkpoint_setting("--image-size", args.image_size, stored.get("image_size"))
                       or PAPER_IMAGE_SIZE)}
    if settings["lambd"] is None and vectors:
        raise DSDLError(f"{args.resume} does not say its lambda; pass --lambd or --dataset")
    # With --classes, only the trunk and W1, W2 load: the semantics are the new labels' vectors.
    model = models.from_checkpoint(checkpoint, args.resume, settings, classes, semantics,
                                   class_independent_only=bool(args.classes))
    # Per-class thresholds tuned on a validation split (main_custom.py --val): of the training
    # classes, so not for labels given with --classes.
    model.thresholds = None if args.classes else checkpoint.get("thresholds")
    return model.eval()
