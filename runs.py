"""A run's folder and its lock, its checks before anything is read or written, and how the
entry scripts end: a user's mistake, a full disk or a lack of memory in one `error:` line (exit
status 1), Ctrl-C or a scheduler's SIGTERM in a line that says how to go on (exit status 130,
143).
"""
import contextlib
import errno
import fcntl
import functools
import gc
import os
import signal
import socket
import sys
import traceback
import warnings

import torch

import models
import options
import trunks
from checkpoints import BEST, CHECKPOINT, load_checkpoint, resume_advice, split_change
from distributed import is_main_process, resolve_device
from report import METRICS_LOG
from util import (MADE_FOLDERS, DSDLError, make_folders, out_of_memory, out_of_memory_advice,
                  remove_made_folders, user_message, write_error)

LOCK = "run.lock"                   # the pid of the run writing into the folder
RUN_FILES = (CHECKPOINT, BEST, METRICS_LOG)


# --------------------------------------------------------------------------------------------
# The run folder: it belongs to one run
# --------------------------------------------------------------------------------------------


def prepare_run_folder(folder):
    """The run folder exists and can be written to: found before anything trains. A folder made
    here is removed again if the command fails before writing into it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DSDLError(f"--checkpoint-dir {folder} is a file, not a folder; pass a folder")
    try:
        make_folders(folder)
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
    if present == [METRICS_LOG]:  # a run that never saved an epoch (its first checkpoint failed)
        log = os.path.join(folder, METRICS_LOG)
        print(f"note: {log} is the log of a run that saved no epoch (its first checkpoint was "
              f"not written); this run starts it again")
        os.remove(log)
        present = []
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
        try:
            self.lock()
        except OSError as error:  # a full disk, a quota: before anything else is written
            self.release()
            raise DSDLError(f"cannot write {self.path} ({error.strerror}); free disk space in "
                            f"{self.folder}, then run the same command again") from error

    def lock(self):
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
        self.file = lock_file  # locked: `release` removes it, also if the write below fails
        lock_file.seek(0)
        left = lock_file.read().split()
        if left:
            print(f"note: taking over {self.path}, left by process {left[0]} which no longer runs")
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()} {socket.gethostname()}\n")
        lock_file.flush()

    def release(self):
        if self.file is not None:
            os.remove(self.path)  # while still locked: the next run finds no file, or its own
            with contextlib.suppress(OSError):  # a pid that a full disk did not take: no matter
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
# Checks of the command line and the data, before training
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


def check_zero_shot(args):
    if not args.zero_shot:
        return
    if not (args.evaluate and args.resume):
        raise DSDLError("--zero-shot evaluates a trained checkpoint: add -e --resume CHECKPOINT")
    if args.model != "dsdl":
        raise DSDLError(f"--zero-shot needs DSDL, which scores any class from its vector; "
                        f"--model {args.model} has one output per trained class")
    if not args.embeddings:
        raise DSDLError("--zero-shot scores the split's classes from their vectors: pass "
                        "--embeddings PATH, one row per class in the split's class order "
                        "(make_embeddings.py writes it)")


def nothing_left_to_train(args, checkpoint):
    """--resume of a run that has trained --epochs already: says so (and how to score a --val
    run's test split), and there is nothing to do."""
    done = (checkpoint or {}).get("epoch", 0)
    if not args.resume or args.evaluate or done < args.epochs:
        return False
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{args.resume} has already trained {done} epoch{'s' * (done != 1)}, and "
              f"--epochs is {args.epochs}: nothing to do. Pass a larger --epochs to train on.")
        if "thresholds" in checkpoint:  # a --val run: its test split is scored at the end
            best = os.path.join(os.path.dirname(args.resume), BEST)
            print(f"If its test split was not scored at the end (no eval_<split>.jsonl beside "
                  f"it), score it with -e --resume {best}")
    return True


