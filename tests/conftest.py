"""What every test shares: small data the tests make (a tiny VOCdevkit tree with visually
distinct classes), the small command line of the runs, and an offline environment."""
import builtins
import errno
import os
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_EMBEDDINGS = os.path.join(ROOT, "..", "shared", "label_embeddings")

from voc import VOC_CLASSES  # noqa: E402

# One intra-op thread: the same numbers in every process (weights compared bit for bit), and on
# a 2-core machine the fastest way to run many small models.
torch.set_num_threads(1)
# The runs of the suite: ResNet-18 from random weights at 64 px on the CPU, no loader workers.
SMALL = ["--arch", "resnet18", "--no-pretrained", "--image-size", "64", "-j", "0", "-b", "8",
         "--device", "cpu"]


def offline_environment():
    """Environment variables under which every download fails at once (nothing listens on
    port 9), with one thread per process, for the command lines the tests start."""
    proxy = "http://127.0.0.1:9"
    return {**os.environ, "http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy,
            "HTTPS_PROXY": proxy, "no_proxy": "", "OMP_NUM_THREADS": "1"}


def class_image(present, size=64, rng=None):
    """An image where class c paints its own cell of a 4 x 5 grid in its own colour."""
    rng = rng or np.random.default_rng(0)
    pixels = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    cell_h, cell_w = size // 4, size // 5
    for c in present:
        row, col = divmod(c, 5)
        colour = np.array([(c * 67) % 256, (c * 139 + 80) % 256, 255 - (c * 29) % 256], dtype=np.uint8)
        pixels[row * cell_h:(row + 1) * cell_h, col * cell_w:(col + 1) * cell_w] = colour
    return Image.fromarray(pixels)


def write_voc_tree(root, year="2007", splits=None, size=64, seed=0, classes=VOC_CLASSES):
    """A VOCdevkit/VOC<year> tree: JPEGs plus `<class>_<split>.txt` with flags 1 / 0 / -1.

    `splits` maps split name -> number of images. Each image has 1-3 classes; about one
    positive in five is flagged difficult (0). Returns {split: (ids, N x C flags)}.
    """
    splits = splits or {"trainval": 24, "test": 16}
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "VOCdevkit", f"VOC{year}")
    os.makedirs(os.path.join(folder, "JPEGImages"), exist_ok=True)
    os.makedirs(os.path.join(folder, "ImageSets", "Main"), exist_ok=True)
    written, counter = {}, 0
    for split, count in splits.items():
        ids, flags = [], np.full((count, len(classes)), -1, dtype=np.int64)
        for i in range(count):
            image_id = f"{counter:06d}"
            counter += 1
            present = rng.choice(len(classes), size=rng.integers(1, 4), replace=False)
            flags[i, present] = 1
            flags[i, present[rng.random(len(present)) < 0.2]] = 0
            class_image(present, size, rng).save(os.path.join(folder, "JPEGImages", image_id + ".jpg"),
                                                 quality=95)
            ids.append(image_id)
        for c, name in enumerate(classes):
            with open(os.path.join(folder, "ImageSets", "Main", f"{name}_{split}.txt"), "w") as f:
                f.writelines(f"{image_id} {flags[i, c]:2d}\n" for i, image_id in enumerate(ids))
        with open(os.path.join(folder, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.writelines(f"{image_id}\n" for image_id in ids)
        written[split] = (ids, flags)
    return written


def rewrite_split_files(root, split, rewrite, year="2007"):
    """Replace the lines of every `<class>_<split>.txt` of the VOC tree at `root` by
    `rewrite(class name, lines)`."""
    main_folder = os.path.join(root, "VOCdevkit", f"VOC{year}", "ImageSets", "Main")
    for name in VOC_CLASSES:
        path = os.path.join(main_folder, f"{name}_{split}.txt")
        with open(path) as f:
            lines = f.readlines()
        with open(path, "w") as f:
            f.writelines(rewrite(name, lines))
    return main_folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network in this process: every download fails at once, as with no connection (and
    torch.hub looks for weights in an empty folder)."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network, raising=False)


def fill_disk(monkeypatch, module, room):
    """Make the files that `module` opens behave as on a disk with `room` bytes left: a write
    beyond that writes what fits, then fails with ENOSPC (the disk filled up part-way)."""
    left = [room]
    real_open = open

    class Filling:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if len(data) > left[0]:
                self.f.write(data[:left[0]])
                left[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.f.close()

    monkeypatch.setattr(module, "open", lambda *args, **kwargs: Filling(real_open(*args, **kwargs)),
                        raising=False)


def unreadable(monkeypatch, path):
    """Take read permission away from the file or folder at `path`. Root reads whatever the
    permission bits say, so for root the refusal a user would meet is made by hand: os.access,
    open and os.scandir refuse that path as they would refuse that user."""
    os.chmod(path, 0)
    if os.geteuid() != 0:
        return
    path = os.path.abspath(path)

    def refuse(real):
        def call(target, *args, **kwargs):
            if isinstance(target, (str, bytes, os.PathLike)) and os.path.abspath(target) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(target))
            return real(target, *args, **kwargs)
        return call

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda target, mode, *args, **kwargs: (
        False if os.path.abspath(target) == path else real_access(target, mode, *args, **kwargs)))
    monkeypatch.setattr(os, "scandir", refuse(os.scandir))
    monkeypatch.setattr(builtins, "open", refuse(builtins.open))


def call_main(main, argv):
    """An entry script's main(argv) in this process; returns its exit status."""
    try:
        main(argv)
    except SystemExit as exit:
        return exit.code
    return 0


@pytest.fixture
def voc_root(tmp_path):
    """A tiny VOC 2007 tree (24 trainval, 16 test images at 64 px) and its flags."""
    root = tmp_path / "voc2007"
    return str(root), write_voc_tree(str(root))


@pytest.fixture
def random_embeddings(tmp_path):
    """A 20 x 300 .npy of random class vectors (the real ones are in ../shared when present)."""
    path = tmp_path / "embeddings.npy"
    np.save(path, np.random.default_rng(1).standard_normal((20, 300)).astype(np.float32))
    return str(path)


# ---- running the suite on several workers (pytest-xdist: python -m pytest -n auto tests) ------
# The modules that take longest, first: on 2 workers a long module started last would be run
# alone at the end. The other modules follow in their usual order.
SLOW_FIRST = ["test_demo.py", "test_distributed.py", "test_faults_runs.py", "test_adversary.py",
              "test_user_mistakes.py", "test_recipes.py", "test_baseline.py", "test_trunks.py",
              "test_engine.py"]


def pytest_collection_modifyitems(config, items):
    """On an xdist worker: the slow modules first (every worker collects the same order, and
    the scheduler below hands out work in that order). A module's tests stay together."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is not installed: the suite runs in one process
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class ModuleFixtureScheduling(LoadScopeScheduling):
        """The tests of a module that defines a module-scoped fixture (a training run, a torchrun
        launch, made once and read by several tests) go to one worker together, so the fixture is
        made once; the tests of the other modules are handed out one by one."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # the order of the collection (above)
            self.shares = {}

        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            if module not in self.shares:
                with open(os.path.join(str(self.config.rootpath), module), encoding="utf-8") as f:
                    source = f.read()
                self.shares[module] = 'scope="module"' in source or "scope='module'" in source
            return module if self.shares[module] else nodeid

    def pytest_xdist_make_scheduler(config, log):
        return ModuleFixtureScheduling(config, log)
