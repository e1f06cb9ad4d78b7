"""Class vectors of any width d: make_embeddings.py reading GloVe, fastText .vec and word2vec text
files (tiny 5-d ones written here), class names that differ only in case or spacing, a DSDL
built on 5-d vectors, and predict.py / torch.hub refusing vectors of another width than the
checkpoint's."""
import gzip
import json
import zipfile

import numpy as np
import pytest
import torch

import hubconf
import inference
import make_embeddings
import models
import options
import predict
from conftest import class_image
from embeddings import load_embeddings
from util import DSDLError

WIDTH = 5
WORDS = ["the", "cat", "Dog", "dog", "new york", "new", "traffic", "light", "red", "car"]


def vector_lines(width=WIDTH, seed=0, trailing=""):
    """`word v1 .. vd` lines and the vectors as written, by word; "new york" is a token with a
    space (GloVe 840B has a few) before "new"; "Dog" and "dog" are two words (cased files)."""
    rng = np.random.default_rng(seed)
    lines, vectors = [], {}
    for word in WORDS:
        values = [f"{v:.6g}" for v in rng.standard_normal(width)]
        vectors[word] = np.array([float(v) for v in values])
        lines.append(" ".join([word, *values]) + trailing + "\n")
    return lines, vectors


def write_vectors(path, kind, width=WIDTH, seed=0):
    """A word-vector file: GloVe (no header), fastText .vec (header `N d`, each line ending in a
    space as fastText writes it), word2vec text (header, no trailing space)."""
    lines, vectors = vector_lines(width, seed, trailing=" " if kind == "fasttext" else "")
    header = [] if kind == "glove" else [f"{len(lines)} {width}\n"]
    path.write_text("".join(header + lines), encoding="utf-8")
    return str(path), vectors


FILES = {"glove": "glove.tiny.5d.txt", "fasttext": "tiny.vec", "word2vec": "tiny.w2v.txt"}


@pytest.mark.parametrize("kind", sorted(FILES))
def test_each_format_gives_c_x_d_rows_the_mean_of_the_words_vectors(kind, tmp_path, capsys):
    path, vectors = write_vectors(tmp_path / FILES[kind], kind)
    out = tmp_path / "classes.npy"
    classes = ["cat", "traffic light", "red_car", "new", "Dog"]
    make_embeddings.main(["--classes", *classes, "--vectors", path, "-o", str(out)])
    written = np.load(out)
    expected = np.stack([np.mean([vectors[w] for w in words], axis=0) for words in
                         (["cat"], ["traffic", "light"], ["red", "car"], ["new"], ["Dog"])])
    assert written.shape == (5, WIDTH) and written.dtype == np.float32
    np.testing.assert_allclose(written, expected, rtol=1e-6, atol=1e-6)
    assert f"5 x {WIDTH}" in capsys.readouterr().out
    np.testing.assert_array_equal(load_embeddings(str(out), num_classes=5).numpy(), written)


def test_glove_is_still_the_name_of_the_option_and_zipped_or_gzipped_vec_files_are_read(tmp_path):
    path, vectors = write_vectors(tmp_path / "tiny.vec", "fasttext")
    with zipfile.ZipFile(tmp_path / "tiny.vec.zip", "w") as zf:
        zf.write(path, "tiny.vec")
    with open(path, "rb") as f, gzip.open(tmp_path / "tiny.vec.gz", "wb") as gz:
        gz.write(f.read())
    expected = np.stack([vectors["cat"], (vectors["red"] + vectors["car"]) / 2])
    for option, source in (("--glove", path), ("--vectors", tmp_path / "tiny.vec.zip"),
                           ("--vectors", tmp_path / "tiny.vec.gz")):
        out = tmp_path / "out.pkl"
        make_embeddings.main(["--classes", "cat", "red car", option, str(source), "-o", str(out)])
        np.testing.assert_allclose(load_embeddings(str(out), num_classes=2).numpy(), expected,
                                   rtol=1e-6, atol=1e-6)


def test_the_parser_takes_vectors_and_glove_as_one_option():
    for option in ("--vectors", "--glove"):
        args = options.embeddings_parser().parse_args(["--classes", "cat", option, "v.txt"])
        assert args.vectors == "v.txt"


def messages(err):
    """The lines of stderr without the progress bar (which tqdm redraws after a carriage return)."""
    return [line for line in err.split("\n") if line and "\r" not in line]


def error_of(argv, capsys):
    """The one line make_embeddings.main(argv) says on stderr, ending with status 1."""
    with pytest.raises(SystemExit) as exit_info:
        make_embeddings.main(argv)
    assert exit_info.value.code == 1
    (line,) = messages(capsys.readouterr().err)
    assert line.startswith("error: ")
    return line


def test_a_line_narrower_than_the_header_says_is_an_error_naming_the_line(tmp_path, capsys):
    lines, _ = vector_lines()
    (tmp_path / "bad.vec").write_text(f"{len(lines)} 7\n" + "".join(lines))  # header says 7-d
    out = tmp_path / "classes.npy"
    err = error_of(["--classes", "cat", "--vectors", str(tmp_path / "bad.vec"), "-o", str(out)],
                   capsys)
    assert "bad.vec, line 3" in err and "7 numbers" in err and "header" in err
    assert not out.exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("words.txt", b"just some words\nand more\n", "line 1: not a word-vector line"),
    ("vectors.bin", b"10 5\n\x00\x01\x02", "binary word vectors are not read"),
])
def test_files_that_are_not_word_vector_text_are_one_error_line(name, content, message, tmp_path,
                                                                capsys):
    (tmp_path / name).write_bytes(content)
    err = error_of(["--classes", "cat", "--vectors", str(tmp_path / name),
                    "-o", str(tmp_path / "o.npy")], capsys)
    assert message in err


