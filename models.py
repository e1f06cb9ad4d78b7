"""Every model of this project, built by name: the trunks, DSDL, the paper's baseline and their losses.

Zhou, Huang, Xing, "Deep Semantic Dictionary Learning for Multi-label Image Classification",
AAAI 2021. The method (semantic auto-encoder, closed-form coefficients, loss) is `DSDL` and
`DSDLLoss`; `Baseline` is the paper's ResNet-101 baseline row (one linear layer on the pooled
features). `MODELS` maps a model's name to its network and its loss; `build_model` and
`build_loss` are what the engine, predict.py, export.py, hubconf.py and bench.py call. Adding a
model is a class and a line in `MODELS`.

A trunk is any torchvision image-classification network, by its name (`list_archs`), or any timm
model as `timm/<name>`: its classifier is dropped and its last feature map (B x d_f x h x w) is
pooled globally. ResNets keep the release's weight names, so that its checkpoints load.
"""
import difflib
import inspect
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import ResNet

from options import PAPER_ARCH
from util import DSDLError

SEMANTIC_DIM = 300   # d_s: size of a GloVe class vector
HIDDEN_DIM = 1024    # width of the auto-encoder's hidden layer (W1 is 300 x 1024)
TIMM_PREFIX = "timm/"
# The ResNets of the release: their ImageNet weights are the ones it used (torchvision's V1).
RELEASE_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# --------------------------------------------------------------------------------------------
# Trunks: a network by its name, up to its last feature map
# --------------------------------------------------------------------------------------------

class Trunk(nn.Module):
    """The parts of a torchvision network that make its last feature map, kept under the
    network's own names (so its state-dict keys are torchvision's): `forward` returns
    B x d_f x h x w. Subclasses say which parts and how they connect."""

    parts = ("features",)

    def __init__(self, network):
        super().__init__()
        for name in self.parts:
            self.add_module(name, getattr(network, name))

    def forward(self, images):
        return self.features(images)


class DenseNetTrunk(Trunk):
    def forward(self, images):
        return F.relu(self.features(images))  # DenseNet's classifier path starts with a ReLU


class SwinTrunk(Trunk):
    parts = ("features", "norm")

    def forward(self, images):
        return self.norm(self.features(images)).permute(0, 3, 1, 2)  # Swin is channels-last


class RegNetTrunk(Trunk):
    parts = ("stem", "trunk_output")

    def forward(self, images):
        return self.trunk_output(self.stem(images))


class ShuffleNetTrunk(Trunk):
    parts = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")

    def forward(self, images):
        stages = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(images)))))
        return self.conv5(stages)


class MNASNetTrunk(Trunk):
    parts = ("layers",)

    def forward(self, images):
        return self.layers(images)


