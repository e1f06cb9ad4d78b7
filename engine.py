"""The training and evaluation loop shared by every dataset (main_*.py only wire data and defaults).

`run` reads as the method trains: check the command line, read the checkpoint the run starts
from, claim the run folder, build the data and the model, then for each epoch train, step the
schedule, evaluate, report and save. `-e` evaluates once and writes only eval_<split>.* files.
"""
import fcntl
import math
import os
import pickle
import re
import signal
import socket
import sys
import time
import uuid
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

import report
from models import DSDL, DSDLLoss
from options import HYPER_PARAMETERS, PAPER_ARCH, PAPER_IMAGE_SIZE
from util import (DSDLError, atomic_write, compute_metrics, init_distributed, is_main_process,
                  load_embeddings, normalize_on_device, rank_zero_first, resolve_device,
                  standard_embeddings, user_message, write_error)

CHECKPOINT = "checkpoint.pth.tar"   # the last epoch: what --resume continues from
BEST = "model_best.pth.tar"         # the epoch of the best test mAP (the release's selection)
METRICS_LOG = report.METRICS_LOG    # one record per epoch
LOCK = "run.lock"                   # the pid of the run writing into the folder
RUN_FILES = (CHECKPOINT, BEST, METRICS_LOG)


class Datasets(NamedTuple):
    """What an entry script gives the engine."""
    train: Dataset            # None with -e
    test: Dataset             # labelled; evaluated after every epoch, selects model_best
    submission: Dataset = None  # unlabelled, scored by the best model at the end (VOC 2012 test)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

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


def checkpoint_weights(checkpoint):
    """The model's state dict from this project's format or the release's (spec section 9)."""
    weights = checkpoint.get("model", checkpoint.get("state_dict"))
    return {key.removeprefix("module."): value for key, value in weights.items()}


def load_weights(model, checkpoint, path, class_independent_only=False):
    """Load weights, saying which shape differs (classes, feature size) instead of a traceback.

    `class_independent_only` (--init-from): only the trunk and the auto-encoder (W1, W2), which
    do not depend on the class list; the class vectors stay the model's own.
    """
    weights = checkpoint_weights(checkpoint)
    expected = model.state_dict()
    if class_independent_only or "semantics" not in weights:  # the release stores no semantics
        weights["semantics"] = expected["semantics"]
    for key in expected:  # BatchNorm counters, absent from checkpoints of PyTorch < 0.4.1
        if key.endswith("num_batches_tracked") and key not in weights:
            weights[key] = expected[key]
    if "W2" in weights and weights["W2"].shape[1] != model.feature_dim:
        raise DSDLError(f"{path} was trained with feature size {weights['W2'].shape[1]} "
                        f"(W2 is {tuple(weights['W2'].shape)}), but --arch {model.arch} has feature "
                        f"size {model.feature_dim}; pass the --arch it was trained with.")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise DSDLError(f"{path} does not fit a DSDL {model.arch}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}. Is --arch right?")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            what = {"semantics": "classes x 300", "W1": "300 x 1024"}  # W2 is checked above
            raise DSDLError(
                f"{path} does not match this model: {key} is {tuple(value.shape)} in the "
                f"checkpoint but {tuple(expected[key].shape)} here "
                f"({what.get(key, 'trunk weights')}); the model has {model.num_classes} classes "
                f"and --arch {model.arch}.")
    model.load_state_dict(weights)


# --------------------------------------------------------------------------------------------
# The run folder: it belongs to one run
# --------------------------------------------------------------------------------------------

