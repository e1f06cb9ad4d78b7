"""The training and evaluation loop shared by every dataset (main_*.py only wire data and defaults)."""
import argparse
import json
import math
import os
import pickle
import sys
import time
import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

from models import ARCHS, DSDL, DSDLLoss
from util import read_metrics  # noqa: F401 (tests and scripts read the log as engine.read_metrics)
from util import (DSDLError, format_metrics, compute_metrics, init_distributed, is_main_process,
                  load_embeddings, normalize_on_device, plot_curves, rank_zero_first,
                  results_table, standard_embeddings)

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
METRICS_LOG = "metrics.jsonl"
# Arguments that may change between a run and its resumption without changing the method.
RUNTIME_ARGS = {"data", "resume", "evaluate", "epochs", "workers", "device", "checkpoint_dir",
                "amp", "channels_last", "compile", "fast_pipeline",
                "train_csv", "test_csv", "images"}  # main_custom.py: where the files are


def default_workers():
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def get_args_parser(description, **defaults):
    """Every flag of the entry scripts; each script sets its dataset's defaults."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="dataset root; the dataset is downloaded there when absent")
    parser.add_argument("--image-size", type=int, default=448, help="input side in pixels")
    parser.add_argument("-b", "--batch-size", type=int, default=32,
                        help="global batch: under torchrun it is divided over the processes")
    parser.add_argument("--epochs", type=int, default=200, help="total number of epochs")
    parser.add_argument("--epoch_step", type=int, nargs="+", default=[40],
                        help="epochs at which every learning rate is multiplied by 0.1")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the dictionary (W1, W2)")
    parser.add_argument("--lrp", type=float, default=0.1, help="the CNN trunk learns at lr * lrp")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    parser.add_argument("--max-grad-norm", type=float, default=10.0,
                        help="total gradient norm is clipped to this before each step")
    parser.add_argument("--lambd", type=float, default=10.0,
                        help="ridge regulariser of the coefficients, also the weight of ||A||")
    parser.add_argument("--beta", type=float, default=1e-4,
                        help="weight of the reconstruction and sparsity terms of the loss")
    parser.add_argument("-e", "--evaluate", action="store_true",
                        help="only evaluate the checkpoint given by --resume")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="checkpoint to continue training from (or to evaluate with -e): "
                             "this project's or one of the authors' released checkpoints")
    parser.add_argument("-j", "--workers", type=int, default=default_workers(),
                        help="data-loading processes")
    parser.add_argument("--arch", default="resnet101", choices=ARCHS, help="torchvision ResNet trunk")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="start the trunk from random weights instead of ImageNet")
    parser.add_argument("--embeddings", default=None, metavar="PATH",
                        help="C x 300 class vectors (.pkl or .npy); default: the standard GloVe "
                             "file, downloaded (md5 checked) into data/")
    parser.add_argument("--checkpoint-dir", default="checkpoints",
                        help="where checkpoints, metrics.jsonl, tables and plots are written")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (under torchrun each process takes its LOCAL_RANK's GPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the initialisation, and per epoch the order of the images and "
                             "each image's crop and flip")
    speed = parser.add_argument_group(
        "speed", "off by default: the defaults train exactly as the release (float32, PIL pipeline)")
    speed.add_argument("--amp", action="store_true",
                       help="mixed precision: bf16 where supported, else fp16 with a gradient scaler; "
                            "the dictionary, the C x C solve and the loss stay float32")
    speed.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the trunk (falls back to eager with a warning)")
    speed.add_argument("--fast-pipeline", action="store_true",
                       help="one resize instead of two and uint8 batches normalised on the device: "
                            "the same crops, pixels within 0.6 grey levels on average of the release's")
    speed.add_argument("--sync-bn", action="store_true",
                       help="synchronise BatchNorm statistics across processes (torchrun)")
    parser.set_defaults(**defaults)
    return parser


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        # torch.save reports a failed write (disk full) as a RuntimeError raised from the OSError.
        cause = error.__context__ if isinstance(error.__context__, OSError) else error
        if os.path.exists(temporary):
            os.remove(temporary)
        raise DSDLError(f"could not write checkpoint {path} ({cause}); the previous checkpoint "
                        f"there is intact. Free disk space and resume with --resume {path}.") from error
    remove_stale_temporaries(path)


def remove_stale_temporaries(path):
    """Delete `path.tmp<pid>` files left by runs that were killed while writing `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    for leftover in os.listdir(folder):
        pid = leftover[len(name) + 4:]
        if not (leftover.startswith(name + ".tmp") and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # a live process (another run in this folder) keeps its file
        except ProcessLookupError:
            os.remove(os.path.join(folder, leftover))
        except OSError:  # PermissionError: the pid belongs to someone else's live process
            pass


def load_checkpoint(path):
    """torch.load with weights_only=True: loading a checkpoint never runs code."""
    if not os.path.isfile(path):
        raise DSDLError(f"--resume {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise DSDLError(f"refusing to load {path}: it needs arbitrary unpickling, which can run "
                        f"code ({str(error).splitlines()[0]}). Only plain weight checkpoints "
                        f"are accepted.") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise DSDLError(f"cannot read checkpoint {path} ({error}); the file is truncated or "
                        f"not a PyTorch checkpoint.") from error
    if not isinstance(checkpoint, dict) or not ("model" in checkpoint or "state_dict" in checkpoint):
        raise DSDLError(f"{path} is not a DSDL checkpoint (no 'model' or 'state_dict' entry)")
    return checkpoint


def checkpoint_weights(checkpoint):
    """The model's state dict from this project's format or the release's (spec section 9)."""
    weights = checkpoint.get("model", checkpoint.get("state_dict"))
    return {key.removeprefix("module."): value for key, value in weights.items()}


def load_weights(model, checkpoint, path):
    """Load weights, saying which shape differs (classes, feature size) instead of a traceback."""
    weights = checkpoint_weights(checkpoint)
    expected = model.state_dict()
    if "semantics" not in weights:  # the release's checkpoints store no semantics
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
    """(autocast dtype or None, GradScaler or None) for --amp on this device."""
    if not enabled:
        return None, None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, None
        return torch.float16, torch.amp.GradScaler("cuda")  # fp16 needs loss scaling
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16, None
    warnings.warn("--amp: this CPU has no bf16 units, and bf16 there is many times slower than "
                  "float32; running in float32")
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


def train_one_epoch(model, loss_fn, optimizer, loader, device, epoch, max_grad_norm,
                    amp_dtype=None, scaler=None, channels_last=False):
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
            raise DSDLError(f"the loss became {value} at epoch {epoch + 1}, batch {batch + 1}; "
                            f"stopping without taking this step. The last checkpoint is intact; "
                            f"resume from it with a lower --lr.")
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
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model, loss_fn, loader, device, amp_dtype=None, channels_last=False):
    """Scores (N x C), labels (N x C) and ids of the whole split, and the mean loss.

    A split without labels (`dataset.labelled` false, VOC 2012 test) gets scores only: loss NaN.
    Under torchrun each process scores its share (a Subset, no padding) and the shares are
    gathered back into the dataset's order, so every image counts exactly once.
    """
    model.eval()
    dataset = loader.dataset.dataset if isinstance(loader.dataset, Subset) else loader.dataset
    labelled = getattr(dataset, "labelled", True)
    scores, labels, ids = [], [], []
    total, count = 0.0, 0
    bar = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True,
               disable=not is_main_process())
    start = time.perf_counter()
    for images, batch_labels, batch_ids in bar:
        with autocast(device, amp_dtype):
            output = model(prepare_images(images, device, channels_last))
        if labelled:
            loss = loss_fn(output, training_targets(batch_labels.to(device, non_blocking=True)))
            total += loss.detach() * images.shape[0]  # stays on the device: no sync per batch
        count += images.shape[0]
        scores.append(output.scores.float())
        labels.append(batch_labels)
        ids.extend(batch_ids.tolist() if torch.is_tensor(batch_ids) else batch_ids)  # COCO: ints
        bar.set_postfix(img_s=f"{count / (time.perf_counter() - start):.1f}")
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
    return {"scores": scores, "labels": labels, "ids": ids,
            "loss": total / max(count, 1) if labelled else math.nan}


def log_metrics(path, record):
    """Append one JSON line (NaN, e.g. an undefined AP, is written as null)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    drop_partial_last_line(path)
    with open(path, "a") as f:
        f.write(json.dumps({key: clean(value) for key, value in record.items()}) + "\n")


def drop_partial_last_line(path):
    """Cut a line that a killed run left half-written, so the next record starts a line of its own.

    Its epoch has no checkpoint yet (the log is written first), so the resumed run logs it again.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------

def semantics_for(args, classes, checkpoint, default_embeddings):
    """The C x 300 class vectors: from our checkpoint, else --embeddings, else the standard file."""
    if checkpoint is not None and "semantics" in checkpoint:
        return checkpoint["semantics"]
    if not args.embeddings and default_embeddings is None:
        raise DSDLError("this dataset has no standard class vectors: pass --embeddings PATH, a "
                        "C x 300 file in the class order (make_embeddings.py writes one)")
    path = args.embeddings or standard_embeddings(default_embeddings)
    return load_embeddings(path, num_classes=len(classes))


def warn_changed_args(checkpoint, args):
    stored = checkpoint.get("args") or {}
    changed = [f"{key}: {stored[key]!r} -> {value!r}" for key, value in vars(args).items()
               if key in stored and key not in RUNTIME_ARGS and stored[key] != value]
    if changed:
        warnings.warn("resuming with other hyper-parameters than the checkpoint's:\n  "
                      + "\n  ".join(changed), stacklevel=2)


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


def make_loader(dataset, args, device, shuffle):
    """Training loader (shuffled) or evaluation loader; under torchrun each process loads its share.

    The training share comes from a DistributedSampler; the evaluation share is every
    world_size-th image, without the sampler's padding. Call `set_epoch` before each epoch.
    """
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    sampler = None
    if shuffle:
        dataset = EpochSeeded(dataset, args.seed)
        sampler = (DistributedSampler(dataset, shuffle=True, seed=args.seed) if world_size > 1
                   else RandomSampler(dataset, generator=torch.Generator()))
    elif world_size > 1:
        dataset = Subset(dataset, range(torch.distributed.get_rank(), len(dataset), world_size))
    return DataLoader(dataset, batch_size=args.batch_size // world_size, sampler=sampler,
                      num_workers=args.workers, pin_memory=device.type == "cuda",
                      persistent_workers=args.workers > 0)


def set_epoch(loader, epoch, seed):
    """Make the training loader's order and augmentation those of `epoch` (seeded from it)."""
    loader.dataset.epoch.fill_(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # shuffles with seed + epoch, the same on every process
    else:
        loader.sampler.generator.manual_seed(seed + epoch)


def step_schedule(optimizer, model, args, start_epoch):
    """The release's step decay (x0.1 at each of --epoch_step), positioned at `start_epoch`.

    The hyper-parameters always come from the command line, also when resuming (so a changed
    --lr or --epoch_step takes effect, with a warning), and a resumed run, or one that starts
    from the release's checkpoints (which have no optimizer state), decays at the same epochs
    as an uninterrupted one.
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


def check_device(device):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DSDLError(f"--device {device}, but no CUDA GPU is available; pass --device cpu")


def check_args(args):
    """Mistakes in the command line, found before any dataset is loaded or downloaded."""
    check_device(args.device)
    if args.evaluate and not args.resume:
        raise DSDLError("-e/--evaluate needs the checkpoint to evaluate: --resume PATH")
    if args.resume and not os.path.isfile(args.resume):
        raise DSDLError(f"--resume {args.resume}: no such file")


def report_table(metrics, classes, dataset, args, epoch):
    """Print the evaluation as the paper's table (with its row in its setting); save it as Markdown."""
    benchmark = getattr(dataset, "benchmark", None)
    source = args.resume if args.evaluate else "this run"
    title = (f"DSDL {args.arch} at {args.image_size} px, epoch {epoch} of {source}, on "
             f"{benchmark or type(dataset).__name__} {dataset.split}")
    table = results_table(metrics, classes, benchmark, args.arch, title)
    path = os.path.join(args.checkpoint_dir, f"results_{dataset.split}.md")
    with open(path, "w") as f:
        f.write(table + "\n")
    print(f"{table}\n(saved as {path})")


def submit(model, loss_fn, dataset, args, device, write_submission, amp_dtype=None):
    """Score a split without labels and write the evaluation server's files (VOC 2012 test)."""
    result = evaluate(model, loss_fn, make_loader(dataset, args, device, shuffle=False), device,
                      amp_dtype, args.channels_last)
    if not is_main_process():
        return None
    folder, archive = write_submission(result["scores"], result["ids"], list(dataset.classes),
                                       args.checkpoint_dir)
    print(f"evaluation-server files for {len(result['ids'])} {dataset.split} images: {folder}\n"
          f"upload {archive} to the evaluation server")
    return archive


def run(args, train_set, test_set, default_embeddings, submission_set=None, write_submission=None):
    """Train (or with -e only evaluate); `submission_set` is then scored by the best model."""
    check_args(args)
    if not args.evaluate and not getattr(test_set, "labelled", True):
        raise DSDLError(f"the {test_set.split} split has no labels, so it cannot select the best "
                        f"model; evaluate every epoch on a labelled split")
    rank, world_size, device = init_distributed(args.device)
    main_process = rank == 0
    say = print if main_process else (lambda *_, **__: None)  # only rank 0 prints and writes
    if args.batch_size % world_size:
        raise DSDLError(f"--batch-size {args.batch_size} (the global batch) does not divide over "
                        f"{world_size} processes; pass a multiple of {world_size}")
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    classes = [str(name) for name in test_set.classes]  # plain str: checkpoints load weights_only
    if checkpoint is not None and checkpoint.get("classes") not in (None, classes):
        raise DSDLError(f"{args.resume} was trained on {len(checkpoint['classes'])} classes "
                        f"({', '.join(checkpoint['classes'][:4])}, ...), but this dataset has "
                        f"{len(classes)} ({', '.join(classes[:4])}, ...)")
    torch.manual_seed(args.seed)
    with rank_zero_first():  # downloads (class vectors, ImageNet weights) happen once
        semantics = semantics_for(args, classes, checkpoint, default_embeddings)
        model = DSDL(len(classes), semantics, args.lambd, args.arch,
                     pretrained=not args.no_pretrained and checkpoint is None)
    if checkpoint is not None:
        load_weights(model, checkpoint, args.resume)
    model.to(device)
    amp_dtype, scaler = mixed_precision(device, args.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_trunk(model.features)
    train_model = model  # what the training step calls: DDP-wrapped under torchrun
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = DSDLLoss(args.lambd, args.beta)
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    log_path = os.path.join(args.checkpoint_dir, METRICS_LOG)
    test_loader = make_loader(test_set, args, device, shuffle=False)

    def test(epoch, train_loss=None):
        # The unwrapped model: DDP's forward would synchronise buffers, and the shares differ.
        # DDP copies rank 0's buffers before each training forward only: after the last step
        # every rank has its own BatchNorm statistics, so take rank 0's (the ones it saves).
        if world_size > 1:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        result = evaluate(model, loss_fn, test_loader, device, amp_dtype, args.channels_last)
        if not getattr(test_set, "labelled", True):
            say(f"epoch {epoch}: {test_set.split} has no labels; {len(result['ids'])} images "
                  f"scored, no metrics")
            return None
        metrics = compute_metrics(result["scores"], result["labels"])
        if not main_process:
            return metrics
        print(f"epoch {epoch}: test loss {result['loss']:.4f}\n" + format_metrics(metrics, classes))
        log_metrics(log_path, {"epoch": epoch, "split": test_set.split, "loss": result["loss"],
                               "train_loss": train_loss, **metrics})
        report_table(metrics, classes, test_set, args, epoch)
        plot_curves(log_path, args.checkpoint_dir, classes)
        return metrics

    if args.evaluate:
        metrics = test(checkpoint.get("epoch", 0))
        if submission_set is not None:
            submit(model, loss_fn, submission_set, args, device, write_submission, amp_dtype)
        return metrics

    optimizer = torch.optim.SGD(model.parameter_groups(args.lr, args.lrp), lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    start_epoch, best_score = 0, -math.inf
    if checkpoint is not None:
        if "optimizer" in checkpoint:
            warn_changed_args(checkpoint, args)
            optimizer.load_state_dict(checkpoint["optimizer"])  # the momentum buffers
            if scaler is not None and "scaler" in checkpoint:
                scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint.get("epoch", 0)
        best_score = float(checkpoint.get("best_score", -math.inf))  # the release's is a tensor
        say(f"resumed from {args.resume} at epoch {start_epoch} (best mAP {best_score:.2f})")
    scheduler = step_schedule(optimizer, model, args, start_epoch)
    train_loader = make_loader(train_set, args, device, shuffle=True)
    metrics = None
    for epoch in range(start_epoch, args.epochs):
        set_epoch(train_loader, epoch, args.seed)  # a resumed run draws the same batches and crops
        lrs = ", ".join(f"{group['lr']:g}" for group in optimizer.param_groups)
        say(f"epoch {epoch + 1}/{args.epochs}, learning rates {lrs}")
        train_loss = train_one_epoch(train_model, loss_fn, optimizer, train_loader, device, epoch,
                                     args.max_grad_norm, amp_dtype, scaler, args.channels_last)
        scheduler.step()
        metrics = test(epoch + 1, train_loss)
        is_best = metrics["mAP"] > best_score
        best_score = max(best_score, metrics["mAP"])
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                 "best_score": best_score, "args": vars(args), "classes": classes,
                 "semantics": model.semantics.cpu()}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if main_process:
            # The best model first: a run killed between the two writes redoes this epoch on
            # resume and so writes both again; the other order would lose this epoch's best.
            if is_best:
                save_checkpoint(state, os.path.join(args.checkpoint_dir, BEST))
            save_checkpoint(state, os.path.join(args.checkpoint_dir, CHECKPOINT))
        say(f"train loss {train_loss:.4f}, test mAP {metrics['mAP']:.2f}, best {best_score:.2f}")
    if submission_set is not None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process reads the best model once rank 0 wrote it
        best = os.path.join(args.checkpoint_dir, BEST)
        if os.path.isfile(best):  # the submission comes from the best model, not the last
            load_weights(model, load_checkpoint(best), best)
        submit(model, loss_fn, submission_set, args, device, write_submission, amp_dtype)
    return metrics


def main(args, train_set_fn, test_set_fn, default_embeddings, submission_set_fn=None,
         write_submission=None):
    """Entry point of the main_*.py scripts: user errors are printed, not raised.

    `submission_set_fn` gives a split without labels (VOC 2012 test) that the best model scores
    at the end, and `write_submission(scores, ids, classes, folder)` writes those scores.
    """
    try:
        check_args(args)
        init_distributed(args.device)
        with rank_zero_first():  # rank 0 downloads and extracts the data first
            train_set = None if args.evaluate else train_set_fn(args)
            test_set = test_set_fn(args)
            submission_set = submission_set_fn(args) if submission_set_fn else None
        run(args, train_set, test_set, default_embeddings, submission_set, write_submission)
    except DSDLError as error:
        message = str(error)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its own message
            message = message.rsplit("DSDLError: ", 1)[-1].strip()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
