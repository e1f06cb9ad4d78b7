"""The training and evaluation loop shared by every dataset and model (main_*.py wire data and
defaults, models.py builds the model and its loss).

`run` reads as the method trains: check the command line, read the checkpoint the run starts
from, claim the run folder, build the data and the model, then `train`: for each epoch train,
step the schedule, evaluate, report and save. `-e` evaluates once and writes only
eval_<split>.* files. Checkpoints are written and read in checkpoints.py, the run folder and
the scripts' errors are runs.py's, data loading is dataset.py's and the speed options speed.py's.
"""
import contextlib
import math
import os
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import models
import recipes
import report
from checkpoints import (BEST, checkpoint_state, dataset_record, load_checkpoint, load_weights,
                         restore_training, save_epoch)
from dataset import (Datasets, has_partial_labels, labelled_loss, make_loader, set_epoch,
                     split_of)
from distributed import (gather_shares, init_distributed, is_main_process, mean_over_processes,
                         rank_zero_first, share_rank_zero_buffers)
from embeddings import class_vectors
from runs import (NonFiniteLoss, RunLock, check_datasets, check_zero_shot,
                  claim_run_folder, non_finite_loss_advice, nothing_left_to_train,
                  one_image_batches, run_command,
                  start_from, stop_if_interrupted)
from speed import (autocast, compile_trunk, mixed_precision, numerics, on_device,
                   prepare_images, warn_if_compile_changed)
from util import DSDLError, compute_metrics, top_k_metrics, tune_thresholds


def main(args, datasets_fn, default_embeddings, write_submission=None):
    """Entry point of the main_*.py scripts (runs.run_command: one `error:` line for a user's
    mistake, a resume command after Ctrl-C)."""
    return run_command(lambda: run(args, datasets_fn, default_embeddings, write_submission), args)


def run(args, datasets_fn, default_embeddings, write_submission=None):
    """Train (or with -e only evaluate). `datasets_fn(args)` returns the `Datasets`; when it
    has a submission split, the best model scores it at the end with `write_submission`."""
    checkpoint = start_from(args)
    recipes.check_recipe(args)
    check_zero_shot(args)
    if nothing_left_to_train(args, checkpoint):
        return None
    rank, world_size, device = init_distributed(args.device)
    if args.sync_bn and world_size > 1 and device.type != "cuda":
        raise DSDLError("--sync-bn needs GPUs (SyncBatchNorm has no CPU implementation); "
                        "drop it on the CPU")
    lock = RunLock(args.checkpoint_dir)
    try:
        with rank_zero_first():  # an error found by rank 0 stops every process
            if rank == 0:
                claim_run_folder(args, checkpoint, lock)
        with rank_zero_first():  # rank 0 downloads and extracts the data first
            datasets = Datasets(*datasets_fn(args))
        # Zero-shot: the split's classes are not the checkpoint's, by design.
        check_datasets(datasets, None if args.zero_shot else checkpoint, args)
        with numerics(device, args.tf32, args.deterministic):
            model = build_model(args, datasets, checkpoint, default_embeddings, device, world_size)
            if args.evaluate:
                return evaluate_checkpoint(args, model, datasets, checkpoint, device, world_size,
                                           write_submission)
            return train(args, model, datasets, checkpoint, device, world_size, write_submission)
    finally:
        lock.release()


def build_model(args, datasets, checkpoint, default_embeddings, device, world_size):
    """The model on its device, with the speed options (speed.on_device): the checkpoint's with
    --resume and -e (models.from_checkpoint), else a new one (with --init-from, that run's
    class-independent weights); its constructor sees the training split and the input size
    (models.ModelContext)."""
    torch.manual_seed(args.seed)
    classes = [str(name) for name in datasets.test.classes]
    with rank_zero_first():  # downloads (class vectors, ImageNet weights) happen once
        semantics = (class_vectors(args, classes, checkpoint, default_embeddings)
                     if models.needs_class_vectors(args.model) else None)
        if args.resume:
            model = models.from_checkpoint(checkpoint, args.resume, args, classes, semantics,
                                           datasets.train, class_independent_only=args.zero_shot,
                                           training=not args.evaluate)
        else:
            context = models.ModelContext(classes, args.image_size, semantics, datasets.train)
            model = models.build_model(args, context,
                                       pretrained=not args.no_pretrained and checkpoint is None)
    if args.init_from:
        loaded = load_weights(model, checkpoint, args.init_from, class_independent_only=True)
        if is_main_process():
            print(f"starting from the {loaded} weights of {args.init_from}")
    return on_device(model, device, args, world_size)