def prepare_run_folder(folder):
    """The run folder exists and can be written to: found before anything trains."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DSDLError(f"--checkpoint-dir {folder} is a file, not a folder; pass a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise DSDLError(f"cannot create --checkpoint-dir {folder} ({error.strerror}); pass a "
                        f"folder you can write to") from error
    error = write_error(folder)
    if error is not None:
        raise DSDLError(f"--checkpoint-dir {folder} is not writable ({error.strerror}); pass a "
                        f"folder you can write to") from error


def check_run_folder(args, checkpoint):
    """Refuse, before anything is written, a training run that would overwrite or splice
    another: a fresh run needs a folder without a run in it; --resume continues the run whose
    latest checkpoint it is (never an older one: that would overwrite the newer epochs)."""
    folder = args.checkpoint_dir
    last = os.path.join(folder, CHECKPOINT)
    resumed = os.path.abspath(args.resume) if args.resume else None
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))
               and os.path.abspath(os.path.join(folder, name)) != resumed]
    if not args.resume:
        if present:
            way_on = (f"To continue it, pass --resume {last}; to" if os.path.isfile(last) else "To")
            raise DSDLError(f"{folder} already holds a run ({', '.join(present)}); a new run would "
                            f"overwrite it. {way_on} start a new run, pass another "
                            f"--checkpoint-dir (or delete that folder)")
        return
    if not present or resumed == os.path.abspath(last):
        return
    if not os.path.isfile(last):
        raise DSDLError(f"{folder} holds another run's {', '.join(present)}; continuing "
                        f"{args.resume} there would mix the two. Pass another --checkpoint-dir")
    try:
        current = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a damaged file: say so rather than guess which run it was
        raise DSDLError(f"{last} cannot be read ({type(error).__name__}); to continue from "
                        f"{args.resume} in {folder}, move that file away first") from error
    same_run = checkpoint.get("run_id") is not None and current.get("run_id") == checkpoint.get("run_id")
    if not same_run or current.get("epoch", 0) > checkpoint.get("epoch", 0):
        which = "an older epoch of this run" if same_run else "another run"
        raise DSDLError(f"{args.resume} (epoch {checkpoint.get('epoch', 0)}) is {which} than "
                        f"{last} (epoch {current.get('epoch', 0)}); continuing it in {folder} would "
                        f"overwrite that. Continue the latest with --resume {last}, or write the "
                        f"continuation elsewhere with --checkpoint-dir NEW_FOLDER")


class RunLock:
    """`<folder>/run.lock`, locked (flock) by the run that writes into the folder.

    The kernel lets go of the lock when its process ends, however it ends, so a second run is
    refused exactly while the first lives. The file holds the holder's pid and host, for the
    message of a refused run and the note of a run that takes over after a crash; a run that
    ends removes it.
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK)
        self.file = None

    def acquire(self):
        while True:
            lock_file = open(self.path, "a+")  # a+: never truncates what another run wrote
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.seek(0)
                holder = lock_file.read().split() or ["?", "?"]
                lock_file.close()
                raise DSDLError(f"another run (process {holder[0]} on {holder[-1]}) is writing "
                                f"into {self.folder}; wait for it to end, or pass another "
                                f"--checkpoint-dir") from None
            try:  # the file locked is still the one at the path (not removed by its last holder)
                if os.fstat(lock_file.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            lock_file.close()
        lock_file.seek(0)
        left = lock_file.read().split()
        if left:
            print(f"note: taking over {self.path}, left by process {left[0]} which no longer runs")
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()} {socket.gethostname()}\n")
        lock_file.flush()
        self.file = lock_file

    def release(self):
        if self.file is not None:
            os.remove(self.path)  # while still locked: the next run finds no file, or its own
            self.file.close()
            self.file = None


def claim_run_folder(args, checkpoint, lock):
    """Rank 0, before any data is read: the folder is usable and, for training, locked and
    free of another run."""
    prepare_run_folder(args.checkpoint_dir)
    if not args.evaluate:
        lock.acquire()
        check_run_folder(args, checkpoint)


# --------------------------------------------------------------------------------------------
# One epoch of training, one evaluation
# --------------------------------------------------------------------------------------------

def training_targets(labels):
    """1 (present) and 0 (difficult) are positives of the loss, -1 is a negative (spec 5)."""
    return (labels >= 0).float()


