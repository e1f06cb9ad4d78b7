"""The model of spec sections 2-3: dictionary, closed-form coefficients, loss, gradients."""
import types

import numpy as np
import pytest
import torch

import options
from util import DSDLError
from models import (MODELS, DSDL, Baseline, BaselineLoss, DSDLLoss, DSDLOutput, ModelContext,
                    build_loss, build_model, ridge_coefficients)


def small_model(num_classes=5, lambd=10.0, seed=0):
    torch.manual_seed(seed)
    semantics = torch.randn(num_classes, 300)
    return DSDL(num_classes, semantics, lambd, arch="resnet18", pretrained=False)


def leaky_relu(x):
    return np.where(x > 0, x, 0.2 * x)


def ridge_by_lstsq(features, dictionary, lambd):
    """Each row a of A solves min ||f - D^T a||^2 + lambd ||a||^2: least squares on the
    stacked system [D^T; sqrt(lambd) I] a = [f; 0], in float64 with numpy."""
    features, dictionary = np.float64(features), np.float64(dictionary)
    num_classes = dictionary.shape[0]
    system = np.vstack([dictionary.T, np.sqrt(lambd) * np.eye(num_classes)])
    rhs = np.vstack([features.T, np.zeros((num_classes, features.shape[0]))])
    return np.linalg.lstsq(system, rhs, rcond=None)[0].T


def test_coefficients_equal_independent_ridge_solution():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, 40)).astype(np.float32)
    dictionary = rng.standard_normal((4, 40)).astype(np.float32)
    for lambd in (0.1, 10.0):
        ours = ridge_coefficients(torch.from_numpy(features), torch.from_numpy(dictionary), lambd)
        assert ours.dtype == torch.float32
        np.testing.assert_allclose(ours.numpy(), ridge_by_lstsq(features, dictionary, lambd),
                                   rtol=1e-4, atol=1e-5)


def test_model_scores_are_the_ridge_coefficients_of_its_features_and_dictionary():
    model = small_model(lambd=10.0).eval()
    with torch.no_grad():
        output = model(torch.randn(3, 3, 64, 64))
    assert output.scores.shape == (3, 5) and output.features.shape == (3, 512)
    assert output.dictionary.shape == (5, 512) and output.reconstruction.shape == (5, 300)
    expected = ridge_by_lstsq(output.features.numpy(), output.dictionary.numpy(), 10.0)
    np.testing.assert_allclose(output.scores.numpy(), expected, rtol=1e-3, atol=1e-4)


def test_features_are_global_max_pooled_trunk_maps():
    model = small_model().eval()
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        feature_map = model.features(images).numpy()
        output = model(images)
    np.testing.assert_allclose(output.features.numpy(), feature_map.max(axis=(2, 3)), rtol=1e-6)


def test_tied_autoencoder_matches_the_formulas():
    model = small_model()
    semantics = model.semantics.numpy()
    w1, w2 = model.W1.detach().numpy(), model.W2.detach().numpy()
    dictionary = leaky_relu(semantics @ w1) @ w2
    reconstruction = leaky_relu(dictionary @ w2.T) @ w1.T
    with torch.no_grad():
        output = model(torch.randn(1, 3, 64, 64))
    np.testing.assert_allclose(output.dictionary.numpy(), dictionary, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(output.reconstruction.numpy(), reconstruction, rtol=1e-4, atol=1e-5)
    assert {name for name, _ in model.named_parameters() if not name.startswith("features.")} == {"W1", "W2"}


def test_autoencoder_initialisation_is_uniform_in_the_spec_bounds():
    model = small_model()
    assert model.W1.shape == (300, 1024) and model.W2.shape == (1024, 512)
    for weight, bound in ((model.W1, 1 / 1024 ** 0.5), (model.W2, 1 / 512 ** 0.5)):
        assert weight.abs().max() <= bound
        assert weight.abs().max() > 0.95 * bound  # spread over the whole range, not a narrower init


def test_loss_equals_the_formula_by_hand():
    model = small_model(lambd=10.0)
    targets = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 1]])
    output = model(torch.randn(3, 3, 64, 64))
    loss = DSDLLoss(lambd=10.0, beta=1e-4)(output, targets).item()

    a = output.scores.detach().numpy().astype(np.float64)
    d = output.dictionary.detach().numpy().astype(np.float64)
    f = output.features.detach().numpy().astype(np.float64)
    s = output.semantics.numpy().astype(np.float64)
    s_hat = output.reconstruction.detach().numpy().astype(np.float64)
    y = targets.numpy()
    sigmoid = 1 / (1 + np.exp(-a))
    bce = -np.mean(y * np.log(sigmoid) + (1 - y) * np.log(1 - sigmoid))
    rec = np.sqrt(np.sum((a @ d - f) ** 2))
    sparsity = np.sqrt(np.sum(a ** 2))
    cos = np.mean(np.sum(s * s_hat, 1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(s_hat, axis=1)))
    expected = (bce + 1e-4 * (rec + 10.0 * sparsity)) / cos
    assert loss == pytest.approx(expected, rel=1e-4)


