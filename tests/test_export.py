"""export.py: the model with its head folded into one linear layer, as ONNX and TorchScript,
scores as predict.py does; the folded weight is the ridge projection of the dictionary."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import export
import predict
import util
from conftest import fill_disk
from models import ridge_projection
from test_predict import IMAGE_SIZE, direct_input, trained  # noqa: F401 (trained: a fixture)
from voc import VOC_CLASSES

TORCHSCRIPT_DEPRECATED = "ignore:`torch.jit.:FutureWarning"


def numpy_projection(model, semantics=None):
    """P = D^T (D D^T + lambd I)^-1 (d_f x C), D = LeakyReLU(S W1) W2, in float64 with numpy."""
    semantics = model.semantics.double().numpy() if semantics is None else semantics
    hidden = semantics @ model.W1.detach().double().numpy()
    dictionary = np.where(hidden > 0, hidden, 0.2 * hidden) @ model.W2.detach().double().numpy()
    gram = dictionary @ dictionary.T + model.lambd * np.eye(len(dictionary))
    return np.linalg.solve(gram, dictionary).T


def prepared(path, sidecar):
    """The 1 x 3 x S x S input of an exported model, as its classes.json describes it."""
    size = sidecar["image_size"]
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float32) / 255 - sidecar["mean"]) / sidecar["std"]
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def predicted(trained, tmp_path_factory):
    """predict.py's scores of the test images: [{label: score}] in image order."""
    checkpoint, _, images = trained
    out = tmp_path_factory.mktemp("predicted") / "out.json"
    assert predict.main(["--resume", checkpoint, "-j", "0", "--device", "cpu", "--threshold", "0",
                         "--json", str(out), *images]) == 0
    return [{p["label"]: p["score"] for p in result["predictions"]}
            for result in json.loads(out.read_text())]


def assert_scores_as_predict(scores, classes, predicted):
    for row, expected in zip(scores, predicted):
        np.testing.assert_allclose(row, [expected[name] for name in classes], rtol=0, atol=1e-4)


def test_folded_head_weight_is_the_ridge_projection_of_the_dictionary(trained):
    _, model, _ = trained
    folded = model.folded()
    with torch.no_grad():
        projection = ridge_projection(model.encode(model.semantics), model.lambd)
        images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(folded(images), model(images).scores, rtol=1e-5, atol=1e-5)
    assert folded.classifier.bias is None
    assert torch.equal(folded.classifier.weight, projection.T)
    np.testing.assert_allclose(folded.classifier.weight.detach().numpy(),
                               numpy_projection(model).T, rtol=1e-4, atol=1e-6)


def test_onnx_model_scores_as_predict_for_any_batch_with_one_linear_head(
        trained, predicted, tmp_path):
    onnx = pytest.importorskip("onnx", reason="pip install -r requirements-export.txt")
    onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
    checkpoint, model, images = trained
    out = tmp_path / "dsdl.onnx"
    assert export.main(["--resume", checkpoint, "--format", "onnx", "-o", str(out)]) == 0
    sidecar = json.loads((tmp_path / "dsdl.onnx.classes.json").read_text())
    assert sidecar["classes"] == list(VOC_CLASSES) and sidecar["image_size"] == IMAGE_SIZE
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = np.concatenate([prepared(path, sidecar) for path in images])  # 3 x 3 x S x S
    (scores,) = session.run(["scores"], {"images": batch})
    assert_scores_as_predict(scores, sidecar["classes"], predicted)
    (single,) = session.run(["scores"], {"images": batch[1:2]})
    assert_scores_as_predict(single, sidecar["classes"], predicted[1:2])
    # No solve at run time: one matrix product, the folded head, whose weight is P.
    graph = onnx.load(str(out)).graph
    assert [node.op_type for node in graph.node if node.op_type in ("Gemm", "MatMul")] in (
        ["Gemm"], ["MatMul"])
    (head,) = [onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer
               if sorted(tensor.dims) == sorted([len(VOC_CLASSES), model.feature_dim])]
    head = head if head.shape[0] == len(VOC_CLASSES) else head.T
    np.testing.assert_allclose(head, numpy_projection(model).T, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)
