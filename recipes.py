"""Training recipes: the optimizer, the learning-rate schedule and the moving average of the
weights (EMA), each chosen by an option whose default is the release's (SGD, x0.1 steps, no
EMA). With the defaults, what is built here is exactly what the release trains with.

The classification loss (--cls-loss) is chosen where every loss is, in models.build_loss; the
augmentations (--augment, --cutout) where the transforms are, in util.train_transform; the
training step that uses all of them is engine.train_one_epoch.
"""
import copy
import importlib.util
import math
import os
import warnings

import torch

from checkpoints import checkpoint_weights
from util import DSDLError


def check_recipe(args):
    """Refuse a combination of recipe options that would silently not do what it says."""
    asl = [f"--{key.replace('_', '-')}" for key in ("asl_gamma_neg", "asl_gamma_pos", "asl_clip")
           if key in args.given]
    if asl and args.cls_loss != "asl":
        raise DSDLError(f"{' and '.join(asl)} {'apply' if len(asl) > 1 else 'applies'} only with "
                        f"--cls-loss asl; add it, or drop {'them' if len(asl) > 1 else 'it'}")
    if "momentum" in args.given and (args.optimizer == "adamw" or args.schedule == "onecycle"):
        user = "--optimizer adamw" if args.optimizer == "adamw" else "--schedule onecycle"
        raise DSDLError(f"--momentum is not used with {user} (AdamW has betas 0.9, 0.999; "
                        f"OneCycleLR cycles the momentum itself); drop --momentum")
    if args.schedule != "step" and "epoch_step" in args.given:
        raise DSDLError(f"--epoch_step is the step schedule's; --schedule {args.schedule} does "
                        f"not use it: drop one of them")
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        raise DSDLError(f"--warmup-epochs {args.warmup_epochs} leaves no epoch after the "
                        f"warm-up of a run of --epochs {args.epochs}; use fewer")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        if "tensorboard" in args.given:
            raise DSDLError("--tensorboard needs the tensorboard package: pip install -r "
                            "requirements-tensorboard.txt (or run without --tensorboard)")
        # taken from the checkpoint of a run resumed where tensorboard is not installed
        warnings.warn(f"{args.resume} was trained with --tensorboard, but the tensorboard "
                      f"package is not installed here: this run goes on without TensorBoard "
                      f"events (metrics.jsonl stays the record; pip install -r "
                      f"requirements-tensorboard.txt to write them)", stacklevel=2)
        args.tensorboard = False
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.accumulate > args.batch_size // world_size:
        raise DSDLError(f"--accumulate {args.accumulate} splits each batch into more parts than "
                        f"it has images ({args.batch_size // world_size} per process); use at "
                        f"most that, or a larger -b")


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------

def parameter_groups(model, args):
    """The optimizer's groups: the release's two (trunk at lr * lrp, head at lr), each with its
    momentum and weight decay. AdamW splits each in two, so that the weight decay applies to
    weights and not to norms and biases (tensors of one dimension)."""
    groups = model.parameter_groups(args.lr, args.lrp)
    if args.optimizer == "sgd":
        return [dict(group, momentum=args.momentum, weight_decay=args.weight_decay)
                for group in groups]
    split = []
    for group in groups:
        parameters = list(group["params"])
        split += [dict(group, params=[p for p in parameters if p.ndim > 1],
                       weight_decay=args.weight_decay),
                  dict(group, params=[p for p in parameters if p.ndim <= 1], weight_decay=0.0)]
    return split


def build_optimizer(model, args):
    """--optimizer: the release's SGD with momentum, or AdamW."""
    groups = parameter_groups(model, args)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def learning_rates(optimizer, model):
    """The trunk's and the head's learning rates, in words (the trunk's groups come first)."""
    trunk, head = optimizer.param_groups[0]["lr"], optimizer.param_groups[-1]["lr"]
    return f"learning rates: trunk {trunk:g}, {model.head_name} {head:g}"


# --------------------------------------------------------------------------------------------
# The learning-rate schedule
# --------------------------------------------------------------------------------------------