def prepare_images(images, device, channels_last=False):
    """Move a batch to the device; uint8 batches (--fast-pipeline) are normalised there."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_on_device(images)
    return images.contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)


def compile_trunk(trunk):
    """torch.compile the trunk's forward in place (state-dict keys unchanged). If the first call
    fails (no compiler, unsupported platform) warn and run the trunk eagerly from then on; later
    errors (out of memory ...) are raised as they are."""
    eager = trunk.forward
    compiled = torch.compile(eager)

    def first_call(images):
        try:
            output = compiled(images)
        except Exception as error:  # torch._dynamo / inductor raise many types
            warnings.warn(f"--compile does not work here ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); running without it")
            trunk.forward = eager
            return eager(images)
        trunk.forward = compiled
        return output

    trunk.forward = first_call


def mixed_precision(device, enabled):
    """(autocast dtype or None, GradScaler or None) for --amp on this device.

    GPUs: bf16 where supported, else fp16 with loss scaling. CPUs: float32 with a warning, as
    --help says: bf16 is only fast on CPUs with bf16 units, and PyTorch offers no public way to
    ask whether this one has them (on one without, bf16 was 23x slower than float32).
    """
    if not enabled:
        return None, None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, None
        return torch.float16, torch.amp.GradScaler("cuda")
    warnings.warn("--amp has no effect on the CPU; running in float32")
    return None, None


def autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def mean_over_processes(loss):
    """The loss as a number, averaged over torchrun's processes (every process sees the same)."""
    if not torch.distributed.is_initialized():
        return loss.item()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return total.item() / torch.distributed.get_world_size()


INTERRUPTS = []  # the Ctrl-Cs that main() has seen


def stop_if_interrupted():
    """Stop at the next batch after a Ctrl-C: its KeyboardInterrupt is raised wherever the main
    process is, and Python swallows one that lands in a finaliser (with a message)."""
    if INTERRUPTS:
        raise KeyboardInterrupt


class NonFiniteLoss(DSDLError):
    """The loss became NaN or infinite; the step was not taken."""