def test_gradients_reach_the_autoencoder_and_the_trunk():
    model = small_model()
    output = model(torch.randn(2, 3, 64, 64))
    DSDLLoss(10.0, 1e-4)(output, torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]])).backward()
    for name in ("W1", "W2", "features.0.weight", "features.7.1.conv2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert not model.semantics.requires_grad  # the GloVe vectors are fixed


def test_gradcheck_of_the_head_in_float64():
    """Gradient through the closed-form solve, the auto-encoder and the loss, against finite differences."""
    torch.manual_seed(0)
    loss_fn = DSDLLoss(lambd=10.0, beta=0.1)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    semantics = torch.randn(3, 300, dtype=torch.float64)
    w1 = (0.05 * torch.randn(300, 8, dtype=torch.float64)).requires_grad_()
    w2 = (0.3 * torch.randn(8, 6, dtype=torch.float64)).requires_grad_()
    features = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)

    def head(features, w1, w2):
        # The model's own encode and decode, on weights small enough for finite differences.
        weights = types.SimpleNamespace(W1=w1, W2=w2)
        dictionary = DSDL.encode(weights, semantics)
        reconstruction = DSDL.decode(weights, dictionary)
        scores = ridge_coefficients(features, dictionary, 0.5)
        return loss_fn(DSDLOutput(scores, features, dictionary, semantics, reconstruction), targets), scores

    assert torch.autograd.gradcheck(head, (features, w1, w2), eps=1e-6, atol=1e-5)


def test_parameter_groups_trunk_at_lr_times_lrp_dictionary_at_lr():
    model = small_model()
    groups = model.parameter_groups(lr=0.01, lrp=0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(0.001), 0.01]
    trunk, dictionary = ({id(p) for p in g["params"]} for g in groups)
    assert dictionary == {id(model.W1), id(model.W2)}
    assert trunk == {id(p) for p in model.features.parameters()}
    assert trunk | dictionary == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("shape", [(4, 300), (5,), (5, 0)])
def test_semantics_of_the_wrong_shape_are_refused(shape):
    with pytest.raises(ValueError, match=r"5 x d_s .*got \(" + ", ".join(map(str, shape))):
        DSDL(5, torch.randn(*shape), 10.0, arch="resnet18", pretrained=False)


def test_pretrained_weights_offline_say_which_file_to_place_where(offline, tmp_path):
    with pytest.raises(RuntimeError) as error:
        DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=True)
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "--no-pretrained" in message


# --------------------------------------------------------------------------------------------
# The paper's baseline, global average pooling, and what every model shares
# --------------------------------------------------------------------------------------------

def small_baseline(num_classes=5, pool="max", seed=0):
    torch.manual_seed(seed)
    return Baseline(num_classes, arch="resnet18", pretrained=False, pool=pool)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_baseline_scores_are_one_linear_layer_with_bias_on_globally_pooled_features(pool):
    model = small_baseline(pool=pool).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
        feature_map = model.trunk(images).numpy()                        # B x d_f x h x w
    pooled = feature_map.max(axis=(2, 3)) if pool == "max" else feature_map.mean(axis=(2, 3))
    np.testing.assert_allclose(output.features.numpy(), pooled, rtol=1e-5, atol=1e-6)
    weight, bias = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    np.testing.assert_allclose(output.scores.numpy(), pooled @ weight.T + bias, rtol=1e-4, atol=1e-5)


def test_baseline_loss_is_binary_cross_entropy_on_the_logits_by_hand():
    scores = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0]])
    loss = BaselineLoss()(types.SimpleNamespace(scores=scores), targets).item()
    p = 1 / (1 + np.exp(-scores.numpy().astype(np.float64)))
    y = targets.numpy()
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert loss == pytest.approx(expected, rel=1e-6)


def test_baseline_parameter_groups_trunk_at_lr_times_lrp_linear_layer_at_lr():
    model = small_baseline()
    groups = model.parameter_groups(lr=0.01, lrp=0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(0.001), 0.01]
    trunk, head = ({id(p) for p in g["params"]} for g in groups)
    assert head == {id(model.fc.weight), id(model.fc.bias)}
    assert trunk | head == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_baseline_class_maps_are_cams_that_sum_to_the_scores(pool):
    model = small_baseline(pool=pool).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scores, maps = model.class_maps(images)
        feature_map = model.trunk(images).numpy()
    torch.testing.assert_close(scores, model(images).scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps.sum(dim=(2, 3)).numpy(), scores.numpy(), rtol=1e-4, atol=1e-4)
    if pool == "avg":  # the classic CAM (Zhou et al. 2016), with the bias spread evenly
        weight, bias = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
        positions = feature_map.shape[2] * feature_map.shape[3]
        cam = (np.einsum("bkhw,ck->bchw", feature_map, weight) + bias[None, :, None, None]) / positions
        np.testing.assert_allclose(maps.numpy(), cam, rtol=1e-4, atol=1e-5)


