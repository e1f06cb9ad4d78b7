"""torch.hub entry points: a trained DSDL from a checkpoint, ready for inference.

    model = torch.hub.load("path/to/this/repo", "dsdl_resnet101", source="local",
                           checkpoint="model_best.pth.tar")            # add dataset="voc" or
                                                                      # "coco" for the release's
    image = model.transform(PIL.Image.open("photo.jpg").convert("RGB"))  # 3 x S x S
    scores = model(image.unsqueeze(0)).scores                           # 1 x C logits
    labels = [model.classes[c] for c in (scores[0] >= 0).nonzero()[:, 0]]

`baseline` loads a checkpoint of the paper's baseline (--model baseline) the same way.
The model is `models.DSDL` (`models.Baseline`) in eval mode, on the CPU, with three attributes: `classes` (the
names, in the order of the scores), `image_size` and `transform` (PIL image -> normalised
tensor, resized to image_size x image_size ignoring the aspect ratio, as in evaluation).
"""
import os
import re

import options
from predict import load_model
from util import DSDLError, eval_transform

dependencies = ["torch", "torchvision", "numpy", "PIL", "tqdm", "matplotlib", "sklearn"]


class _ArgumentError(DSDLError):
    """An argument that predict.py's command line would refuse."""


class _Parser(options.ArgumentParser):
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
    options.add_checkpoint_options(parser)
    argv = ["--resume", os.fspath(checkpoint)]
    for name, value in given.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "classes":  # names, or one file listing them
            argv += [flag, *([value] if isinstance(value, (str, os.PathLike)) else value)]
        else:
            argv.append(f"{flag}={os.fspath(value) if isinstance(value, os.PathLike) else value}")
    try:
        return parser.parse_args([str(token) for token in argv])
    except _ArgumentError as error:
        message = re.sub(r"argument --([\w-]+)", lambda m: "argument " + m[1].replace("-", "_"),
                         str(error))  # the keyword, as the caller wrote it
        raise DSDLError(f"{entry}(): {message}") from None


def _load(checkpoint, model_name, **given):
    """The model of `checkpoint` (predict.load_model), refused unless it is a `model_name`."""
    model, names, size, thresholds = load_model(_checked(model_name, checkpoint, **given))
    if model.name != model_name:
        raise DSDLError(f"{checkpoint} holds a {model.name} model, not a {model_name}: load it with "
                        f"the entry point {model.name!r}")
    model.classes, model.image_size, model.transform = names, size, eval_transform(size)
    model.thresholds = thresholds  # per class, tuned on a validation split; None: 0.5 for all
    return model.eval()


def dsdl(checkpoint, dataset=None, embeddings=None, lambd=None, image_size=None, arch=None,
         classes=None, classes_from_glove=None):
    """DSDL from a trained checkpoint, its trunk read from the checkpoint.

    checkpoint: this project's checkpoint, or one of the authors' released ones, which store no
    class names, class vectors or lambda: then dataset="voc" or "coco" supplies them (their
    standard class vectors are downloaded into data/ unless `embeddings` gives the file).
    classes with embeddings (C x d file, rows in their order, d the width the checkpoint was
    trained with: 300 for GloVe and the release) or classes_from_glove (a word-vector text file:
    GloVe, fastText .vec, word2vec text): score these labels instead; those the model was not
    trained on are scored zero-shot (accuracy not measured). The other arguments are predict.py's options of the same names.
    """
    return _load(checkpoint, "dsdl", dataset=dataset, embeddings=embeddings, lambd=lambd,
                 image_size=image_size, arch=arch, classes=classes,
                 classes_from_glove=classes_from_glove)


def dsdl_resnet101(checkpoint, **kwargs):
    """DSDL with a ResNet-101 trunk (the paper's) from a trained checkpoint; arguments as `dsdl`."""
    model = dsdl(checkpoint, **kwargs)
    if model.arch != "resnet101":
        raise DSDLError(f"{checkpoint} holds a DSDL {model.arch}, not a resnet101: load it with "
                        f"the entry point 'dsdl'")
    return model


def baseline(checkpoint, image_size=None, arch=None):
    """The paper's baseline (trunk, global pooling, one linear layer) from a checkpoint trained
    with --model baseline; `model(images).scores` are its logits."""
    return _load(checkpoint, "baseline", image_size=image_size, arch=arch)
