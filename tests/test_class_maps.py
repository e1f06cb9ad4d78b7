"""Class activation maps (models.DSDL.class_maps): exact, because the features are max-pooled
and the scores are linear in them."""
import numpy as np
import pytest
import torch

from models import DSDL

LAMBD = 10.0


@pytest.fixture(scope="module")
def model_and_images():
    """A random ResNet-18 DSDL in float64 (so that float error cannot hide a wrong map) and
    two 96 px images: a 3 x 3 layer-4 grid."""
    torch.manual_seed(0)
    model = DSDL(4, torch.randn(4, 300), LAMBD, arch="resnet18", pretrained=False)
    model = model.double().eval()
    images = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    return model, images


def layer4_and_projection(model, images):
    """The layer-4 map (numpy) and P = D^T (D D^T + lambda I)^-1 by an explicit inverse."""
    with torch.no_grad():
        feature_map = model.features(images).numpy()                    # B x d_f x h x w
        dictionary = model.encode(model.semantics.double()).numpy()     # C x d_f
    gram = dictionary @ dictionary.T + LAMBD * np.eye(dictionary.shape[0])
    return feature_map, dictionary.T @ np.linalg.inv(gram)              # d_f x C


def test_layer4_map_max_pooled_per_channel_and_projected_on_p_is_the_score(model_and_images):
    model, images = model_and_images
    feature_map, projection = layer4_and_projection(model, images)
    pooled = feature_map.max(axis=(2, 3))  # the model's global max pooling, channel by channel
    with torch.no_grad():
        scores = model(images).scores.numpy()
    np.testing.assert_allclose(pooled @ projection, scores, rtol=1e-9, atol=1e-12)


def test_class_map_is_each_channels_share_at_the_position_it_is_pooled_from(model_and_images):
    model, images = model_and_images
    feature_map, projection = layer4_and_projection(model, images)
    with torch.no_grad():
        maps = model.class_maps(images).maps.numpy()
    batch, channels, height, width = feature_map.shape
    assert maps.shape == (batch, projection.shape[1], height, width)
    expected = np.zeros_like(maps)
    for b in range(batch):
        for k in range(channels):
            y, x = np.unravel_index(np.argmax(feature_map[b, k]), (height, width))
            expected[b, :, y, x] += feature_map[b, k, y, x] * projection[k]
    np.testing.assert_allclose(maps, expected, rtol=1e-9, atol=1e-12)


def test_class_map_summed_over_positions_reproduces_the_class_score(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        scores, maps = model.class_maps(images)
        forward_scores = model(images).scores
    assert torch.equal(scores, forward_scores)  # the same computation as inference
    torch.testing.assert_close(maps.sum(dim=(2, 3)), forward_scores, rtol=1e-9, atol=1e-12)
    # Not a trivial identity: the maps spread the scores over several positions.
    assert (maps != 0).flatten(2).sum(2).min() > 1


def test_class_map_is_gradient_times_layer4_activation(model_and_images):
    model, images = model_and_images
    captured = {}
    handle = model.features.register_forward_hook(lambda module, inputs, output:
                                                  captured.update(layer4=output))
    try:
        scores = model(images).scores
    finally:
        handle.remove()
    layer4 = captured["layer4"]
    with torch.no_grad():
        maps = model.class_maps(images).maps
    for c in range(scores.shape[1]):
        (gradient,) = torch.autograd.grad(scores[:, c].sum(), layer4, retain_graph=True)
        torch.testing.assert_close(maps[:, c], (gradient * layer4).sum(1).detach(),
                                   rtol=1e-9, atol=1e-12)
