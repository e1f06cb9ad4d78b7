"""Every command-line option of the entry scripts, in one parser that loads without torch.

Importing torch takes a second or two, so the scripts parse their arguments first: `--help`, a
typo or a value out of range is answered at once, before torch, the data or the model load.
"""
import argparse
import ast
import os
import warnings

# The paper's setting: the defaults where no checkpoint says otherwise, and where its numbers hold.
PAPER_ARCH, PAPER_IMAGE_SIZE = "resnet101", 448
DEVICES = ("cuda", "cpu")

# Every option of the entry scripts declares its role where it is defined (`add_option`);
# what a checkpoint restores and what a record holds are derived from the roles:
ROLES = {
    "trunk": "the trunk and its input (--resume, -e and --init-from take the checkpoint's)",
    "scores": "the rest of what changes the scores of given weights (--resume and -e take the "
              "checkpoint's)",
    "loss": "the training loss (--resume and -e take the checkpoint's: -e reports the loss the "
            "run trained with)",
    "recipe": "how training goes (--resume takes the checkpoint's)",
    "files": "where things are read and written (never taken from a checkpoint)",
    "runtime": "speed and what this command does (never taken; recorded)",
}
TAKEN = {"resume": ("trunk", "scores", "loss", "recipe"), "evaluate": ("trunk", "scores", "loss"),
         "init_from": ("trunk",)}
RECORDED = ("trunk", "scores", "loss", "recipe", "runtime")  # a run's settings in its checkpoints and logs
OPTION_ROLES = {}  # option (its dest) -> role, filled by add_option


def add_option(parser, *flags, role, **kwargs):
    """`parser.add_argument(*flags, **kwargs)`, recording the option's role (one of ROLES)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} of {flags[0]}")
    action = parser.add_argument(*flags, **kwargs)
    OPTION_ROLES[action.dest] = role
    return action


def options_without_role(parser):
    """The options of `parser` (their dests) that were not defined with `add_option`."""
    return [action.dest for action in parser._actions
            if not isinstance(action, argparse._HelpAction) and action.dest not in OPTION_ROLES]


def with_role(*roles):
    """The options (dests) whose role is one of `roles`, in the order they were defined."""
    return tuple(dest for dest, role in OPTION_ROLES.items() if role in roles)


def default_workers():
    """Data-loading processes: the CPUs this process may use, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, cpus or 1)


def number(kind, text):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def seed(text):
    """A seed numpy and torch take: 0 to 2^64 - 1."""
    value = non_negative_int(text)
    if value >= 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be below 2^64 (18446744073709551616), got {value}")
    return value


