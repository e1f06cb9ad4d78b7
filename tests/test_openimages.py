"""Open Images V6 / V7 human-verified image labels in their official files: Confidence 1 present,
0 absent, unverified unknown (-2); the --classes subset; images not downloaded left out with one
message; the label cache; each input mistake one error line."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import main_openimages
import openimages
import runs
from conftest import SMALL, call_main, class_image
from openimages import OpenImages
from report import read_metrics
from util import ABSENT, PRESENT, UNKNOWN, DSDLError

# MID -> display name, as oidv7-class-descriptions.csv has them: two classes share "Jaguar", one
# name holds a comma, one class is never verified on the test images.
DESCRIPTIONS = {"/m/01yrx": "Cat", "/m/0bt9lr": "Dog", "/m/0k4j": "Car", "/m/01g317": "Person",
                "/m/0449p": "Jaguar", "/m/012x34": "Jaguar", "/m/0cgh4": "Building, tall",
                "/g/11bc5q0r4n": "Snowboard"}
KEPT = ["/m/0bt9lr", "/m/01yrx", "/m/0k4j", "/m/0449p"]  # the --classes of most tests, in this order
# split -> rows (ImageID, Source, LabelName, Confidence) in file order
ROWS = {
    "train": [("000a1249af2bc5f0", "verification", "/m/01yrx", "1"),
              ("000a1249af2bc5f0", "verification", "/m/0bt9lr", "0"),
              ("000a1249af2bc5f0", "crowdsource-verification", "/m/01g317", "1"),  # not kept
              ("0a1b2c3d4e5f6071", "verification", "/m/0k4j", "1"),
              ("0a1b2c3d4e5f6071", "crowdsource-verification", "/m/0k4j", "0"),  # twice: 1 wins
              ("1f2e3d4c5b6a7980", "verification", "/m/01g317", "1"),  # no kept class: dropped
              ("2b3c4d5e6f708192", "verification", "/m/0449p", "1"),
              ("2b3c4d5e6f708192", "verification", "/m/01yrx", "0"),
              ("3c4d5e6f70819203", "verification", "/m/0bt9lr", "1"),  # not downloaded
              ("4d5e6f7081920314", "verification", "/m/0bt9lr", "1"),
              ("4d5e6f7081920314", "verification", "/m/01yrx", "1"),
              ("5e6f708192031425", "verification", "/m/0k4j", "0"),
              ("6f70819203142536", "verification", "/m/01yrx", "1")],
    "validation": [("7081920314253647", "verification", "/m/0bt9lr", "1"),
                   ("7081920314253647", "verification", "/m/0k4j", "0"),
                   ("8192031425364758", "verification", "/m/01yrx", "1"),
                   ("9203142536475869", "verification", "/m/0k4j", "1"),
                   ("9203142536475869", "verification", "/m/0449p", "0"),
                   ("a314253647586970", "verification", "/m/0bt9lr", "0"),
                   ("a314253647586970", "verification", "/m/01yrx", "1")],
}
NOT_DOWNLOADED = {"3c4d5e6f70819203"}
# The labels read independently of the CSV: ImageID -> {MID: label}, every other kept class -2.
EXPECTED = {
    "train": {"000a1249af2bc5f0": {"/m/01yrx": PRESENT, "/m/0bt9lr": ABSENT},
              "0a1b2c3d4e5f6071": {"/m/0k4j": PRESENT},
              "2b3c4d5e6f708192": {"/m/0449p": PRESENT, "/m/01yrx": ABSENT},
              "4d5e6f7081920314": {"/m/0bt9lr": PRESENT, "/m/01yrx": PRESENT},
              "5e6f708192031425": {"/m/0k4j": ABSENT},
              "6f70819203142536": {"/m/01yrx": PRESENT}},
    "validation": {"7081920314253647": {"/m/0bt9lr": PRESENT, "/m/0k4j": ABSENT},
                   "8192031425364758": {"/m/01yrx": PRESENT},
                   "9203142536475869": {"/m/0k4j": PRESENT, "/m/0449p": ABSENT},
                   "a314253647586970": {"/m/0bt9lr": ABSENT, "/m/01yrx": PRESENT}},
}
V7 = {"descriptions": "oidv7-class-descriptions.csv",
      "train": "oidv7-train-annotations-human-imagelabels.csv",
      "validation": "oidv7-val-annotations-human-imagelabels.csv"}
V6 = {"descriptions": "oidv6-class-descriptions.csv",
      "train": "oidv6-train-annotations-human-imagelabels.csv",
      "validation": "validation-annotations-human-imagelabels.csv"}


def write_openimages_tree(root, names=V7, header=True):
    """The class descriptions, the human-verified image labels of train and validation and the
    images (`<split>/<ImageID>.jpg`, 48 px), as the official files are laid out."""
    rng = np.random.default_rng(0)
    os.makedirs(root)
    with open(os.path.join(root, names["descriptions"]), "w", newline="") as f:
        f.write("LabelName,DisplayName\n" * header + "".join(
            f'{mid},"{name}"\n' if "," in name else f"{mid},{name}\n" for mid, name in DESCRIPTIONS.items()))
    for split, rows in ROWS.items():
        with open(os.path.join(root, names[split]), "w", newline="") as f:
            f.write("ImageID,Source,LabelName,Confidence\n" + "".join(",".join(row) + "\n" for row in rows))
        os.makedirs(os.path.join(root, split))
        for image_id in dict.fromkeys(row[0] for row in rows):
            if image_id not in NOT_DOWNLOADED:
                present = [KEPT.index(mid) for i, _, mid, c in rows if i == image_id and c == "1" and mid in KEPT]
                class_image(present, 48, rng).save(os.path.join(root, split, image_id + ".jpg"))


def expected_rows(split, mids=KEPT):
    return [[EXPECTED[split][image_id].get(mid, UNKNOWN) for mid in mids] for image_id in EXPECTED[split]]


def load(root, split, classes=KEPT):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image not downloaded
        return OpenImages(root, split, classes)


@pytest.fixture
def oi_root(tmp_path):
    root = str(tmp_path / "openimages")
    write_openimages_tree(root)
    return root


def test_confidence_1_is_present_0_absent_and_an_unverified_pair_unknown(oi_root):
    for split in ("train", "validation"):
        dataset = load(oi_root, split)
        assert dataset.image_ids == list(EXPECTED[split])  # in the file's order
        labels = [dataset.label_vector(i).tolist() for i in range(len(dataset))]
        assert labels == expected_rows(split)
        assert dataset.partial is True and dataset.labelled and dataset.benchmark is None


def test_an_item_is_the_image_its_labels_and_its_image_id(oi_root):
    dataset = load(oi_root, "train")
    image, labels, image_id = dataset[2]
    assert image_id == "2b3c4d5e6f708192"
    assert isinstance(image, Image.Image) and image.size == (48, 48)
    assert labels.dtype == torch.int64 and labels.tolist() == [-2, -1, -2, 1]


def test_images_without_a_verified_label_of_the_classes_or_not_downloaded_are_left_out(oi_root):
    with pytest.warns(UserWarning) as caught:
        dataset = OpenImages(oi_root, "train", KEPT)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("Open Images train: 6 of the 7 images with a verified label of the 4 "
                              f"classes are in {os.path.join(oi_root, 'train')} and used; the 1 "
                              "missing (e.g. 3c4d5e6f70819203) are left out")
    assert "1f2e3d4c5b6a7980" not in dataset.image_ids  # verified for Person only


def test_classes_are_display_names_in_the_order_given_with_the_mid_where_two_share_one(oi_root):
    dataset = load(oi_root, "validation")
    assert dataset.classes == ["Dog", "Cat", "Car", "Jaguar (/m/0449p)"] and dataset.mids == KEPT


@pytest.mark.parametrize("given", [
    ["Dog", "Cat", "Car", "Jaguar (/m/0449p)"],
    ["/m/0bt9lr", "Cat", "/m/0k4j", "/m/0449p"],
])
def test_classes_may_be_given_as_mids_display_names_or_both(oi_root, given):
    assert load(oi_root, "validation", given).mids == KEPT


def test_classes_may_be_one_file_of_names_or_a_class_descriptions_csv(oi_root, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("Dog\nCat\n\nCar\nJaguar (/m/0449p)\n")
    boxable = tmp_path / "class-descriptions-boxable.csv"  # headerless, as the older file
    boxable.write_text('/m/0bt9lr,Dog\n/m/01yrx,Cat\n/m/0k4j,Car\n/m/0449p,Jaguar\n')
    assert load(oi_root, "validation", [str(names)]).mids == KEPT
    assert load(oi_root, "validation", [str(boxable)]).mids == KEPT
    subset = load(oi_root, "validation", ["Car", "Dog"])
    assert subset.image_ids == ["7081920314253647", "9203142536475869", "a314253647586970"]
    assert [subset.label_vector(i).tolist() for i in range(len(subset))] == [[-1, 1], [1, -2], [-2, -1]]


def test_the_v6_file_names_and_a_headerless_description_file_are_read_alike(tmp_path):
    root = str(tmp_path / "v6")
    write_openimages_tree(root, V6, header=False)
    dataset = load(root, "validation")
    assert dataset.label_source == os.path.join(root, V6["validation"])
    assert [dataset.label_vector(i).tolist() for i in range(len(dataset))] == expected_rows("validation")
    # all at once (what a model's context gives a constructor that asks for them): int8, the same
    assert dataset.labels.dtype == np.int8 and dataset.labels.tolist() == expected_rows("validation")


def test_the_labels_are_cached_and_read_again_when_the_file_or_the_classes_change(oi_root, monkeypatch):
    first = load(oi_root, "train")
    read = openimages.read_image_labels
    calls = []
    monkeypatch.setattr(openimages, "read_image_labels", lambda *a: calls.append(a) or read(*a))
    again = load(oi_root, "train")
    assert calls == [] and again.image_ids == first.image_ids
    np.testing.assert_array_equal(again.values, first.values)
    load(oi_root, "train", ["Cat"])
    assert len(calls) == 1
    with open(os.path.join(oi_root, V7["train"]), "a") as f:
        f.write("6f70819203142536,verification,/m/0k4j,0\n")
    assert load(oi_root, "train").label_vector(5).tolist() == [-2, 1, -1, -2]
    assert len(calls) == 2


def replace_in(root, name, old, new):
    path = os.path.join(root, name)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(old, new))


MISTAKES = {
    "no folder": (lambda root: os.rename(root, root + "-elsewhere"), KEPT,
                  "Open Images not found: {root} is not a folder"),
    "no class descriptions": (lambda root: os.remove(os.path.join(root, V7["descriptions"])), KEPT,
                              "no class descriptions in {root} (looked for oidv7-class-descriptions.csv"),
    "no validation labels": (lambda root: os.remove(os.path.join(root, V7["validation"])), KEPT,
                             "no validation image labels in {root} (looked for oidv7-val-annotations"),
    "a class not described": (lambda root: None, ["Dog", "Kat"],
                              "--classes: 'Kat' is neither a MID nor a display name of "
                              "{root}/oidv7-class-descriptions.csv (did you mean 'Cat'"),
    "an ambiguous name": (lambda root: None, ["Dog", "Jaguar"],
                          "--classes: 'Jaguar' is the display name of /m/0449p, /m/012x34: give the MID"),
    "no --classes": (lambda root: None, [], "choose them with --classes"),
    "a bad confidence": (lambda root: replace_in(root, V7["train"], "/m/0k4j,0\n", "/m/0k4j,0.7\n"), KEPT,
                         "oidv7-train-annotations-human-imagelabels.csv, line 6: Confidence must be 0 or 1, got '0.7'"),
    "no image downloaded": (lambda root: [os.remove(os.path.join(root, "validation", name))
                                          for name in os.listdir(os.path.join(root, "validation"))],
                            KEPT, "none of the 4 images labelled in {root}/oidv7-val-annotations-human-"
                                  "imagelabels.csv is in {root}/validation (e.g. 7081920314253647.jpg)"),
    "no images folder": (lambda root: os.rename(os.path.join(root, "validation"), os.path.join(root, "val")),
                         KEPT, "the images folder {root}/validation is missing"),
}


@pytest.mark.filterwarnings("ignore:Open Images train")  # the image not downloaded
@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_input_mistake_is_one_error_line(mistake, oi_root, tmp_path, capsys):
    make, classes, said = MISTAKES[mistake]
    make(oi_root)
    code = call_main(main_openimages.main, [oi_root, *SMALL, "--model", "baseline",
                                            *(["--classes", *classes] if classes else []),
                                            "--checkpoint-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and errors == err[-1:]
    assert said.format(root=oi_root) in errors[0]


def test_main_openimages_trains_one_epoch_and_logs_the_validation_metrics(oi_root, tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="6 of the 7 images"):
        code = call_main(main_openimages.main, [oi_root, *SMALL, "-b", "4", "--epochs", "1",
                                                "--model", "baseline", "--classes", *KEPT,
                                                "--checkpoint-dir", str(out)])
    assert code == 0
    best = torch.load(out / checkpoints.BEST, weights_only=True)
    assert best["classes"] == ["Dog", "Cat", "Car", "Jaguar (/m/0449p)"]
    assert best["args"]["lambd"] == 0.1 and best["args"]["beta"] == 1e-6  # COCO's
    (record,) = read_metrics(out / runs.METRICS_LOG)
    assert (record["epoch"], record["split"]) == (1, "validation")


def test_the_class_names_for_make_embeddings_are_printed_one_per_line(oi_root, capsys):
    openimages.main([oi_root, "--classes", *KEPT])
    assert capsys.readouterr().out == "Dog\nCat\nCar\nJaguar (/m/0449p)\n"
    with pytest.raises(DSDLError):
        OpenImages(oi_root, "validation", ["/m/0cgh4"])  # described, never verified there


def test_a_class_list_of_another_version_is_one_error_that_shows_ten_names(oi_root):
    with pytest.raises(DSDLError) as error:
        OpenImages(oi_root, "validation", ["Dog", *(f"/m/0zz{i:03d}" for i in range(25))])
    message = str(error.value)
    assert message.count("is neither a MID nor a display name") == 10 and message.endswith("; and 15 more")
