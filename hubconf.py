"""torch.hub entry points: a trained model from its checkpoint, ready for inference.

    model = torch.hub.load("path/to/this/repo", "load", source="local",
                           checkpoint="model_best.pth.tar")           # add dataset="voc" or
                                                                      # "coco" for the release's
    image = model.transform(PIL.Image.open("photo.jpg").convert("RGB"))  # 3 x S x S
    scores = model(image.unsqueeze(0)).scores                           # 1 x C logits
    labels = [model.classes[c] for c in (scores[0] >= 0).nonzero()[:, 0]]

`load` takes a checkpoint of any model; each model of models.MODELS also has an entry point of
its name ("dsdl", "baseline", ...) that refuses a checkpoint of another model, and
"dsdl_resnet101" a DSDL with the paper's trunk. The model (e.g. `models.DSDL`) is in eval mode,
on the CPU, with four attributes: `classes` (the names, in the order of the scores),
`image_size`, `thresholds` (per class, tuned on a validation split, or None: 0.5) and
`transform` (PIL image -> normalised tensor, resized to image_size x image_size ignoring the
aspect ratio, as in evaluation). The arguments are predict.py's options of the same names; the
model is rebuilt as -e rebuilds it (inference.load_model, models.from_checkpoint).
"""
import os as _os
import re as _re

import inference as _inference
import models as _models
import options as _options
import util as _util

dependencies = ["torch", "torchvision", "numpy", "PIL", "tqdm", "matplotlib", "sklearn"]


class _ArgumentError(_util.DSDLError):
    """An argument that predict.py's command line would refuse."""


class _Parser(_options.ArgumentParser):
    """predict.py's checkpoint options, whose mistakes are raised rather than ending the process."""

    def error(self, message):
        raise _ArgumentError(message)

    def exit(self, status=0, message=None):  # arch="list" prints the trunks and would exit
        raise _ArgumentError((message or "").strip() or "arch='list' only prints the trunks "
                             "there are; pass one of their names")


def _checked(entry, checkpoint, **given):
    """The arguments of an entry point, checked and converted as predict.py's options of the
    same names (`lambd=-1` is refused with the message of `--lambd -1`, `image_size="64"` is
    64): the keyword arguments are written as that command line and parsed by its parser."""
    parser = _Parser(prog=entry)
    _options.add_checkpoint_options(parser)
    argv = ["--resume", _os.fspath(checkpoint)]
    for name, value in given.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "classes":  # names, or one file listing them
            argv += [flag, *([value] if isinstance(value, (str, _os.PathLike)) else value)]
        else:
            argv.append(f"{flag}={_os.fspath(value) if isinstance(value, _os.PathLike) else value}")
    try:
        return parser.parse_args([str(token) for token in argv])
    except _ArgumentError as error:
        message = _re.sub(r"argument --([\w-]+)", lambda m: "argument " + m[1].replace("-", "_"),
                          str(error))  # the keyword, as the caller wrote it
        raise _util.DSDLError(f"{entry}(): {message}") from None


def _load(checkpoint, entry, model_name=None, **given):
    """The model of `checkpoint` (inference.load_model), refused unless it is a `model_name`."""
    model = _inference.load_model(_checked(entry, checkpoint, **given))
    if model_name is not None and model.name != model_name:
        raise _util.DSDLError(f"{checkpoint} holds a {model.name} model, not a {model_name}: load "
                              f"it with the entry point {model.name!r} (or 'load')")
    model.transform = _util.eval_transform(model.image_size)
    return model


def load(checkpoint, dataset=None, embeddings=None, lambd=None, image_size=None, arch=None,
         classes=None, classes_from_glove=None):
    """The trained model of `checkpoint`, of whichever model it is (models.MODELS).

    checkpoint: this project's checkpoint, or one of the authors' released ones, which store no
    class names, class vectors or lambda: then dataset="voc" or "coco" supplies them (their
    standard class vectors are downloaded into data/ unless `embeddings` gives the file).
    classes with embeddings (C x d file, rows in their order, d the width the checkpoint was
    trained with: 300 for GloVe and the release) or classes_from_glove (a word-vector text file:
    GloVe, fastText .vec, word2vec text): score these labels instead (DSDL); those the model was
    not trained on are scored zero-shot (accuracy not measured). The other arguments are
    predict.py's options of the same names.
    """
    return _load(checkpoint, "load", dataset=dataset, embeddings=embeddings, lambd=lambd,
                 image_size=image_size, arch=arch, classes=classes,
                 classes_from_glove=classes_from_glove)


def _model_entry(name):
    """The entry point of model `name`: `load`, refusing a checkpoint of another model."""
    def entry(checkpoint, **kwargs):
        return _load(checkpoint, name, name, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"The trained {_models.model_title(name)} of `checkpoint` (--model {name}); "
                     f"arguments as `load`.")
    return entry


globals().update({_name: _model_entry(_name) for _name in _models.MODELS})


def dsdl_resnet101(checkpoint, **kwargs):
    """DSDL with a ResNet-101 trunk (the paper's) from a trained checkpoint; arguments as `load`."""
    model = _load(checkpoint, "dsdl_resnet101", "dsdl", **kwargs)
    if model.arch != "resnet101":
        raise _util.DSDLError(f"{checkpoint} holds a DSDL {model.arch}, not a resnet101: load "
                              f"it with the entry point 'dsdl'")
    return model