def train_one_epoch(model, loss_fn, optimizer, loader, device, epoch, max_grad_norm,
                    amp_dtype=None, scaler=None, channels_last=False):
    """One pass over `loader`; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"train {epoch + 1}", leave=False, dynamic_ncols=True,
               disable=not is_main_process())
    start = time.perf_counter()
    for batch, (images, labels, _) in enumerate(bar):
        images = prepare_images(images, device, channels_last)
        targets = training_targets(labels.to(device, non_blocking=True))
        with autocast(device, amp_dtype):
            output = model(images)
        loss = loss_fn(output, targets)  # float32: the head leaves autocast
        value = mean_over_processes(loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the loss became {value} at epoch {epoch + 1}, batch {batch + 1}; "
                                f"stopped without taking this step.")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scale the loss, unscale before clipping
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
        total += value * images.shape[0]
        count += images.shape[0]
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{count / (time.perf_counter() - start):.1f}")
        stop_if_interrupted()
    return total / max(count, 1)


class Evaluation(NamedTuple):
    scores: np.ndarray   # N x C, the coefficients A of every image of the split, in its order
    labels: np.ndarray   # N x C, in {1, 0, -1}
    ids: list            # N image ids
    loss: float          # mean loss over the images; NaN for a split without labels


@torch.no_grad()
def evaluate(model, loss_fn, loader, device, amp_dtype=None, channels_last=False):
    """Score the whole split of `loader`.

    A split without labels (`dataset.labelled` false, VOC 2012 test) gets scores only: loss NaN.
    Under torchrun each process scores its share (a Subset, no padding) and the shares are
    gathered back into the dataset's order, so every image counts exactly once.
    """
    model.eval()
    dataset = loader.dataset.dataset if isinstance(loader.dataset, Subset) else loader.dataset
    scores, labels, ids = [], [], []
    total, count = 0.0, 0
    bar = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True,
               disable=not is_main_process())
    start = time.perf_counter()
    for images, batch_labels, batch_ids in bar:
        with autocast(device, amp_dtype):
            output = model(prepare_images(images, device, channels_last))
        if dataset.labelled:
            loss = loss_fn(output, training_targets(batch_labels.to(device, non_blocking=True)))
            total += loss.detach() * images.shape[0]  # stays on the device: no sync per batch
        count += images.shape[0]
        scores.append(output.scores.float())
        labels.append(batch_labels)
        ids.extend(batch_ids.tolist() if torch.is_tensor(batch_ids) else batch_ids)  # COCO: ints
        bar.set_postfix(img_s=f"{count / (time.perf_counter() - start):.1f}")
        stop_if_interrupted()
    scores, labels = torch.cat(scores).cpu().numpy(), torch.cat(labels).numpy()
    total = float(total)
    if torch.distributed.is_initialized():
        shares = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(
            shares, (list(loader.dataset.indices), scores, labels, ids, total, count))
        positions = np.concatenate([share[0] for share in shares])
        order = np.argsort(positions, kind="stable")
        scores = np.concatenate([share[1] for share in shares])[order]
        labels = np.concatenate([share[2] for share in shares])[order]
        ids = [i for share in shares for i in share[3]]
        ids = [ids[i] for i in order]
        total, count = sum(share[4] for share in shares), sum(share[5] for share in shares)
    return Evaluation(scores, labels, ids, total / max(count, 1) if dataset.labelled else math.nan)


def share_rank_zero_buffers(model):
    """Give every process rank 0's BatchNorm statistics (the ones it saves) before evaluating.

    DDP copies rank 0's buffers before each training forward only: after the last step every
    rank has its own statistics.
    """
    if torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


# --------------------------------------------------------------------------------------------
# Data loading
# --------------------------------------------------------------------------------------------

class EpochSeeded(Dataset):
    """The training set with reproducible augmentation: image i in epoch e is transformed with
    the random numbers of the seed (seed, e, i), whichever worker loads it and however many
    workers or processes there are. A run resumed at epoch e thus draws the crops and flips an
    uninterrupted run draws, with persistent workers too. The epoch is a tensor in shared memory,
    set by the main process (`set_epoch`) and read by the workers."""

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        seed = np.random.SeedSequence([self.seed, int(self.epoch), index]).generate_state(1)[0]
        torch.default_generator.manual_seed(int(seed))  # what the transforms draw from
        return self.dataset[index]


def make_loader(dataset, batch_size, workers, seed, device, shuffle):
    """Training loader (shuffled) or evaluation loader; under torchrun each process loads its share.

    The training share comes from a DistributedSampler; the evaluation share is every
    world_size-th image, without the sampler's padding. Call `set_epoch` before each epoch.
    """
    distributed = torch.distributed.is_initialized()
    world_size = torch.distributed.get_world_size() if distributed else 1
    sampler = None
    if shuffle:
        dataset = EpochSeeded(dataset, seed)
        sampler = (DistributedSampler(dataset, shuffle=True, seed=seed) if distributed
                   else RandomSampler(dataset, generator=torch.Generator()))
    elif distributed:
        dataset = Subset(dataset, range(torch.distributed.get_rank(), len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=ignore_interrupts)


def ignore_interrupts(worker_id):
    """Ctrl-C is for the main process, which stops the run and says how to resume; a loader
    worker that died of it first would turn that into a DataLoader error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def set_epoch(loader, epoch, seed):
    """Make the training loader's order and augmentation those of `epoch` (seeded from it)."""
    loader.dataset.epoch.fill_(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # shuffles with seed + epoch, the same on every process
    else:
        loader.sampler.generator.manual_seed(seed + epoch)


# --------------------------------------------------------------------------------------------
# Building a run
# --------------------------------------------------------------------------------------------

def check_args(args):
    """Mistakes in the command line, found before any file is read or written."""
    args.device = resolve_device(args.device)
    if args.evaluate and not args.resume:
        raise DSDLError("-e/--evaluate needs the checkpoint to evaluate: --resume PATH")
    if args.resume and args.init_from:
        raise DSDLError("--resume continues a run and --init-from starts a new one from another "
                        "run's weights: pass one of them")
    if not args.evaluate and args.batch_size < 2:
        raise DSDLError(f"--batch-size {args.batch_size}: training needs at least 2 images per "
                        f"batch (BatchNorm statistics)")


def settle_args(args, checkpoint):
    """What the command line left open. From the checkpoint a run starts from: with --resume
    its recipe (`HYPER_PARAMETERS` and --epochs), with -e what changes the scores (trunk, input
    size, lambda, beta), with --init-from its trunk and input size, wherever the command line
    does not give them (a given value that differs is used, with one warning listing each);
    else the paper's trunk and input size. The run folder is, with --resume, the checkpoint's."""
    source = args.resume or args.init_from
    stored = (checkpoint or {}).get("args") or {}
    if args.init_from:
        keys = ("arch", "image_size")
    elif args.evaluate:  # what changes the scores (and the loss printed with them)
        keys = ("arch", "image_size", "lambd", "beta")
    else:
        keys = HYPER_PARAMETERS + ("epochs",)
    changed = []
    for key in keys:
        theirs = stored.get(key)
        if theirs is None:
            continue
        if key not in args.given:
            setattr(args, key, theirs)
        elif theirs != getattr(args, key) and key != "epochs":  # more epochs: the usual resume
            changed.append(f"{key}: {theirs!r} -> {getattr(args, key)!r}")
    if changed:
        doing = "evaluating" if args.evaluate else "resuming" if args.resume else "starting"
        warnings.warn(f"{doing} with other hyper-parameters than the checkpoint's ({source}); "
                      f"the command line's are used:\n  " + "\n  ".join(changed), stacklevel=2)
    args.arch = args.arch or PAPER_ARCH
    args.image_size = args.image_size or PAPER_IMAGE_SIZE
    # The class list a checkpoint was trained on: a CSV dataset evaluated or resumed uses it.
    args.checkpoint_classes = None if checkpoint is None or args.init_from else checkpoint.get("classes")
    if args.checkpoint_dir is None:
        args.checkpoint_dir = (os.path.dirname(args.resume) or ".") if args.resume else args.run_folder


def dataset_record(datasets):
    """What a checkpoint says of the data it was trained on."""
    test = datasets.test
    sizes = {test.split: len(test)}
    if datasets.train is not None:
        sizes[datasets.train.split] = len(datasets.train)
    return {"name": test.name, "benchmark": test.benchmark, "sizes": sizes,
            "classes": [str(name) for name in test.classes]}  # plain str: loads weights_only


def check_datasets(datasets, checkpoint, args):
    """The class lists of the splits agree, and --resume continues a run on its own dataset."""
    train, test = datasets.train, datasets.test
    if train is not None and list(train.classes) != list(test.classes):
        only_train = [name for name in train.classes if name not in test.classes]
        only_test = [name for name in test.classes if name not in train.classes]
        raise DSDLError(f"the classes of {train.label_source} and {test.label_source} differ"
                        + (f": only in {train.split}: {', '.join(only_train[:5])}" if only_train else "")
                        + (f"; only in {test.split}: {', '.join(only_test[:5])}" if only_test else "")
                        + ("" if only_train or only_test else ": same names, another order")
                        + ". Both splits must name the same classes")
    if not test.labelled:
        raise DSDLError(f"the {test.split} split has no labels, so it cannot select the best "
                        f"model; evaluate every epoch on a labelled split")
    if checkpoint is None or args.init_from:
        return
    classes = [str(name) for name in test.classes]
    theirs = checkpoint.get("classes")
    if theirs is not None and list(theirs) != classes:
        way = ("it can only be evaluated on data with its classes" if args.evaluate else
               f"to start a run on this dataset from its weights, use --init-from {args.resume}")
        raise DSDLError(f"{args.resume} was trained on {len(theirs)} classes "
                        f"({', '.join(theirs[:4])}, ...), but this dataset has {len(classes)} "
                        f"({', '.join(classes[:4])}, ...); {way}")
    # A run on one of the paper's benchmarks is known by its name; one on own data by its
    # class list (checked above), whatever its folder is called.
    trained_on = checkpoint.get("dataset") or {}
    if not args.evaluate and trained_on.get("benchmark") and trained_on["name"] != test.name:
        raise DSDLError(f"{args.resume} is a run on {trained_on['name']}, not {test.name}: --resume "
                        f"continues a run on its own dataset. To start a {test.name} run from its "
                        f"weights, use --init-from {args.resume}")


def semantics_for(args, classes, checkpoint, default_embeddings):
    """The C x 300 class vectors: from our checkpoint, else --embeddings, else the standard file."""
    if checkpoint is not None and "semantics" in checkpoint and not args.init_from:
        return checkpoint["semantics"]
    if not args.embeddings and default_embeddings is None:
        raise DSDLError("this dataset has no standard class vectors: pass --embeddings PATH, a "
                        "C x 300 file in the class order (make_embeddings.py writes one)")
    path = args.embeddings or standard_embeddings(default_embeddings)
    return load_embeddings(path, num_classes=len(classes))


def step_schedule(optimizer, model, args, start_epoch):
    """The release's step decay (x0.1 at each of --epoch_step), positioned at `start_epoch`:
    sets each group's learning rate, momentum and weight decay from `args`, and returns the
    scheduler that decays them.

    Built from `args` and the epoch rather than loaded from a checkpoint's `lr_scheduler` (which
    is saved for other tools): a resumed run with a new --lr or --epoch_step (given on the
    command line, with a warning) uses it, and a run that starts from the release's checkpoints
    (which have no optimizer state) decays at the same epochs as an uninterrupted one.
    """
    for group, fresh in zip(optimizer.param_groups, model.parameter_groups(args.lr, args.lrp)):
        lr = fresh["lr"]
        for _ in range(sum(step < start_epoch for step in args.epoch_step)):
            lr *= 0.1  # multiplied step by step, as the scheduler does: bit-exact on resume
        group.update(initial_lr=fresh["lr"], lr=lr, momentum=args.momentum,
                     weight_decay=args.weight_decay)
    # Creating it at start_epoch - 1 takes its first step to start_epoch (and decays there).
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, args.epoch_step, gamma=0.1,
                                                last_epoch=start_epoch - 1)