def positive_int(text):
    value = number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text):
    value = number(float, text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = number(float, text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


def decay(text):
    value = number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a decay in (0, 1), got {text}")
    return value


def device(text):
    if text.split(":")[0] not in DEVICES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cuda, cuda:N or cpu")
    return text


class KeywordArguments(argparse.Action):
    """KEY=VALUE ... into a dict; a VALUE is read as a Python number, bool or None where it is
    one (`gamma=2` is 2), else kept as text."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = {}
        for item in values:
            key, equals, text = item.partition("=")
            if not equals or not key.isidentifier():
                parser.error(f"argument {option_string}: {item!r} is not KEY=VALUE")
            try:
                given[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                given[key] = text
        setattr(namespace, self.dest, given)


class ArchAction(argparse.Action):
    """--arch NAME; `--arch list` prints the trunks there are and exits, like --help."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value == "list":
            import trunks  # torch loads only for the list
            print(f"{trunks.describe_archs()}\ndefault: {PAPER_ARCH}, the paper's")
            parser.exit(0)
        setattr(namespace, self.dest, value)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake in the command line is one `error:` line and exit status 1,
    like every other mistake the scripts report."""

    def error(self, message):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def parse_args(parser, argv=None):
    """`parser.parse_args(argv)`, with `given`: the names of the options the command line gave
    (not taken from their defaults), so that a checkpoint's values can fill in the others."""
    args = parser.parse_args(argv)
    # argparse fills in a default only where the namespace has no value yet: parsed again into
    # a namespace of placeholders, an option keeps its placeholder unless it was given.
    unset = object()
    probe = parser.parse_args(argv, argparse.Namespace(**{key: unset for key in vars(args)}))
    args.given = {key for key, value in vars(probe).items() if value is not unset}
    return args


def get_args_parser(description, run_folder, **defaults):
    """Every option of the main_*.py scripts, each with its role (`add_option`); each script sets
    its dataset's defaults and its default run folder (`run_folder`)."""
    parser = ArgumentParser(description=description)
    add_option(parser, "data", role="files",
               help="dataset root; the dataset is downloaded there when absent")
    model = parser.add_argument_group("model", "what is trained (the defaults are the release's)")
    add_option(model, "--model", default=None, metavar="NAME", role="scores",
               help="a model of models.MODELS by its name: dsdl, the paper's method, as "
                    "released; baseline, the paper's baseline row, one linear layer (with bias) "
                    "on the pooled features, trained with binary cross-entropy (default: the "
                    "checkpoint's with -e or --resume, else dsdl)")
    add_option(model, "--model-args", nargs="+", action=KeywordArguments, default=None,
               metavar="KEY=VALUE", role="scores",
               help="settings of the model's constructor that have no option of their own, by "
                    "their names (default: the constructor's defaults)")
    add_option(model, "--arch", default=None, action=ArchAction, role="trunk",
               help="the trunk: any torchvision classification network by name (resnet101, "
                    "convnext_tiny, efficientnet_v2_s, swin_t, vit_b_16, ...) or timm/<name> "
                    "with timm installed; `--arch list` prints them (default: the checkpoint's "
                    "with -e, --resume or --init-from, else resnet101)")
    add_option(model, "--pool", choices=("max", "avg"), default=None, role="trunk",
               help="global pooling of the trunk's last map (default: the checkpoint's, else "
                    "max, the release's)")
    add_option(model, "--image-size", type=positive_int, default=None, role="trunk",
               help="input side in pixels (default: the checkpoint's with -e, --resume or "
                    "--init-from, else 448)")
    add_option(model, "--lambd", type=positive_float, default=10.0, role="scores",
               help="DSDL: ridge regulariser of the coefficients, also the weight of ||A|| "
                    "(default: %(default)s)")
    add_option(model, "--beta", type=non_negative_float, default=1e-4, role="loss",
               help="DSDL: weight of the reconstruction and sparsity terms of the loss "
                    "(default: %(default)s)")
    add_option(model, "--no-pretrained", action="store_true", role="recipe",
               help="start the trunk from random weights instead of ImageNet's (each network's "
                    "default torchvision weights; the release's ResNets keep IMAGENET1K_V1)")
    add_option(model, "--embeddings", default=None, metavar="PATH", role="files",
               help="DSDL: C x d class vectors (.pkl or .npy, any width d); default: the "
                    "dataset's standard 300-d GloVe file, downloaded (md5 checked) into data/")
    recipe = parser.add_argument_group("recipe", "the release's training recipe")
    add_option(recipe, "-b", "--batch-size", type=positive_int, default=32, role="recipe",
               help="global batch, divided over the processes under torchrun "
                    "(default: %(default)s)")
    add_option(recipe, "--epochs", type=positive_int, default=200, role="recipe",
               help="total number of epochs, counted from the first (default: %(default)s)")
    add_option(recipe, "--epoch_step", type=positive_int, nargs="+", default=[40], role="recipe",
               help="epochs at which every learning rate is multiplied by 0.1 "
                    "(default: %(default)s)")
    add_option(recipe, "--lr", type=positive_float, default=0.01, role="recipe",
               help="learning rate of the head (DSDL: W1 and W2; baseline: the linear layer) "
                    "(default: %(default)s)")
    add_option(recipe, "--lrp", type=positive_float, default=0.1, role="recipe",
               help="the CNN trunk learns at lr * lrp (default: %(default)s)")
    add_option(recipe, "--momentum", type=non_negative_float, default=0.9, role="recipe",
               help="SGD momentum (not used by --optimizer adamw or --schedule onecycle) "
                    "(default: %(default)s)")
    add_option(recipe, "--weight-decay", type=non_negative_float, default=1e-4, role="recipe",
               help="weight decay (with --optimizer adamw, decoupled and only on weights) "
                    "(default: %(default)s)")
    add_option(recipe, "--max-grad-norm", type=positive_float, default=10.0, role="recipe",
               help="the total gradient norm is clipped to this before each step "
                    "(default: %(default)s)")
    add_option(recipe, "--seed", type=seed, default=0, role="recipe",
               help="seeds the initialisation, and per epoch the order of the images and "
                    "each image's crop and flip (default: %(default)s)")
    more = parser.add_argument_group(
        "recipes", "beyond the release (docs/training.md#recipes): the defaults keep the "
        "release's recipe; each is restored by --resume")
    add_option(more, "--cls-loss", default="bce", metavar="NAME", role="loss",
               help="the classification term of the loss, a loss of models.LOSSES by its name: "
                    "bce, the release's binary cross-entropy; asl, the asymmetric loss of "
                    "Ridnik et al. (ICCV 2021); focal, the focal loss of Lin et al. (ICCV "
                    "2017); each averaged like bce (default: %(default)s)")
    add_option(more, "--asl-gamma-neg", type=non_negative_float, default=4.0, role="loss",
               help="asl: focusing exponent of the negatives (default: %(default)s)")
    add_option(more, "--asl-gamma-pos", type=non_negative_float, default=0.0, role="loss",
               help="asl: focusing exponent of the positives (default: %(default)s)")
    add_option(more, "--asl-clip", type=probability, default=0.05, role="loss",
               help="asl: probability margin shifted off the negatives (default: %(default)s)")
    add_option(more, "--loss-args", nargs="+", action=KeywordArguments, default=None,
               metavar="KEY=VALUE", role="loss",
               help="settings of the --cls-loss by their names, e.g. focal: gamma=2 alpha=0.25 "
                    "(default: the loss's defaults)")
    add_option(more, "--ema", type=decay, default=0.0, metavar="DECAY", role="recipe",
               help="keep an exponential moving average of the weights with this decay, "
                    "updated after every optimizer step (e.g. 0.9997); each epoch evaluates "
                    "both, model_best is chosen by and holds the average (default: 0, off)")
    add_option(more, "--optimizer", choices=("sgd", "adamw"), default="sgd", role="recipe",
               help="sgd, the release's (with --momentum); adamw (betas 0.9, 0.999; "
                    "--weight-decay only on weights, not on norms and biases) "
                    "(default: %(default)s)")
    add_option(more, "--schedule", choices=("step", "cosine", "onecycle"), default="step",
               role="recipe",
               help="step: x0.1 at each --epoch_step, the release's; cosine: cosine decay to 0 "
                    "over the run, per optimizer step; onecycle: torch's OneCycleLR (up to "
                    "--lr in --warmup-epochs or the first 30%% of the steps, then down; it "
                    "cycles the momentum 0.95-0.85, so --momentum is not used) "
                    "(default: %(default)s)")
    add_option(more, "--warmup-epochs", type=non_negative_int, default=0, metavar="N",
               role="recipe",
               help="raise the learning rates linearly, per optimizer step, over the first N "
                    "epochs (default: %(default)s)")
    add_option(more, "--accumulate", type=positive_int, default=1, metavar="N", role="recipe",
               help="split each batch of -b into N micro-batches whose gradients are summed "
                    "before one optimizer step: about 1/N of the memory; BatchNorm statistics "
                    "and DSDL's norms are then per micro-batch (default: %(default)s)")
    add_option(more, "--augment", choices=("release", "randaugment", "trivialaugment"),
               default="release", role="recipe",
               help="after the release's crop and flip, also torchvision's RandAugment "
                    "(2 operations, magnitude 9) or TrivialAugmentWide (default: %(default)s)")
    add_option(more, "--cutout", type=probability, default=0.0, metavar="P", role="recipe",
               help="erase one random box of each training image with probability P, filled "
                    "with the ImageNet mean (torchvision's RandomErasing) (default: 0, off)")
    add_option(more, "--tensorboard", action=argparse.BooleanOptionalAction, default=False,
               role="recipe",
               help="also write each epoch's losses, metrics and learning rates as TensorBoard "
                    "events into the run folder (needs `pip install -r "
                    "requirements-tensorboard.txt`; metrics.jsonl stays the record); "
                    "--no-tensorboard resumes such a run without them")
    run = parser.add_argument_group("run", "where a run starts from and where it writes")
    add_option(run, "-e", "--evaluate", action="store_true", role="runtime",
               help="only evaluate the checkpoint given by --resume; the results go to "
                    "eval_<split>.jsonl and eval_<split>.md, training's files are not touched")
    add_option(run, "--zero-shot", action="store_true", role="runtime",
               help="with -e: evaluate the checkpoint on classes it was not trained on (DSDL), "
                    "scored from their class vectors (--embeddings, in the split's class "
                    "order) through its trunk and auto-encoder; prints the mAP and the "
                    "precision, recall and F1 of the top-3 and top-5 classes")
    add_option(run, "--resume", default=None, metavar="PATH", role="files",
               help="checkpoint to continue training from (or to evaluate with -e): "
                    "this project's or one of the authors' released checkpoints")
    add_option(run, "--init-from", default=None, metavar="PATH", role="files",
               help="start a new run from the weights of another run's checkpoint (the trunk, "
                    "and for DSDL the auto-encoder; any class list, e.g. a COCO model for VOC): "
                    "fresh optimizer, epoch 0, no best score")
    add_option(run, "--checkpoint-dir", default=None, role="files",
               help=f"the run folder: checkpoints, metrics.jsonl, tables and plots; it "
                    f"belongs to one run (default: the --resume checkpoint's folder, else "
                    f"{run_folder})")
    add_option(run, "-j", "--workers", type=non_negative_int, default=default_workers(),
               role="runtime",
               help="data-loading processes (default: the CPUs, at most 8: %(default)s)")
    add_option(run, "--device", type=device, default=None, role="runtime",
               help="cuda or cpu (default: cuda when a GPU is available); under torchrun "
                    "each process takes its LOCAL_RANK's GPU")
    speed = parser.add_argument_group(
        "speed", "off by default: the defaults train exactly as the release (float32, PIL pipeline)")
    add_option(speed, "--amp", action="store_true", role="runtime",
               help="mixed precision on GPUs: bf16 where supported, else fp16 with a "
                    "gradient scaler; the head, the C x C solve and the loss stay "
                    "float32. No effect on a CPU (float32, with a warning)")
    add_option(speed, "--channels-last", action="store_true", role="runtime",
               help="channels-last memory layout")
    add_option(speed, "--compile", action="store_true", role="runtime",
               help="torch.compile the trunk (falls back to eager with a warning); to keep one "
                    "shape, training drops each epoch's last partial batch and evaluation pads "
                    "its own")
    add_option(speed, "--fast-pipeline", action="store_true", role="runtime",
               help="JPEGs decoded by torchvision and the release's resizes, crop and flip "
                    "done on uint8 tensors, batches normalised on the device: the same "
                    "crops and flips, pixels on average within 0.1 grey level (at most 2) "
                    "of the release's")
    add_option(speed, "--tf32", choices=("on", "off"), default="off", role="runtime",
               help="GPUs: off runs float32 convolutions and matrix products in full float32, "
                    "as the release trained (cuDNN would use TF32 on Ampere and newer); on "
                    "allows TF32 for both: faster, 10-bit mantissa products (default: %(default)s)")
    add_option(speed, "--deterministic", action="store_true", role="runtime",
               help="GPUs: deterministic algorithms and no cuDNN autotuning, so that resuming "
                    "and -j leave the weights bit for bit as on the CPU (slower); on the CPU "
                    "training is deterministic already")
    add_option(speed, "--sync-bn", action="store_true", role="runtime",
               help="synchronise BatchNorm statistics across processes (torchrun)")
    parser.set_defaults(run_folder=run_folder, **defaults)
    return parser


def take_from_checkpoint(args, stored, source):
    """What the command line left open, from the settings `stored` in the checkpoint a run
    starts from (`source`): with --resume the options of the roles TAKEN["resume"] (and the
    number of epochs), with -e those of TAKEN["evaluate"], with --init-from those of
    TAKEN["init_from"], wherever the command line does not give them (a given value that differs
    is used, with one warning listing each); else the paper's model, trunk and input size. The
    run folder is, with --resume, the checkpoint's."""
    kind = "init_from" if args.init_from else "evaluate" if args.evaluate else "resume"
    changed = []
    for key in with_role(*TAKEN[kind]) if source else ():
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
                      f"the command line's are used:\n  " + "\n  ".join(changed), stacklevel=3)
    args.model = args.model or "dsdl"
    args.arch = args.arch or PAPER_ARCH
    args.pool = args.pool or "max"
    args.image_size = args.image_size or PAPER_IMAGE_SIZE
    if args.checkpoint_dir is None:
        args.checkpoint_dir = (os.path.dirname(args.resume) or ".") if args.resume else args.run_folder


def recorded_settings(args):
    """A run's settings, as its checkpoints and log records hold them (the roles RECORDED)."""
    return {key: getattr(args, key) for key in with_role(*RECORDED) if hasattr(args, key)}


def probability(text):
    value = number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1, got {text}")
    return value


def add_checkpoint_options(parser):
    """Which model a trained checkpoint makes (inference.load_model): shared by predict.py and
    export.py. The authors' released checkpoints store no class names, vectors, lambda or
    input size; `--dataset` supplies the first three."""
    parser.add_argument("--resume", required=True, metavar="PATH", help="the trained checkpoint")
    parser.add_argument("--dataset", choices=("coco", "voc"),
                        help="class names, class vectors and lambda of a checkpoint that has none "
                             "(the authors' released ones)")
    parser.add_argument("--classes", nargs="+", metavar="NAME",
                        help="score these labels instead of the training classes (or one file "
                             "with a name per line); labels the model was not trained on are "
                             "scored zero-shot from their word vectors, with --embeddings or "
                             "--classes-from-glove")
    vectors = parser.add_mutually_exclusive_group()
    vectors.add_argument("--embeddings", metavar="PATH",
                         help="C x d class vectors (.npy or .pkl), d the checkpoint's: of "
                              "--classes, in their order; "
                              "or with --dataset, instead of the standard file (downloaded into "
                              "data/)")
    vectors.add_argument("--classes-from-glove", metavar="GLOVE",
                         help="the vectors of --classes read from a word-vector text file (GloVe, "
                              "fastText .vec, word2vec text; or its .zip) of the checkpoint's "
                              "width, as make_embeddings.py makes them")
    parser.add_argument("--image-size", type=positive_int,
                        help="input side (default: the checkpoint's, else 448)")
    parser.add_argument("--arch", action=ArchAction,
                        help="the trunk (default: the checkpoint's, or for the release's, the "
                             "ResNet inferred from its weights)")
    parser.add_argument("--lambd", type=positive_float,
                        help="ridge regulariser (default: the checkpoint's, else the dataset's)")


def predict_parser():
    """The options of predict.py (label your own images with a trained checkpoint)."""
    parser = ArgumentParser(description="Label your own images with a trained DSDL checkpoint.")
    parser.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    add_checkpoint_options(parser)
    parser.add_argument("--top-k", type=positive_int, metavar="K", help="at most K labels per image")
    parser.add_argument("--threshold", type=probability, metavar="P",
                        help="only labels with probability >= P, one P for every class "
                             "(default unless --top-k is given: the checkpoint's per-class "
                             "thresholds, tuned on a validation split, when it has them, else "
                             "0.5; 0 lists every class)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--csv", metavar="FILE", help="also write the results as CSV")
    parser.add_argument("--cam", metavar="DIR",
                        help="save a class-map overlay per image and predicted class in DIR")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=32,
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("-j", "--workers", type=non_negative_int, default=default_workers(),
                        help="data-loading processes (default: the CPUs, at most 8: %(default)s)")
    parser.add_argument("--device", type=device, default=None,
                        help="cuda, cuda:N or cpu (default: cuda when a GPU is available)")
    return parser


def export_parser():
    """The options of export.py (the trained model as one ONNX or TorchScript file)."""
    parser = ArgumentParser(
        description="Export a trained DSDL checkpoint with its head folded into one linear layer.")
    add_checkpoint_options(parser)
    parser.add_argument("--format", choices=("onnx", "torchscript"), required=True,
                        help="ONNX (for onnxruntime and others) or TorchScript")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="the model file; the class names go next to it, in FILE.classes.json")
    return parser


