"""Recipes beyond the release: asymmetric loss, EMA, AdamW, schedules with warm-up, gradient
accumulation, RandAugment / TrivialAugment / Cutout, TensorBoard; each resumed exactly."""
import copy
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import engine
import main_voc2007
import options
import recipes
import runs
from conftest import ROOT, SMALL, call_main
from models import AsymmetricLoss, DSDL, DSDLLoss, build_loss
from report import read_metrics, reproduction_block
from util import DSDLError, FastTrainTransform, train_transform

RECIPE_OPTIONS = ("ema", "optimizer", "schedule", "warmup_epochs", "accumulate", "augment", "cutout",
                  "tensorboard")
LOSS_OPTIONS = ("cls_loss", "asl_gamma_neg", "asl_gamma_pos", "asl_clip", "loss_args")


def parse(*argv):
    return options.parse_args(main_voc2007.get_args_parser(), ["data", *argv])


def small_model(num_classes=4, seed=0):
    torch.manual_seed(seed)
    return DSDL(num_classes, torch.randn(num_classes, 300), 10.0, arch="resnet18", pretrained=False)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

def test_every_recipe_option_is_recipe_and_defaults_to_the_release():
    args = parse()
    assert all(options.OPTION_ROLES[name] == "recipe" for name in RECIPE_OPTIONS)
    assert all(options.OPTION_ROLES[name] == "loss" for name in LOSS_OPTIONS)  # -e takes them
    assert (args.cls_loss, args.ema, args.optimizer, args.schedule, args.warmup_epochs,
            args.accumulate, args.augment, args.cutout, args.tensorboard) == (
        "bce", 0.0, "sgd", "step", 0, 1, "release", 0.0, False)
    args.model = "dsdl"
    term = build_loss(args).classification  # the release's: MultiLabelSoftMarginLoss's formula
    scores, targets = torch.randn(4, 20, dtype=torch.float64), (torch.rand(4, 20) < 0.3).double()
    assert torch.equal(term(scores, targets), F.multilabel_soft_margin_loss(scores, targets))


@pytest.mark.parametrize("argv, message", [
    (["--asl-gamma-neg", "2"], "--asl-gamma-neg applies only with --cls-loss asl; add it, or drop it"),
    (["--asl-clip", "0", "--asl-gamma-pos", "1"],
     "--asl-gamma-pos and --asl-clip apply only with --cls-loss asl; add it, or drop them"),
    (["--optimizer", "adamw", "--momentum", "0.8"], "--momentum is not used with --optimizer adamw"),
    (["--schedule", "cosine", "--epoch_step", "3"], "--epoch_step is the step schedule's"),
    (["--warmup-epochs", "5", "--epochs", "5"], "leaves no epoch after the warm-up"),
    (["--accumulate", "9", "-b", "8"], r"more parts than it has images \(8 per process\)"),
])
def test_a_recipe_option_that_would_do_nothing_is_refused(argv, message):
    with pytest.raises(DSDLError, match=message):
        recipes.check_recipe(parse(*argv))