def learning_rates(optimizer):
    trunk, dictionary = (group["lr"] for group in optimizer.param_groups)
    return f"learning rates: trunk {trunk:g}, dictionary {dictionary:g}"


def table_title(args, dataset, epoch, source):
    return (f"DSDL {args.arch} at {args.image_size} px, epoch {epoch} of {source}, on "
            f"{dataset.name} {dataset.split}")


def score_submission(model, loss_fn, dataset, args, device, write_submission, amp_dtype, folder):
    """Score a split without labels and write the evaluation server's files (VOC 2012 test)
    into `folder`."""
    loader = make_loader(dataset, args.batch_size, args.workers, args.seed, device, shuffle=False)
    result = evaluate(model, loss_fn, loader, device, amp_dtype, args.channels_last)
    if is_main_process():
        folder, archive = write_submission(result.scores, result.ids, list(dataset.classes), folder)
        print(f"evaluation-server files for {len(result.ids)} {dataset.split} images: {folder}\n"
              f"upload {archive} to the evaluation server")


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------

def run(args, datasets_fn, default_embeddings, write_submission=None):
    """Train (or with -e only evaluate). `datasets_fn(args)` returns the `Datasets`; when it
    has a submission split, the best model scores it at the end with `write_submission`."""
    check_args(args)
    source = args.resume or args.init_from
    checkpoint = load_checkpoint(source, "--resume" if args.resume else "--init-from") if source else None
    settle_args(args, checkpoint)
    processes = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if args.batch_size % processes:
        raise DSDLError(f"--batch-size {args.batch_size} (the global batch) does not divide over "
                        f"{processes} processes; pass a multiple of {processes}")
    if args.resume and not args.evaluate and checkpoint.get("epoch", 0) >= args.epochs:
        done = checkpoint.get("epoch", 0)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{args.resume} has already trained {done} epoch{'s' * (done != 1)}, and "
                  f"--epochs is {args.epochs}: nothing to do. Pass a larger --epochs to train on.")
        return None
    rank, world_size, device = init_distributed(args.device)
    lock = RunLock(args.checkpoint_dir)
    try:
        with rank_zero_first():  # an error found by rank 0 stops every process
            if rank == 0:
                claim_run_folder(args, checkpoint, lock)
        with rank_zero_first():  # rank 0 downloads and extracts the data first
            datasets = Datasets(*datasets_fn(args))
        check_datasets(datasets, checkpoint, args)
        classes = [str(name) for name in datasets.test.classes]
        model = build_model(args, classes, checkpoint, default_embeddings, device, world_size)
        if args.evaluate:
            return evaluate_checkpoint(args, model, datasets, checkpoint, device, world_size,
                                       write_submission)
        return train(args, model, datasets, checkpoint, device, world_size, write_submission)
    finally:
        lock.release()


