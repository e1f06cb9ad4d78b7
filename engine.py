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
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import ARCHS, DSDL, DSDLLoss
from util import plot_curves, read_metrics  # noqa: F401 (read_metrics: engine.read_metrics)
from util import (DSDLError, format_metrics, compute_metrics, load_embeddings, results_table,
                  standard_embeddings)

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
METRICS_LOG = "metrics.jsonl"
# Arguments that may change between a run and its resumption without changing the method.
RUNTIME_ARGS = {"data", "resume", "evaluate", "epochs", "workers", "device", "checkpoint_dir"}


def default_workers():
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def get_args_parser(description, **defaults):
    """Every flag of the entry scripts; each script sets its dataset's defaults."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="dataset root; the dataset is downloaded there when absent")
    parser.add_argument("--image-size", type=int, default=448, help="input side in pixels")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=200, help="total number of epochs")
    parser.add_argument("--epoch_step", type=int, nargs="+", default=[40],
                        help="epochs at which every learning rate is multiplied by 0.1")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the dictionary (W1, W2)")
    parser.add_argument("--lrp", type=float, default=0.1, help="the CNN trunk learns at lr * lrp")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=10.0,
                        help="total gradient norm is clipped to this before each step")
    parser.add_argument("--lambd", type=float, default=10.0,
                        help="ridge regulariser of the coefficients, also the weight of ||A||")
    parser.add_argument("--beta", type=float, default=1e-4,
                        help="weight of the reconstruction and sparsity terms of the loss")
    parser.add_argument("-e", "--evaluate", action="store_true",
                        help="only evaluate the checkpoint given by --resume")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="checkpoint to continue training from (or to evaluate with -e)")
    parser.add_argument("-j", "--workers", type=int, default=default_workers(),
                        help="data-loading processes")
    parser.add_argument("--arch", default="resnet101", choices=ARCHS)
    parser.add_argument("--no-pretrained", action="store_true",
                        help="start the trunk from random weights instead of ImageNet")
    parser.add_argument("--embeddings", default=None, metavar="PATH",
                        help="C x 300 class vectors (.pkl or .npy); default: the standard GloVe "
                             "file, downloaded (md5 checked) into data/")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
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
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise DSDLError(f"could not write checkpoint {path} ({error}); the previous checkpoint "
                        f"there is intact. Free disk space and resume with --resume {path}.") from error


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
            what = {"semantics": "classes x 300", "W1": "300 x 1024",
                    "W2": f"1024 x feature size ({model.feature_dim} for {model.arch})"}
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


def train_one_epoch(model, loss_fn, optimizer, loader, device, epoch, max_grad_norm):
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"train {epoch + 1}", leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for batch, (images, labels, _) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = training_targets(labels).to(device, non_blocking=True)
        output = model(images)
        loss = loss_fn(output, targets)
        value = loss.item()
        if not math.isfinite(value):
            raise DSDLError(f"the loss became {value} at epoch {epoch + 1}, batch {batch + 1}; "
                            f"stopping without taking this step. The last checkpoint is intact; "
                            f"resume from it with a lower --lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        total += value * images.shape[0]
        count += images.shape[0]
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{count / (time.perf_counter() - start):.1f}")
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model, loss_fn, loader, device):
    """Scores (N x C), labels (N x C) and ids of the whole split, and the mean loss.

    A split without labels (`dataset.labelled` false, VOC 2012 test) gets scores only: loss NaN.
    """
    model.eval()
    labelled = getattr(loader.dataset, "labelled", True)
    scores, labels, ids = [], [], []
    total, count = 0.0, 0
    bar = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for images, batch_labels, batch_ids in bar:
        output = model(images.to(device, non_blocking=True))
        if labelled:
            loss = loss_fn(output, training_targets(batch_labels).to(device))
            total += loss.item() * images.shape[0]
        count += images.shape[0]
        scores.append(output.scores.float().cpu())
        labels.append(batch_labels)
        ids.extend(batch_ids.tolist() if torch.is_tensor(batch_ids) else batch_ids)  # COCO: ints
        bar.set_postfix(img_s=f"{count / (time.perf_counter() - start):.1f}")
    return {"scores": torch.cat(scores).numpy(), "labels": torch.cat(labels).numpy(),
            "ids": ids, "loss": total / max(count, 1) if labelled else math.nan}


def log_metrics(path, record):
    """Append one JSON line (NaN, e.g. an undefined AP, is written as null)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    with open(path, "a") as f:
        f.write(json.dumps({key: clean(value) for key, value in record.items()}) + "\n")


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


def make_loader(dataset, args, device, shuffle):
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle,
                      num_workers=args.workers, pin_memory=device.type == "cuda",
                      persistent_workers=args.workers > 0,
                      generator=torch.Generator().manual_seed(args.seed))


