"""Write the C x d class vectors (the semantics S) of any class list from word vectors.

    python make_embeddings.py --classes cat dog "traffic light" -o classes.npy
    python make_embeddings.py --csv my_data/train.csv my_data/test.csv --vectors glove.840B.300d.txt
    python make_embeddings.py --classes cat dog --vectors crawl-300d-2M.vec -o classes.npy

As for the standard VOC and COCO files (ML-GCN's): one vector per class name, the mean of its
words' vectors for a multi-word name ("traffic light", "dining_table"). A word the file lacks
is an error that lists every missing word: a class never gets an invented vector. Rows follow
the class order that main_custom.py uses (given, or the CSVs' labels sorted).

The word vectors: any text file of them, its width d read from the file: GloVe (`word v1 .. vd`,
no header), fastText `.vec` and word2vec's text format (a first line `N d`), plain, in a .zip
or gzipped. Without --vectors, GloVe 840B (300-d, the standard files' and the release's) is
downloaded.
"""
import options

if __name__ == "__main__":  # parse before importing torch: --help and mistakes answer at once
    options.embeddings_parser().parse_args()

import gzip
import os
import pickle
import re
import sys
import zipfile

import numpy as np
from tqdm import tqdm

import custom
from downloads import download
from outputs import check_output, is_class_vectors
from runs import stops_on_interrupt
from util import DSDLError, atomic_write

GLOVE_ZIP = "glove.840B.300d.zip"  # 2.0 GB; holds glove.840B.300d.txt (5.6 GB, 2.2M cased words)
GLOVE_URLS = ["https://nlp.stanford.edu/data/glove.840B.300d.zip",
              "https://downloads.cs.stanford.edu/nlp/data/glove.840B.300d.zip",
              "https://huggingface.co/stanfordnlp/glove/resolve/main/glove.840B.300d.zip"]


def class_words(name):
    """The words of a class name: split at spaces and underscores."""
    return [word for word in re.split(r"[\s_]+", name) if word]


def open_vectors(path):
    """A binary line stream of a word-vector text file, of the one .txt or .vec file inside a
    .zip, or of a gzipped one, and its size in bytes (for the progress bar; None if unknown)."""
    if path.endswith(".bin"):
        raise DSDLError(f"{path}: binary word vectors are not read; convert them to the text format "
                        f"(gensim: KeyedVectors.load_word2vec_format(PATH, binary=True)"
                        f".save_word2vec_format(OUT, binary=False)), or pass fastText's .vec file")
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        members = [info for info in archive.infolist() if info.filename.endswith((".txt", ".vec"))]
        if len(members) != 1:
            raise DSDLError(f"{path} should hold one word-vector .txt or .vec file, found "
                            f"{[info.filename for info in members]}")
        return archive.open(members[0]), members[0].file_size
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:  # e.g. fastText's cc.en.300.vec.gz
        return gzip.open(path, "rb"), None
    return open(path, "rb"), os.path.getsize(path)


def header_width(fields):
    """d of a fastText / word2vec header line `N d` (two integers), else None."""
    if len(fields) == 2 and all(field.isdigit() for field in fields) and int(fields[1]) > 0:
        return int(fields[1])
    return None


def line_width(fields):
    """d of a GloVe line: the fields after the first that read as numbers, counted from the end
    (so that a token with spaces, as GloVe 840B has a few, is not counted)."""
    width = 0
    for field in reversed(fields[1:]):
        try:
            float(field)
        except ValueError:
            break
        width += 1
    return width


def read_vectors(path, words, enough=None):
    """The vectors of `words` (a set) found in a word-vector text file: {word: d-d float64
    array}, d the file's width.

    GloVe lines are `word v1 .. vd`; fastText and word2vec text files have a first line `N d`
    and then the same lines (fastText's end in a space). d is the header's, else the first
    line's. A few tokens of GloVe 840B contain spaces, so the vector is the last d fields. Only
    lines whose word is wanted are parsed, and reading stops once every word of `enough`
    (default: all of `words`) is found (these files are sorted by frequency, common words come
    early).
    """
    enough = set(words if enough is None else enough)
    found = {}
    width, header = None, False
    stream, size = open_vectors(path)
    with stream, tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
        for number, line in enumerate(stream, 1):
            bar.update(len(line))
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if width is None:
                fields = line.rstrip(b" \r\n").split(b" ")
                width = header_width(fields)
                if width is not None:
                    header = True
                    continue
                width = line_width(fields)
                if width == 0:
                    raise DSDLError(f"{path}, line 1: not a word-vector line (a word, then numbers) "
                                    f"nor a header `N d`: is this a GloVe, fastText .vec or "
                                    f"word2vec text file?")
            first = line.split(b" ", 1)[0].decode("utf-8", errors="replace")
            if first not in words or first in found:
                continue
            fields = line.rstrip(b" \r\n").split(b" ")
            if len(fields) <= width:
                raise DSDLError(f"{path}, line {number}: fewer than {width} numbers after the "
                                f"word, the width of this file's vectors (from its "
                                f"{'header' if header else 'first line'})")
            word = b" ".join(fields[:-width]).decode("utf-8", errors="replace")
            if word != first:
                continue  # a token with spaces that only begins with a wanted word
            try:
                found[word] = np.array(fields[-width:], dtype=np.float64)
            except ValueError as error:
                raise DSDLError(f"{path}, line {number}: not a word and {width} numbers, the "
                                f"width of this file ({error})") from error
            if not np.isfinite(found[word]).all():
                raise DSDLError(f"{path}, line {number}: the vector of {word!r} holds NaN or "
                                f"infinite values; repair or re-download the file")
            if enough <= found.keys():
                break
    if width is None:
        raise DSDLError(f"{path} is empty: no word vectors in it")
    return found