def one_image_batches(args, model, train_size, world_size):
    """BatchNorm cannot train on one value per channel: a batch (or --accumulate part) of one
    image, where the trunk's last map is 1 x 1 (a small --image-size). Parts of one image in
    every step are refused; a last batch of the epoch that would make one is left out of each
    epoch, with a note (returns True: drop it). At the paper's sizes nothing changes."""
    grid = getattr(model, "feature_grid", None)
    if grid is None or grid[0] * grid[1] > 1:
        return False
    per_process = args.batch_size // world_size
    at_size = (f"at --image-size {args.image_size} the last map of --arch {args.arch} is 1 x 1, "
               f"where BatchNorm cannot train on one image")
    if per_process // args.accumulate < 2:
        raise DSDLError(f"-b {args.batch_size} with --accumulate {args.accumulate} makes parts of "
                        f"one image, and {at_size}: use a smaller --accumulate, a larger -b or a "
                        f"larger --image-size")
    last = -(-train_size // world_size) % per_process  # images in each epoch's last batch
    if not 0 < last or last // args.accumulate >= 2:
        return False
    if is_main_process():
        print(f"note: each epoch's last batch would hold {last} image(s) in parts of one, and "
              f"{at_size}: it is left out of each epoch (-b {args.batch_size} on {train_size} "
              f"images)")
    return True


def start_from(args):
    """Check the command line, read the checkpoint the run starts from (--resume, --init-from)
    and fill in what the command line left open from it (options.take_from_checkpoint); returns
    the checkpoint, or None."""
    check_args(args)
    source = args.resume or args.init_from
    checkpoint = load_checkpoint(source, "--resume" if args.resume else "--init-from") if source else None
    options.take_from_checkpoint(args, (checkpoint or {}).get("args") or {}, source)
    # The class list a checkpoint was trained on: a CSV dataset evaluated or resumed uses it.
    args.checkpoint_classes = None if checkpoint is None or args.init_from else checkpoint.get("classes")
    trunks.check_arch(args.arch)
    models.check_settings(args)  # --model, --model-args, --cls-loss, --loss-args
    processes = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if args.batch_size % processes:
        raise DSDLError(f"--batch-size {args.batch_size} (the global batch) does not divide over "
                        f"{processes} processes; pass a multiple of {processes}")
    return checkpoint


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
    if not args.evaluate:
        check_same_splits(trained_on, datasets, args.resume)


def check_same_splits(trained_on, datasets, resume):
    """--resume on the splits the run was trained on: its best mAP was measured on its
    evaluation split, and a score on other images is not comparable (refused); other training
    images are the user's choice (a warning)."""
    has_val = getattr(datasets, "val", None) is not None
    selection = datasets.val if has_val else datasets.test
    evaluated = trained_on.get("evaluated")
    if "roles" in trained_on:  # splits known by their role, whatever their files are called
        now, train_key, test_key = ("val" if has_val else "test"), "train", "test"
        chose = trained_on["roles"].get(evaluated, evaluated)
    else:  # a checkpoint of before roles: splits known by their names (a CSV's, its file's)
        def name(split):
            return getattr(split, "file_name_split", split.split)
        now, test_key, chose = name(selection), name(datasets.test), evaluated
        train_key = name(datasets.train) if datasets.train is not None else None
    if evaluated and evaluated != now and (trained_on.get("sizes") or {}).get(evaluated):
        given = ("is not given now: pass it again with --val" if evaluated != test_key
                 else "was not given then: --val cannot be added to a run")
        raise DSDLError(f"{resume} chose its best model on the split {chose!r}, and now "
                        f"{selection.split!r} would choose it; the validation CSV {given} (or "
                        f"start a new run from its weights with --init-from {resume} "
                        f"--checkpoint-dir NEW_FOLDER)")
    change = split_change(trained_on, selection, now)
    if change:
        raise DSDLError(f"the evaluation split differs from the one {resume} was selected on "
                        f"({change}): its best mAP is no longer comparable, so --resume cannot "
                        f"continue the run. To start a new run from its weights on these images, "
                        f"use --init-from {resume} --checkpoint-dir NEW_FOLDER")
    change = split_change(trained_on, datasets.train, train_key) if datasets.train is not None else None
    if change:
        warnings.warn(f"the {datasets.train.split} split differs from the one {resume} was "
                      f"trained on ({change}); training continues on this one", stacklevel=2)


# --------------------------------------------------------------------------------------------
# Interruptions, errors and how the scripts end
# --------------------------------------------------------------------------------------------

INTERRUPTS = []  # the signals of STOP_SIGNALS that main() has seen
# What ends a run from outside: Ctrl-C (SIGINT); a scheduler's pre-emption or time limit
# (SIGTERM, and SIGXCPU for a CPU-time limit); a closed terminal or ssh session (SIGHUP). Each
# stops the run as Ctrl-C does, with the command that continues it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGXCPU)
# Disk errors a write can end in: reported as one line naming the folder and the way on.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def stop_if_interrupted():
    """Stop at the next batch after a signal of STOP_SIGNALS: its KeyboardInterrupt is raised
    wherever the main process is, and Python swallows one that lands in a finaliser (with a
    message)."""
    if INTERRUPTS:
        raise KeyboardInterrupt


class NonFiniteLoss(DSDLError):
    """The loss became NaN or infinite; the step was not taken."""


# Beyond these, a NaN loss comes from the inputs rather than the learning rate: GloVe's values
# lie within about +-5, and the release's beta is 1e-4.
LARGEST_CLASS_VECTOR_VALUE, LARGEST_BETA = 100.0, 1.0


def non_finite_loss_advice(error, folder, args=None, model=None):
    """The error of a NaN or infinite loss: what to change (class vectors or --beta out of
    range, else --lr) and how to go on."""
    causes = []
    semantics = getattr(model, "semantics", None)
    if torch.is_tensor(semantics) and semantics.numel():
        largest = float(semantics.abs().max())
        if largest > LARGEST_CLASS_VECTOR_VALUE:
            causes.append(f"the class vectors hold values up to {largest:.3g} (GloVe's lie "
                          f"within about 5): scale them (--embeddings)")
    if getattr(args, "beta", 0) > LARGEST_BETA:
        causes.append(f"--beta {args.beta:g} is large (the release's is 1e-4)")
    change = "; ".join(causes) + ("; or" if causes else "") + " lower --lr"
    last = os.path.join(folder, CHECKPOINT)
    if os.path.isfile(last):
        return DSDLError(f"{error} {last} is intact: {change.strip()} and continue with --resume {last}")
    return DSDLError(f"{error} No epoch was saved yet: {change.strip()}, then start again")


def ignore_interrupts(worker_id):
    """Ctrl-C and the other signals of STOP_SIGNALS are for the main process, which stops the
    run and says how to resume; a loader worker that died of one first would turn that into a
    DataLoader error. SIGTERM stays deadly: it is also how the DataLoader and multiprocessing end
    their workers (a worker that ignored it would hang the exit); a worker that dies of a
    scheduler's SIGTERM is no error once the main process has its own (see run_command)."""
    for signum in STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)


