"""predict.py: labels, probabilities, output formats, bad inputs, the release's checkpoints, maps."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import torchvision
from models import ARCHS
from conftest import class_image
from models import DSDL
from voc import VOC_CLASSES

IMAGE_SIZE = 64
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint in this project's format (engine.run's keys) of a random ResNet-18 DSDL on
    the VOC classes, the model itself, and three images of two folders."""
    folder = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    semantics = torch.randn(len(VOC_CLASSES), 300)
    model = DSDL(len(VOC_CLASSES), semantics, 10.0, arch="resnet18", pretrained=False).eval()
    checkpoint = folder / "checkpoint.pth.tar"
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 1,
                "best_score": 50.0, "classes": list(VOC_CLASSES), "semantics": semantics,
                "args": {"arch": "resnet18", "lambd": 10.0, "image_size": IMAGE_SIZE}},
               checkpoint)
    rng = np.random.default_rng(0)
    os.makedirs(folder / "photos" / "more")
    images = [folder / "photos" / "a.jpg", folder / "photos" / "more" / "b.png",
              folder / "c.jpg"]
    for path, present in zip(images, ([0, 6], [14], [3, 11, 19])):
        class_image(present, 80, rng).save(path)
    return str(checkpoint), model, [str(path) for path in images]


def direct_scores(model, path):
    """The model's scores of one image, its input prepared here with PIL and numpy alone."""
    image = Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float64) / 255 - MEAN) / STD
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1)).float().unsqueeze(0)
    with torch.no_grad():
        return model(tensor).scores[0].double().numpy()


def run(argv, checkpoint):
    return predict.main(["--resume", checkpoint, "-j", "0", "--device", "cpu", *argv])


def test_probabilities_are_the_sigmoid_of_the_model_scores_most_probable_first(trained, tmp_path):
    checkpoint, model, images = trained
    out = tmp_path / "out.json"
    # Batches of 2 over 3 images: a full batch and a partial one.
    assert run(["--threshold", "0", "-b", "2", "--json", str(out), *images], checkpoint) == 0
    results = json.loads(out.read_text())
    assert [result["image"] for result in results] == images
    for result, path in zip(results, images):
        scores = direct_scores(model, path)
        order = np.argsort(-scores)
        assert [p["label"] for p in result["predictions"]] == [VOC_CLASSES[c] for c in order]
        np.testing.assert_allclose([p["score"] for p in result["predictions"]], scores[order],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]],
                                   1 / (1 + np.exp(-scores[order])), rtol=1e-4, atol=1e-6)


def test_top_k_and_threshold_limit_the_labels(trained, tmp_path):
    checkpoint, model, images = trained
    out = tmp_path / "out.json"
    assert run(["--top-k", "3", "--json", str(out), *images], checkpoint) == 0
    for result, path in zip(json.loads(out.read_text()), images):
        top = np.argsort(-direct_scores(model, path))[:3]
        assert [p["label"] for p in result["predictions"]] == [VOC_CLASSES[c] for c in top]

    scores = direct_scores(model, images[0])
    probabilities = 1 / (1 + np.exp(-scores))
    ranked = [(VOC_CLASSES[c], probabilities[c]) for c in np.argsort(-scores)]

    def chosen(**limits):
        return [(p["label"], p["probability"]) for p in
                predict.select(scores.tolist(), list(VOC_CLASSES), **limits)]

    above = [(name, p) for name, p in ranked if p >= 0.52]
    assert 2 < len(above) < len(ranked)
    for got, expected in ((chosen(threshold=0.52), above),
                          (chosen(threshold=0.52, top_k=2), above[:2]),
                          (chosen(top_k=4), ranked[:4]),
                          # Neither: the model's decision rule, score >= 0 (probability >= 0.5).
                          (chosen(), [(name, p) for name, p in ranked if p >= 0.5])):
        assert [name for name, _ in got] == [name for name, _ in expected]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], rtol=1e-12)


def test_folders_are_searched_and_unreadable_images_reported_without_stopping(
        trained, tmp_path, capsys):
    checkpoint, _, images = trained
    folder = tmp_path / "mixed"
    os.makedirs(folder / "sub")
    shutil.copy(images[0], folder / "sub" / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("not an image, not an image name")
    missing = str(tmp_path / "nowhere.jpg")
    out = tmp_path / "out.json"
    status = run(["--json", str(out), str(folder), missing, images[1]], checkpoint)
    assert status == 1  # something was skipped
    results = json.loads(out.read_text())
    assert [r["image"] for r in results] == [str(folder / "broken.jpg"),
                                            str(folder / "sub" / "good.jpg"), missing, images[1]]
    assert [("error" in r) for r in results] == [True, False, True, False]
    err = capsys.readouterr().err
    assert str(folder / "broken.jpg") in err and missing in err
    # The readable images are labelled as if alone.
    alone = tmp_path / "alone.json"
    run(["--json", str(alone), images[0], images[1]], checkpoint)
    for expected, got in zip(json.loads(alone.read_text()), [results[1], results[3]]):
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in expected["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in got["predictions"]],
                                   [p["probability"] for p in expected["predictions"]], rtol=1e-5)


def test_csv_has_one_row_per_predicted_label_and_the_text_lists_them(trained, tmp_path, capsys):
    checkpoint, _, images = trained
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    run(["--top-k", "2", "--json", str(out_json), "--csv", str(out_csv), *images], checkpoint)
    expected = [(r["image"], p["label"], p["probability"], p["score"])
                for r in json.loads(out_json.read_text()) for p in r["predictions"]]
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["label"], float(r["probability"]), float(r["score"])) for r in rows] == expected
    lines = capsys.readouterr().out.splitlines()
    assert lines == [line for image in images for line in
                     [image] + [f"  {label:<{max(len(l) for i, l, _, _ in expected if i == image)}}"
                                f"  {p:.3f}" for i, label, p, _ in expected if i == image]]


