"""NUS-WIDE: the 81 concepts' image-level labels, in the layout of the official downloads.

    ROOT/Concepts81.txt                                  one concept per line
    ROOT/ImageList/TrainImagelist.txt, TestImagelist.txt one image per line: actor\\0001_2124494179.jpg
    ROOT/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt (and _Test.txt)
                                                         one 0 / 1 per line of the image list
    ROOT/Flickr/actor/0001_2124494179.jpg                the images

Nothing is downloaded: the labels and lists come from the NUS-WIDE page (NUS_WIDE_PAGE), the
images from Flickr, where many are gone. The images listed but missing are left out, with one
warning that says how many were used.
"""
import os
import re
import warnings

import numpy as np

from dataset import MultiLabelDataset
from util import ABSENT, PRESENT, DSDLError

NUS_WIDE_PAGE = "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html"
SPLITS = {"train": ("TrainImagelist.txt", "Train"), "test": ("TestImagelist.txt", "Test")}


def where_to_get(what):
    return f"{what} comes with NUS-WIDE's downloads from {NUS_WIDE_PAGE} (this code downloads nothing)"


def read_lines(path, what):
    """The stripped, non-empty lines of a text file (CRLF or LF), or an error naming it."""
    if not os.path.isfile(path):
        raise DSDLError(f"NUS-WIDE: {path} not found; {where_to_get(what)}")
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def relative_image_path(entry):
    """`actor\\0001_2124494179.jpg` (or a full Windows path through `...\\Flickr\\`) as the path
    below `Flickr/` on this machine."""
    parts = [part for part in re.split(r"[\\/]", entry) if part]
    lowered = [part.lower() for part in parts]
    if "flickr" in lowered:  # Imagelist.txt style: C:\ImageData\Flickr\actor\...
        parts = parts[len(lowered) - lowered[::-1].index("flickr"):]
    return "/".join(parts)


def read_flags(path, count, list_path):
    """The 0 / 1 column of a `Labels_<concept>_<Split>.txt`, one per line of the image list."""
    values = read_lines(path, "Groundtruth/TrainTestLabels")
    if len(values) != count:
        raise DSDLError(f"{path} has {len(values):,} labels but {list_path} lists {count:,} "
                        f"images; one 0 / 1 per listed image is expected. Restore the file from "
                        f"NUS-WIDE's Groundtruth download ({NUS_WIDE_PAGE})")
    wrong = [i for i, value in enumerate(values) if value not in ("0", "1")]
    if wrong:
        raise DSDLError(f"{path}, line {wrong[0] + 1}: expected 0 or 1, got {values[wrong[0]]!r}")
    return np.array([value == "1" for value in values])


class NUSWIDE(MultiLabelDataset):
    """NUS-WIDE `train` or `test` (its TrainImagelist / TestImagelist) with the 81 concepts.

    `dataset[i]` is `(image, labels, image id)`, labels an int vector of 1 (present) and -1
    (absent) in the order of Concepts81.txt, the id the image's path below `Flickr/`
    (`actor/0001_2124494179.jpg`). Images of the list that are not on disk are left out.
    """

    name = "NUS-WIDE"
    upright = True  # Flickr photos

    def __init__(self, root, split, transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not os.path.isdir(root):
            raise DSDLError(f"NUS-WIDE not found: {root} is not a folder. Get its concept list, "
                            f"image lists and ground truth from {NUS_WIDE_PAGE} and the images "
                            f"(Flickr/) as that page says; docs/datasets.md shows the layout")
        self.root = root
        self.split = split
        self.transform = transform
        self.image_folder = os.path.join(root, "Flickr")
        list_name, suffix = SPLITS[split]
        concepts = os.path.join(root, "Concepts81.txt")
        self.classes = read_lines(concepts, "Concepts81.txt (the concept list)")
        if not self.classes:
            raise DSDLError(f"{concepts} names no concept; restore it from {NUS_WIDE_PAGE}")
        repeated = sorted({name for name in self.classes if self.classes.count(name) > 1})
        if repeated:  # two columns of one name: its labels and its class vector would be ambiguous
            raise DSDLError(f"{concepts} names {', '.join(repeated[:5])} more than once; each "
                            f"concept must be listed once (restore the file from {NUS_WIDE_PAGE})")
        list_path = os.path.join(root, "ImageList", list_name)
        listed = [relative_image_path(entry) for entry in read_lines(list_path, "ImageList/")]
        if not listed:
            raise DSDLError(f"{list_path} lists no images; restore it from NUS-WIDE's ImageList download")
        labels_folder = os.path.join(root, "Groundtruth", "TrainTestLabels")
        self.label_source = labels_folder
        missing_files = [name for name in (f"Labels_{concept}_{suffix}.txt" for concept in self.classes)
                         if not os.path.isfile(os.path.join(labels_folder, name))]
        if missing_files:
            raise DSDLError(f"NUS-WIDE {split}: {len(missing_files)} of the {len(self.classes)} label "
                            f"files are missing from {labels_folder} ({', '.join(missing_files[:3])}"
                            f"{', ...' if len(missing_files) > 3 else ''}); "
                            f"{where_to_get('Groundtruth/TrainTestLabels')}")
        present = np.stack([read_flags(os.path.join(labels_folder, f"Labels_{concept}_{suffix}.txt"),
                                       len(listed), list_path)
                            for concept in self.classes], axis=1)  # N x C
        found = np.array([os.path.isfile(os.path.join(self.image_folder, path)) for path in listed])
        if not found.any():
            raise DSDLError(f"NUS-WIDE {split}: none of the {len(listed):,} images of {list_path} is "
                            f"in {self.image_folder} (e.g. {listed[0]}); put the images there "
                            f"as Flickr/<folder>/<file>, the paths of the list")
        if not found.all():
            gone = [path for path, there in zip(listed, found) if not there]
            warnings.warn(f"NUS-WIDE {split}: {int(found.sum()):,} of the {len(listed):,} images of "
                          f"{list_path} are in {self.image_folder} and used; the {len(gone):,} "
                          f"missing (e.g. {', '.join(gone[:3])}) are left out", stacklevel=2)
        self.images = [path for path, there in zip(listed, found) if there]
        self.image_ids = self.images
        self.labels = np.where(present[found], PRESENT, ABSENT).astype(np.int64)  # N x C

    def image_path(self, index):
        return os.path.join(self.image_folder, self.images[index])
