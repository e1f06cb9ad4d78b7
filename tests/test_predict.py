"""predict.py: labels, probabilities, output formats, bad inputs, the release's checkpoints, maps,
mistakes of the command line, labels scored zero-shot."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import inference
import options
import predict
import torchvision
import util
from trunks import RELEASE_RESNETS
from conftest import class_image, fill_disk, unreadable
from models import DSDL
from util import DSDLError
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


def direct_input(path, size=IMAGE_SIZE):
    """The 1 x 3 x size x size input of one image, prepared here with PIL and numpy alone."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float64) / 255 - MEAN) / STD
    return torch.from_numpy(pixels.transpose(2, 0, 1)).float().unsqueeze(0)


def direct_scores(model, path, size=IMAGE_SIZE):
    """The model's scores of one image."""
    with torch.no_grad():
        return model(direct_input(path, size)).scores[0].double().numpy()


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
    for arch in RELEASE_RESNETS:
        resnet = torchvision.models.get_model(arch, weights=None)
        trunk = torch.nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                    resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        weights = {f"features.{key}": None for key in trunk.state_dict()}
        assert checkpoints.infer_arch(weights) == arch


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


# --------------------------------------------------------------------------------------------
# Mistakes of the command line: answered at once, before the checkpoint loads
# --------------------------------------------------------------------------------------------

@pytest.fixture
def must_not_load(monkeypatch):
    """Fails the test if the checkpoint is read (so no image is scored either)."""
    def load_checkpoint(*args, **kwargs):
        pytest.fail("the checkpoint was loaded before the mistake was reported")
    monkeypatch.setattr(checkpoints, "load_checkpoint", load_checkpoint)


def files_under(folder):
    return sorted(os.path.join(root, name) for root, dirs, files in os.walk(folder)
                  for name in dirs + files)


