"""MS-COCO 2014: image-level labels from the instance annotations (spec section 5)."""
import json
import os
import warnings

import numpy as np

from downloads import fetch, interrupted_extraction

from dataset import MultiLabelDataset
from util import DSDLError, cached_arrays, check_images_exist

COCO_SITE = "http://images.cocodataset.org/"
# archive -> (path on the COCO site, md5)
COCO2014_ARCHIVES = {
    "train2014.zip": ("zips/train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88"),
    "val2014.zip": ("zips/val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3"),
    "annotations_trainval2014.zip": ("annotations/annotations_trainval2014.zip",
                                     "0a379cfc70b0e71301e0f377548639bd"),
}
CACHE_VERSION = 2  # 2: util.cached_arrays' layout

# The 80 COCO category names in the model's order: sorted alphabetically (spec section 5), the
# row order of coco_glove_word2vec.pkl. The dataset reads them from the annotations; this list
# serves checkpoints that carry no class names (the release's) in predict.py.
COCO_CLASSES = sorted((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"))


def read_instance_labels(path):
    """Classes, image ids, file names and N x C labels (1 / -1) from an `instances_*.json`.

    The labels of an image are the categories of its instance annotations; a class's index is
    the position of its NAME among the sorted names (not its category id); images without any
    annotation are dropped. Images keep the file's order.
    """
    try:
        with open(path) as f:
            data = json.load(f)
        names = [category["name"] for category in data["categories"]]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DSDLError(f"{path} names two categories {', '.join(map(repr, repeated))}; a class "
                            f"name must be unique (its column is its place among the sorted names)")
        classes = sorted(names)
        column = {category["id"]: classes.index(category["name"]) for category in data["categories"]}
        if not data["annotations"]:
            raise DSDLError(f"{path} holds no annotations, so no image has a label; is it the "
                            f"instances file (instances_*2014.json)?")
        present = {}  # image id -> class indices of its annotations
        for annotation in data["annotations"]:
            if annotation["category_id"] not in column:
                raise DSDLError(f"{path}: annotation {annotation.get('id')} of image "
                                f"{annotation['image_id']} has category id "
                                f"{annotation['category_id']}, which is not among its categories")
            present.setdefault(annotation["image_id"], set()).add(column[annotation["category_id"]])
        kept = [image for image in data["images"] if image["id"] in present]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DSDLError(f"cannot read the COCO annotations {path} ({error!r}); delete it to "
                        f"download annotations_trainval2014.zip again") from error
    del data  # the annotations (most of the file) are not kept
    labels = np.full((len(kept), len(classes)), -1, dtype=np.int8)  # N x C
    for row, image in enumerate(kept):
        labels[row, sorted(present[image["id"]])] = 1
    image_ids = np.array([image["id"] for image in kept], dtype=np.int64)
    file_names = np.array([image["file_name"] for image in kept], dtype=str)
    return classes, image_ids, file_names, labels


def load_labels_cached(annotation_file, cache_file):
    """`read_instance_labels`, kept in `cache_file` (util.cached_arrays) so that later starts
    skip the json."""
    def build():
        classes, image_ids, file_names, labels = read_instance_labels(annotation_file)
        return {"classes": np.array(classes, dtype=str), "image_ids": image_ids,
                "file_names": file_names, "labels": labels}

    arrays = cached_arrays(cache_file, annotation_file, build, CACHE_VERSION)
    return (arrays["classes"].tolist(), arrays["image_ids"], arrays["file_names"],
            arrays["labels"])


class COCO2014(MultiLabelDataset):
    """MS-COCO 2014 `train` or `val` for multi-label classification.

    `root` is laid out as the official zips extract: `train2014/`, `val2014/` and
    `annotations/instances_{train,val}2014.json`. What is absent is downloaded (md5 verified)
    and extracted when `download` is true. `dataset[i]` is `(image, labels, image_id)`, labels
    an int vector of 1 (present) and -1 (absent); `classes` are the category names sorted.
    """

    name = "COCO 2014"
    benchmark = "coco2014"  # key of the paper's results (report.PAPER_RESULTS)
    labelled = True
    splits = ("train", "val")

    def __init__(self, root, split, transform=None, download=True):
        if split not in self.splits:
            raise ValueError(f"split must be one of {', '.join(self.splits)}, got {split!r}")
        self.root = root
        self.split = split
        self.transform = transform
        self.image_folder = os.path.join(root, f"{split}2014")
        self.annotation_file = self.label_source = os.path.join(root, "annotations",
                                                                f"instances_{split}2014.json")
        needed = [(self.annotation_file, "annotations_trainval2014.zip"),
                  (self.image_folder, f"{split}2014.zip")]
        for path, archive in needed:
            if os.path.exists(path) and not interrupted_extraction(archive, root):
                continue
            if not download:
                raise DSDLError(f"COCO 2014 {split}: {path} not found and download=False")
            self._download(archive, path)
        cache_file = os.path.join(root, "annotations", f"instances_{split}2014.labels.npz")
        self.classes, self.image_ids, self.file_names, self.labels = load_labels_cached(
            self.annotation_file, cache_file)
        check_images_exist([os.path.join(self.image_folder, str(name)) for name in self.file_names],
                           f"COCO 2014 {split} ({self.image_folder})")
        ids, counts = np.unique(self.image_ids, return_counts=True)
        if (counts > 1).any():  # on every start, also when the labels come from the cache
            warnings.warn(f"{self.annotation_file} lists {int((counts > 1).sum())} image id(s) more "
                          f"than once (e.g. {', '.join(map(str, ids[counts > 1][:5]))}); each entry "
                          f"is kept as an image", stacklevel=2)

    def _download(self, filename, expected):
        """Fetch and extract `filename` unless a verified copy is already in `root`."""
        site_path, md5 = COCO2014_ARCHIVES[filename]
        archive = os.path.join(self.root, filename)
        fetch(archive, [COCO_SITE + site_path], md5, self.root, f"COCO 2014 {self.split} ({expected})",
              f"Extract the official {filename} into {self.root}, or put the zip there.")
        if not os.path.exists(expected):
            raise DSDLError(f"{archive} did not contain {expected}; is it the right archive?")

    def image_path(self, index):
        return os.path.join(self.image_folder, str(self.file_names[index]))

    def label_vector(self, index):
        return self.labels[index].astype(np.int64)  # the cache keeps them small

    def image_id(self, index):
        return int(self.image_ids[index])