class Training(NamedTuple):
    """What the epochs of a run use, made once by `set_up_training`."""
    loss_fn: Any
    step_model: Any      # what the training step calls: the model, DDP-wrapped under torchrun
    optimizer: Any
    amp_dtype: Any       # --amp's autocast dtype, or None
    scaler: Any          # fp16's gradient scaler, or None
    schedule: Any        # recipes.Schedule
    average: Any         # recipes.WeightAverage (--ema), or None
    train_loader: Any
    selection_loader: Any
    start_epoch: int
    best_score: float
    run_id: str
    board: Any           # report.TensorBoardLog (--tensorboard, rank 0), or None
    data: dict           # what the checkpoints say of the data (checkpoints.dataset_record), rank 0


def set_up_training(args, model, datasets, selection, checkpoint, device, world_size):
    """The loss, optimizer, schedule, weight average and loaders of a run, restored from
    --resume's checkpoint where it continues one."""
    amp_dtype, scaler = mixed_precision(device, args.amp)
    loss_fn = models.build_loss(args)
    step_model = model
    if torch.distributed.is_initialized():
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = recipes.build_optimizer(model, args)
    start_epoch, best_score, run_id = restore_training(args, checkpoint, optimizer, scaler)
    drop_last = (one_image_batches(args, model, len(datasets.train), world_size)
                 or args.compile)  # --compile: one shape to compile
    train_loader = make_loader(datasets.train, args.batch_size, args.workers, args.seed, device,
                               shuffle=True, drop_last=drop_last)
    schedule = recipes.Schedule(optimizer, model, args, start_epoch, len(train_loader))
    warn_if_compile_changed(args, checkpoint, schedule.per_step)
    average = recipes.weight_average(model, args, checkpoint)  # --ema; None without
    if average is not None and args.compile:
        compile_trunk(average.model.trunk)
    board = (report.TensorBoardLog(args.checkpoint_dir, start_epoch)
             if args.tensorboard and is_main_process() else None)
    selection_loader = make_loader(selection, args.batch_size, args.workers, args.seed, device,
                                   shuffle=False)
    data = dataset_record(datasets) if is_main_process() else None  # fingerprints: taken once
    return Training(loss_fn, step_model, optimizer, amp_dtype, scaler, schedule, average,
                    train_loader, selection_loader, start_epoch, best_score, run_id, board, data)