def test_class_names_that_differ_only_in_case_or_spacing_are_named_in_one_warning(tmp_path,
                                                                                 capsys):
    path, vectors = write_vectors(tmp_path / "glove.txt", "glove")
    out = tmp_path / "classes.npy"
    classes = ["Dog", "cat", "traffic light", "dog", "traffic_light", "traffic  light", "red"]
    make_embeddings.main(["--classes", *classes, "--vectors", path, "-o", str(out)])
    (warning,) = messages(capsys.readouterr().err)
    assert warning.startswith("warning: ") and "case, spacing or underscores" in warning
    # The cased file gives Dog and dog their own vectors; the three spellings get the same one.
    assert "'Dog' and 'dog';" in warning and "'Dog' and 'dog' (the same" not in warning
    assert "'traffic light' and 'traffic_light' and 'traffic  light' (the same vector)" in warning
    assert "'cat'" not in warning and "'red'" not in warning
    assert np.load(out).shape == (7, WIDTH)  # written all the same, one row per class


def test_distinct_class_names_give_no_warning(tmp_path, capsys):
    path, _ = write_vectors(tmp_path / "glove.txt", "glove")
    make_embeddings.main(["--classes", "cat", "dog", "traffic light", "--vectors", path,
                          "-o", str(tmp_path / "classes.npy")])
    assert messages(capsys.readouterr().err) == []


def test_a_dsdl_model_runs_and_its_loss_trains_the_auto_encoder_on_5_d_vectors():
    torch.manual_seed(0)
    semantics = torch.randn(3, WIDTH)
    model = models.DSDL(3, semantics, 10.0, arch="resnet18", pretrained=False)
    output = model(torch.randn(2, 3, 64, 64))
    assert model.W1.shape == (WIDTH, models.HIDDEN_DIM)
    assert output.scores.shape == (2, 3) and output.reconstruction.shape == (3, WIDTH)
    loss = models.DSDLLoss(10.0, 1e-4)(output, torch.tensor([[1, 0, 1], [0, 1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.W1.grad).all() and model.W1.grad.any()


# ---- predict.py and torch.hub: vectors of the checkpoint's width, others refused -------------

@pytest.fixture(scope="module")
def five_d_checkpoint(tmp_path_factory):
    """A checkpoint (this project's format) of a random ResNet-18 DSDL trained on 5-d class
    vectors, the model, and an image."""
    folder = tmp_path_factory.mktemp("five_d")
    torch.manual_seed(0)
    classes = ["cat", "dog", "car"]
    semantics = torch.randn(len(classes), WIDTH)
    model = models.DSDL(len(classes), semantics, 10.0, arch="resnet18", pretrained=False).eval()
    checkpoint = folder / "checkpoint.pth.tar"
    torch.save({"model": model.state_dict(), "epoch": 1, "classes": classes,
                "semantics": semantics,
                "args": {"arch": "resnet18", "lambd": 10.0, "image_size": 64}}, checkpoint)
    image = folder / "a.jpg"
    class_image([0, 3], 64).save(image)
    return str(checkpoint), model, str(image)


def run_predict(argv, checkpoint, image):
    return predict.main(["--resume", checkpoint, "-j", "0", "--device", "cpu", image, *argv])


def test_labels_with_vectors_of_the_checkpoints_width_are_scored(five_d_checkpoint, tmp_path):
    checkpoint, model, image = five_d_checkpoint
    vectors = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
    np.save(tmp_path / "new.npy", vectors)
    argv = ["--classes", "zebra", "kite", "--embeddings", str(tmp_path / "new.npy")]
    out = tmp_path / "out.json"
    assert run_predict([*argv, "--threshold", "0", "--json", str(out)], checkpoint, image) == 0
    assert {p["label"] for p in json.loads(out.read_text())[0]["predictions"]} == {"zebra", "kite"}
    loaded = inference.load_model(
        options.predict_parser().parse_args([*argv, "--resume", checkpoint, image]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(loaded.semantics),
                                   model.encode(torch.from_numpy(vectors)), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["embeddings", "glove"])
def test_labels_with_vectors_of_another_width_are_one_error_line(kind, five_d_checkpoint,
                                                                 tmp_path, capsys):
    checkpoint, _, image = five_d_checkpoint
    if kind == "embeddings":
        source = str(tmp_path / "wide.npy")
        np.save(source, np.ones((2, 512), np.float32))
        argv = ["--classes", "zebra", "kite", "--embeddings", source]
        width = 512
    else:
        source, _ = write_vectors(tmp_path / "glove.7d.txt", "glove", width=7)
        argv = ["--classes", "cat", "red car", "--classes-from-glove", source]
        width = 7
    assert run_predict(argv, checkpoint, image) == 1
    assert messages(capsys.readouterr().err) == [
        f"error: {checkpoint} was trained with {WIDTH}-d class vectors; {source} holds {width}-d "
        f"ones: give vectors of the kind it was trained with (the authors' released checkpoints: "
        f"300-d GloVe)"]


def test_the_hub_entry_refuses_vectors_of_another_width(five_d_checkpoint, tmp_path):
    checkpoint, _, _ = five_d_checkpoint
    np.save(tmp_path / "glove300.npy", np.ones((1, 300), np.float32))
    with pytest.raises(DSDLError, match=f"trained with {WIDTH}-d class vectors; .*300-d ones"):
        hubconf.dsdl(checkpoint, classes=["zebra"], embeddings=str(tmp_path / "glove300.npy"))