def test_tensorboard_without_the_package_is_one_line_saying_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else real(name, *rest))
    code = call_main(main_voc2007.main, ["no-such-folder", "--tensorboard", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == ["error: --tensorboard needs the tensorboard package: pip install "
                                 "-r requirements-tensorboard.txt (or run without --tensorboard)"]
    assert os.path.isfile(os.path.join(ROOT, "requirements-tensorboard.txt"))


# --------------------------------------------------------------------------------------------
# The asymmetric loss
# --------------------------------------------------------------------------------------------

def test_asl_without_focusing_or_clip_is_binary_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 4
    targets = (torch.rand(6, 5, generator=generator) < 0.4).double()
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(scores, targets)
    assert asl.item() == pytest.approx(F.binary_cross_entropy_with_logits(scores, targets).item(),
                                       rel=1e-15)
    assert asl.item() == pytest.approx(F.multilabel_soft_margin_loss(scores, targets).item(), rel=1e-15)


def test_asl_is_the_papers_formula():
    """Ridnik et al. (ICCV 2021), eq. 4-7, written out in numpy, averaged over all pairs."""
    rng = np.random.default_rng(1)
    scores, targets = rng.normal(0, 3, (5, 7)), (rng.random((5, 7)) < 0.3).astype(float)
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    p = 1 / (1 + np.exp(-scores))
    p_m = np.maximum(p - clip, 0)
    per_pair = -(targets * (1 - p) ** gamma_pos * np.log(p)
                 + (1 - targets) * p_m ** gamma_neg * np.log(1 - p_m))
    ours = AsymmetricLoss(gamma_neg, gamma_pos, clip)(torch.tensor(scores), torch.tensor(targets))
    assert ours.item() == pytest.approx(per_pair.mean(), rel=1e-12)


def test_a_training_step_with_plain_asl_equals_the_release_loss_step():
    images = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([[1, -1, 0, -1], [-1, 1, -1, -1], [1, 1, -1, 1], [-1, -1, 1, -1]])
    after = []
    for loss in (DSDLLoss(10.0, 1e-4), DSDLLoss(10.0, 1e-4, AsymmetricLoss(0, 0, 0))):
        model = small_model()
        optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
        engine.train_one_epoch(model, loss, optimizer, [(images, labels, [""] * 4)],
                               torch.device("cpu"), 0, 10.0)
        after.append(model.state_dict())
    for key, value in after[0].items():
        assert torch.allclose(value.float(), after[1][key].float(), rtol=1e-5, atol=1e-7), key


# --------------------------------------------------------------------------------------------
# Optimizer and schedules
# --------------------------------------------------------------------------------------------

def test_adamw_decays_weights_but_not_norms_and_biases():
    model = small_model()
    args = parse("--optimizer", "adamw", "--weight-decay", "0.5", "--lr", "0.1")
    optimizer = recipes.build_optimizer(model, args)
    before = copy.deepcopy(model.state_dict())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)  # only the decoupled decay moves them
    optimizer.step()
    for name, parameter in model.named_parameters():
        lr = 0.1 * (0.1 if name.startswith("features.") else 1.0)  # trunk at lr * lrp
        shrink = 1 - lr * 0.5 if parameter.ndim > 1 else 1.0
        assert torch.allclose(parameter, before[name] * shrink, rtol=1e-6), name
    assert any(p.ndim == 1 for p in model.parameters())  # norms were there to be spared


class TwoGroups(torch.nn.Module):
    """What a schedule sees of a model: a trunk and a head (models.PooledModel's groups)."""
    head_name = "head"

    def __init__(self):
        super().__init__()
        self.trunk, self.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def parameter_groups(self, lr, lrp):
        return [{"params": self.trunk.parameters(), "lr": lr * lrp},
                {"params": self.head.parameters(), "lr": lr}]


def run_schedule(args, steps_per_epoch, start_epoch=0):
    """The learning rate of every optimizer step from `start_epoch` to the end, per group."""
    model = TwoGroups()
    optimizer = recipes.build_optimizer(model, args)
    schedule = recipes.Schedule(optimizer, model, args, start_epoch, steps_per_epoch)
    rates = []
    for _ in range(start_epoch, args.epochs):
        for _ in range(steps_per_epoch):
            rates.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            schedule.after_step()
        schedule.after_epoch()
    return np.array(rates)


def torch_curve(make, steps, base=1.0):
    """The learning rates torch's own scheduler `make(optimizer)` gives, one per step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base, momentum=0.9)
    scheduler, rates = make(optimizer), []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


EPOCHS, PER_EPOCH = 6, 5
TOTAL = EPOCHS * PER_EPOCH


def one_cycle_by_hand(step, total, rise, top):
    """OneCycleLR written out: cosine from top/25 up to top over `rise` steps (its last step is
    rise - 1), then cosine down to top / 25 / 1e4 at the last step."""
    low, end = top / 25, top / 25 / 1e4
    if step <= rise - 1:
        start, stop, fraction = low, top, step / (rise - 1)
    else:
        start, stop, fraction = top, end, (step - (rise - 1)) / (total - 1 - (rise - 1))
    return stop + (start - stop) / 2 * (1 + math.cos(math.pi * fraction))


@pytest.mark.parametrize("schedule, warmup", [("step", 0), ("step", 2), ("cosine", 0), ("cosine", 2),
                                              ("onecycle", 0), ("onecycle", 2)])
def test_each_schedule_is_torchs_or_the_hand_worked_curve_at_every_step(schedule, warmup):
    argv = ["--schedule", schedule, "--warmup-epochs", str(warmup), "--epochs", str(EPOCHS)]
    if schedule == "step":
        argv += ["--epoch_step", "3", "5"]
    args = parse(*argv)
    rates = run_schedule(args, PER_EPOCH)
    head = rates[:, -1] / args.lr  # the head's group, in units of --lr
    assert np.allclose(rates[:, 0] / (args.lr * args.lrp), head, rtol=1e-12)  # one curve for both
    W = warmup * PER_EPOCH
    if schedule == "step" and not warmup:
        expected = torch_curve(lambda o: torch.optim.lr_scheduler.MultiStepLR(
            o, [3 * PER_EPOCH, 5 * PER_EPOCH], gamma=0.1), TOTAL)
    elif schedule == "step":
        expected = np.array([min((s + 1) / W, 1) * 0.1 ** ((s >= 15) + (s >= 25)) for s in range(TOTAL)])
    elif schedule == "cosine" and not warmup:
        expected = torch_curve(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, TOTAL), TOTAL)
    elif schedule == "cosine":
        expected = torch_curve(lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
            torch.optim.lr_scheduler.LinearLR(o, 1 / W, 1.0, total_iters=W - 1),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, TOTAL - W)], milestones=[W]), TOTAL)
    else:
        rise = W if warmup else 0.3 * TOTAL
        expected = np.array([one_cycle_by_hand(s, TOTAL, rise, 1.0) for s in range(TOTAL)])
    assert np.allclose(head, expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("schedule, warmup", [("step", 0), ("step", 2), ("cosine", 2), ("onecycle", 0)])
@pytest.mark.parametrize("start_epoch", [1, 3])
def test_a_schedule_started_at_any_epoch_continues_the_uninterrupted_curve(schedule, warmup,
                                                                           start_epoch):
    args = parse("--schedule", schedule, "--warmup-epochs", str(warmup), "--epochs", str(EPOCHS),
                 *(["--epoch_step", "3", "5"] if schedule == "step" else []))
    whole = run_schedule(args, PER_EPOCH)
    assert np.array_equal(run_schedule(args, PER_EPOCH, start_epoch), whole[start_epoch * PER_EPOCH:])


# --------------------------------------------------------------------------------------------
# Gradient accumulation and the moving average
# --------------------------------------------------------------------------------------------

def freeze_batchnorm(model):
    """BatchNorm in eval mode for good: its running statistics, whatever train() says."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
            module.train = lambda mode=True, module=module: module
    return model


@pytest.mark.parametrize("accumulate", [2, 3])  # 8 images in 4 + 4, and in 3 + 3 + 2
def test_accumulated_micro_batches_make_the_big_batchs_update(accumulate):
    """Exact where the loss is a mean over images: BatchNorm frozen and beta 0 (DSDL's norms
    are over the micro-batch otherwise, as over each process's share under torchrun)."""
    images = torch.randn(8, 3, 64, 64)
    labels = torch.from_numpy(np.random.default_rng(0).choice([-1, 1], (8, 4)))
    after, losses = [], []
    for parts in (1, accumulate):
        model = freeze_batchnorm(small_model())
        optimizer = torch.optim.SGD(model.parameter_groups(0.01, 0.1), lr=0.01, momentum=0.9)
        losses.append(engine.train_one_epoch(
            model, DSDLLoss(10.0, 0.0), optimizer, [(images, labels, [""] * 8)],
            torch.device("cpu"), 0, 10.0, accumulate=parts))
        after.append(model.state_dict())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for key, value in after[0].items():
        assert torch.allclose(value.float(), after[1][key].float(), rtol=1e-4, atol=1e-6), key
    assert not torch.equal(after[0]["W1"], small_model().W1)  # the step did move the weights


def test_the_ema_is_the_decayed_average_of_the_weights_after_each_step():
    model = small_model()
    average = recipes.WeightAverage(model, 0.75)
    optimizer = torch.optim.SGD(model.parameter_groups(0.05, 1.0), lr=0.05)
    expected = {name: value.clone().double() for name, value in model.named_parameters()}
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([[1, -1, -1, 1]] * 4)
    for step in range(3):
        engine.train_one_epoch(model, DSDLLoss(10.0, 1e-4), optimizer, [(images, labels, [""] * 4)],
                               torch.device("cpu"), 0, 10.0, average=average)
        for name, value in model.named_parameters():  # w_avg = 0.75 w_avg + 0.25 w
            expected[name] = 0.75 * expected[name] + 0.25 * value.detach().double()
    averaged = dict(average.model.named_parameters())
    for name, value in expected.items():
        assert torch.allclose(averaged[name].double(), value, rtol=1e-5, atol=1e-7), name
    for name, buffer in model.named_buffers():  # running statistics copied, not averaged
        assert torch.equal(dict(average.model.named_buffers())[name], buffer), name
    assert average.updates == 3


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("augment", ["randaugment", "trivialaugment"])
def test_augmentation_policies_are_seeded_like_the_crops(fast, augment):
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    release, strong = train_transform(64, fast), train_transform(64, fast, augment, cutout=1.0)
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        draws.append(strong(image))
    assert torch.equal(draws[0], draws[1])           # the same seed, the same image
    assert not torch.equal(draws[0], draws[2])        # another seed, another one
    torch.manual_seed(3)
    assert not torch.equal(release(image), draws[0])  # the policy and the box changed it


@pytest.mark.parametrize("fast", [False, True])
def test_cutout_fills_one_box_with_the_imagenet_mean(fast, monkeypatch):
    from PIL import Image
    image = Image.fromarray(np.full((80, 100, 3), 255, dtype=np.uint8))  # white: no pixel is mean
    torch.manual_seed(0)
    out = train_transform(64, fast, cutout=1.0)(image)
    if fast:
        erased = (out == torch.tensor([124, 116, 104], dtype=torch.uint8)).all(dim=2)  # H x W x 3
    else:
        erased = (out == 0).all(dim=0)  # normalised: the mean is 0
    rows, cols = erased.nonzero(as_tuple=True)
    assert erased.sum() > 0
    box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one rectangle, and nothing else
    assert isinstance(train_transform(64, True, cutout=0.5), FastTrainTransform)


# --------------------------------------------------------------------------------------------
# Everything on, interrupted and resumed
# --------------------------------------------------------------------------------------------

EVERYTHING = ["--cls-loss", "asl", "--asl-clip", "0.1", "--ema", "0.9", "--optimizer", "adamw",
              "--lr", "0.001", "--schedule", "cosine", "--warmup-epochs", "1", "--accumulate", "2",
              "--augment", "randaugment", "--cutout", "0.5"]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def everything_runs(tmp_path_factory):
    """One run of 2 epochs with every recipe option on, and the same run stopped after epoch 1
    and resumed (loader workers: 2)."""
    from conftest import write_voc_tree
    folder = tmp_path_factory.mktemp("everything")
    root = str(folder / "voc2007")
    write_voc_tree(root, splits={"trainval": 16, "test": 8})
    embeddings = str(folder / "embeddings.npy")
    np.save(embeddings, np.random.default_rng(1).standard_normal((20, 300)).astype(np.float32))
    common = [root, *SMALL, "-j", "2", "--embeddings", embeddings, *EVERYTHING,
              *(["--tensorboard"] if HAS_TENSORBOARD else [])]

    def train(run_folder, *extra):
        args = options.parse_args(main_voc2007.get_args_parser(),
                                  [*common, "--checkpoint-dir", str(run_folder), *extra])
        engine.run(args, main_voc2007.datasets, default_embeddings=None)

    train(folder / "straight", "--epochs", "2")
    saved = engine.save_epoch

    def save_then_stop(state, *rest):  # as Ctrl-C right after epoch 1 is saved
        saved(state, *rest)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "save_epoch", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(folder / "split", "--epochs", "2")
    train(folder / "split", "--resume", str(folder / "split" / checkpoints.CHECKPOINT))
    return folder, root, embeddings


def same(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_a_resumed_run_with_every_recipe_option_is_the_uninterrupted_run(everything_runs):
    folder, _, _ = everything_runs
    straight, split = (torch.load(folder / name / checkpoints.CHECKPOINT, weights_only=True)
                       for name in ("straight", "split"))
    assert straight["epoch"] == split["epoch"] == 2
    for state in (straight, split):  # torch's count of step() calls made in this process
        state["lr_scheduler"].pop("_step_count")
    for key in ("model", "training_model", "ema", "optimizer", "lr_scheduler", "best_score"):
        same(straight[key], split[key], key)
    assert straight["ema"]["updates"] == 2 * 2  # two optimizer steps per epoch (16 images, -b 8)
    assert not torch.equal(straight["model"]["W1"], straight["training_model"]["W1"])
    assert "exp_avg" in straight["optimizer"]["state"][0]  # AdamW's
    logs = [read_metrics(folder / name / runs.METRICS_LOG) for name in ("straight", "split")]
    for ours, theirs in zip(*logs):
        for record in (ours, theirs):
            record.pop("epoch_seconds")
            record.pop("run")
        same(ours, theirs, "metrics.jsonl")
    settings = logs[0][-1]["settings"]
    for name in RECIPE_OPTIONS:  # every recipe option is named in the record
        assert name in settings, name
    assert (settings["cls_loss"], settings["optimizer"], settings["accumulate"]) == ("asl", "adamw", 2)
    assert {"raw_mAP", "raw_loss"} <= logs[0][-1].keys()
    block = reproduction_block(folder / "split")  # report.py shows the recipe
    assert all(f"{name}=" in block for name in RECIPE_OPTIONS)
    assert "cls_loss=asl" in block and "ema=0.9" in block and "schedule=cosine" in block


def test_evaluating_an_ema_checkpoint_prints_the_map_training_logged_for_it(everything_runs, capsys):
    folder, root, embeddings = everything_runs
    best = folder / "straight" / checkpoints.BEST
    logged = {r["epoch"]: r["mAP"] for r in read_metrics(folder / "straight" / runs.METRICS_LOG)}
    epoch = torch.load(best, weights_only=True)["epoch"]
    capsys.readouterr()
    code = call_main(main_voc2007.main, [root, "-e", "--resume", str(best), "--embeddings",
                                         embeddings, "-j", "0", "--device", "cpu"])
    assert code == 0 and f"mAP {logged[epoch]:.2f} (over" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in open(folder / "straight" / "eval_test.jsonl")]
    assert record["mAP"] == pytest.approx(logged[epoch], abs=1e-9)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (requirements-tensorboard.txt)")
def test_tensorboard_events_hold_the_logged_numbers_and_learning_rates(everything_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder, _, _ = everything_runs
    records = read_metrics(folder / "split" / runs.METRICS_LOG)
    events = EventAccumulator(str(folder / "split")).Reload()
    for name in ("mAP", "raw_mAP", "loss", "train_loss", "OF1", "CF1_top3"):
        logged = [(r["epoch"], r[name]) for r in records]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(name)] == logged
    head = [e.value for e in events.Scalars("learning_rate/head")]
    assert head == pytest.approx([0.001 / 2, 0.001])  # epoch 1 starts warming up; epoch 2 at the top


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(0.5, 0.0, 0.0), (4.0, 0.5, 0.05)])
def test_fractional_focusing_exponents_keep_the_gradient_finite_on_saturated_scores(gamma_neg, gamma_pos,
                                                                                   clip):
    scores = torch.tensor([[40.0, -200.0, 3.0]], requires_grad=True)  # p = 1 and p = 0 in float32
    AsymmetricLoss(gamma_neg, gamma_pos, clip)(scores, torch.tensor([[1.0, 0.0, 0.0]])).backward()
    assert torch.isfinite(scores.grad).all()


def test_the_free_space_estimate_counts_adamws_moments_and_the_trained_weights_beside_the_ema(
        everything_runs):
    folder, _, _ = everything_runs
    model = small_model(num_classes=20)
    optimizer = recipes.build_optimizer(model, parse("--optimizer", "adamw"))
    estimate = checkpoints.checkpoint_bytes(optimizer, averaged=True)
    actual = os.path.getsize(folder / "straight" / checkpoints.CHECKPOINT)
    assert abs(estimate - actual) / actual < 0.05