def report_parser():
    """The options of report.py (the reproduction record of a run)."""
    parser = ArgumentParser(description="Print the reproduction record of a training run as Markdown.")
    parser.add_argument("folder", help="the run's --checkpoint-dir (it holds metrics.jsonl)")
    return parser


def embeddings_parser():
    """The options of make_embeddings.py (class vectors from word vectors: GloVe, fastText, word2vec)."""
    parser = ArgumentParser(description="Write the C x d class vectors of a class list from word "
                                        "vectors (GloVe, fastText .vec, word2vec text).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--classes", nargs="+", metavar="NAME",
                        help="class names in order, or one file with a name per line")
    source.add_argument("--csv", nargs="+", metavar="CSV",
                        help="label CSVs of main_custom.py: their labels, sorted, are the classes")
    parser.add_argument("--vectors", "--glove", metavar="PATH", dest="vectors",
                        help="word-vector text file of any width d: GloVe, fastText .vec or word2vec "
                             "text format (plain, .zip or .gz); default: "
                             "glove.840B.300d.zip (300-d, as the standard files and the released "
                             "checkpoints), downloaded into data/ when absent")
    parser.add_argument("-o", "--output", default="embeddings.npy",
                        help="where to write the C x d array, .npy or .pkl (default: %(default)s)")
    return parser


