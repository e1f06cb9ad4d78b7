"""Checkpoints: written whole or not at all, read in this project's format and the release's,
with one clear error for each way a file can fail to be the checkpoint asked for.

A checkpoint is one dict: `model` (the weights; with --ema their average, and the trained ones
in `training_model`, the average's count in `ema`), `optimizer`, `lr_scheduler`, `scaler`, `epoch`,
`best_score`, `args` (every option), what the model keeps beyond its weights (DSDL: `semantics`),
`classes`, `dataset`, `run_id` and `provenance`. The release's is `epoch`, `arch`, `best_score`
and `state_dict` (spec section 9).
"""
import math
import os
import pickle
import re
import uuid

import torch

from distributed import is_main_process
from util import DSDLError, atomic_write

CHECKPOINT = "checkpoint.pth.tar"   # the last epoch: what --resume continues from
BEST = "model_best.pth.tar"         # the epoch of the best test mAP (the release's selection)


def save_checkpoint(state, path):
    """Write `state` whole or not at all (util.atomic_write)."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as error:
        # torch.save reports a failed write (disk full) as a RuntimeError raised from the OSError.
        cause = error.__context__ if isinstance(error.__context__, OSError) else error
        kept = (f"the previous {os.path.basename(path)} there is intact" if os.path.isfile(path)
                else f"no {os.path.basename(path)} was written")
        raise DSDLError(f"could not write checkpoint {path} ({cause}); {kept}. Free disk space, "
                        f"then {resume_advice(os.path.dirname(path))}") from error


def resume_advice(folder):
    """How to go on after a run in `folder` stopped."""
    last = os.path.join(folder, CHECKPOINT)
    if os.path.isfile(last):
        return f"continue with --resume {last}"
    return "start the run again (no epoch was saved yet)"


def describe_non_checkpoint(head):
    """What a file that is not a PyTorch checkpoint looks like, from its first bytes."""
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "a git-lfs pointer, not the file itself: fetch it with `git lfs pull`"
    if text.startswith(b"<"):
        return "an HTML or XML page (a failed download?)"
    if all(byte in b"\t\n\r" or 32 <= byte < 127 for byte in head):
        return "a text file"
    return "neither a zip archive nor a pickle"


def load_checkpoint(path, option="--resume"):
    """torch.load with weights_only=True (loading never runs code), with one clear error for each
    way a file can fail to be a checkpoint."""
    if os.path.isdir(path):
        raise DSDLError(f"{option} {path} is a folder, not a PyTorch checkpoint; pass the "
                        f"checkpoint file in it, e.g. {os.path.join(path, CHECKPOINT)}")
    if not os.path.isfile(path):
        raise DSDLError(f"{option} {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise DSDLError(f"{option} {path} is empty (0 bytes): not a PyTorch checkpoint")
    # torch.save writes a zip archive (PK); PyTorch < 1.6 and the release wrote a pickle (0x80).
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise DSDLError(f"{option} {path} is not a PyTorch checkpoint: it is "
                        f"{describe_non_checkpoint(head)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({refused.group(1)})" if refused else ""
        raise DSDLError(f"refusing to load {path}: it needs arbitrary unpickling{what}, which can "
                        f"run code. Only plain weight checkpoints are accepted.") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise DSDLError(f"cannot read {path}: it is truncated or not a PyTorch checkpoint "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from error
    if not isinstance(checkpoint, dict) or not ("model" in checkpoint or "state_dict" in checkpoint):
        raise DSDLError(f"{path} is a PyTorch file but not a DSDL checkpoint (no 'model' or "
                        f"'state_dict' entry)")
    return checkpoint


def checkpoint_weights(checkpoint, training=False):
    """The model's state dict from this project's format or the release's (spec section 9).
    `training`: the weights that training continues from; with --ema they are kept apart, as
    `training_model`, and `model` holds their average (what is evaluated, exported, predicted)."""
    weights = checkpoint.get("training_model") if training else None
    if weights is None:
        weights = checkpoint.get("model", checkpoint.get("state_dict"))
    return {key.removeprefix("module."): value for key, value in weights.items()}


def load_weights(model, checkpoint, path, class_independent_only=False, training=False):
    """Load the weights of `checkpoint` (read from `path`) into `model`, which checks them
    (`PooledModel.load_weights`). `class_independent_only` (--init-from): only the weights that
    do not depend on the class list; `training` (--resume): the weights training continues
    from. Returns what was loaded, in words."""
    return model.load_weights(checkpoint_weights(checkpoint, training), path,
                              class_independent_only)


def save_epoch(state, folder, is_best):
    # The best model first: a run killed between the two writes redoes this epoch on resume
    # and so writes both again; the other order would lose this epoch's best.
    if is_best:
        save_checkpoint(state, os.path.join(folder, BEST))
    save_checkpoint(state, os.path.join(folder, CHECKPOINT))


def dataset_record(datasets):
    """What a checkpoint says of the data it was trained on."""
    test = datasets.test
    sizes = {test.split: len(test)}
    if datasets.train is not None:
        sizes[datasets.train.split] = len(datasets.train)
    return {"name": test.name, "benchmark": test.benchmark, "sizes": sizes,
            "classes": [str(name) for name in test.classes]}  # plain str: loads weights_only


def restore_training(args, checkpoint, optimizer, scaler):
    """(first epoch, best mAP so far, run id) of a run: a new one, or the one --resume continues
    (optimizer and scaler state restored). Continued in another folder, a run is a new branch
    whose model_best is the best of its own epochs."""
    if not args.resume:
        return 0, -math.inf, uuid.uuid4().hex
    if "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])  # the momentum buffers
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
    start_epoch = checkpoint.get("epoch", 0)
    if os.path.abspath(os.path.dirname(args.resume)) != os.path.abspath(args.checkpoint_dir):
        if is_main_process():
            print(f"continuing {args.resume} from epoch {start_epoch} in {args.checkpoint_dir}, "
                  f"a new branch: its best model is chosen among the epochs trained here")
        return start_epoch, -math.inf, uuid.uuid4().hex
    best_score = float(checkpoint.get("best_score", -math.inf))  # the release's is a tensor
    if is_main_process():
        best = "none yet" if math.isinf(best_score) else f"{best_score:.2f}"
        print(f"resumed from {args.resume} at epoch {start_epoch} (best mAP {best})")
    return start_epoch, best_score, checkpoint.get("run_id") or uuid.uuid4().hex