def test_dsdl_with_average_pooling_reads_mean_features_and_its_maps_sum_to_the_scores():
    torch.manual_seed(0)
    model = DSDL(5, torch.randn(5, 300), 10.0, arch="resnet18", pretrained=False, pool="avg").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = model(images)
        scores, maps = model.class_maps(images)
        mean = model.trunk(images).mean(dim=(2, 3))
    torch.testing.assert_close(output.features, mean)
    torch.testing.assert_close(scores, output.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["dsdl", "baseline"])
def test_the_folded_model_gives_the_models_scores(name):
    torch.manual_seed(0)
    settings = types.SimpleNamespace(model=name, arch="resnet18", pool="max", lambd=10.0, beta=1e-4)
    model = build_model(settings, context(4)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.folded()(images), model(images).scores, rtol=1e-4, atol=1e-5)
    assert (model.folded().classifier.bias is not None) == (name == "baseline")


def context(num_classes, image_size=None):
    return ModelContext([f"class {c}" for c in range(num_classes)], image_size,
                        torch.randn(num_classes, 300))


def test_the_model_table_builds_each_model_and_its_loss_by_name():
    settings = types.SimpleNamespace(model=None, arch="resnet18", pool="max", lambd=0.5, beta=0.25)
    for name, entry in MODELS.items():
        settings.model = name
        assert type(build_model(settings, context(3))) is entry.network
        assert type(build_loss(settings)) is entry.loss
    settings.model = "dsdl"
    assert build_model(settings, context(3)).lambd == 0.5
    assert (build_loss(settings).lambd, build_loss(settings).beta) == (0.5, 0.25)


def test_init_from_loads_the_trunk_across_models_and_keeps_the_heads_own_weights():
    dsdl, baseline = small_model(num_classes=5, seed=1), small_baseline(num_classes=3, seed=2)
    own_fc = baseline.fc.weight.detach().clone()
    baseline.load_weights(dict(dsdl.state_dict()), "dsdl.pth", class_independent_only=True)
    for key, value in dsdl.features.state_dict().items():
        assert torch.equal(baseline.features.state_dict()[key], value), key
    assert torch.equal(baseline.fc.weight, own_fc)
    # and back: a DSDL from a baseline's trunk keeps its own auto-encoder
    fresh = small_model(num_classes=4, seed=3)
    own_w1 = fresh.W1.detach().clone()
    fresh.load_weights(dict(baseline.state_dict()), "baseline.pth", class_independent_only=True)
    assert torch.equal(fresh.W1, own_w1)
    assert torch.equal(fresh.features[0].weight, baseline.features[0].weight)


def test_with_partial_labels_only_the_known_pairs_count_in_the_classification_term():
    from models import AsymmetricLoss, BaselineLoss, BaselineOutput
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    targets = (torch.rand(5, 4, generator=generator) < 0.5).double()
    known = torch.rand(5, 4, generator=generator) < 0.6
    x, y, k = scores.numpy(), targets.numpy(), known.numpy()
    per_pair = -(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-x))))
    expected = per_pair[k].mean()
    output = BaselineOutput(scores, torch.zeros(5, 8, dtype=torch.float64))
    assert BaselineLoss()(output, targets, known).item() == pytest.approx(expected, rel=1e-12)
    plain_asl = BaselineLoss(AsymmetricLoss(0, 0, 0))(output, targets, known).item()
    assert plain_asl == pytest.approx(expected, rel=1e-12)
    flipped = torch.where(known, targets, 1 - targets)  # the unknown pairs' targets do not matter
    assert BaselineLoss()(output, flipped, known).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("width", [50, 512])
def test_class_vectors_of_any_width_build_an_auto_encoder_that_follows_them(width):
    torch.manual_seed(0)
    model = DSDL(4, torch.randn(4, width), 10.0, arch="resnet18", pretrained=False)
    output = model(torch.randn(2, 3, 64, 64))
    assert model.W1.shape == (width, 1024) and output.reconstruction.shape == (4, width)
    loss = DSDLLoss(10.0, 1e-4)(output, torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]]))
    loss.backward()
    assert torch.isfinite(model.W1.grad).all()
    other = DSDL(4, torch.randn(4, 300), 10.0, arch="resnet18", pretrained=False)
    with pytest.raises(DSDLError, match=f"trained with {width}-d class vectors.*here are 300-d"):
        other.load_weights(model.state_dict(), "run.pth")