@pytest.mark.parametrize("argv, message", [
    (["-b", "0"], "argument -b/--batch-size: must be at least 1, got 0"),
    (["-j", "-1"], "argument -j/--workers: must be 0 or more, got -1"),
    (["--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
    (["--threshold", "2"], "argument --threshold: must be a probability between 0 and 1, got 2"),
    (["--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["--image-size", "-64"], "argument --image-size: must be at least 1, got -64"),
])
def test_option_values_out_of_range_are_refused_by_the_parser(argv, message, trained, capsys,
                                                               must_not_load):
    with pytest.raises(SystemExit) as exit:
        predict.main(["--resume", trained[0], *argv, trained[2][0]])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def unwritable_folder(tmp_path):
    """A folder this process cannot write in (root writes through permission bits, not /sys)."""
    if os.geteuid() == 0:
        return "/sys"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


@pytest.mark.parametrize("option, where, message", [
    ("--json", "a folder", "is a folder; --json takes a file name"),
    ("--csv", "a folder", "is a folder; --csv takes a file name"),
    ("--cam", "a file", "is a file; --cam takes a folder"),
    ("--json", "in a missing folder", "does not exist"),
    ("--cam", "in a missing folder", "does not exist"),
    ("--csv", "in a read-only folder", "cannot be written"),
    ("--cam", "in a read-only folder", "cannot be written"),
])
def test_output_that_cannot_be_written_is_an_error_before_the_checkpoint_loads(
        option, where, message, trained, tmp_path, capsys, must_not_load):
    (tmp_path / "a folder").mkdir()
    (tmp_path / "a file").write_text("")
    path = {"a folder": str(tmp_path / "a folder"), "a file": str(tmp_path / "a file"),
            "in a missing folder": str(tmp_path / "missing" / "out"),
            "in a read-only folder": os.path.join(unwritable_folder(tmp_path), "out")}[where]
    before = files_under(tmp_path)
    assert predict.main(["--resume", trained[0], option, path, trained[2][0]]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} {path}") and err.count("\n") == 1
    assert message in err
    assert files_under(tmp_path) == before and (where in ("a folder", "a file") or
                                                not os.path.exists(path))


NOT_CHECKPOINTS = {
    "a folder": None,
    "empty": b"",
    "text": b"epoch 20, mAP 94.4\n",
    "HTML": b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n",
    "a git-lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64
                         + b"\nsize 178542069\n",
    "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
}


@pytest.mark.parametrize("kind", NOT_CHECKPOINTS)
def test_resume_that_is_not_a_checkpoint_says_so(kind, trained, tmp_path, capsys):
    path = tmp_path / "model_best.pth.tar"
    if NOT_CHECKPOINTS[kind] is None:
        path.mkdir()
    else:
        path.write_bytes(NOT_CHECKPOINTS[kind])
    assert predict.main(["--resume", str(path), "-j", "0", "--device", "cpu", trained[2][0]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(path) in err and "not a PyTorch checkpoint" in err


def test_image_size_and_arch_other_than_the_checkpoints_are_used_with_a_warning(
        trained, tmp_path, capsys):
    checkpoint, model, images = trained
    out = tmp_path / "out.json"
    assert run(["--image-size", "96", "--threshold", "0", "--json", str(out), images[0]],
               checkpoint) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")] \
        == ["warning: --image-size 96 differs from the checkpoint's 64; using 96"]
    scores = {p["label"]: p["score"] for p in json.loads(out.read_text())[0]["predictions"]}
    np.testing.assert_allclose([scores[name] for name in VOC_CLASSES],
                               direct_scores(model, images[0], size=96), rtol=1e-4, atol=1e-5)

    assert run(["--image-size", str(IMAGE_SIZE), "--arch", "resnet18", images[0]], checkpoint) == 0
    assert "warning" not in capsys.readouterr().err  # the checkpoint's own values

    assert run(["--arch", "resnet34", images[0]], checkpoint) == 1  # its weights fit no resnet34
    first, second = capsys.readouterr().err.splitlines()
    assert first == "warning: --arch resnet34 differs from the checkpoint's resnet18; using resnet34"
    assert second.startswith("error: ")


def test_default_device_is_cuda_when_available_else_cpu_resolved_after_parsing(
        trained, monkeypatch):
    assert options.predict_parser().parse_args(["a.jpg", "--resume", "m.pth"]).device is None
    devices = []

    def load_model(args):
        devices.append(args.device)
        raise DSDLError("stop before the model is built")
    monkeypatch.setattr(predict, "load_model", load_model)
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert predict.main(["--resume", trained[0], trained[2][0]]) == 1
    assert devices == ["cpu", "cuda"]


# --------------------------------------------------------------------------------------------
# Labels from their word vectors (zero-shot for labels the model was not trained on)
# --------------------------------------------------------------------------------------------

def numpy_scores(model, vectors, features):
    """A = F D^T (D D^T + lambd I)^-1 with D = LeakyReLU(S W1) W2, in float64 with numpy."""
    W1, W2 = model.W1.detach().double().numpy(), model.W2.detach().double().numpy()
    hidden = vectors.astype(np.float64) @ W1
    dictionary = np.where(hidden > 0, hidden, 0.2 * hidden) @ W2             # C x d_f
    gram = dictionary @ dictionary.T + model.lambd * np.eye(len(dictionary))
    return np.linalg.solve(gram, dictionary @ features.T).T                  # B x C


def test_training_classes_given_with_their_own_vectors_score_exactly_as_the_model(
        trained, tmp_path, capsys):
    checkpoint, model, images = trained
    np.save(tmp_path / "own.npy", model.semantics.numpy())
    stored, given = tmp_path / "stored.json", tmp_path / "given.json"
    assert run(["--threshold", "0", "--json", str(stored), *images], checkpoint) == 0
    assert run(["--classes", *VOC_CLASSES, "--embeddings", str(tmp_path / "own.npy"),
                "--threshold", "0", "--json", str(given), *images], checkpoint) == 0
    assert json.loads(given.read_text()) == json.loads(stored.read_text())
    assert "zero-shot" not in capsys.readouterr().err


def test_new_labels_are_scored_zero_shot_from_their_encoded_word_vectors(
        trained, tmp_path, capsys):
    checkpoint, model, images = trained
    names = ["zebra", "dog", "kite"]
    vectors = np.random.default_rng(2).standard_normal((3, 300)).astype(np.float32)
    vectors[1] = model.semantics[VOC_CLASSES.index("dog")].numpy()
    np.save(tmp_path / "new.npy", vectors)
    argv = ["--classes", *names, "--embeddings", str(tmp_path / "new.npy")]
    out = tmp_path / "out.json"
    assert run([*argv, "--threshold", "0", "--json", str(out), *images[:2]], checkpoint) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "2 label(s)" in warning and "(zebra, kite)" in warning
    assert "zero-shot" in warning and "not been measured" in warning
    for result, path in zip(json.loads(out.read_text()), images):
        with torch.no_grad():
            features = model(direct_input(path)).features.double().numpy()  # 1 x d_f
        scores = {p["label"]: p["score"] for p in result["predictions"]}
        np.testing.assert_allclose([scores[name] for name in names],
                                   numpy_scores(model, vectors, features)[0], rtol=1e-4, atol=1e-5)
    # The dictionary of the loaded model: the trained encoder applied to the new vectors.
    loaded = inference.load_model(
        options.predict_parser().parse_args([*argv, "--resume", checkpoint, images[0]]))
    assert loaded.classes == names
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(loaded.semantics),
                                   model.encode(torch.from_numpy(vectors)), rtol=0, atol=0)


def test_classes_from_glove_take_each_name_as_the_mean_of_its_words_vectors(
        trained, tmp_path, capsys):
    checkpoint, _, images = trained
    rng = np.random.default_rng(3)
    lines = {word: " ".join(f"{x:.5f}" for x in rng.standard_normal(300))
             for word in ("the", "zebra", "traffic", "light")}
    (tmp_path / "glove.txt").write_text("".join(f"{w} {v}\n" for w, v in lines.items()))
    read = {word: np.array(vector.split(), dtype=np.float64) for word, vector in lines.items()}
    expected = np.stack([read["zebra"], np.mean([read["traffic"], read["light"]], axis=0)])
    np.save(tmp_path / "expected.npy", expected.astype(np.float32))
    by_glove, by_file = tmp_path / "glove.json", tmp_path / "file.json"
    assert run(["--classes", "zebra", "traffic light", "--classes-from-glove",
                str(tmp_path / "glove.txt"), "--threshold", "0", "--json", str(by_glove),
                images[0]], checkpoint) == 0
    assert "2 label(s) the checkpoint was not trained on" in capsys.readouterr().err
    assert run(["--classes", "zebra", "traffic light", "--embeddings",
                str(tmp_path / "expected.npy"), "--threshold", "0", "--json", str(by_file),
                images[0]], checkpoint) == 0
    assert json.loads(by_glove.read_text()) == json.loads(by_file.read_text())


@pytest.mark.parametrize("argv, message", [
    (["--classes", "zebra"], "--classes needs the labels' word vectors"),
    (["--classes-from-glove", "glove.txt"], "--classes-from-glove needs --classes"),
])
def test_labels_without_their_vectors_are_an_error_before_the_checkpoint_loads(
        argv, message, trained, capsys, must_not_load):
    assert run([trained[2][0], *argv], trained[0]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


# ---- nothing lost, nothing skipped without a word (issue 18) ---------------------------------

@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_results_that_do_not_fit_on_the_disk_leave_the_previous_file_and_are_printed(
        trained, tmp_path, capsys, monkeypatch, option):
    checkpoint, _, images = trained
    previous = tmp_path / "prev.out"  # an earlier output of the option, which it may replace
    earlier = ('[{"image": "old.jpg", "predictions": []}]\n' if option == "--json" else
               "image,label,probability,score\nold.jpg,cat,0.9,2.2\n")
    previous.write_text(earlier)
    fill_disk(monkeypatch, util, 100)  # a tenth of what the results need
    assert run([option, str(previous), *images], checkpoint) == 1
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == (
        f"error: could not write {previous} (No space left on device); the file there is as it "
        f"was, and the results are printed above. Free disk space, then run the same command again")
    assert all(path in out for path in images) and "Traceback" not in err
    assert previous.read_text() == earlier
    assert os.listdir(tmp_path) == ["prev.out"]


def test_running_out_of_memory_names_the_settings_to_lower(trained, capsys, monkeypatch):
    checkpoint, _, images = trained

    def huge_transform(image_size):
        # What --image-size 20000 does to the allocator, without taking the machine's memory.
        return lambda image: torch.empty(1 << 60, dtype=torch.uint8)

    monkeypatch.setattr(predict, "eval_transform", huge_transform)
    assert run(["-b", "2", *images], checkpoint) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress bar
    assert last.startswith("error: out of memory (") and "Traceback" not in err
    assert last.endswith(f"lower -b/--batch-size (now 2) or --image-size (now {IMAGE_SIZE})")


def test_linked_folders_are_followed_once_and_unreadable_ones_and_images_reported(
        trained, tmp_path, capsys, monkeypatch):
    checkpoint, _, images = trained
    photos, private = tmp_path / "photos", tmp_path / "photos" / "private"
    os.makedirs(private)
    os.makedirs(tmp_path / "elsewhere")
    shutil.copy(images[0], tmp_path / "elsewhere" / "linked.jpg")
    os.symlink(tmp_path / "elsewhere", photos / "link")
    os.symlink(photos, photos / "loop")  # a link back up: followed once, not for ever
    shutil.copy(images[1], photos / "locked.png")
    shutil.copy(images[2], private / "hidden.jpg")
    unreadable(monkeypatch, str(private))
    unreadable(monkeypatch, str(photos / "locked.png"))
    out = tmp_path / "out.json"
    assert run(["--json", str(out), str(photos)], checkpoint) == 1
    results = {r["image"]: r for r in json.loads(out.read_text())}
    assert set(results) == {str(photos / "link" / "linked.jpg"), str(photos / "locked.png"),
                            str(private)}
    assert "error" not in results[str(photos / "link" / "linked.jpg")]
    err = capsys.readouterr().err
    assert f"warning: skipped {private}: cannot read this folder: permission denied" in err
    assert (f"warning: skipped {photos / 'locked.png'}: cannot read {photos / 'locked.png'}: "
            f"permission denied") in err


def test_class_maps_that_none_of_the_images_gets_are_explained(trained, tmp_path, capsys):
    checkpoint, _, images = trained
    maps = tmp_path / "maps"
    assert run(["--threshold", "1", "--cam", str(maps), *images], checkpoint) == 0
    assert os.listdir(maps) == []
    assert capsys.readouterr().err == (
        f"note: --cam {maps}: no map written, since no image has a predicted label (a map is "
        f"drawn for each); pass --top-k K or a lower --threshold\n")


def test_embeddings_other_than_the_checkpoints_vectors_are_refused_the_same_ones_accepted(
        trained, tmp_path, capsys):
    checkpoint, model, images = trained
    np.save(tmp_path / "same.npy", model.semantics.numpy())
    np.save(tmp_path / "other.npy", model.semantics.numpy()[::-1])
    assert run(["--embeddings", str(tmp_path / "same.npy"), images[0]], checkpoint) == 0
    assert "warning" not in capsys.readouterr().err
    assert run(["--embeddings", str(tmp_path / "other.npy"), images[0]], checkpoint) == 1
    assert capsys.readouterr().err == (
        f"error: --embeddings {tmp_path / 'other.npy'} holds other class vectors than {checkpoint}: "
        f"its dictionary was learned from the checkpoint's vectors, which are kept; leave out "
        f"--embeddings to use them. To score labels from other vectors, name them with --classes\n")