def stops_on_interrupt(kept):
    """For the commands that write one result (predict.py, export.py, make_embeddings.py):
    Ctrl-C ends the command in one line saying what is as it was (`kept`), exit status 130."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"\ninterrupted; {kept}: run the same command again", file=sys.stderr)
                return 128 + signal.SIGINT
        return run
    return wrap


def way_on(args):
    """What to run after this command stopped part-way."""
    if args.evaluate:
        return "run the same command again"
    return resume_advice(args.checkpoint_dir or args.run_folder)


def stopped_message(signum, args):
    """The line a run stopped by a signal ends with."""
    if signum in (None, signal.SIGINT):
        what = "interrupted"
    else:
        what = f"stopped by {signal.Signals(signum).name}"
    if args.evaluate:
        return f"{what}; the evaluation did not finish: run the same command again"
    return f"{what}; {way_on(args)}"


def failure_message(error, args):
    """The one line for an error the user can act on that is not a DSDLError (a full disk, the
    memory), or None for a bug (which keeps its traceback)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        folder = args.checkpoint_dir or args.run_folder
        return (f"could not write into {folder} ({error.strerror}); the files there that were "
                f"complete still are. Free disk space there (or pass a --checkpoint-dir on "
                f"another disk), then {way_on(args)}")
    if out_of_memory(error):
        return f"{out_of_memory_advice(error, args.batch_size, args.image_size)}, then {way_on(args)}"
    return None


def run_command(run, args):
    """`run()` for the main_*.py scripts: a user's mistake, a full disk or a lack of memory ends
    in one `error:` line (exit status 1); Ctrl-C, and the other signals of STOP_SIGNALS, in a
    line saying how to go on (exit status 128 + the signal's number: 130 for Ctrl-C, 143 for
    SIGTERM)."""
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    # Ctrl-C reaches the whole process group, loader workers included, and a scheduler signals
    # every process of a job: the workers ignore these (this handler does nothing in a forked
    # worker, `ignore_interrupts` once it runs), and in the main process whatever error follows
    # a signal is taken for the signal.
    INTERRUPTS.clear()
    MADE_FOLDERS.clear()
    main_process = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_process:  # a loader worker, forked with this handler: ignore it
            return
        INTERRUPTS.append(signum)
        # Workers that die of the same SIGTERM (a scheduler signals every process of a job)
        # must not be reported by the DataLoader's SIGCHLD handler: this signal stops the run.
        # A no-op, not SIG_DFL: a SIGCHLD already pending would meet SIG_DFL in Python's
        # handler table and raise "Signal 17 ignored due to race condition" mid-step.
        child_handler.append(signal.signal(signal.SIGCHLD, lambda *_: None))
        raise KeyboardInterrupt

    child_handler = []  # the SIGCHLD handler (the DataLoader's) that a signal set aside
    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}
    try:
        return run()
    except (KeyboardInterrupt, Exception) as error:
        remove_made_folders()  # a start that failed leaves no empty folder behind
        signum = INTERRUPTS[0] if INTERRUPTS else None
        if not (INTERRUPTS or isinstance(error, KeyboardInterrupt)):
            message = user_message(error) if isinstance(error, DSDLError) else failure_message(error, args)
            if message is None:
                raise
            if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank stops with it
                print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        # The loaders' workers, which a scheduler's SIGTERM killed with this process, are shut
        # down now, while SIGCHLD is still set aside: later (when the frames that hold the
        # loaders are collected, at exit) the DataLoader's own handler would report each of them.
        traceback.clear_frames(error.__traceback__)
        gc.collect()
        print(f"\n{stopped_message(signum, args)}", file=sys.stderr)
        sys.exit(128 + (signum or signal.SIGINT))
    finally:
        INTERRUPTS.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child_handler and child_handler[0] is not None:
            signal.signal(signal.SIGCHLD, child_handler[0])
        warnings.formatwarning = formatwarning
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