def class_vectors(classes, vectors_path):
    """C x d float32: each class the mean of its words' vectors, d the file's width.

    A word is looked up as written, then in lower case (GloVe 840B and fastText are cased:
    "Dog" and "dog" are different words). Raises DSDLError naming every word found in neither
    form. Also used by predict.py --classes-from-glove (labels scored zero-shot).
    """
    if not os.path.isfile(vectors_path):
        raise DSDLError(f"word-vector file not found: {vectors_path}")
    words = {name: class_words(name) for name in classes}
    empty = [name for name, parts in words.items() if not parts]
    if empty:
        raise DSDLError(f"class names without any word: {empty}")
    wanted = {form for parts in words.values() for word in parts for form in (word, word.lower())}
    # Once every word is found as written, its lower-case fallback is not needed.
    found = read_vectors(vectors_path, wanted, enough={word for parts in words.values() for word in parts})
    vectors, missing = [], []
    for name in classes:
        parts = [found.get(word, found.get(word.lower())) for word in words[name]]
        missing += [f"{word!r} (in {name!r})" for word, vector in zip(words[name], parts)
                    if vector is None]
        if not missing:
            vectors.append(np.mean(parts, axis=0))
    if missing:
        raise DSDLError(f"{len(missing)} word(s) are not in {vectors_path}: {', '.join(missing)}. "
                        f"Rename those classes with words the file knows (a synonym, or separate "
                        f"words with spaces); no vector was written.")
    return np.stack(vectors).astype(np.float32)


def look_alike_classes(classes):
    """Groups of class names that differ only in case, spacing or underscores ("Dog" and "dog",
    "traffic light" and "traffic_light"), in the order of `classes`."""
    groups = {}
    for name in classes:
        groups.setdefault(re.sub(r"[\s_]+", "", name).casefold(), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def warn_look_alikes(classes, vectors):
    """One warning line naming each group of look-alike class names (look_alike_classes).

    A warning, not an error: names that differ in case can be different classes with different
    vectors in a cased file ("Apple" and "apple" in GloVe 840B), and the rows must follow the
    dataset's class list whatever it is; refusing here would not fix that list, which lives in
    the label files. Most often, though, such names are one class written two ways: they get the
    same or nearly the same vector, so their dictionary atoms (D = encode(S)) are alike and
    their scores hard to tell apart. The warning names them, and which rows are identical.
    """
    groups = look_alike_classes(classes)
    if not groups:
        return
    row = {name: index for index, name in enumerate(classes)}
    described = []
    for group in groups:
        same = all(np.array_equal(vectors[row[group[0]]], vectors[row[name]]) for name in group[1:])
        described.append(" and ".join(repr(name) for name in group)
                         + (" (the same vector)" if same else ""))
    print(f"warning: class names that differ only in case, spacing or underscores: "
          f"{'; '.join(described)}; they get the same or nearly the same vector, so the model can "
          f"hardly tell them apart: if each group is one class, merge its labels in the label "
          f"files", file=sys.stderr)


def save_vectors(vectors, path):
    """.npy (default), or a pickled numpy array like the standard files when `path` ends .pkl."""
    with atomic_write(path) as f:  # whole or not at all: an older file stays as it was
        if path.endswith(".pkl"):
            pickle.dump(vectors, f, protocol=3)
        else:
            np.save(f, vectors, allow_pickle=False)


@stops_on_interrupt("the vectors file is as it was")
def main(argv=None):
    args = options.embeddings_parser().parse_args(argv)
    try:
        check_output("-o", args.output, [args.vectors, *(args.classes or [])[:1], *(args.csv or [])],
                     is_class_vectors)
        classes = custom.parse_classes(args.classes) if args.classes else custom.classes_from_csv(*args.csv)
        source = args.vectors
        if source is None:
            source = os.path.join("data", GLOVE_ZIP)
            if not os.path.isfile(source):
                download(GLOVE_URLS, source)
        elif not os.path.isfile(source):
            raise DSDLError(f"--vectors {source}: no such file (a GloVe, fastText .vec or "
                            f"word2vec text file)")
        vectors = class_vectors(classes, source)
        warn_look_alikes(classes, vectors)
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
    sys.exit(main())
