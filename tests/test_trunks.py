"""Any torchvision classification network is a trunk, by its name: a training step, class maps
where the map is spatial, and export, for one network of each family; timm models as timm/<name>."""
import argparse
import importlib.util

import pytest
import torch
import torchvision

import export
import models
import trunks
from conftest import call_main
from util import DSDLError

# One network of each family the issue names, at a size where each is quick on a CPU.
FAMILIES = [
    ("resnet18", 64), ("resnext50_32x4d", 64), ("wide_resnet50_2", 64), ("convnext_tiny", 64),
    ("efficientnet_b0", 64), ("efficientnet_v2_s", 64), ("regnet_y_400mf", 64),
    ("mobilenet_v3_small", 64), ("swin_t", 64), ("swin_v2_t", 64), ("vit_b_16", 48),
]
CLASSES = 3


def settings(model, arch, pool="max"):
    return argparse.Namespace(model=model, arch=arch, pool=pool, lambd=10.0, beta=1e-4)


def build(model, arch, pool="max", image_size=None):
    torch.manual_seed(0)
    context = models.ModelContext([f"class {c}" for c in range(CLASSES)], image_size,
                                  torch.randn(CLASSES, 300))
    return models.build_model(settings(model, arch, pool), context)


def layers_of(arch):
    """torchvision's network, of which only the layers are read: on the meta device (no memory,
    no initialisation: seconds for the large ones) where it builds there."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(arch, weights=None)
    except NotImplementedError:  # regnet computes its widths with tensors
        return torchvision.models.get_model(arch, weights=None)


@pytest.mark.parametrize("arch,size", FAMILIES)
def test_a_torchvision_network_trains_maps_and_exports_as_a_trunk(arch, size, tmp_path):
    model = build("dsdl", arch)
    reference = layers_of(arch)
    # The feature width is the network's own: the input width of its classifier's first layer.
    parts = {name for name, _ in model.trunk.named_children()}
    head = next(module for name, module in reference.named_modules()
                if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in parts)
    assert model.feature_dim == head.in_features
    images = torch.randn(2, 3, size, size)
    # One training step changes the trunk and the dictionary.
    before = [p.detach().clone() for p in (next(model.trunk.parameters()), model.W2)]
    optimizer = torch.optim.SGD(model.parameter_groups(0.1, 1.0), lr=0.1)
    loss = models.build_loss(settings("dsdl", arch))(model.train()(images), torch.tensor([[1, 0, 1], [0, 1, 0]]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, (next(model.trunk.parameters()), model.W2)))
    # Class maps: on a spatial grid, summing over positions to the scores.
    model.eval()
    with torch.no_grad():
        scores, maps = model.class_maps(images)
        torch.testing.assert_close(scores, model(images).scores, rtol=1e-4, atol=1e-4)
        assert maps.shape[:2] == (2, CLASSES) and maps.shape[2] * maps.shape[3] > 1
        torch.testing.assert_close(maps.sum(dim=(2, 3)), scores, rtol=1e-4, atol=1e-4)
        # Export: the folded model, as export.py writes it (TorchScript), gives the same scores.
        (tmp_path / "model.pt").write_bytes(export.export_torchscript(model.folded()))
        exported = torch.jit.load(str(tmp_path / "model.pt"))
        torch.testing.assert_close(exported(images), scores, rtol=1e-4, atol=1e-4)


def test_vit_patch_tokens_at_its_own_size_are_torchvisions_encoder_output():
    torch.manual_seed(0)
    network = torchvision.models.vit_b_16(weights=None, image_size=64).eval()
    trunk = trunks.ViTTrunk(network).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = network.encoder(torch.cat([network.class_token.expand(2, -1, -1),
                                            network._process_input(images)], dim=1))
        expected = tokens[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
        torch.testing.assert_close(trunk(images), expected)


def test_vit_at_another_size_interpolates_its_position_embeddings_and_refuses_a_partial_patch():
    torch.manual_seed(0)
    trunk = trunks.ViTTrunk(torchvision.models.vit_b_16(weights=None, image_size=64)).eval()
    with torch.no_grad():
        assert trunk(torch.randn(1, 3, 96, 32)).shape == (1, 768, 6, 2)
        # Resized to its own grid, the embedding is the stored one.
        torch.testing.assert_close(trunk.position_embedding(4, 4), trunk.encoder.pos_embedding)
    with pytest.raises(DSDLError, match="16 divides"):
        trunk(torch.randn(1, 3, 40, 40))


def test_resnets_keep_the_release_key_names_and_others_torchvisions():
    assert "features.4.0.conv1.weight" in build("dsdl", "resnet18").state_dict()
    keys = build("baseline", "convnext_tiny").state_dict()
    network = torchvision.models.convnext_tiny(weights=None).state_dict()
    trunk_keys = {key.removeprefix("features.") for key in keys if key.startswith("features.")}
    assert trunk_keys == {key for key in network if not key.startswith("classifier.")}


def test_every_listed_arch_is_a_torchvision_classification_network_and_unknown_names_are_errors():
    listed = trunks.list_archs()
    assert set(listed) <= set(torchvision.models.list_models(module=torchvision.models))
    assert {"resnet101", "convnext_tiny", "swin_v2_t", "vit_b_16", "regnet_y_400mf"} <= set(listed)
    assert "googlenet" not in listed  # its classifier reads aux outputs: not a pooled map
    with pytest.raises(DSDLError, match="did you mean resnet101 or"):
        trunks.check_arch("resnet110")
    with pytest.raises(DSDLError, match="cannot be a trunk"):
        trunks.check_arch("googlenet")


def test_arch_list_prints_the_trunks_and_a_typo_is_one_error_line(tmp_path, capsys):
    import main_voc2007
    assert call_main(main_voc2007.main, ["--arch", "list"]) == 0  # no data folder needed
    out = capsys.readouterr().out
    assert "convnext_tiny" in out and "vit_b_16" in out and "timm/" in out
    assert call_main(main_voc2007.main, [str(tmp_path / "none"), "--arch", "convnext_tiyn", "--device",
                                    "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown --arch 'convnext_tiyn'; did you mean convnext_tiny")
    assert not (tmp_path / "none").exists()  # found before any data is touched


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_a_timm_model_is_a_trunk_by_its_name():
    import timm
    model = build("dsdl", "timm/resnet18")
    assert model.feature_dim == timm.create_model("resnet18", num_classes=0).num_features
    images = torch.randn(2, 3, 64, 64)
    loss = models.build_loss(settings("dsdl", "timm/resnet18"))(model(images), torch.ones(2, CLASSES))
    loss.backward()
    assert model.trunk.body.conv1.weight.grad is not None
    with torch.no_grad():
        scores, maps = model.eval().class_maps(images)
        torch.testing.assert_close(maps.sum(dim=(2, 3)), scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(DSDLError, match="timm has no model"):
        trunks.check_arch("timm/resnet_not_a_model")
