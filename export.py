"""Export a trained checkpoint (DSDL or the baseline) for inference: ONNX or TorchScript, the head folded.

    python export.py --resume checkpoints/voc2007/model_best.pth.tar --format onnx -o dsdl.onnx
    python export.py --resume release/voc2007.pth.tar --dataset voc --format torchscript -o dsdl.pt

Once trained, the dictionary is fixed, so the closed-form coefficients are one constant matrix
P = D^T (D D^T + lambda I)^-1 (`DSDL.folded`): the exported model is the trunk, its global
pooling and one linear layer without bias (weight P^T), with no solve at run time; the baseline
is exported as it is (its linear layer keeps its bias). It takes a
batch of any size of images B x 3 x S x S (S: the checkpoint's input size, resized ignoring the
aspect ratio and normalised with the ImageNet mean and std) and returns the scores B x C
(logits: a class's probability is their sigmoid). The class names, in the order of the scores,
and the input settings go next to the model, in `<output>.classes.json`.
"""
import importlib.util
import sys

import options

if __name__ == "__main__":  # parse before importing torch: --help and bad options answer at once
    options.export_parser().parse_args()

import io
import json
import os
import warnings

import torch

from inference import load_model
from runs import stops_on_interrupt
from outputs import check_output, is_class_list_json, is_export
from util import (IMAGENET_MEAN, IMAGENET_STD, DSDLError, atomic_write, out_of_memory,
                  out_of_memory_advice, user_message)

ONNX_OPSET = 20  # what onnxruntime 1.32 runs; the README states it
ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export (torch.export based) imports


def missing_onnx_packages():
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def export_onnx(model, image_size):
    """The ONNX file's bytes (one file: the weights stay inside, < 2 GB)."""
    example = torch.zeros(2, 3, image_size, image_size)  # B x 3 x S x S; B = 2 keeps B dynamic
    program = torch.onnx.export(model, (example,), None, input_names=["images"],
                                output_names=["scores"],
                                dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                                opset_version=ONNX_OPSET, verbose=False)
    return program.model_proto.SerializeToString()


def export_torchscript(model):
    """The TorchScript file's bytes."""
    # PyTorch deprecates TorchScript in favour of torch.export, but C++ and mobile runtimes
    # still load it: the format is asked for, so the deprecation notice is not repeated here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        scripted = torch.jit.script(model)
    buffer = io.BytesIO()  # in memory first: libtorch aborts the process on a failed file write
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def sidecar(output):
    """Where the class names go: next to the model file."""
    return output + ".classes.json"


def write_export(output, model_bytes, description):
    """The model file and its classes.json, as a pair: each goes to a temporary file first
    (atomic_write), and neither replaces the old one unless both were written whole. A failed
    write leaves both old files as they were."""
    with atomic_write(sidecar(output), "w") as names:
        json.dump(description, names, indent=2)
        names.flush()
        os.fsync(names.fileno())  # on the disk before the model is renamed into place
        with atomic_write(output) as f:
            f.write(model_bytes)


@stops_on_interrupt("the model file and its classes.json are as they were")
def main(argv=None):
    args = options.export_parser().parse_args(argv)
    try:
        missing = missing_onnx_packages() if args.format == "onnx" else []
        if missing:
            raise DSDLError(f"--format onnx needs the packages {', '.join(missing)}: "
                            f"pip install -r requirements-export.txt")
        inputs = [args.resume, args.embeddings, args.classes_from_glove, *(args.classes or [])[:1]]
        check_output("-o", args.output, inputs, is_export)
        check_output("-o", sidecar(args.output), inputs, is_class_list_json)
        model = load_model(args)
        classes, image_size, thresholds = model.classes, model.image_size, model.thresholds
    except DSDLError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 1
    folded = model.eval().folded()
    try:
        with torch.no_grad():
            model_bytes = (export_onnx(folded, image_size) if args.format == "onnx"
                           else export_torchscript(folded))
        write_export(args.output, model_bytes, {
            "classes": classes, "image_size": image_size, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, **model.settings(),  # what rebuilds it, its input size too
            # tuned per class on a validation split: predict class c when sigmoid(score) >= it
            **({"thresholds": thresholds} if thresholds is not None else {})})
    except OSError as error:
        print(f"error: could not write {args.output} and {sidecar(args.output)} "
              f"({error.strerror}); both files there are as they were. Free disk space, then run "
              f"the same command again", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as error:
        if not out_of_memory(error):
            raise
        print(f"error: {out_of_memory_advice(error, image_size=image_size)}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({args.format}: images B x 3 x {image_size} x {image_size} -> "
          f"scores B x {len(classes)}, logits) and {sidecar(args.output)} (class names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
