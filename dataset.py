"""What a dataset gives the engine (`MultiLabelDataset`), and how the engine loads it
(`make_loader`: shuffled and seeded per image for training, in order for evaluation).

Every dataset of this project (voc.py, coco.py, custom.py, nuswide.py, openimages.py) is a
`MultiLabelDataset`. A new layout is a subclass that sets the attributes below in its
`__init__` and says where image i is (`image_path`); docs/code_layout.md shows one in full.
"""
import hashlib
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from util import UNKNOWN, read_image


class MultiLabelDataset(Dataset):
    """One split of a multi-label dataset. `dataset[i]` is `(image, labels, image id)`: the image
    through `transform`, its C labels (int64) and its id.

    Labels are PRESENT 1, DIFFICULT 0 (a positive of the loss that no metric counts, VOC's),
    ABSENT -1 and UNKNOWN -2 (never checked: no loss term, no metric; util.py names them).
    """

    name = None           # the dataset's name in tables and messages ("VOC 2007")
    benchmark = None      # the key of the paper's results (report.PAPER_RESULTS); None: own data
    labelled = True       # False: a split without labels (VOC 2012 test), scored only
    partial = False       # True: UNKNOWN labels occur (the engine leaves them out)
    upright = False       # turn photos upright by their EXIF orientation (own data: yes)
    transform = None      # image -> tensor (util.train_transform / eval_transform)
    # Set by each split's __init__:
    split = None          # the split's name: "trainval", "test", a CSV's name ...
    classes = ()          # C class names, in the order of the label columns and class vectors
    label_source = None   # the file or folder the labels come from (named in messages)
    image_ids = ()        # N ids in the split's order (their fingerprint goes into checkpoints)
    labels = None         # N x C numpy array of the labels above

    def image_path(self, index):
        """The file of image `index`."""
        raise NotImplementedError(f"{type(self).__name__} must say where its images are")

    def label_vector(self, index):
        """The C labels of image `index` (a numpy row)."""
        return self.labels[index]

    def image_id(self, index):
        return self.image_ids[index]

    def label_fingerprint(self):
        """sha256 of the split's labels, each image's row with its id, in the order of the
        sorted ids: another label of any image gives another fingerprint (checkpoints record it,
        so that --resume sees a labels-only change)."""
        ids = [str(image_id) for image_id in self.image_ids]
        digest = hashlib.sha256()
        for index in sorted(range(len(ids)), key=ids.__getitem__):
            row = np.asarray(self.label_vector(index), dtype=np.int8)
            digest.update(ids[index].encode() + b"\0" + row.tobytes())
        return digest.hexdigest()

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        image = read_image(self.image_path(index), self.transform, upright=self.upright)
        return image, torch.from_numpy(self.label_vector(index)), self.image_id(index)


class Datasets(NamedTuple):
    """What an entry script gives the engine (each a dataset.MultiLabelDataset)."""
    train: Dataset            # None with -e
    test: Dataset             # labelled; evaluated after every epoch, selects model_best
    submission: Dataset = None  # unlabelled, scored by the best model at the end (VOC 2012 test)
    val: Dataset = None       # labelled; if given, selects model_best instead of test, which
    #                           the best model then scores once, at the end


# --------------------------------------------------------------------------------------------
# What the labels mean to the loss
# --------------------------------------------------------------------------------------------

def training_targets(labels):
    """1 (present) and 0 (difficult) are positives of the loss, -1 is a negative (spec 5); -2
    (unknown) is neither: `labelled_loss` leaves it out."""
    return (labels >= 0).float()


def labelled_loss(loss_fn, output, labels, partial):
    """The loss of `output` against `labels` (on the device); with partial labels only the known
    image-class pairs count in its classification term."""
    targets = training_targets(labels)
    if partial:
        return loss_fn(output, targets, labels != UNKNOWN)
    return loss_fn(output, targets)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def split_of(loader):
    """The dataset of `loader`, unwrapped (EpochSeeded, Subset)."""
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, (EpochSeeded, Subset)):
        dataset = dataset.dataset
    return dataset


def has_partial_labels(loader):
    """Whether the split of `loader` may have unknown labels (its dataset's `partial`)."""
    return bool(getattr(split_of(loader), "partial", False))


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


def make_loader(dataset, batch_size, workers, seed, device, shuffle, drop_last=False):
    """Training loader (shuffled) or evaluation loader; under torchrun each process loads its share.

    The training share comes from a DistributedSampler; the evaluation share is every
    world_size-th image, without the sampler's padding. Call `set_epoch` before each epoch.
    `drop_last` (training under --compile): no smaller last batch, unless there is no full one.
    """
    from runs import ignore_interrupts  # runs.py owns the signals (and imports much more)
    distributed = torch.distributed.is_initialized()
    world_size = torch.distributed.get_world_size() if distributed else 1
    sampler = None
    if shuffle:
        dataset = EpochSeeded(dataset, seed)
        sampler = (DistributedSampler(dataset, shuffle=True, seed=seed) if distributed
                   else RandomSampler(dataset, generator=torch.Generator()))
    elif distributed:
        dataset = Subset(dataset, range(torch.distributed.get_rank(), len(dataset), world_size))
    drop_last = drop_last and len(dataset) // world_size >= batch_size // world_size
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                      drop_last=drop_last, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=ignore_interrupts)


def set_epoch(loader, epoch, seed):
    """Make the training loader's order and augmentation those of `epoch` (seeded from it)."""
    loader.dataset.epoch.fill_(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # shuffles with seed + epoch, the same on every process
    else:
        loader.sampler.generator.manual_seed(seed + epoch)