def build_model(args, classes, checkpoint, default_embeddings, device, world_size):
    """The model on its device, with the checkpoint's weights and the speed options."""
    torch.manual_seed(args.seed)
    with rank_zero_first():  # downloads (class vectors, ImageNet weights) happen once
        semantics = semantics_for(args, classes, checkpoint, default_embeddings)
        model = DSDL(len(classes), semantics, args.lambd, args.arch,
                     pretrained=not args.no_pretrained and checkpoint is None)
    if checkpoint is not None:
        load_weights(model, checkpoint, args.resume or args.init_from,
                     class_independent_only=bool(args.init_from))
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_trunk(model.trunk)
    return model


def describe_run(args, test_set, world_size, device):
    """What every record of this run says of it: its settings and what produced it."""
    settings = {key: getattr(args, key) for key in (*HYPER_PARAMETERS, "epochs", "amp",
                                                     "channels_last", "compile", "fast_pipeline")}
    settings.update(dataset=test_set.name, benchmark=test_set.benchmark)
    return {"settings": settings, "run": report.provenance(device, world_size)}


def report_split(args, test_set, metrics, record, source, log, table):
    """Print one evaluation of the test split, append its record to the file `log` and save its
    table as `table`, both in the run folder; returns the log's path."""
    log = os.path.join(args.checkpoint_dir, log)
    report.report_evaluation(
        metrics, [str(name) for name in test_set.classes],
        table_title(args, test_set, record["epoch"], source), test_set.benchmark,
        (args.arch, args.image_size, test_set.split), record, log,
        table_path=os.path.join(args.checkpoint_dir, table))
    return log


