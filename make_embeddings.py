"""Write the C x 300 class vectors (the semantics S) of any class list from GloVe.

    python make_embeddings.py --classes cat dog "traffic light" -o classes.npy
    python make_embeddings.py --csv my_data/train.csv my_data/test.csv --glove glove.840B.300d.txt

As for the standard VOC and COCO files (ML-GCN's): one GloVe vector per class name, the mean of
its words' vectors for a multi-word name ("traffic light", "dining_table"). A word GloVe lacks
is an error that lists every missing word: a class never gets an invented vector. Rows follow
the class order that main_custom.py uses (given, or the CSVs' labels sorted).
"""
import options

if __name__ == "__main__":  # parse before importing torch: --help and mistakes answer at once
    options.embeddings_parser().parse_args()

import os
import pickle
import re
import sys
import zipfile

import numpy as np
from tqdm import tqdm

import custom
from downloads import download
from util import DSDLError, atomic_write

DIM = 300
GLOVE_ZIP = "glove.840B.300d.zip"  # 2.0 GB; holds glove.840B.300d.txt (5.6 GB, 2.2M cased words)
GLOVE_URLS = ["https://nlp.stanford.edu/data/glove.840B.300d.zip",
              "https://downloads.cs.stanford.edu/nlp/data/glove.840B.300d.zip",
              "https://huggingface.co/stanfordnlp/glove/resolve/main/glove.840B.300d.zip"]


def class_words(name):
    """The words of a class name: split at spaces and underscores."""
    return [word for word in re.split(r"[\s_]+", name) if word]


def open_glove(path):
    """A binary line stream of a GloVe text file, or of the one .txt inside a GloVe .zip,
    and its size in bytes (for the progress bar)."""
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        members = [info for info in archive.infolist() if info.filename.endswith(".txt")]
        if len(members) != 1:
            raise DSDLError(f"{path} should hold one GloVe .txt file, found "
                            f"{[info.filename for info in members]}")
        return archive.open(members[0]), members[0].file_size
    return open(path, "rb"), os.path.getsize(path)


def read_glove(path, words, enough=None):
    """The vectors of `words` (a set) found in a GloVe text file: {word: 300-d float64 array}.

    Lines are `word v1 .. v300`; a few tokens of the 840B file contain spaces, so the vector is
    the last 300 fields. Only lines whose word is wanted are parsed, and reading stops once
    every word of `enough` (default: all of `words`) is found (the file is sorted by frequency,
    common words come early).
    """
    enough = set(words if enough is None else enough)
    found = {}
    stream, size = open_glove(path)
    with stream, tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
        for number, line in enumerate(stream, 1):
            bar.update(len(line))
            first = line.split(b" ", 1)[0].decode("utf-8", errors="replace")
            if first not in words or first in found:
                continue
            fields = line.rstrip(b"\r\n").split(b" ")
            word = b" ".join(fields[:-DIM]).decode("utf-8", errors="replace")
            if word != first:
                continue  # a token with spaces that only begins with a wanted word
            try:
                found[word] = np.array(fields[-DIM:], dtype=np.float64)
            except ValueError as error:
                raise DSDLError(f"{path}, line {number}: not a {DIM}-d GloVe line ({error})") from error
            if enough <= found.keys():
                break
    return found


def class_vectors(classes, glove_path):
    """C x 300 float32: each class the mean of its words' vectors.

    A word is looked up as written, then in lower case (GloVe 840B is cased: "Dog" and "dog"
    are different words). Raises DSDLError naming every word found in neither form.
    Also used by predict.py --classes-from-glove (labels scored zero-shot).
    """
    if not os.path.isfile(glove_path):
        raise DSDLError(f"GloVe file not found: {glove_path}")
    words = {name: class_words(name) for name in classes}
    empty = [name for name, parts in words.items() if not parts]
    if empty:
        raise DSDLError(f"class names without any word: {empty}")
    wanted = {form for parts in words.values() for word in parts for form in (word, word.lower())}
    # Once every word is found as written, its lower-case fallback is not needed.
    found = read_glove(glove_path, wanted, enough={word for parts in words.values() for word in parts})
    vectors, missing = [], []
    for name in classes:
        parts = [found.get(word, found.get(word.lower())) for word in words[name]]
        missing += [f"{word!r} (in {name!r})" for word, vector in zip(words[name], parts)
                    if vector is None]
        if not missing:
            vectors.append(np.mean(parts, axis=0))
    if missing:
        raise DSDLError(f"{len(missing)} word(s) are not in {glove_path}: {', '.join(missing)}. "
                        f"Rename those classes with words GloVe knows (a synonym, or separate "
                        f"words with spaces); no vector was written.")
    return np.stack(vectors).astype(np.float32)


def save_vectors(vectors, path):
    """.npy (default), or a pickled numpy array like the standard files when `path` ends .pkl."""
    with atomic_write(path) as f:  # whole or not at all: an older file stays as it was
        if path.endswith(".pkl"):
            pickle.dump(vectors, f, protocol=3)
        else:
            np.save(f, vectors, allow_pickle=False)


def main(argv=None):
    args = options.embeddings_parser().parse_args(argv)
    try:
        classes = custom.parse_classes(args.classes) if args.classes else custom.classes_from_csv(*args.csv)
        glove = args.glove
        if glove is None:
            glove = os.path.join("data", GLOVE_ZIP)
            if not os.path.isfile(glove):
                download(GLOVE_URLS, glove)
        elif not os.path.isfile(glove):
            raise DSDLError(f"--glove {glove}: no such file")
        vectors = class_vectors(classes, glove)
        try:
            save_vectors(vectors, args.output)
        except OSError as error:
            raise DSDLError(f"could not write {args.output} ({error.strerror}); the file there "
                            f"is as it was. Free disk space, then run the same command again") from error
    except DSDLError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.output}: {vectors.shape[0]} x {vectors.shape[1]}, rows in this order:\n  "
          + "\n  ".join(classes))


if __name__ == "__main__":
    main()