class ViTTrunk(Trunk):
    """A vision transformer's patch tokens as the spatial map (its class token is dropped).

    Any input size that the patch size divides: the position embeddings of the patch grid are
    resized (bicubic) to the grid of the input, as torchvision does to fine-tune at another size.
    """

    parts = ("conv_proj", "encoder")

    def __init__(self, network):
        super().__init__(network)
        self.class_token = network.class_token
        self.patch_size = network.patch_size

    def forward(self, images):
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise DSDLError(f"a ViT with {self.patch_size}-pixel patches needs an input size "
                            f"that {self.patch_size} divides, got {images.shape[-2]} x "
                            f"{images.shape[-1]}; pass such an --image-size")
        grid = self.conv_proj(images)                                 # B x D x h x w
        height, width = grid.shape[2], grid.shape[3]
        tokens = grid.flatten(2).transpose(1, 2)                      # B x hw x D
        tokens = torch.cat([self.class_token.expand(len(tokens), -1, -1), tokens], dim=1)
        encoder = self.encoder
        tokens = encoder.dropout(tokens + self.position_embedding(height, width))
        tokens = encoder.ln(encoder.layers(tokens))
        return tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, height, width)  # B x D x h x w

    def position_embedding(self, height: int, width: int):
        embedding = self.encoder.pos_embedding                        # 1 x (1 + n) x D
        side = int((embedding.shape[1] - 1) ** 0.5)
        if height == side and width == side:
            return embedding
        grid = embedding[:, 1:].transpose(1, 2).reshape(1, -1, side, side)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return torch.cat([embedding[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class TimmTrunk(nn.Module):
    """A timm model's `forward_features` as the trunk (timm's own weight names, under `body`)."""

    def __init__(self, network):
        super().__init__()
        self.body = network
        self.prefix_tokens = getattr(network, "num_prefix_tokens", 0)
        self.channels_last = getattr(network, "output_fmt", "NCHW") == "NHWC"

    def forward(self, images):
        output = self.body.forward_features(images)
        if output.ndim == 3:  # a transformer's tokens: B x (prefix + hw) x D, on a square grid
            tokens = output[:, self.prefix_tokens:]
            side = int(tokens.shape[1] ** 0.5)
            return tokens.transpose(1, 2).unflatten(2, (side, side))
        return output.permute(0, 3, 1, 2) if self.channels_last else output


# torchvision's network class -> the trunk made of it; ResNets are the release's Sequential.
TRUNKS = {
    "ConvNeXt": Trunk, "EfficientNet": Trunk, "MobileNetV2": Trunk, "MobileNetV3": Trunk,
    "MNASNet": MNASNetTrunk, "VGG": Trunk, "AlexNet": Trunk, "SqueezeNet": Trunk,
    "DenseNet": DenseNetTrunk, "SwinTransformer": SwinTrunk, "RegNet": RegNetTrunk,
    "ShuffleNetV2": ShuffleNetTrunk, "VisionTransformer": ViTTrunk, "ResNet": None,
}


def network_class(arch):
    """The torchvision class that `arch`'s builder returns (from its annotation: nothing built)."""
    annotation = inspect.signature(torchvision.models.get_model_builder(arch)).return_annotation
    return getattr(annotation, "__name__", str(annotation))


def list_archs():
    """The torchvision classification networks that can be a trunk, by name."""
    return [name for name in torchvision.models.list_models(module=torchvision.models)
            if network_class(name) in TRUNKS]


def timm_available():
    import importlib.util
    return importlib.util.find_spec("timm") is not None


def describe_archs():
    """What `--arch list` prints."""
    names = list_archs()
    lines = [f"{len(names)} torchvision networks can be the trunk (--arch NAME):"]
    lines += ["  " + " ".join(names[i:i + 6]) for i in range(0, len(names), 6)]
    if timm_available():
        lines.append("and any timm model as --arch timm/<name> (e.g. timm/tresnet_m; timm.list_models() "
                     "lists them)")
    else:
        lines.append("with timm installed (pip install -r requirements-timm.txt), any timm model "
                     "as --arch timm/<name>")
    lines.append(f"default: {PAPER_ARCH}, the paper's")
    return "\n".join(lines)


def check_arch(arch):
    """A clear error for an --arch that no trunk is built from, before any data is read."""
    if arch.startswith(TIMM_PREFIX):
        if not timm_available():
            raise DSDLError(f"--arch {arch} needs timm: pip install -r requirements-timm.txt")
        import timm
        name = arch[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise DSDLError(f"timm has no model {name!r}" + did_you_mean([TIMM_PREFIX + c for c in close]))
        return
    if arch in torchvision.models.list_models(module=torchvision.models) and arch not in list_archs():
        raise DSDLError(f"--arch {arch} ({network_class(arch)}) cannot be a trunk here: its "
                        f"classifier is not one layer on a pooled feature map; `--arch list` "
                        f"prints the choices")
    if arch not in list_archs():
        close = difflib.get_close_matches(arch, list_archs(), n=3)
        raise DSDLError(f"unknown --arch {arch!r}" + did_you_mean(close) + " `--arch list` prints "
                        f"the choices")


def did_you_mean(names):
    return f"; did you mean {' or '.join(names)}?" if names else "."


def imagenet_weights(arch):
    """torchvision's ImageNet weights of `arch`: each network's default, except the release's
    ResNets, which keep the weights the release used (IMAGENET1K_V1)."""
    weights = torchvision.models.get_model_weights(arch)
    return weights.IMAGENET1K_V1 if arch in RELEASE_RESNETS else weights.DEFAULT


def download_advice(arch, weights, error):
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return DSDLError(
        f"could not download the ImageNet weights of {arch} ({error}).\n"
        f"Either download {weights.url} on a machine with internet and place it as "
        f"{os.path.join(folder, os.path.basename(weights.url))}, or pass --no-pretrained to start "
        f"from random weights.")


def load_trunk(arch, pretrained):
    """The trunk of `arch` (with ImageNet weights when `pretrained`) and its feature size d_f.

    A ResNet's trunk is conv1 .. layer4 in a Sequential whose indices (features.0 = conv1,
    features.1 = bn1, features.4-7 = layer1-4) are the release's key names. d_f is read from the
    network: the channels of the map it makes from a small image.
    """
    check_arch(arch)
    if arch.startswith(TIMM_PREFIX):
        import timm
        try:
            network = timm.create_model(arch[len(TIMM_PREFIX):], pretrained=pretrained,
                                        num_classes=0, global_pool="")
        except OSError as error:
            raise DSDLError(f"could not download the ImageNet weights of {arch} ({error}); place "
                            f"them in the Hugging Face cache on a machine with internet, or pass "
                            f"--no-pretrained") from error
        trunk = TimmTrunk(network)
        probe = network.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    else:
        weights = imagenet_weights(arch) if pretrained else None
        try:
            network = torchvision.models.get_model(arch, weights=weights)
        except OSError as error:  # URLError and friends: no internet, proxy, interrupted download
            raise download_advice(arch, weights, error) from error
        if isinstance(network, ResNet):
            trunk = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool,
                                  network.layer1, network.layer2, network.layer3, network.layer4)
        else:
            trunk = TRUNKS[type(network).__name__](network)
        probe = 4 * getattr(network, "patch_size", 16)
    return trunk, feature_size(trunk, probe)


@torch.no_grad()
def feature_size(trunk, side):
    """The channels of the trunk's map of one side x side image (in eval mode: no statistics change)."""
    mode = trunk.training
    feature_map = trunk.eval()(torch.zeros(1, 3, side, side))
    trunk.train(mode)
    if feature_map.ndim != 4:
        raise DSDLError(f"the trunk makes a {feature_map.ndim}-d output, not a B x C x h x w map")
    return feature_map.shape[1]


# --------------------------------------------------------------------------------------------
# What every model shares: trunk, global pooling, a linear read-out of the pooled features
# --------------------------------------------------------------------------------------------

POOLING = {"max": nn.AdaptiveMaxPool2d, "avg": nn.AdaptiveAvgPool2d}


class ClassMaps(NamedTuple):
    scores: torch.Tensor  # B x C, the model's scores
    maps: torch.Tensor    # B x C x h x w, each class's score spread over the trunk's last grid


def at_least_float32(tensor):
    """Half-precision tensors (from autocast) go up to float32; float64 stays (gradcheck)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class PooledModel(nn.Module):
    """A trunk, global pooling and scores linear in the pooled features: scores = F P + b.

    What the models share: the parameter groups of the release's recipe, class maps, the folded
    inference model, and loading weights with a message instead of a traceback. A model gives
    its head's parameters (`head_parameters`), its read-out (`readout`: P d_f x C and b or
    None), its own entries of a checkpoint (`checkpoint_extras`) and which of its weights do not
    depend on the class list (`class_independent`, what --init-from takes).
    """

    name = None  # its key in MODELS
    shared = "trunk"  # what --init-from takes: the weights that do not depend on the class list

    def __init__(self, num_classes, arch, pretrained, pool):
        super().__init__()
        if pool not in POOLING:
            raise ValueError(f"pool must be one of {', '.join(POOLING)}, got {pool!r}")
        self.num_classes, self.arch, self.pool = num_classes, arch, pool
        # The trunk is stored as `features` so that the state-dict keys are the release's
        # (features.0 ...); the code calls it `trunk`, and "features" means the pooled F.
        self.features, self.feature_dim = load_trunk(arch, pretrained)
        # The release used a fixed 14x14 max pool, i.e. global max pooling at 448 px.
        self.pooling = POOLING[pool](1)

    @property
    def trunk(self):
        """The CNN up to its last feature map (the module the release named `features`)."""
        return self.features

    def pooled(self, images):
        return self.pooling(self.trunk(images)).flatten(1)  # B x d_f

    def settings(self):
        """What rebuilds this network (besides its class vectors): export.py's classes.json."""
        return {"model": self.name, "arch": self.arch, "pool": self.pool}

    def parameter_groups(self, lr, lrp):
        """The release's two groups: the CNN trunk at lr * lrp, the head at lr."""
        return [{"params": self.trunk.parameters(), "lr": lr * lrp},
                {"params": self.head_parameters(), "lr": lr}]

    def checkpoint_extras(self):
        return {}

    def class_independent(self, key):
        return key.startswith("features.")

    def class_maps(self, images):
        """The scores and, for each class, where on the trunk's last grid its score comes from.

        The scores are linear in the pooled features: A = F P + b (P d_f x C). With global max
        pooling, feature k is the map M_k read at the one position x_k its pool picks, so channel
        k adds P_kc M_k(x_k) to the score of class c, at x_k; with average pooling, every position
        adds P_kc M_k(x) / hw. The map of class c collects these shares where they are read,

            m_c(x) = sum of P_kc M_k(x) over the channels k pooled at x  (+ b_c / hw),

        so that summed over positions it is the score, exactly; it is also the gradient of A_c
        with respect to the map times that map. (The bias, which no position earns, is spread
        evenly.) With average pooling and a linear classifier these are the classic CAMs
        (Zhou et al., CVPR 2016). Returns ClassMaps(scores B x C as `forward` computes them,
        maps B x C x h x w).
        """
        feature_map = self.trunk(images)                      # B x d_f x h x w
        with torch.autocast(images.device.type, enabled=False):
            grid = feature_map.shape[2:]
            feature_map = at_least_float32(feature_map).flatten(2)  # B x d_f x hw
            positions = feature_map.shape[2]
            projection, bias = self.readout()                    # d_f x C, C or None
            if self.pool == "max":
                features, where = feature_map.max(dim=2)           # B x d_f, flat positions
                read = torch.zeros_like(feature_map).scatter(
                    2, where.unsqueeze(2), features.unsqueeze(2))  # M_k kept at x_k only
            else:
                features, read = feature_map.mean(dim=2), feature_map / positions
            scores = features @ projection                       # B x C, as in forward
            maps = torch.einsum("bkx,kc->bcx", read, projection)
            if bias is not None:
                scores = scores + bias
                maps = maps + (bias / positions)[None, :, None]
        return ClassMaps(scores, maps.unflatten(2, grid))

    @torch.no_grad()
    def folded(self):
        """This model for inference as `FoldedModel`: trunk, pooling, one linear layer (weight
        P^T, bias b). Shares this model's trunk (no copy)."""
        projection, bias = self.readout()
        return FoldedModel(self.trunk, self.pool, projection, bias).train(self.training)

    def load_weights(self, weights, path, class_independent_only=False):
        """Load a state dict, saying which shape differs (classes, feature size) instead of a
        traceback. `class_independent_only` (--init-from): only the weights that do not depend on
        the class list; the others stay this model's own."""
        expected = self.state_dict()
        if class_independent_only:  # the trunk, whole; of the head what this model shares
            trunk = {key: value for key, value in weights.items() if key.startswith("features.")}
            head = {key: value for key, value in weights.items() if key in expected
                    and not key.startswith("features.") and self.class_independent(key)}
            own = {key: value for key, value in expected.items() if not key.startswith("features.")}
            weights = {**own, **head, **trunk}
        for key in expected:  # BatchNorm counters, absent from checkpoints of PyTorch < 0.4.1
            if key.endswith("num_batches_tracked") and key not in weights:
                weights[key] = expected[key]
        self.check_weights(weights, path)
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise DSDLError(f"{path} does not fit a {self.name} {self.arch} (--pool {self.pool}): "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Are --model and "
                            f"--arch right?")
        for key, value in weights.items():
            if value.shape != expected[key].shape:
                raise DSDLError(
                    f"{path} does not match this model: {key} is {tuple(value.shape)} in the "
                    f"checkpoint but {tuple(expected[key].shape)} here ({self.describe_key(key)}); "
                    f"the model has {self.num_classes} classes and --arch {self.arch}.")
        self.load_state_dict(weights)

    def check_weights(self, weights, path):
        """Model-specific checks of foreign weights, before the generic ones."""

    def describe_key(self, key):
        return "trunk weights" if key.startswith("features.") else "classifier weights"


class FoldedModel(nn.Module):
    """A trained model as it runs at inference: trunk, global pooling and its scores as one
    linear map, A = F P + b (weight P^T, C x d_f): for DSDL no solve at run time. `forward`
    returns the scores A (B x C), the same as the model's `forward(images).scores`."""

    def __init__(self, trunk, pool, projection, bias=None):
        super().__init__()
        self.features = trunk  # the release's name for the trunk, as in the models
        self.pooling = POOLING[pool](1)
        self.classifier = nn.Linear(*projection.shape, bias=bias is not None)
        self.classifier.weight = nn.Parameter(projection.T.contiguous())  # C x d_f
        if bias is not None:
            self.classifier.bias = nn.Parameter(bias.clone())

    def forward(self, images):
        features = self.pooling(self.features(images)).flatten(1)  # B x d_f
        return self.classifier(features)                            # B x C


# --------------------------------------------------------------------------------------------
# DSDL (spec sections 2 and 3)
# --------------------------------------------------------------------------------------------

class DSDLOutput(NamedTuple):
    scores: torch.Tensor          # B x C, the coefficients A (logits)
    features: torch.Tensor        # B x d_f, globally pooled visual features F
    dictionary: torch.Tensor      # C x d_f, the semantic dictionary D
    semantics: torch.Tensor       # C x 300, the fixed class vectors S
    reconstruction: torch.Tensor  # C x 300, the decoder's S_hat


def ridge_projection(dictionary, lambd):
    """P = D^T (D D^T + lambd I)^-1, d_f x C, in float32: the closed-form coefficients are A = F P.

    Solving the C x C system (never forming the inverse) keeps the solution accurate. The
    coefficients are linear in the features, so P also reads the scores of single positions of
    a feature map (see `PooledModel.class_maps`).
    """
    dictionary = at_least_float32(dictionary)
    gram = dictionary @ dictionary.T + lambd * torch.eye(
        dictionary.shape[0], dtype=dictionary.dtype, device=dictionary.device)  # C x C, SPD
    return torch.linalg.solve(gram, dictionary).T  # d_f x C


def ridge_coefficients(features, dictionary, lambd):
    """A = argmin ||F - A D||^2 + lambd ||A||^2 = F D^T (D D^T + lambd I)^-1, B x C, in float32.

    The gradient flows through the solve into both the features and the dictionary (APUS).
    """
    return at_least_float32(features) @ ridge_projection(dictionary, lambd)


class DSDL(PooledModel):
    """Trunk + global max pooling + semantic dictionary + closed-form ridge coefficients."""

    name = "dsdl"
    needs_class_vectors = True
    shared = "trunk and auto-encoder"

    def __init__(self, num_classes, semantics, lambd, arch=PAPER_ARCH, pretrained=True, pool="max"):
        semantics = torch.as_tensor(semantics, dtype=torch.float32)
        if semantics.shape != (num_classes, SEMANTIC_DIM):
            raise ValueError(f"semantics must be {num_classes} x {SEMANTIC_DIM} "
                             f"(one GloVe vector per class), got {tuple(semantics.shape)}")
        super().__init__(num_classes, arch, pretrained, pool)
        self.lambd = lambd
        # Tied-weight auto-encoder: the encoder uses W1, W2, the decoder their transposes.
        self.W1 = nn.Parameter(torch.empty(SEMANTIC_DIM, HIDDEN_DIM))
        self.W2 = nn.Parameter(torch.empty(HIDDEN_DIM, self.feature_dim))
        for weight in (self.W1, self.W2):
            bound = 1.0 / weight.shape[1] ** 0.5
            nn.init.uniform_(weight, -bound, bound)
        # Fixed class-level semantics S, one copy for the model (saved with its weights).
        self.register_buffer("semantics", semantics)

    @classmethod
    def from_settings(cls, settings, num_classes, semantics, pretrained):
        return cls(num_classes, semantics, settings.lambd, settings.arch, pretrained, settings.pool)

    def encode(self, semantics):
        """The semantic dictionary D = LeakyReLU(S W1) W2, C x d_f."""
        return F.leaky_relu(semantics @ self.W1, 0.2) @ self.W2

    def decode(self, dictionary):
        """The reconstruction S_hat = LeakyReLU(D W2^T) W1^T, C x 300."""
        return F.leaky_relu(dictionary @ self.W2.T, 0.2) @ self.W1.T

    def forward(self, images):
        features = self.pooled(images)                           # B x d_f
        # The head runs in float32 even under autocast: the C x C solve needs the precision.
        with torch.autocast(images.device.type, enabled=False):
            features = at_least_float32(features)
            dictionary = self.encode(self.semantics)             # C x d_f
            reconstruction = self.decode(dictionary)             # C x 300
            scores = ridge_coefficients(features, dictionary, self.lambd)  # B x C
        return DSDLOutput(scores, features, dictionary, self.semantics, reconstruction)

    def readout(self):
        """A = F P with P = D^T (D D^T + lambd I)^-1 (d_f x C) and no bias."""
        return ridge_projection(self.encode(self.semantics), self.lambd), None

    def head_parameters(self):
        return [self.W1, self.W2]

    def settings(self):
        return {**super().settings(), "lambd": self.lambd}

    def checkpoint_extras(self):
        return {"semantics": self.semantics.cpu()}

    def class_independent(self, key):
        # The auto-encoder maps any class vectors to atoms: only S is the class list's own.
        return key != "semantics"

    def check_weights(self, weights, path):
        if "semantics" not in weights:  # the release stores no semantics: this model's own
            weights["semantics"] = self.semantics
        if "W2" in weights and weights["W2"].shape[1] != self.feature_dim:
            raise DSDLError(f"{path} was trained with feature size {weights['W2'].shape[1]} "
                            f"(W2 is {tuple(weights['W2'].shape)}), but --arch {self.arch} has "
                            f"feature size {self.feature_dim}; pass the --arch it was trained with.")

    def describe_key(self, key):
        return {"semantics": "classes x 300", "W1": "300 x 1024"}.get(key, super().describe_key(key))


class DSDLLoss(nn.Module):
    """(L_cls + beta (||A D - F||_F + lambd ||A||_F)) / mean_c cos(S_c, S_hat_c)  (spec section 3).

    The norms are over the whole batch, neither squared nor averaged, as in the release.
    """

    def __init__(self, lambd, beta):
        super().__init__()
        self.lambd = lambd
        self.beta = beta

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.lambd, settings.beta)

    def forward(self, output, targets):
        scores, dictionary, features, semantics, reconstructed = map(at_least_float32, (
            output.scores, output.dictionary, output.features, output.semantics, output.reconstruction))
        classification = F.multilabel_soft_margin_loss(scores, targets.to(scores.dtype))
        reconstruction = torch.linalg.norm(scores @ dictionary - features)
        sparsity = torch.linalg.norm(scores)
        cosine = F.cosine_similarity(semantics, reconstructed, dim=1).mean()
        return (classification + self.beta * (reconstruction + self.lambd * sparsity)) / cosine


# --------------------------------------------------------------------------------------------
# The paper's baseline: one linear layer on the pooled features, binary cross-entropy
# --------------------------------------------------------------------------------------------

class BaselineOutput(NamedTuple):
    scores: torch.Tensor    # B x C, logits
    features: torch.Tensor  # B x d_f, globally pooled visual features


class Baseline(PooledModel):
    """The paper's ResNet-101 baseline: trunk, global pooling, one linear layer with bias."""

    name = "baseline"
    needs_class_vectors = False

    def __init__(self, num_classes, arch=PAPER_ARCH, pretrained=True, pool="max"):
        super().__init__(num_classes, arch, pretrained, pool)
        self.fc = nn.Linear(self.feature_dim, num_classes)  # PyTorch's default initialisation

    @classmethod
    def from_settings(cls, settings, num_classes, semantics, pretrained):
        return cls(num_classes, settings.arch, pretrained, settings.pool)

    def forward(self, images):
        features = self.pooled(images)                           # B x d_f
        with torch.autocast(images.device.type, enabled=False):
            features = at_least_float32(features)
            return BaselineOutput(self.fc(features), features)   # B x C

    def readout(self):
        return self.fc.weight.T, self.fc.bias

    def head_parameters(self):
        return self.fc.parameters()


class BaselineLoss(nn.Module):
    """Binary cross-entropy on the logits, the mean over classes and images (what the release's
    MultiLabelSoftMarginLoss computes)."""

    @classmethod
    def from_settings(cls, settings):
        return cls()

    def forward(self, output, targets):
        scores = at_least_float32(output.scores)
        return F.binary_cross_entropy_with_logits(scores, targets.to(scores.dtype))


# --------------------------------------------------------------------------------------------
# The table of models, and the builders everything else calls
# --------------------------------------------------------------------------------------------

class ModelEntry(NamedTuple):
    network: type  # built by its `from_settings(settings, num_classes, semantics, pretrained)`
    loss: type     # built by its `from_settings(settings)`


MODELS = {
    "dsdl": ModelEntry(DSDL, DSDLLoss),
    "baseline": ModelEntry(Baseline, BaselineLoss),
}


def model_entry(name):
    if name not in MODELS:
        raise DSDLError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def needs_class_vectors(name):
    return model_entry(name).network.needs_class_vectors


def build_model(settings, num_classes, semantics=None, pretrained=False):
    """The network `settings.model` (`settings`: the options of the command line, or any object
    with the attributes model, arch, pool and the model's own, e.g. lambd)."""
    return model_entry(settings.model).network.from_settings(settings, num_classes, semantics,
                                                             pretrained)


def build_loss(settings):
    """The training loss of `settings.model`."""
    return model_entry(settings.model).loss.from_settings(settings)
