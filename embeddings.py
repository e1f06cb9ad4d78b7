"""Class-vector files: the standard GloVe files (downloaded, md5 checked) and safe loading of
any C x d file (.npy, or a pickle of one numpy array, read without running code): d is 300 for
GloVe, and any width works (the auto-encoder's W1 is d x 1024)."""
import os
import pickle

import numpy as np
import torch

from checkpoints import describe_file
from downloads import download, md5sum
from util import DSDLError

# The standard GloVe class vectors (ML-GCN's, made from glove.840B.300d): name -> (urls, md5).
STANDARD_EMBEDDINGS = {
    "voc_glove_word2vec.pkl": (
        ["https://github.com/megvii-research/ML-GCN/raw/master/data/voc/voc_glove_word2vec.pkl"],
        "214a91652f7e0533f9108683ffa15ab1"),
    "coco_glove_word2vec.pkl": (
        ["https://github.com/megvii-research/ML-GCN/raw/master/data/coco/coco_glove_word2vec.pkl"],
        "1977a47d8ba304e6f3f89788edf1ab9d"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles a plain numpy array and refuses every other global (so no code can run)."""

    def find_class(self, module, name):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")}:
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_embeddings(path, num_classes=None):
    """Load a C x d label-embedding file (.pkl of one numpy array, or .npy) safely: one d-d
    vector per class, for any d >= 1 (the standard files and the release's checkpoints: 300-d
    GloVe). `num_classes`: the C required (None: any).

    A file named like a standard one must match its md5; pickles are read by an unpickler that
    allows only numpy's array globals, so a hostile file is refused without running anything.
    """
    if not os.path.isfile(path):
        raise DSDLError(f"label embeddings not found: {path}")
    name = os.path.basename(path)
    if name in STANDARD_EMBEDDINGS and md5sum(path) != STANDARD_EMBEDDINGS[name][1]:
        raise DSDLError(f"{path} has md5 {md5sum(path)}, not the standard file's "
                        f"{STANDARD_EMBEDDINGS[name][1]}; delete it to download it again")
    try:
        if path.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            with open(path, "rb") as f:
                array = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, ValueError, EOFError, OSError) as error:
        what = describe_file(path)
        found = (f"it is {what}" if not what.startswith(("neither", "a pickle", "a NumPy"))
                 else f"{str(error).splitlines()[0]}")
        raise DSDLError(f"cannot load label embeddings {path}: {found}. Expected the class "
                        f"vectors: a pickled numpy array or a .npy file of shape C x d (e.g. "
                        f"300-d GloVe; make_embeddings.py writes one)") from error
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] < 1 or (
            num_classes is not None and array.shape[0] != num_classes):
        shape = getattr(array, "shape", type(array).__name__)
        width = array.shape[1] if getattr(array, "ndim", 0) == 2 and array.shape[1] else "d"
        raise DSDLError(f"label embeddings {path} have shape {shape}; expected "
                        f"({num_classes if num_classes is not None else 'C'}, {width}), one "
                        f"vector per class in the dataset's class order (e.g. 300-d GloVe)")
    if array.dtype.kind not in "fiu":  # e.g. an object array of strings: no code, but no vectors
        raise DSDLError(f"label embeddings {path} hold {array.dtype} values; expected numbers")
    # A NaN or an all-zero vector makes the loss NaN (cos(S, S_hat) is undefined): say which row.
    broken = [row for row in range(array.shape[0])
              if not np.isfinite(array[row]).all() or not np.any(array[row])]
    if broken:
        raise DSDLError(f"label embeddings {path}: row(s) {', '.join(map(str, broken[:10]))} "
                        f"{'are' if len(broken) > 1 else 'is'} all zeros or hold NaN/inf; every "
                        f"class needs a real vector (make_embeddings.py writes them)")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def standard_embeddings(name, folder="data"):
    """Path of a standard GloVe file in `folder`, downloaded (md5 checked) when absent."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        urls, md5 = STANDARD_EMBEDDINGS[name]
        try:
            download(urls, path, md5)
        except DSDLError as error:
            raise DSDLError(f"{error}\nOr pass a copy you have with --embeddings PATH.") from error
    return path


def class_vectors(args, classes, checkpoint, default_embeddings):
    """The C x d class vectors of a run: from our checkpoint (not with --init-from, whose
    class list is another's, nor with --zero-shot, which scores the split's classes from
    theirs), else --embeddings, else the dataset's standard file."""
    if getattr(args, "zero_shot", False):
        return load_embeddings(args.embeddings, num_classes=len(classes))
    if checkpoint is not None and "semantics" in checkpoint and not args.init_from:
        if args.embeddings:
            check_same_vectors(args.embeddings, checkpoint["semantics"], args.resume,
                               f"to start a new run from its weights with these vectors, use "
                               f"--init-from {args.resume}")
        return checkpoint["semantics"]
    if not args.embeddings and default_embeddings is None:
        raise DSDLError("this dataset has no standard class vectors: pass --embeddings PATH, a "
                        "C x d file in the class order (make_embeddings.py writes one)")
    path = args.embeddings or standard_embeddings(default_embeddings)
    return load_embeddings(path, num_classes=len(classes))


def trained_width(checkpoint, weights):
    """The width d of the class vectors a DSDL checkpoint was trained with (its W1 is d x 1024,
    its semantics C x d), or None when it stores neither."""
    if "W1" in weights:
        return weights["W1"].shape[0]
    semantics = checkpoint.get("semantics")
    return None if semantics is None else semantics.shape[1]


def check_width(vectors, width, source, path):
    """Class vectors of another width than the checkpoint's are refused in one line, before the
    model is built (W1 maps d-d vectors to the hidden layer: another d does not fit it)."""
    if width is not None and vectors.shape[1] != width:
        raise DSDLError(f"{path} was trained with {width}-d class vectors; {source} holds "
                        f"{vectors.shape[1]}-d ones: give vectors of the kind it was trained with "
                        f"(the authors' released checkpoints: 300-d GloVe)")


def check_same_vectors(path, semantics, checkpoint_path, way_on):
    """--embeddings beside a checkpoint that has its class vectors (--resume, -e, predict.py):
    the same vectors are welcome; other ones are refused, since the checkpoint's dictionary was
    learned from its own (and keeping those silently would ignore the option). `way_on`: how to
    use other vectors instead."""
    given = load_embeddings(path)
    if given.shape != semantics.shape or not torch.equal(given, semantics.float()):
        raise DSDLError(f"--embeddings {path} holds other class vectors than {checkpoint_path}: "
                        f"its dictionary was learned from the checkpoint's vectors, which are "
                        f"kept; leave out --embeddings to use them. {way_on[0].upper()}{way_on[1:]}")