def train(args, model, datasets, checkpoint, device, world_size, write_submission):
    """The release's training: each epoch trains, steps the schedule, evaluates the selection
    split (the test split, as the release did; the validation split when there is one), reports
    and saves (model_best when its mAP improves); then the best model scores the test split once
    (with a validation split) and the submission split (if there is one). With --ema the
    weights' average is evaluated too, and it is what model_best selects and holds."""
    main_process = is_main_process()
    say = print if main_process else (lambda *_, **__: None)  # only rank 0 prints and writes
    selection = datasets.val if datasets.val is not None else datasets.test
    run = set_up_training(args, model, datasets, selection, checkpoint, device, world_size)
    described = report.describe_run(args, selection, world_size, device) if main_process else {}
    say(f"training on {len(datasets.train)} {datasets.train.split} images, evaluating on "
        f"{len(selection)} {selection.split} images; {recipes.learning_rates(run.optimizer, model)}")
    note = report.selection_note(datasets, can_validate=hasattr(args, "val"))
    if note:
        say(note)
    metrics, best_score = None, run.best_score
    for epoch in range(run.start_epoch, args.epochs):
        started = time.perf_counter()
        set_epoch(run.train_loader, epoch, args.seed)  # a resumed run draws the same batches and crops
        rates = {"trunk": run.optimizer.param_groups[0]["lr"],
                 "head": run.optimizer.param_groups[-1]["lr"]}
        counts = {}
        try:
            train_loss = train_one_epoch(run.step_model, run.loss_fn, run.optimizer, run.train_loader,
                                         device, epoch, args.max_grad_norm, run.amp_dtype,
                                         run.scaler, args.channels_last, schedule=run.schedule,
                                         average=run.average, accumulate=args.accumulate,
                                         counts=counts)
        except NonFiniteLoss as error:
            raise non_finite_loss_advice(error, args.checkpoint_dir, args, model) from error
        run.schedule.after_epoch()
        result, extra = evaluate_epoch(model, run.average, run.loss_fn, run.selection_loader,
                                       device, run.amp_dtype, args.channels_last)
        if run.scaler is not None:
            extra["skipped_fp16_steps"] = counts["skipped_steps"]
        # Per-class thresholds are tuned on a validation split only: never on the test split.
        thresholds = (tune_thresholds(result.scores, result.labels)
                      if datasets.val is not None else None)
        metrics = metrics_of(result, device, thresholds)
        is_best = metrics["mAP"] > best_score  # False for an undefined (NaN) mAP
        best_score = metrics["mAP"] if is_best else best_score
        seconds = time.perf_counter() - started
        if main_process:
            record = {"epoch": epoch + 1, "split": selection.split, "loss": result.loss,
                      "train_loss": train_loss, "epoch_seconds": seconds, **metrics, **extra,
                      "classes": [str(name) for name in selection.classes], **described}
            report.log_epoch(args, selection, metrics, record, run.board, rates)
            save_epoch(checkpoint_state(model, run, args, epoch + 1, best_score, described["run"],
                                        seconds, thresholds),
                       args.checkpoint_dir, is_best)
        say(report.epoch_line(epoch + 1, args.epochs, train_loss, selection.split, metrics["mAP"],
                              best_score, seconds, is_best, extra.get("raw_mAP")))
        if extra.get("skipped_fp16_steps"):
            say(f"the fp16 gradient scaler skipped {extra['skipped_fp16_steps']} of "
                f"{len(run.train_loader)} steps of this epoch (gradients out of fp16's range)")
        if not run.schedule.per_step and epoch + 1 in args.epoch_step and epoch + 1 < args.epochs:
            say(f"from epoch {epoch + 2}: {recipes.learning_rates(run.optimizer, model)}")
    if run.board is not None:
        run.board.close()
    score_with_best_model(args, model, run, datasets, device, world_size, write_submission)
    return metrics


def score_with_best_model(args, model, run, datasets, device, world_size, write_submission):
    """After the last epoch, with a validation split or a submission split: the best model
    (loaded into `model`) scores the test split once, and the submission split."""
    if datasets.val is None and datasets.submission is None:
        return
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process reads the best model once rank 0 wrote it
    best_path = os.path.join(args.checkpoint_dir, BEST)
    best = load_checkpoint(best_path) if os.path.isfile(best_path) else None
    if best is not None:  # the final numbers come from the best model, not the last
        load_weights(model, best, best_path)
    if datasets.val is not None:
        score_test_once(args, model, run.loss_fn, datasets, best, device, run.amp_dtype, world_size)
    if datasets.submission is not None:
        score_submission(model, run.loss_fn, datasets.submission, args, device, write_submission,
                         run.amp_dtype, args.checkpoint_dir)


def metrics_of(result, device, thresholds=None):
    """The metrics of an evaluation (util.compute_metrics); on a GPU, the AP's ranking runs there."""
    return compute_metrics(result.scores, result.labels, thresholds,
                           device if device.type == "cuda" else None)


def evaluate_epoch(model, average, loss_fn, loader, device, amp_dtype, channels_last):
    """The evaluation of an epoch, and what its record adds: of the model, or with --ema of the
    weights' average (what is selected and saved), the trained weights' mAP and loss beside."""
    share_rank_zero_buffers(model)  # the unwrapped model: the processes' shares differ
    result = evaluate(model, loss_fn, loader, device, amp_dtype, channels_last)
    if average is None:
        return result, {}
    raw = metrics_of(result, device)
    share_rank_zero_buffers(average.model)
    return (evaluate(average.model, loss_fn, loader, device, amp_dtype, channels_last),
            {"raw_mAP": raw["mAP"], "raw_loss": result.loss})