def test_torchscript_model_scores_as_predict_for_any_batch(trained, predicted, tmp_path):
    checkpoint, model, images = trained
    out = tmp_path / "dsdl.pt"
    assert export.main(["--resume", checkpoint, "--format", "torchscript", "-o", str(out)]) == 0
    classes = json.loads((tmp_path / "dsdl.pt.classes.json").read_text())["classes"]
    loaded = torch.jit.load(str(out))
    batch = torch.cat([direct_input(path) for path in images])  # 3 x 3 x S x S
    with torch.no_grad():
        assert_scores_as_predict(loaded(batch).numpy(), classes, predicted)
        assert_scores_as_predict(loaded(batch[:1]).numpy(), classes, predicted[:1])
    np.testing.assert_allclose(dict(loaded.named_parameters())["classifier.weight"].detach().numpy(),
                               numpy_projection(model).T, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)
def test_release_checkpoint_exports_with_dataset_and_image_size_and_new_labels(trained, tmp_path):
    _, model, images = trained
    weights = {key: value for key, value in model.state_dict().items() if key != "semantics"}
    release = tmp_path / "release.pth.tar"  # the release's layout (spec section 9)
    torch.save({"epoch": 20, "arch": None, "best_score": 94.0, "state_dict": weights}, release)
    vectors = np.random.default_rng(4).standard_normal((2, 300)).astype(np.float32)
    np.save(tmp_path / "new.npy", vectors)
    out = str(tmp_path / "dsdl.pt")
    assert export.main(["--resume", str(release), "--dataset", "voc", "--image-size", "48",
                        "--classes", "zebra", "kite", "--embeddings", str(tmp_path / "new.npy"),
                        "--format", "torchscript", "-o", out]) == 0
    sidecar = json.loads(open(out + ".classes.json").read())
    assert (sidecar["classes"], sidecar["image_size"], sidecar["lambd"]) == (["zebra", "kite"], 48, 10.0)
    projection = numpy_projection(model, vectors.astype(np.float64))  # d_f x 2
    loaded = torch.jit.load(out)
    np.testing.assert_allclose(dict(loaded.named_parameters())["classifier.weight"].detach().numpy(),
                               projection.T, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        features = model(direct_input(images[0], size=48)).features.double().numpy()
        np.testing.assert_allclose(loaded(direct_input(images[0], size=48)).numpy(),
                                   features @ projection, rtol=1e-4, atol=1e-5)


def test_onnx_without_its_packages_says_what_to_install(trained, tmp_path, capsys, monkeypatch):
    for package in ("onnx", "onnxscript"):  # as if neither were installed, installed or not
        monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setattr(export, "load_model", lambda args: pytest.fail("the checkpoint was loaded"))
    assert export.main(["--resume", trained[0], "--format", "onnx",
                        "-o", str(tmp_path / "dsdl.onnx")]) == 1
    assert capsys.readouterr().err == ("error: --format onnx needs the packages onnx, onnxscript: "
                                       "pip install -r requirements-export.txt\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.filterwarnings(TORCHSCRIPT_DEPRECATED)
def test_an_export_onto_a_disk_that_fills_up_leaves_the_previous_model_and_its_classes(
        trained, tmp_path, capsys, monkeypatch):
    """TorchScript (ONNX's bytes take the same way to the disk, export.write_export)."""
    out = tmp_path / "model.bin"
    out.write_bytes(b"the user's working model")
    (tmp_path / "model.bin.classes.json").write_text('{"classes": ["theirs"]}')
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    fill_disk(monkeypatch, util, 100_000)  # room for the classes, not for the model
    assert export.main(["--resume", trained[0], "--format", "torchscript", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: could not write {out} and {out}.classes.json (No space left on "
                   f"device); both files there are as they were. Free disk space, then run the "
                   f"same command again\n")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
