"""Checkpoints: written whole or not at all, read in this project's format and the release's,
with one clear error for each way a file can fail to be the checkpoint asked for.

A checkpoint is one dict: `model` (the weights; with --ema their average, and the trained ones
in `training_model`, the average's count in `ema`), `optimizer`, `lr_scheduler`, `scaler`, `epoch`,
`best_score`, `args` (every option), what the model keeps beyond its weights (DSDL: `semantics`),
`classes`, `dataset`, `run_id` and `provenance`. The release's is `epoch`, `arch`, `best_score`
and `state_dict` (spec section 9).
"""
import hashlib
import math
import numbers
import os
import pickle
import re
import shutil
import uuid
import zipfile

import torch

from distributed import is_main_process, rank_zero_first
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
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")) or head[8:12] == b"WEBP":
        return "an image"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array (.npy: class vectors go to --embeddings)"
    if head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower()):
        return "an ONNX model (what export.py writes), which cannot be trained or evaluated here"
    if all(byte in b"\t\n\r" or 32 <= byte < 127 for byte in head):
        if text.startswith((b"{", b"[")):
            return "a JSON text file (a run's metrics.jsonl or eval_<split>.jsonl, predict.py's --json)"
        return "a text file" + (" (a CSV: label files go to the entry script)" if b"," in head else "")
    return "neither a zip archive nor a pickle"


