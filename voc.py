"""PASCAL VOC 2007 and 2012: image-level labels from the per-class split files."""
import os
import tarfile

import numpy as np

from dataset import MultiLabelDataset
from downloads import fetch, interrupted_extraction

from util import DSDLError, atomic_write, check_images_exist

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

MIRRORS = ("http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
           "https://pjreddie.com/media/files/")

# split -> (archive, md5) holding it (spec section 7)
VOC2007_ARCHIVES = {
    "train": ("VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
    "val": ("VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
    "trainval": ("VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
    "test": ("VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f"),
}


def read_split_labels(main_folder, split, classes):
    """Image ids and the N x C label matrix in {1, 0, -1} from `<class>_<split>.txt`."""
    ids, columns = None, []
    for name in classes:
        path = os.path.join(main_folder, f"{name}_{split}.txt")
        if not os.path.isfile(path):
            raise DSDLError(f"split file not found: {path}")
        flags = {}
        with open(path) as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or fields[1] not in ("1", "0", "-1"):
                    raise DSDLError(f"{path}, line {number}: expected '<image_id> <1|0|-1>', "
                                    f"got {line.strip()!r}")
                flags[fields[0]] = int(fields[1])
        if ids is None:
            ids = list(flags)
        elif set(flags) != set(ids):
            raise DSDLError(f"{path} lists other images than {classes[0]}_{split}.txt")
        columns.append([flags[i] for i in ids])
    return ids, np.stack(columns, axis=1).astype(np.int64)  # N x C


class VOC2007(MultiLabelDataset):
    """VOC 2007 for multi-label classification.

    `root` holds `VOCdevkit/VOC2007`. When the split's files are absent and `download` is true,
    the archive is downloaded (md5 verified) and extracted; when present, nothing touches the
    network. `dataset[i]` is `(image, labels, image_id)`, labels an int vector in {1, 0, -1}
    (0 = difficult).
    """

    year = "2007"
    name = "VOC 2007"
    benchmark = "voc2007"  # key of the paper's results (report.PAPER_RESULTS)
    labelled = True
    archives = VOC2007_ARCHIVES
    mirrors = MIRRORS
    classes = list(VOC_CLASSES)

    def __init__(self, root, split, transform=None, download=True):
        if split not in self.archives:
            raise ValueError(f"split must be one of {', '.join(self.archives)}, got {split!r}")
        self.root = root
        self.split = split
        self.transform = transform
        self.folder = os.path.join(root, "VOCdevkit", f"VOC{self.year}")
        self.main_folder = self.label_source = os.path.join(self.folder, "ImageSets", "Main")
        missing = self._missing_label_files()
        # An extraction that was cut short leaves its staging folder: extract again. A split
        # whose files are only partly there is the user's tree: never extract over it.
        if interrupted_extraction(self.archives[split][0], root) or len(missing) == len(self._label_files()):
            if not download:
                raise DSDLError(f"{self.name} {split} not found in {self.folder} (or its "
                                f"extraction was interrupted) and download=False")
            self._download()
            missing = self._missing_label_files()
        if missing:
            raise DSDLError(f"{self.name} {split} is incomplete: {len(missing)} of its label files "
                            f"are missing from {self.main_folder} ({', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}). Restore them, or move "
                            f"{self.folder} away to download it again; nothing is downloaded or "
                            f"extracted over existing files.")
        self.image_ids, self.labels = self._read_labels()
        if not self.image_ids:
            raise DSDLError(f"the {split} split files in {self.main_folder} list no images")
        check_images_exist([self._image_path(image_id) for image_id in self.image_ids],
                           f"{self.name} {split}")

    def _label_files(self):
        return [f"{name}_{self.split}.txt" for name in self.classes]

    def _missing_label_files(self):
        return [name for name in self._label_files()
                if not os.path.isfile(os.path.join(self.main_folder, name))]

    def _read_labels(self):
        return read_split_labels(self.main_folder, self.split, self.classes)

    def _image_path(self, image_id):
        return os.path.join(self.folder, "JPEGImages", image_id + ".jpg")

    def image_path(self, index):
        return self._image_path(self.image_ids[index])

    def _download(self):
        filename, md5 = self.archives[self.split]
        archive = os.path.join(self.root, filename)
        fetch(archive, [mirror + filename for mirror in self.mirrors], md5, self.root,
              f"{self.name} {self.split}",
              f"Place the extracted VOCdevkit folder in {self.root} (so that {self.main_folder} "
              f"exists), or put {filename} there.")
        if len(self._missing_label_files()) == len(self._label_files()):
            raise DSDLError(f"{archive} did not contain the {self.split} files of "
                            f"{self.main_folder}; is it the right archive?")


# split -> (archive, md5) holding it (spec section 7); the test archive has no published md5.
VOC2012_ARCHIVES = {
    "train": ("VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd"),
    "val": ("VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd"),
    "trainval": ("VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd"),
    "test": ("VOC2012test.tar", None),
}


class VOC2012(VOC2007):
    """VOC 2012 for multi-label classification: `train`, `val`, `trainval` and `test`.

    Same contract as `VOC2007`, with `root` holding `VOCdevkit/VOC2012`. The test split's labels
    are withheld by the organisers: its ids come from `ImageSets/Main/test.txt`, `labelled` is
    False and every label is 0, the flag that no AP counts, so that nothing mistakes the unknown
    labels for negatives. Scores on it are judged by the evaluation server (`write_submission`).
    """

    year = "2012"
    name = "VOC 2012"
    benchmark = "voc2012"
    archives = VOC2012_ARCHIVES
    # The test archive is only on the pjreddie.com mirror (the release fetched it from there).
    mirrors = ("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/", "https://pjreddie.com/media/files/")

    def __init__(self, root, split, transform=None, download=True):
        self.labelled = split != "test"
        super().__init__(root, split, transform, download)

    def _label_files(self):
        return super()._label_files() if self.labelled else ["test.txt"]

    def _read_labels(self):
        if self.labelled:
            return super()._read_labels()
        with open(os.path.join(self.main_folder, "test.txt")) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        return ids, np.zeros((len(ids), len(self.classes)), dtype=np.int64)


def write_submission(scores, image_ids, classes, folder):
    """The VOC 2012 evaluation-server files of N x C `scores` (spec section 8).

    Writes `<folder>/results/VOC2012/Main/comp1_cls_test_<class>.txt`, one line
    `<image_id> <score>` per image, and `<folder>/results.tar.gz` holding them under
    `results/VOC2012/Main/`, the layout the server expects. Returns (that folder, the archive).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(image_ids), len(classes)):
        raise ValueError(f"scores {scores.shape} do not match {len(image_ids)} images x "
                         f"{len(classes)} classes")
    relative = os.path.join("results", "VOC2012", "Main")
    results = os.path.join(folder, relative)
    os.makedirs(results, exist_ok=True)
    archive = os.path.join(folder, "results.tar.gz")
    with atomic_write(archive) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for c, name in enumerate(classes):
            filename = f"comp1_cls_test_{name}.txt"
            with atomic_write(os.path.join(results, filename), "w") as text:
                # Six decimals, as the devkit's own example writes them (%f).
                text.writelines(f"{image_id} {score:.6f}\n" for image_id, score in zip(image_ids, scores[:, c]))
            tar.add(os.path.join(results, filename), arcname=f"results/VOC2012/Main/{filename}")
    return results, archive