def test_release_checkpoint_takes_classes_and_semantics_from_dataset(trained, tmp_path, capsys):
    _, _, images = trained
    torch.manual_seed(1)
    semantics = torch.randn(len(VOC_CLASSES), 300)
    np.save(tmp_path / "voc.npy", semantics.numpy())
    model = DSDL(len(VOC_CLASSES), semantics, 10.0, arch="resnet18", pretrained=False).eval()
    # The release's layout (spec section 9): state_dict, arch None, no classes, no semantics.
    weights = {key: value for key, value in model.state_dict().items() if key != "semantics"}
    release = tmp_path / "release.pth.tar"
    torch.save({"epoch": 20, "arch": None, "best_score": 94.0, "state_dict": weights}, release)

    assert predict.main(["--resume", str(release), "-j", "0", images[0]]) == 1
    assert "--dataset voc" in capsys.readouterr().err

    out = tmp_path / "out.json"
    assert predict.main(["--resume", str(release), "--dataset", "voc", "--embeddings",
                         str(tmp_path / "voc.npy"), "--image-size", str(IMAGE_SIZE), "-j", "0",
                         "--threshold", "0", "--json", str(out), images[0]]) == 0
    (result,) = json.loads(out.read_text())
    scores = direct_scores(model, images[0])
    assert sorted(p["label"] for p in result["predictions"]) == sorted(VOC_CLASSES)
    by_label = {p["label"]: p["score"] for p in result["predictions"]}
    np.testing.assert_allclose([by_label[name] for name in VOC_CLASSES], scores,
                               rtol=1e-4, atol=1e-5)


def test_release_arch_is_read_from_the_layer3_blocks():
    """Key names of the release's format, built from each torchvision ResNet itself."""
    for arch in ARCHS:
        resnet = torchvision.models.get_model(arch, weights=None)
        trunk = torch.nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                    resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        weights = {f"features.{key}": None for key in trunk.state_dict()}
        assert predict.infer_arch(weights) == arch


def test_folders_yield_common_image_files_only_and_no_images_is_an_error(trained, tmp_path, capsys):
    for name in ("a.JPG", "b.jpeg", "c.png", "._a.jpg", "d.h5", "e.eps", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = [os.path.basename(path) for path, problem in predict.find_images([str(tmp_path)])]
    assert found == ["a.JPG", "b.jpeg", "c.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run([str(empty)], trained[0]) == 1
    assert f"error: no images found in {empty}" in capsys.readouterr().err


def test_class_maps_saved_for_each_predicted_class_of_each_image(trained, tmp_path):
    checkpoint, _, images = trained
    twin = tmp_path / "elsewhere"
    os.makedirs(twin)
    shutil.copy(images[0], twin / "a.jpg")  # the same file name as images[0]
    inputs = [*images, str(twin / "a.jpg")]
    out, maps = tmp_path / "out.json", tmp_path / "maps"
    assert run(["--top-k", "2", "--json", str(out), "--cam", str(maps), *inputs], checkpoint) == 0
    results = json.loads(out.read_text())
    stems = ["a-0", "b", "c", "a-3"]
    expected = {f"{stem}_{p['label']}.png" for stem, r in zip(stems, results) for p in r["predictions"]}
    assert len(expected) == 8 and set(os.listdir(maps)) == expected
    for name in expected:
        with Image.open(maps / name) as picture:
            assert picture.format == "PNG"
            picture.verify()


def test_overlay_draws_the_class_map_over_the_whole_image_centred_on_zero(trained):
    _, model, images = trained
    image = Image.open(images[0]).convert("RGB").resize((120, 80))
    with torch.no_grad():
        maps = model.class_maps(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)).maps[0].numpy()
    figure = predict.class_map_figure(image, maps[5], "car", 0.75)
    photo, overlay = figure.axes[0].get_images()
    np.testing.assert_array_equal(np.asarray(photo.get_array()), np.asarray(image))
    np.testing.assert_array_equal(overlay.get_array(), maps[5])
    assert overlay.get_extent() == photo.get_extent()  # the map covers exactly the image
    limit = np.abs(maps[5]).max()
    assert overlay.get_clim() == pytest.approx((-limit, limit))  # red adds, blue takes away
    assert figure.axes[0].get_title() == "car: probability 0.75"