def evaluate_checkpoint(args, model, datasets, checkpoint, device, world_size, write_submission):
    """-e: score the test split once. The results go to eval_<split>.jsonl and eval_<split>.md,
    and a submission to eval_submission/: beside, never over, what training wrote."""
    amp_dtype, _ = mixed_precision(device, args.amp)
    loss_fn = DSDLLoss(args.lambd, args.beta)
    test_set = datasets.test
    loader = make_loader(test_set, args.batch_size, args.workers, args.seed, device, shuffle=False)
    result = evaluate(model, loss_fn, loader, device, amp_dtype, args.channels_last)
    metrics = compute_metrics(result.scores, result.labels)
    if is_main_process():
        record = {"checkpoint": os.path.abspath(args.resume), "epoch": checkpoint.get("epoch", 0),
                  "split": test_set.split, "loss": result.loss, **metrics,
                  **describe_run(args, test_set, world_size, device)}
        log = report_split(args, test_set, metrics, record, args.resume,
                           f"eval_{test_set.split}.jsonl", f"eval_{test_set.split}.md")
        print(f"{test_set.split} loss {result.loss:.4f}; written to {log} and "
              f"{log.removesuffix('.jsonl')}.md")
    if datasets.submission is not None:
        score_submission(model, loss_fn, datasets.submission, args, device, write_submission,
                         amp_dtype, os.path.join(args.checkpoint_dir, "eval_submission"))
    return metrics


def restore_training(args, checkpoint, optimizer, scaler):
    """(first epoch, best mAP so far, run id) of a run: a new one, or the one --resume continues
    (optimizer and scaler state restored). Continued in another folder, a run is a new branch
    whose model_best is the best of its own epochs."""
    if not args.resume:
        if args.init_from and is_main_process():
            print(f"starting from the trunk and auto-encoder weights of {args.init_from}")
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


def non_finite_loss_advice(error, folder):
    last = os.path.join(folder, CHECKPOINT)
    if os.path.isfile(last):
        return DSDLError(f"{error} {last} is intact: lower --lr and continue with --resume {last}")
    return DSDLError(f"{error} No epoch was saved yet: start again with a lower --lr")


def save_epoch(state, folder, is_best):
    # The best model first: a run killed between the two writes redoes this epoch on resume
    # and so writes both again; the other order would lose this epoch's best.
    if is_best:
        save_checkpoint(state, os.path.join(folder, BEST))
    save_checkpoint(state, os.path.join(folder, CHECKPOINT))


