"""hubconf.py through torch.hub.load(source="local"): a trained model ready for inference, with
its class names and its input transform; nothing is downloaded."""
import glob
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from models import DSDL
from test_predict import IMAGE_SIZE, direct_input, direct_scores, trained  # noqa: F401 (fixture)
from embeddings import load_embeddings
from util import DSDLError
from voc import VOC_CLASSES


def test_hubconf_declares_every_package_its_modules_import():
    """torch.hub checks `dependencies` before it calls an entry point: a missing package is
    then named, instead of a ModuleNotFoundError from inside this project's modules. timm is
    optional: models.py imports it only for an --arch timm/<name>, and says how to install it."""
    import ast
    import hubconf
    imported = set()
    for path in glob.glob(os.path.join(ROOT, "*.py")):  # every module of the project
        if os.path.basename(path) in ("bench.py", "demo.py"):  # scripts, never imported by a model
            continue
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = {name for name in imported
                   if name not in sys.stdlib_module_names and not os.path.isfile(os.path.join(ROOT, name + ".py"))}
    assert third_party - {"timm"} == set(hubconf.dependencies)


def test_model_is_ready_in_eval_mode_with_its_classes_and_transform(trained):
    checkpoint, model, images = trained
    loaded = torch.hub.load(ROOT, "dsdl", source="local", checkpoint=checkpoint)
    assert not loaded.training
    assert loaded.classes == list(VOC_CLASSES) and loaded.image_size == IMAGE_SIZE
    image = loaded.transform(Image.open(images[0]).convert("RGB"))  # 3 x S x S
    torch.testing.assert_close(image.unsqueeze(0), direct_input(images[0]), rtol=0, atol=1e-5)
    with torch.no_grad():
        scores = loaded(image.unsqueeze(0)).scores[0].numpy()
    np.testing.assert_allclose(scores, direct_scores(model, images[0]), rtol=1e-4, atol=1e-5)


def test_resnet101_entry_loads_a_release_checkpoint_with_its_dataset(
        trained, random_embeddings, tmp_path):
    _, _, images = trained
    torch.manual_seed(5)
    model = DSDL(len(VOC_CLASSES), load_embeddings(random_embeddings), 10.0, arch="resnet101",
                 pretrained=False).eval()
    weights = {key: value for key, value in model.state_dict().items() if key != "semantics"}
    release = tmp_path / "release.pth.tar"  # the release's layout (spec section 9)
    torch.save({"epoch": 20, "arch": None, "best_score": 94.0, "state_dict": weights}, release)
    loaded = torch.hub.load(ROOT, "dsdl_resnet101", source="local", checkpoint=str(release),
                            dataset="voc", embeddings=random_embeddings, image_size=IMAGE_SIZE)
    assert (loaded.arch, loaded.classes, loaded.training) == ("resnet101", list(VOC_CLASSES), False)
    image = loaded.transform(Image.open(images[0]).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(image).scores[0].numpy(), direct_scores(model, images[0]),
                                   rtol=1e-4, atol=1e-5)


def test_resnet101_entry_refuses_another_resnet(trained):
    with pytest.raises(DSDLError, match="holds a DSDL resnet18, not a resnet101: load it with "
                                        "the entry point 'dsdl'"):
        torch.hub.load(ROOT, "dsdl_resnet101", source="local", checkpoint=trained[0])


@pytest.mark.parametrize("given, message", [
    ({"lambd": -1.0}, "argument lambd: must be a positive number, got -1.0"),
    ({"lambd": 0}, "argument lambd: must be a positive number, got 0"),
    ({"image_size": 64.5}, "argument image_size: '64.5' is not an integer"),
    ({"dataset": "imagenet"}, "argument dataset: invalid choice: 'imagenet'"),
    ({"embeddings": "a.npy", "classes_from_glove": "glove.txt"},
     "argument classes_from_glove: not allowed with argument embeddings"),
])
def test_entry_point_arguments_are_checked_as_predict_checks_its_options(trained, given, message):
    with pytest.raises(DSDLError, match=re.escape(f"dsdl(): {message}")):
        torch.hub.load(ROOT, "dsdl", source="local", checkpoint=trained[0], **given)


def test_an_image_size_given_as_text_is_the_number_as_on_the_command_line(trained, recwarn):
    loaded = torch.hub.load(ROOT, "dsdl", source="local", checkpoint=trained[0],
                            image_size=str(IMAGE_SIZE))
    assert loaded.image_size == IMAGE_SIZE and not recwarn.list


def test_embeddings_other_than_the_checkpoints_are_refused_not_ignored(trained, tmp_path):
    checkpoint, model, _ = trained
    np.save(tmp_path / "other.npy", model.semantics.numpy() + 1)
    with pytest.raises(DSDLError, match="holds other class vectors than"):
        torch.hub.load(ROOT, "dsdl", source="local", checkpoint=checkpoint,
                       embeddings=str(tmp_path / "other.npy"))