def describe_file(path):
    """What the file at `path` is, in words: a PyTorch checkpoint, a TorchScript model, an ONNX
    model, a NumPy array, a text file ..., for a message about a file given in the wrong place."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "a damaged zip archive"
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "a TorchScript model (what export.py writes), which cannot be trained or evaluated here"
        if any(name.endswith("/data.pkl") for name in names):
            return "a PyTorch checkpoint"
        return "a zip archive"
    if head.startswith(b"\x80"):
        return "a pickle (a checkpoint of PyTorch < 1.6, or class vectors)"
    return describe_non_checkpoint(head) if head else "empty"


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
    what = describe_file(path)
    if not head.startswith((b"PK\x03\x04", b"\x80")) or "TorchScript" in what:
        raise DSDLError(f"{option} {path} is not a PyTorch checkpoint: it is {what}. Pass a run's "
                        f"checkpoint.pth.tar or model_best.pth.tar (or a checkpoint of the "
                        f"authors' release)")
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
    check_contents(checkpoint, path)
    return checkpoint


def check_contents(checkpoint, path):
    """What an edited or damaged checkpoint gets wrong, found when it is loaded rather than as a
    traceback or a NaN loss later: the epoch, the class list and its vectors, the weights."""
    damaged = f"{path} is damaged or was edited:"
    epoch = checkpoint.get("epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise DSDLError(f"{damaged} its epoch is {epoch!r}, not a number of finished epochs; use "
                        f"another checkpoint")
    best = checkpoint.get("best_score", 0.0)
    if torch.is_tensor(best) and best.numel() == 1:
        best = best.item()  # the release's
    if isinstance(best, bool) or not isinstance(best, numbers.Real):
        raise DSDLError(f"{damaged} its best_score is {best!r}, not a number; use another checkpoint")
    classes = checkpoint.get("classes")
    if classes is not None and not (isinstance(classes, (list, tuple))
                                    and all(isinstance(name, str) for name in classes)):
        raise DSDLError(f"{damaged} its classes are not a list of names; use another checkpoint")
    semantics = checkpoint.get("semantics")
    if semantics is not None:
        rows = len(classes) if classes is not None else None
        if not (torch.is_tensor(semantics) and semantics.ndim == 2 and semantics.shape[1] >= 1
                and rows in (None, semantics.shape[0])):
            shape = tuple(semantics.shape) if torch.is_tensor(semantics) else type(semantics).__name__
            raise DSDLError(f"{damaged} its class vectors ('semantics') are {shape}, but it names "
                            f"{rows if rows is not None else 'C'} classes, each with one class "
                            f"vector; use another checkpoint")
    weights = checkpoint.get("model", checkpoint.get("state_dict"))
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise DSDLError(f"{damaged} its weights are not a dict of tensors; use another checkpoint")
    width = weights.get("W1").shape[0] if torch.is_tensor(weights.get("W1")) else None
    if semantics is not None and width is not None and semantics.shape[1] != width:
        raise DSDLError(f"{damaged} its class vectors ('semantics') are {tuple(semantics.shape)}, "
                        f"but its auto-encoder (W1, {tuple(weights['W1'].shape)}) takes {width}-d "
                        f"vectors; use another checkpoint")
    broken = [key for key, value in weights.items()
              if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise DSDLError(f"{damaged} {len(broken)} of its weights hold NaN or infinite values "
                        f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}); it cannot "
                        f"be trained on or evaluated. Use an earlier checkpoint of the run (its "
                        f"model_best.pth.tar, or a copy)")


# (blocks in layer3, bottleneck blocks) -> arch: tells the release's checkpoints apart.
ARCH_BY_LAYER3 = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50",
                  (23, True): "resnet101", (36, True): "resnet152"}


def infer_arch(weights):
    """The ResNet of a state dict, from the blocks of layer3 (features.6) and their type (the
    authors' released checkpoints do not name their trunk)."""
    blocks = {key.split(".")[2] for key in weights if key.startswith("features.6.")}
    bottleneck = any(key.startswith("features.6.0.conv3.") for key in weights)
    arch = ARCH_BY_LAYER3.get((len(blocks), bottleneck))
    if arch is None:
        raise DSDLError("cannot tell the ResNet of this checkpoint from its weights; pass --arch")
    return arch


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


def checkpoint_state(model, run, args, epoch, best_score, provenance, seconds, thresholds=None):
    """The checkpoint of a run (engine.Training `run`) after `epoch`: everything --resume
    continues from, and what rebuilds the model (`model_settings`, `classes`, the model's own
    entries such as DSDL's class vectors: models.from_checkpoint)."""
    state = {"model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "lr_scheduler": run.schedule.state_dict(), "epoch": epoch, "best_score": best_score,
             "args": vars(args), "model_settings": model.settings(), "classes": list(model.classes),
             **model.checkpoint_extras(), "dataset": run.data,
             "run_id": run.run_id, "provenance": provenance, "epoch_seconds": seconds}
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    if run.average is not None:  # the average is what is evaluated and selected
        state.update(model=run.average.model.state_dict(), training_model=model.state_dict(),
                     ema=run.average.state())
    if thresholds is not None:
        state["thresholds"] = thresholds
    return state


def save_epoch(state, folder, is_best):
    # The best model first: a run killed between the two writes redoes this epoch on resume
    # and so writes both again; the other order would lose this epoch's best.
    if is_best:
        save_checkpoint(state, os.path.join(folder, BEST))
    save_checkpoint(state, os.path.join(folder, CHECKPOINT))


def image_fingerprint(dataset):
    """sha256 of the sorted image ids of a split (None for a dataset that lists none): the
    same images give the same fingerprint, in any order."""
    ids = getattr(dataset, "image_ids", None)
    if ids is None:
        return None
    return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()


def label_fingerprint(dataset):
    """sha256 of a split's labels (dataset.MultiLabelDataset.label_fingerprint), or None."""
    fingerprint = getattr(dataset, "label_fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def dataset_record(datasets):
    """What a checkpoint says of the data it was trained on: its name, classes, and of each
    split, by its role (train, val, test; the evaluated one is `evaluated`), its name, size and
    the fingerprints of its images and of their labels."""
    test = datasets.test
    val = getattr(datasets, "val", None)  # with a validation split, it is the one evaluated
    splits = {role: split for role, split in (("train", datasets.train), ("val", val), ("test", test))
              if split is not None}
    return {"name": test.name, "benchmark": test.benchmark,
            "evaluated": "val" if val is not None else "test",
            "roles": {role: split.split for role, split in splits.items()},
            "sizes": {role: len(split) for role, split in splits.items()},
            "fingerprints": {role: image_fingerprint(split) for role, split in splits.items()},
            "label_fingerprints": {role: label_fingerprint(split) for role, split in splits.items()},
            "classes": [str(name) for name in test.classes]}  # plain str: loads weights_only


def split_change(record, dataset, key):
    """How `dataset` differs from the split that the checkpoint's `record` (dataset_record)
    describes under `key` (its role; in a checkpoint of before roles, its name), in words, or
    None when it is the same (or not recorded)."""
    size = (record.get("sizes") or {}).get(key)
    fingerprint = (record.get("fingerprints") or {}).get(key)
    labels = (record.get("label_fingerprints") or {}).get(key)
    if size is None:
        return None
    if size != len(dataset):
        return f"{size} images then, {len(dataset)} now"
    if fingerprint is not None and fingerprint != image_fingerprint(dataset):
        return f"{size} images then and now, but not the same ones"
    if labels is not None and labels != label_fingerprint(dataset):
        return f"the same {size} images, but their labels changed"
    return None


def checkpoint_bytes(optimizer, averaged=False):
    """About how large a checkpoint of this run is: the weights, the optimizer's state (SGD's
    momentum: one value per weight; AdamW's two moments: two) and with --ema (`averaged`) the
    trained weights beside their average; BatchNorm statistics and class vectors are small."""
    weights = sum(p.numel() * p.element_size() for group in optimizer.param_groups
                  for p in group["params"])
    state = 2 if isinstance(optimizer, torch.optim.AdamW) else 1
    return (1 + state + int(averaged)) * weights


def check_free_space(folder, optimizer, averaged=False):
    """Refuse a run whose folder cannot take what its epochs write: each of model_best.pth.tar
    and checkpoint.pth.tar not there yet, and the temporary copy (util.atomic_write) that a
    checkpoint is written to beside the old one before it replaces it (one at a time: the
    epoch after the first needs it); plus the log, tables and plots (taken as 1 MB)."""
    size = checkpoint_bytes(optimizer, averaged)
    missing = sum(not os.path.isfile(os.path.join(folder, name)) for name in (BEST, CHECKPOINT))
    needed = size * (missing + 1) + 2 ** 20
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DSDLError(f"{folder} has {free / 2 ** 20:.0f} MB free, but an epoch of this run "
                        f"writes about {needed / 2 ** 20:.0f} MB (checkpoints of about "
                        f"{size / 2 ** 20:.0f} MB each: the weights and the optimizer's state). "
                        f"Free disk space there, or pass a --checkpoint-dir on another disk")


def restore_training(args, checkpoint, optimizer, scaler):
    """(first epoch, best mAP so far, run id) of a run: a new one, or the one --resume continues
    (optimizer and scaler state restored). Continued in another folder, a run is a new branch
    whose model_best is the best of its own epochs. The run folder must have room for an epoch."""
    with rank_zero_first():  # before the first epoch, not when its checkpoint fails to fit
        if is_main_process():  # which writes the checkpoints; its refusal stops every rank
            check_free_space(args.checkpoint_dir, optimizer, bool(getattr(args, "ema", 0)))
    if not args.resume:
        return 0, -math.inf, uuid.uuid4().hex
    trained_with = (checkpoint.get("args") or {}).get("optimizer", "sgd")
    if "optimizer" in checkpoint and trained_with != getattr(args, "optimizer", "sgd"):
        raise DSDLError(f"{args.resume} was trained with --optimizer {trained_with}, whose state "
                        f"--resume continues: keep --optimizer {trained_with}, or start a new run "
                        f"from its weights with --init-from {args.resume} --optimizer "
                        f"{args.optimizer} --checkpoint-dir NEW_FOLDER")
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