def score_test_once(args, model, loss_fn, datasets, best, device, amp_dtype, world_size):
    """With a validation split: the best model (loaded) scores the test split, once, with the
    thresholds tuned on the validation split. Its record says that it chose nothing."""
    test, val = datasets.test, datasets.val
    if best is None:
        if is_main_process():
            print(f"no model_best (no mAP was defined on {val.split}): {test.split} is not scored")
        return
    loader = make_loader(test, args.batch_size, args.workers, args.seed, device, shuffle=False)
    result = evaluate(model, loss_fn, loader, device, amp_dtype, args.channels_last)
    metrics = metrics_of(result, device, best.get("thresholds"))
    if is_main_process():
        record = {"checkpoint": os.path.abspath(os.path.join(args.checkpoint_dir, BEST)),
                  "epoch": best.get("epoch", 0), "split": test.split, "loss": result.loss,
                  **metrics, "selected_on": val.split, "used_for_selection": False,
                  **report.describe_run(args, test, world_size, device)}
        report.report_split(args, test, metrics, record, f"model_best, chosen on {val.split}",
                            f"eval_{test.split}.jsonl", f"eval_{test.split}.md")


def evaluate_checkpoint(args, model, datasets, checkpoint, device, world_size, write_submission):
    """-e: score the test split once. The results go to eval_<split>.jsonl and eval_<split>.md
    (of another dataset than the run's: eval_<dataset>_<split>.*), and a submission to
    eval_submission/: beside, never over, what training wrote. The
    checkpoint's per-class thresholds, if it has them, are reported beside the fixed one's;
    --zero-shot adds the top-3 and top-5 precision, recall and F1."""
    amp_dtype, _ = mixed_precision(device, args.amp)
    loss_fn = models.build_loss(args)
    test_set = datasets.test
    loader = make_loader(test_set, args.batch_size, args.workers, args.seed, device, shuffle=False)
    result = evaluate(model, loss_fn, loader, device, amp_dtype, args.channels_last)
    metrics = metrics_of(result, device, None if args.zero_shot else checkpoint.get("thresholds"))
    if args.zero_shot:
        metrics.update(top_k_metrics(result.scores, result.labels))
    if is_main_process():
        record = {"checkpoint": os.path.abspath(args.resume), "epoch": checkpoint.get("epoch", 0),
                  "split": test_set.split, "loss": result.loss, **metrics,
                  **({"zero_shot": True} if args.zero_shot else {}),
                  **report.describe_run(args, test_set, world_size, device)}
        name = report.evaluation_name(test_set, checkpoint)
        log = report.report_split(args, test_set, metrics, record, args.resume, f"{name}.jsonl",
                                  f"{name}.md")
        print(f"{test_set.split} loss {result.loss:.4f}; written to {log} and "
              f"{log.removesuffix('.jsonl')}.md")
    if datasets.submission is not None:
        score_submission(model, loss_fn, datasets.submission, args, device, write_submission,
                         amp_dtype, os.path.join(args.checkpoint_dir, "eval_submission"))
    return metrics


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
# One epoch of training, one evaluation
# --------------------------------------------------------------------------------------------

READ_EVERY = 10  # training steps between two readings of the loss (each makes the host wait)