def warmup_factor(step, warmup_steps):
    """Linear warm-up: optimizer step s (from 0) of the first `warmup_steps` uses (s + 1) / W of
    the learning rate, so that step W - 1 reaches it (torch's LinearLR from 1 / W)."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


class Schedule:
    """--schedule and --warmup-epochs: the learning rate of every optimizer step.

    `step` without warm-up is the release's: MultiStepLR, x0.1 at each --epoch_step, stepped
    once per epoch (`after_epoch`). Every other schedule is stepped after every optimizer step
    (`after_step`): the factor of step s of T (W of them warm-up) is

        step:    warm-up(s) * 0.1 ** (the --epoch_step epochs reached)
        cosine:  warm-up(s), then (1 + cos(pi (s - W) / (T - W))) / 2
        onecycle: torch's OneCycleLR (rising for W steps, or 30% of T without warm-up).

    Built from the options and the step reached, not loaded from a checkpoint, so that a resumed
    run continues the uninterrupted curve, with a new --lr if one is given; the torch scheduler's
    state is still saved with each checkpoint (`state_dict`).
    """

    def __init__(self, optimizer, model, args, start_epoch, steps_per_epoch):
        self.per_step = not (args.schedule == "step" and args.warmup_epochs == 0)
        for group, fresh in zip(optimizer.param_groups, parameter_groups(model, args)):
            lr = fresh["lr"]
            if not self.per_step:
                for _ in range(sum(step < start_epoch for step in args.epoch_step)):
                    lr *= 0.1  # multiplied step by step, as the scheduler does: bit-exact on resume
            group.update(initial_lr=fresh["lr"], lr=lr, weight_decay=fresh["weight_decay"])
            if "momentum" in fresh:
                group["momentum"] = fresh["momentum"]
        if not self.per_step:
            # Created at start_epoch - 1, its first step takes it to start_epoch (and decays there).
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, args.epoch_step, gamma=0.1, last_epoch=start_epoch - 1)
            return
        start = start_epoch * steps_per_epoch
        total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
        if args.schedule == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[group["initial_lr"] for group in optimizer.param_groups],
                total_steps=total, pct_start=warmup / total if warmup else 0.3)
            if start:  # its factors are a formula of the step: position it there
                self.scheduler.last_epoch = start - 1
                with warnings.catch_warnings():  # "step() before optimizer.step()": on purpose
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
            return
        milestones = [epoch * steps_per_epoch for epoch in args.epoch_step]

        def factor(step):
            if args.schedule == "cosine" and step >= warmup:
                return (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2
            return warmup_factor(step, warmup) * (
                0.1 ** sum(step >= milestone for milestone in milestones)
                if args.schedule == "step" else 1.0)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)

    def after_step(self):
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self):
        if not self.per_step:
            self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()


# --------------------------------------------------------------------------------------------
# The moving average of the weights
# --------------------------------------------------------------------------------------------

class WeightAverage:
    """--ema: an exponential moving average of `model`'s weights, updated after every optimizer
    step: w_avg <- decay w_avg + (1 - decay) w. Buffers (BatchNorm statistics, class vectors)
    are copied, not averaged. `self.model` is the averaged network, evaluated like the model."""

    def __init__(self, model, decay):
        self.source, self.decay, self.updates = model, decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for module in self.model.modules():  # a copied torch.compile wrapper calls the source
            module.__dict__.pop("forward", None)

    @torch.no_grad()
    def update(self):
        averaged, current = list(self.model.parameters()), list(self.source.parameters())
        torch._foreach_lerp_(averaged, current, 1 - self.decay)
        for mine, theirs in zip(self.model.buffers(), self.source.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    def state(self):
        """What a checkpoint keeps besides the averaged weights (its `model`)."""
        return {"decay": self.decay, "updates": self.updates}

    def restore(self, weights, state):
        self.model.load_state_dict(weights)
        self.updates = int(state.get("updates", 0))


def weight_average(model, args, checkpoint):
    """The EMA of a run (None without --ema): the one --resume continues, else a copy of the
    model's weights as they start."""
    if not args.ema:
        return None
    average = WeightAverage(model, args.ema)
    if args.resume and checkpoint and "ema" in checkpoint:  # its `model` is the average
        average.restore(checkpoint_weights(checkpoint), checkpoint["ema"])
    return average