def check_args(args):
    """Mistakes in the command line, found before any dataset is loaded or downloaded."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DSDLError(f"--device {args.device}, but no CUDA GPU is available; pass --device cpu")
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


def submit(model, loss_fn, dataset, args, device, write_submission):
    """Score a split without labels and write the evaluation server's files (VOC 2012 test)."""
    result = evaluate(model, loss_fn, make_loader(dataset, args, device, shuffle=False), device)
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
    device = torch.device(args.device)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    classes = list(test_set.classes)
    if checkpoint is not None and checkpoint.get("classes") not in (None, classes):
        raise DSDLError(f"{args.resume} was trained on {len(checkpoint['classes'])} classes "
                        f"({', '.join(checkpoint['classes'][:4])}, ...), but this dataset has "
                        f"{len(classes)} ({', '.join(classes[:4])}, ...)")
    torch.manual_seed(args.seed)
    semantics = semantics_for(args, classes, checkpoint, default_embeddings)
    model = DSDL(len(classes), semantics, args.lambd, args.arch,
                 pretrained=not args.no_pretrained and checkpoint is None)
    if checkpoint is not None:
        load_weights(model, checkpoint, args.resume)
    model.to(device)
    loss_fn = DSDLLoss(args.lambd, args.beta)
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    log_path = os.path.join(args.checkpoint_dir, METRICS_LOG)
    test_loader = make_loader(test_set, args, device, shuffle=False)

    def test(epoch, train_loss=None):
        result = evaluate(model, loss_fn, test_loader, device)
        if not getattr(test_set, "labelled", True):
            print(f"epoch {epoch}: {test_set.split} has no labels; {len(result['ids'])} images "
                  f"scored, no metrics")
            return None
        metrics = compute_metrics(result["scores"], result["labels"])
        print(f"epoch {epoch}: test loss {result['loss']:.4f}\n" + format_metrics(metrics, classes))
        log_metrics(log_path, {"epoch": epoch, "split": test_set.split, "loss": result["loss"],
                               "train_loss": train_loss, **metrics})
        report_table(metrics, classes, test_set, args, epoch)
        plot_curves(log_path, args.checkpoint_dir, classes)
        return metrics

    if args.evaluate:
        metrics = test(checkpoint.get("epoch", 0))
        if submission_set is not None:
            submit(model, loss_fn, submission_set, args, device, write_submission)
        return metrics

    optimizer = torch.optim.SGD(model.parameter_groups(args.lr, args.lrp), lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.epoch_step, gamma=0.1)
    start_epoch, best_score = 0, -math.inf
    if checkpoint is not None:
        if "optimizer" in checkpoint:
            warn_changed_args(checkpoint, args)
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch = checkpoint.get("epoch", 0)
        best_score = float(checkpoint.get("best_score", -math.inf))  # the release's is a tensor
        print(f"resumed from {args.resume} at epoch {start_epoch} (best mAP {best_score:.2f})")
    train_loader = make_loader(train_set, args, device, shuffle=True)
    metrics = None
    for epoch in range(start_epoch, args.epochs):
        # Seeding from the epoch makes a resumed run draw the same batches and crops.
        torch.manual_seed(args.seed + epoch)
        train_loader.generator.manual_seed(args.seed + epoch)
        lrs = ", ".join(f"{group['lr']:g}" for group in optimizer.param_groups)
        print(f"epoch {epoch + 1}/{args.epochs}, learning rates {lrs}")
        train_loss = train_one_epoch(model, loss_fn, optimizer, train_loader, device, epoch,
                                     args.max_grad_norm)
        scheduler.step()
        metrics = test(epoch + 1, train_loss)
        is_best = metrics["mAP"] > best_score
        best_score = max(best_score, metrics["mAP"])
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                 "best_score": best_score, "args": vars(args), "classes": classes,
                 "semantics": model.semantics.cpu()}
        save_checkpoint(state, os.path.join(args.checkpoint_dir, CHECKPOINT))
        if is_best:
            save_checkpoint(state, os.path.join(args.checkpoint_dir, BEST))
        print(f"train loss {train_loss:.4f}, test mAP {metrics['mAP']:.2f}, best {best_score:.2f}")
    if submission_set is not None:
        best = os.path.join(args.checkpoint_dir, BEST)
        if os.path.isfile(best):  # the submission comes from the best model, not the last
            load_weights(model, load_checkpoint(best), best)
        submit(model, loss_fn, submission_set, args, device, write_submission)
    return metrics


def main(args, train_set_fn, test_set_fn, default_embeddings, submission_set_fn=None,
         write_submission=None):
    """Entry point of the main_*.py scripts: user errors are printed, not raised.

    `submission_set_fn` gives a split without labels (VOC 2012 test) that the best model scores
    at the end, and `write_submission(scores, ids, classes, folder)` writes those scores.
    """
    try:
        check_args(args)
        train_set = None if args.evaluate else train_set_fn(args)
        submission_set = submission_set_fn(args) if submission_set_fn else None
        run(args, train_set, test_set_fn(args), default_embeddings, submission_set,
            write_submission)
    except DSDLError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