def images_by_classes(text):
    """'125000x9605' -> (125000, 9605): bench.py --metrics' N images x C classes."""
    try:
        images, classes = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxC, e.g. 125000x9605; got {text!r}") from None
    if images < 1 or classes < 1:
        raise argparse.ArgumentTypeError(f"N and C must be at least 1; got {text!r}")
    return images, classes


def bench_parser(description):
    """The options of bench.py (speed of the release-style path against the fast path)."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device, default=None,
                        help="cuda or cpu (default: cuda when a GPU is available)")
    parser.add_argument("--arch", default=None, action=ArchAction,
                        help="any --arch of the entry scripts (default: resnet101 on a GPU, "
                             "resnet18 on a CPU)")
    parser.add_argument("--model", default="dsdl", metavar="NAME",
                        help="the model timed, by its name in models.MODELS (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="default: 448 on a GPU, 224 on a CPU")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=None,
                        help="default: 32 on a GPU, 8 on a CPU")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed batches (default: 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=positive_int, default=None,
                        help="untimed batches first (default: 5 GPU, 1 CPU)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="timed passes of the model figures; the best counts (default: %(default)s)")
    parser.add_argument("--pipeline-images", type=positive_int, default=60,
                        help="JPEGs for the pipeline figures (default: %(default)s)")
    parser.add_argument("--pipeline-only", action="store_true", help="time only the input pipeline")
    parser.add_argument("--num-classes", type=positive_int, default=20,
                        help="classes of the synthetic model (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--json", metavar="FILE",
                        help="write the figures to this JSON file, each as soon as it is measured")
    parser.add_argument("--metrics", type=images_by_classes, metavar="NxC",
                        help="time only the metrics (compute_metrics, tune_thresholds, "
                             "top_k_metrics) on generated scores of N images x C classes, e.g. "
                             "125000x9605 (Open Images test) or 40137x80 (COCO val)")
    parser.add_argument("--metrics-known", type=positive_int, default=8, metavar="K",
                        help="with --metrics: K labels of each image verified, the rest unknown, "
                             "as Open Images' (default: %(default)s); K >= C: every label known, "
                             "as COCO's")
    parser.add_argument("--require-gpu", action="store_true",
                        help="a missing or unusable CUDA GPU is an error (default: measure on the CPU)")
    return parser
