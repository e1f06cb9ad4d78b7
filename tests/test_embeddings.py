"""Class vectors: the standard GloVe files, .npy files, loading them safely, and
make_embeddings.py making them from a GloVe text file (a tiny one written here). Hostile
pickles are refused in test_faults_runs.py, through a whole run."""
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import make_embeddings
from conftest import SHARED_EMBEDDINGS
from downloads import md5sum
from embeddings import load_embeddings
from util import DSDLError

WORDS = ["the", "cat", "Dog", "new york", "new", "traffic", "light", "red", "car"]


@pytest.fixture
def glove(tmp_path):
    """A GloVe-format file (word, then 300 values) and the vectors as written, by word.

    "new york" is a token with a space, as the 840B file has a few; it comes before "new".
    "Dog" is only there capitalised (840B is cased).
    """
    rng = np.random.default_rng(0)
    vectors = {}
    lines = []
    for word in WORDS:
        values = [f"{v:.5f}" for v in rng.standard_normal(300)]
        vectors[word] = np.array([float(v) for v in values])
        lines.append(" ".join([word, *values]) + "\n")
    path = tmp_path / "glove.tiny.300d.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path), vectors


def test_multi_word_classes_are_the_mean_of_their_words(glove, tmp_path):
    path, vectors = glove
    out = tmp_path / "classes.npy"
    make_embeddings.main(["--classes", "cat", "traffic light", "red_car", "new", "--glove", path,
                          "-o", str(out)])
    written = np.load(out)
    expected = np.stack([vectors["cat"], (vectors["traffic"] + vectors["light"]) / 2,
                         (vectors["red"] + vectors["car"]) / 2, vectors["new"]])
    assert written.shape == (4, 300) and written.dtype == np.float32
    np.testing.assert_allclose(written, expected, rtol=1e-6, atol=1e-6)
    # The file is one the training scripts accept for these 4 classes.
    np.testing.assert_array_equal(load_embeddings(str(out), num_classes=4).numpy(), written)


def test_words_are_looked_up_as_written_then_in_lower_case(glove, tmp_path):
    path, vectors = glove
    out = tmp_path / "classes.npy"
    make_embeddings.main(["--classes", "Cat", "Dog", "--glove", path, "-o", str(out)])
    np.testing.assert_allclose(np.load(out), np.stack([vectors["cat"], vectors["Dog"]]),
                               rtol=1e-6, atol=1e-6)


def test_every_missing_word_is_listed_and_nothing_is_written(glove, tmp_path, capsys):
    path, _ = glove
    out = tmp_path / "classes.npy"
    with pytest.raises(SystemExit) as exit_info:
        make_embeddings.main(["--classes", "cat", "dog", "flying saucerz", "york", "--glove",
                              path, "-o", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    # "dog" is only there as "Dog"; "york" only inside the token "new york".
    for missing in ("'dog' (in 'dog')", "'flying' (in 'flying saucerz')",
                    "'saucerz' (in 'flying saucerz')", "'york' (in 'york')"):
        assert missing in err
    assert "4 word(s)" in err and "'cat'" not in err
    assert not out.exists()


def test_classes_from_label_csvs_and_a_zipped_glove_give_the_same_rows(glove, tmp_path):
    path, vectors = glove
    for split, rows in (("train", "a.jpg,red car;cat\nb.jpg,cat\n"), ("test", "c.jpg,the\n")):
        (tmp_path / f"{split}.csv").write_text("image,labels\n" + rows)
    archive = tmp_path / "glove.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, os.path.basename(path))
    out = tmp_path / "classes.pkl"
    make_embeddings.main(["--csv", str(tmp_path / "train.csv"), str(tmp_path / "test.csv"),
                          "--glove", str(archive), "-o", str(out)])
    # The rows follow main_custom's class order: the labels sorted.
    expected = np.stack([vectors["cat"], (vectors["red"] + vectors["car"]) / 2, vectors["the"]])
    np.testing.assert_allclose(load_embeddings(str(out), num_classes=3).numpy(), expected,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not os.path.isdir(SHARED_EMBEDDINGS), reason="../shared/label_embeddings absent")
def test_the_standard_glove_files_load_with_the_restricted_unpickler():
    for name, rows in (("voc_glove_word2vec.pkl", 20), ("coco_glove_word2vec.pkl", 80)):
        path = os.path.join(SHARED_EMBEDDINGS, name)
        semantics = load_embeddings(path, num_classes=rows)
        assert semantics.shape == (rows, 300) and semantics.dtype == torch.float32
        with open(path, "rb") as f:
            reference = pickle.load(f)  # trusted copy: the plain unpickler as the reference
        np.testing.assert_array_equal(semantics.numpy(), reference)


def test_npy_embeddings_are_accepted_and_a_wrong_shape_is_an_error(tmp_path):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    vectors = np.random.default_rng(0).standard_normal((20, 300)).astype(np.float32)
    np.save(good, vectors)
    np.save(bad, vectors[:19])
    np.testing.assert_array_equal(load_embeddings(str(good), num_classes=20).numpy(), vectors)
    with pytest.raises(DSDLError, match=r"bad\.npy.*\(19, 300\).*\(20, 300\)"):
        load_embeddings(str(bad), num_classes=20)


def test_a_standard_embeddings_file_with_another_checksum_is_refused(tmp_path):
    path = tmp_path / "voc_glove_word2vec.pkl"
    with open(path, "wb") as f:
        pickle.dump(np.zeros((20, 300), np.float32), f)
    with pytest.raises(DSDLError, match=md5sum(str(path))):
        load_embeddings(str(path), num_classes=20)


@pytest.mark.parametrize("width", [1, 5, 512])
def test_class_vectors_of_any_width_are_accepted(width, tmp_path):
    vectors = np.random.default_rng(width).standard_normal((4, width)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    with open(tmp_path / "v.pkl", "wb") as f:
        pickle.dump(vectors.astype(np.float64), f)
    for name in ("v.npy", "v.pkl"):
        loaded = load_embeddings(str(tmp_path / name), num_classes=4)
        assert loaded.shape == (4, width) and loaded.dtype == torch.float32
        np.testing.assert_array_equal(loaded.numpy(), vectors)


@pytest.mark.parametrize("array, message", [
    (np.ones(5, np.float32), r"shape \(5,\); expected \(4, d\)"),
    (np.ones((4, 0), np.float32), r"shape \(4, 0\); expected \(4, d\)"),
    (np.ones((3, 5), np.float32), r"shape \(3, 5\); expected \(4, 5\)"),
    (np.array([[1.0] * 5, [np.nan] + [1.0] * 4, [1.0] * 5, [0.0] * 5]), r"row\(s\) 1, 3 are"),
    (np.array([["a"] * 5] * 4), "hold <U1 values; expected numbers"),
])
def test_arrays_that_are_not_one_real_vector_per_class_are_refused_at_any_width(
        array, message, tmp_path):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DSDLError, match=message):
        load_embeddings(str(tmp_path / "bad.npy"), num_classes=4)