def train_one_epoch(model, loss_fn, optimizer, loader, device, epoch, max_grad_norm,
                    amp_dtype=None, scaler=None, channels_last=False, *, schedule=None,
                    average=None, accumulate=1, counts=None):
    """One pass over `loader`; returns the mean training loss.

    Each batch is one optimizer step. With `accumulate` N (--accumulate) the batch is split into
    N micro-batches whose gradients, each weighted by its share of the batch, are summed before
    the step; the loss of each is computed on the micro-batch (BatchNorm's statistics and DSDL's
    norms too). After the step: the per-step `schedule` and the weight `average` (--ema).

    The step never makes the host wait for the device: the losses stay on the device and are
    read every READ_EVERY steps and at the end (`check_losses`: printed, and a non-finite loss
    stops the run before the epoch is saved). `counts`, a dict, gets "skipped_steps": the fp16
    steps the gradient scaler skipped.
    """
    model.train()
    partial = has_partial_labels(loader)
    total, count, skipped = 0.0, 0, 0
    bar = tqdm(loader, desc=f"train {epoch + 1}", leave=False, dynamic_ncols=True,
               disable=not is_main_process())
    start = time.perf_counter()
    unread = []  # the losses of the steps taken since the last reading, on the device
    for batch, (images, labels, _) in enumerate(bar):
        optimizer.zero_grad(set_to_none=True)
        parts = list(zip(images.tensor_split(accumulate), labels.tensor_split(accumulate)))
        parts = [(part_images, part_labels) for part_images, part_labels in parts if len(part_images)]
        batch_loss = 0.0
        for part, (part_images, part_labels) in enumerate(parts):
            part_images = prepare_images(part_images, device, channels_last)
            part_labels = part_labels.to(device, non_blocking=True)
            # Under torchrun, the gradients are averaged across processes once, at the last part.
            synced = part == len(parts) - 1 or not isinstance(model, DistributedDataParallel)
            with contextlib.nullcontext() if synced else model.no_sync():
                with autocast(device, amp_dtype):
                    output = model(part_images)
                loss = labelled_loss(loss_fn, output, part_labels, partial)  # float32
                share = len(part_images) / len(images)
                batch_loss = batch_loss + (loss.detach() * share if len(parts) > 1 else loss.detach())
                if len(parts) > 1:
                    loss = loss * share  # the batch's mean
                (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:  # fp16: unscale before clipping
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler is not None:
            scale = scaler.get_scale()  # the scaler's step waits for the device anyway
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale  # the scale drops when a step is skipped
        else:
            optimizer.step()
        if schedule is not None:
            schedule.after_step()
        if average is not None:
            average.update()
        unread.append((batch, len(images), batch_loss))
        if len(unread) == READ_EVERY or batch + 1 == len(loader):
            losses = check_losses(unread, epoch)
            for (_, size, _), value in zip(unread, losses):
                total += value * size
                count += size
            unread = []
            bar.set_postfix(loss=f"{losses[-1]:.4f}",
                            img_s=f"{count / (time.perf_counter() - start):.1f}")
        stop_if_interrupted()
    if counts is not None:
        counts["skipped_steps"] = skipped
    return total / max(count, 1)


def check_losses(unread, epoch):
    """Read the losses of the steps in `unread` ((batch, size, loss on the device) each),
    averaged over the processes; a non-finite one stops the run (NonFiniteLoss)."""
    losses = mean_over_processes(torch.stack([loss for _, _, loss in unread]))
    for (batch, _, _), value in zip(unread, losses):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the loss became {value} at epoch {epoch + 1}, batch {batch + 1}; "
                                f"stopped before this epoch was saved.")
    return losses


class Evaluation(NamedTuple):
    scores: np.ndarray   # N x C float32, the coefficients A of every image of the split, in its order
    labels: np.ndarray   # N x C int8, in {1, 0, -1, -2}: an eighth of int64's memory (Open Images)
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
    dataset = split_of(loader)
    partial = has_partial_labels(loader)
    scores, labels, ids = [], [], []
    total, count = 0.0, 0
    bar = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True,
               disable=not is_main_process())
    start = time.perf_counter()
    for images, batch_labels, batch_ids in bar:
        with autocast(device, amp_dtype):
            output = model(prepare_images(images, device, channels_last))
        if dataset.labelled:
            loss = labelled_loss(loss_fn, output, batch_labels.to(device, non_blocking=True), partial)
            total += loss.detach() * images.shape[0]  # stays on the device: no sync per batch
        count += images.shape[0]
        scores.append(output.scores.float())
        labels.append(batch_labels.to(torch.int8))
        ids.extend(batch_ids.tolist() if torch.is_tensor(batch_ids) else batch_ids)  # COCO: ints
        bar.set_postfix(img_s=f"{count / (time.perf_counter() - start):.1f}")
        stop_if_interrupted()
    return read_evaluation(loader, scores, labels, ids, total, count, dataset.labelled)


def read_evaluation(loader, scores, labels, ids, total, count, labelled):
    """The split's scores, labels, ids and mean loss, read from the device once the last batch
    is scored (the evaluation's one wait for the device), and under torchrun gathered from every
    process in the dataset's order."""
    scores, labels, total = torch.cat(scores), torch.cat(labels), float(total)
    if torch.distributed.is_initialized():
        scores, labels, ids, total, count = gather_shares(
            list(loader.dataset.indices), scores, labels, ids, total, count)
    else:
        scores, labels = scores.cpu().numpy(), labels.numpy()
    return Evaluation(scores, labels, ids, total / max(count, 1) if labelled else math.nan)
