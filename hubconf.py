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
import argparse

from predict import load_model
from util import DSDLError, eval_transform

dependencies = ["torch", "torchvision", "numpy", "PIL", "tqdm", "matplotlib"]


def _load(checkpoint, model_name, dataset=None, embeddings=None, lambd=None, image_size=None,
          arch=None, classes=None, classes_from_glove=None):
    """The model of `checkpoint` (predict.load_model), refused unless it is a `model_name`."""
    args = argparse.Namespace(resume=checkpoint, dataset=dataset, embeddings=embeddings,
                              lambd=lambd, image_size=image_size, arch=arch, classes=classes,
                              classes_from_glove=classes_from_glove)
    model, names, size = load_model(args)
    if model.name != model_name:
        raise DSDLError(f"{checkpoint} holds a {model.name} model, not a {model_name}: load it with "
                        f"the entry point {model.name!r}")
    model.classes, model.image_size, model.transform = names, size, eval_transform(size)
    return model.eval()


def dsdl(checkpoint, dataset=None, embeddings=None, lambd=None, image_size=None, arch=None,
         classes=None, classes_from_glove=None):
    """DSDL from a trained checkpoint, its trunk read from the checkpoint.

    checkpoint: this project's checkpoint, or one of the authors' released ones, which store no
    class names, class vectors or lambda: then dataset="voc" or "coco" supplies them (their
    standard class vectors are downloaded into data/ unless `embeddings` gives the file).
    classes with embeddings (C x 300 file, rows in their order) or classes_from_glove (a GloVe
    file): score these labels instead; those the model was not trained on are scored zero-shot
    (accuracy not measured). The other arguments are predict.py's options of the same names.
    """
    return _load(checkpoint, "dsdl", dataset, embeddings, lambd, image_size, arch, classes,
                classes_from_glove)


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