def train(args, model, datasets, checkpoint, device, world_size, write_submission):
    """The release's training: each epoch trains, steps the schedule, evaluates the test split,
    reports and saves (model_best when the test mAP improves); then the best model scores the
    submission split, if there is one."""
    main_process = is_main_process()
    say = print if main_process else (lambda *_, **__: None)  # only rank 0 prints and writes
    folder, test_set = args.checkpoint_dir, datasets.test
    amp_dtype, scaler = mixed_precision(device, args.amp)
    loss_fn = DSDLLoss(args.lambd, args.beta)
    train_model = model  # what the training step calls: DDP-wrapped under torchrun
    if torch.distributed.is_initialized():
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameter_groups(args.lr, args.lrp), lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    start_epoch, best_score, run_id = restore_training(args, checkpoint, optimizer, scaler)
    scheduler = step_schedule(optimizer, model, args, start_epoch)
    train_loader = make_loader(datasets.train, args.batch_size, args.workers, args.seed, device,
                               shuffle=True)
    test_loader = make_loader(test_set, args.batch_size, args.workers, args.seed, device, shuffle=False)
    described = describe_run(args, test_set, world_size, device) if main_process else {}
    classes = [str(name) for name in test_set.classes]
    say(f"training on {len(datasets.train)} {datasets.train.split} images, evaluating on "
        f"{len(test_set)} {test_set.split} images; {learning_rates(optimizer)}")
    metrics = None
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        set_epoch(train_loader, epoch, args.seed)  # a resumed run draws the same batches and crops
        try:
            train_loss = train_one_epoch(train_model, loss_fn, optimizer, train_loader, device,
                                         epoch, args.max_grad_norm, amp_dtype, scaler,
                                         args.channels_last)
        except NonFiniteLoss as error:
            raise non_finite_loss_advice(error, folder) from error
        scheduler.step()
        share_rank_zero_buffers(model)  # the unwrapped model: the processes' shares differ
        result = evaluate(model, loss_fn, test_loader, device, amp_dtype, args.channels_last)
        metrics = compute_metrics(result.scores, result.labels)
        is_best = metrics["mAP"] > best_score  # False for an undefined (NaN) mAP
        best_score = metrics["mAP"] if is_best else best_score
        seconds = time.perf_counter() - started
        if main_process:
            record = {"epoch": epoch + 1, "split": test_set.split, "loss": result.loss,
                      "train_loss": train_loss, "epoch_seconds": seconds, **metrics,
                      "classes": classes, **described}
            log = report_split(args, test_set, metrics, record, "this run", METRICS_LOG,
                               f"results_{test_set.split}.md")
            report.plot_curves(log, folder, classes)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                     "best_score": best_score, "args": vars(args),
                     "classes": classes, "semantics": model.semantics.cpu(),
                     "dataset": dataset_record(datasets), "run_id": run_id,
                     "provenance": described["run"], "epoch_seconds": seconds}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            save_epoch(state, folder, is_best)
        say(report.epoch_line(epoch + 1, args.epochs, train_loss, test_set.split, metrics["mAP"],
                              best_score, seconds, is_best))
        if epoch + 1 in args.epoch_step and epoch + 1 < args.epochs:
            say(f"from epoch {epoch + 2}: {learning_rates(optimizer)}")
    if datasets.submission is not None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process reads the best model once rank 0 wrote it
        best = os.path.join(folder, BEST)
        if os.path.isfile(best):  # the submission comes from the best model, not the last
            load_weights(model, load_checkpoint(best), best)
        score_submission(model, loss_fn, datasets.submission, args, device, write_submission,
                         amp_dtype, folder)
    return metrics


def main(args, datasets_fn, default_embeddings, write_submission=None):
    """Entry point of the main_*.py scripts: a user's mistake ends in one `error:` line
    (exit status 1), Ctrl-C in a line saying how to go on (exit status 130)."""
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    # Ctrl-C reaches the whole process group, loader workers included: they ignore it (this
    # handler does nothing in a forked worker, `ignore_interrupts` once it runs), and in the
    # main process whatever error follows an interrupt is taken for the interrupt.
    INTERRUPTS.clear()
    main_process = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_process:  # a loader worker, forked with this handler: ignore it
            return
        INTERRUPTS.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        run(args, datasets_fn, default_embeddings, write_submission)
    except (KeyboardInterrupt, Exception) as error:
        if not (INTERRUPTS or isinstance(error, KeyboardInterrupt)):
            if not isinstance(error, DSDLError):
                raise
            if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank stops with it
                print(f"error: {user_message(error)}", file=sys.stderr)
            sys.exit(1)
        if args.evaluate:
            print("\ninterrupted; the evaluation did not finish: run the same command again",
                  file=sys.stderr)
        else:
            print(f"\ninterrupted; {resume_advice(args.checkpoint_dir or args.run_folder)}",
                  file=sys.stderr)
        sys.exit(130)
    finally:
        INTERRUPTS.clear()
        signal.signal(signal.SIGINT, previous)
        warnings.formatwarning = formatwarning
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
