"""Every model of this project, built by name: DSDL, the paper's baseline and their losses.

Zhou, Huang, Xing, "Deep Semantic Dictionary Learning for Multi-label Image Classification",
AAAI 2021. The method (semantic auto-encoder, closed-form coefficients, loss) is `DSDL` and
`DSDLLoss`; `Baseline` is the paper's ResNet-101 baseline row (one linear layer on the pooled
features). `MODELS` maps a model's name to its network and its loss; `build_model` and
`build_loss` are what the engine, predict.py, export.py, hubconf.py and bench.py call. Adding a
model is a class and a line in `MODELS`. The trunk is any network of trunks.py, by its name.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from options import PAPER_ARCH
from trunks import load_trunk
from util import DSDLError

SEMANTIC_DIM = 300   # d_s of the paper's GloVe class vectors (any d_s works: W1 follows it)
HIDDEN_DIM = 1024    # width of the auto-encoder's hidden layer (W1 is d_s x 1024)


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
    title = None  # its name in tables and printouts
    shared = "trunk"  # what --init-from takes: the weights that do not depend on the class list
    head_name = "head"  # what learns at --lr, in the printout

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
        the class list; the others stay this model's own. Returns what was loaded, in words."""
        expected = self.state_dict()
        if class_independent_only:  # the trunk, whole; of the head what this model shares
            trunk = {key: value for key, value in weights.items() if key.startswith("features.")}
            head = {key: value for key, value in weights.items() if key in expected
                    and not key.startswith("features.") and self.class_independent(key)}
            own = {key: value for key, value in expected.items() if not key.startswith("features.")}
            weights = {**own, **head, **trunk}
            loaded = self.shared if head else "trunk"
        else:
            loaded = "weights"
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
        return loaded

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
    semantics: torch.Tensor       # C x d_s, the fixed class vectors S (d_s = 300 for GloVe)
    reconstruction: torch.Tensor  # C x d_s, the decoder's S_hat


def ridge_projection(dictionary, lambd):
    """P = D^T (D D^T + lambd I)^-1, d_f x C, in float32: the closed-form coefficients are A = F P.

    Solving the C x C system (never forming the inverse) keeps the solution accurate. The
    coefficients are linear in the features, so P also reads the scores of single positions of
    a feature map (see `PooledModel.class_maps`).

    `solve_ex` is `torch.linalg.solve` (the same LU solve, the same numbers) without its check
    that the matrix is invertible, a check that makes the host wait for the GPU on every batch.
    D D^T + lambd I is positive definite for lambd > 0 (options.py refuses lambd <= 0), so the
    check could never fail.
    """
    dictionary = at_least_float32(dictionary)
    gram = dictionary @ dictionary.T + lambd * torch.eye(
        dictionary.shape[0], dtype=dictionary.dtype, device=dictionary.device)  # C x C, SPD
    return torch.linalg.solve_ex(gram, dictionary)[0].T  # d_f x C


def ridge_coefficients(features, dictionary, lambd):
    """A = argmin ||F - A D||^2 + lambd ||A||^2 = F D^T (D D^T + lambd I)^-1, B x C, in float32.

    The gradient flows through the solve into both the features and the dictionary (APUS).
    """
    return at_least_float32(features) @ ridge_projection(dictionary, lambd)


class DSDL(PooledModel):
    """Trunk + global max pooling + semantic dictionary + closed-form ridge coefficients."""

    name = "dsdl"
    title = "DSDL"
    needs_class_vectors = True
    shared = "trunk and auto-encoder"
    head_name = "dictionary"

    def __init__(self, num_classes, semantics, lambd, arch=PAPER_ARCH, pretrained=True, pool="max"):
        semantics = torch.as_tensor(semantics, dtype=torch.float32)
        if semantics.ndim != 2 or semantics.shape[0] != num_classes or semantics.shape[1] < 1:
            raise ValueError(f"semantics must be {num_classes} x d_s (one class vector per "
                             f"class, e.g. 300-d GloVe), got {tuple(semantics.shape)}")
        super().__init__(num_classes, arch, pretrained, pool)
        self.lambd = lambd
        # Tied-weight auto-encoder: the encoder uses W1, W2, the decoder their transposes.
        self.W1 = nn.Parameter(torch.empty(semantics.shape[1], HIDDEN_DIM))  # d_s x 1024
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
        """The reconstruction S_hat = LeakyReLU(D W2^T) W1^T, C x d_s."""
        return F.leaky_relu(dictionary @ self.W2.T, 0.2) @ self.W1.T

    def forward(self, images):
        features = self.pooled(images)                           # B x d_f
        # The head runs in float32 even under autocast: the C x C solve needs the precision.
        with torch.autocast(images.device.type, enabled=False):
            features = at_least_float32(features)
            dictionary = self.encode(self.semantics)             # C x d_f
            reconstruction = self.decode(dictionary)             # C x d_s
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
        if "W1" in weights and weights["W1"].shape[0] != self.W1.shape[0]:
            raise DSDLError(f"{path} was trained with {weights['W1'].shape[0]}-d class vectors "
                            f"(W1 is {tuple(weights['W1'].shape)}), but the class vectors given "
                            f"here are {self.W1.shape[0]}-d; pass vectors of the kind it was "
                            f"trained with (the authors' released checkpoints: 300-d GloVe)")
        if "W2" in weights and weights["W2"].shape[1] != self.feature_dim:
            raise DSDLError(f"{path} was trained with feature size {weights['W2'].shape[1]} "
                            f"(W2 is {tuple(weights['W2'].shape)}), but --arch {self.arch} has "
                            f"feature size {self.feature_dim}; pass the --arch it was trained with.")

    def describe_key(self, key):
        width = self.W1.shape[0]
        return {"semantics": f"classes x {width}, the class vectors' width",
                "W1": f"{width} x 1024, the class vectors' width"}.get(key, super().describe_key(key))


class DSDLLoss(nn.Module):
    """(L_cls + beta (||A D - F||_F + lambd ||A||_F)) / mean_c cos(S_c, S_hat_c)  (spec section 3).

    The norms are over the whole batch, neither squared nor averaged, as in the release.
    """

    def __init__(self, lambd, beta, classification=None):
        super().__init__()
        self.lambd = lambd
        self.beta = beta
        # L_cls: the release's binary cross-entropy, or another (--cls-loss)
        self.classification = classification or F.multilabel_soft_margin_loss

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.lambd, settings.beta, classification_loss(settings))

    def forward(self, output, targets, known=None):
        """`known` (B x C booleans, partial labels only): the pairs L_cls counts."""
        scores, dictionary, features, semantics, reconstructed = map(at_least_float32, (
            output.scores, output.dictionary, output.features, output.semantics, output.reconstruction))
        classification = classification_term(self.classification, scores,
                                             targets.to(scores.dtype), known)
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
    title = "ResNet baseline"
    needs_class_vectors = False
    head_name = "linear layer"

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
    MultiLabelSoftMarginLoss computes), or another classification loss (--cls-loss)."""

    def __init__(self, classification=None):
        super().__init__()
        self.classification = classification or F.binary_cross_entropy_with_logits

    @classmethod
    def from_settings(cls, settings):
        return cls(classification_loss(settings))

    def forward(self, output, targets, known=None):
        scores = at_least_float32(output.scores)
        return classification_term(self.classification, scores, targets.to(scores.dtype), known)


# --------------------------------------------------------------------------------------------
# Classification losses beyond the release's (--cls-loss)
# --------------------------------------------------------------------------------------------

class AsymmetricLoss(nn.Module):
    """The asymmetric loss of Ridnik et al., "Asymmetric Loss For Multi-Label Classification"
    (ICCV 2021), on logits x with targets y in {0, 1}: with p = sigmoid(x) and the shifted
    probability of the negatives p_m = max(p - clip, 0),

        L = -mean over images and classes of
            y (1 - p)^gamma_pos log(p) + (1 - y) p_m^gamma_neg log(1 - p_m).

    Averaged, not summed as in the paper's code, so that it takes the place of the binary
    cross-entropy at its scale (the learning rates need no change); with both exponents and the
    clip 0 it is the binary cross-entropy. The focusing weights are differentiated, as the
    paper's loss is written.
    """

    def __init__(self, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, scores, targets, known=None):
        log_p = F.logsigmoid(scores)
        if self.clip > 0:
            shifted = (torch.sigmoid(scores) - self.clip).clamp(min=0)   # p_m
            log_not = torch.log1p(-shifted)                               # 1 - p_m >= clip
        else:
            shifted, log_not = torch.sigmoid(scores), F.logsigmoid(-scores)
        # The bases are kept off 0, where x ** gamma with gamma < 1 has an infinite derivative.
        positive = targets * log_p
        if self.gamma_pos:
            positive = positive * (1 - torch.sigmoid(scores)).clamp(min=1e-12) ** self.gamma_pos
        negative = (1 - targets) * log_not
        if self.gamma_neg:
            negative = negative * shifted.clamp(min=1e-12) ** self.gamma_neg
        return -known_mean(positive + negative, known)

    def extra_repr(self):
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}"


def known_mean(values, known=None):
    """The mean of B x C `values` over the pairs whose label is known (all without `known`)."""
    if known is None:
        return values.mean()
    return (values * known).sum() / known.sum().clamp(min=1)


def classification_term(classification, scores, targets, known=None):
    """L_cls of a model's loss: `classification(scores, targets)` as the release computes it;
    with partial labels (`known`), averaged over the known image-class pairs only."""
    if known is None:
        return classification(scores, targets)
    if isinstance(classification, AsymmetricLoss):
        return classification(scores, targets, known)
    return known_mean(F.binary_cross_entropy_with_logits(scores, targets, reduction="none"), known)


def classification_loss(settings):
    """The classification term of --cls-loss; None for bce, which each model's loss computes as
    the release does."""
    if getattr(settings, "cls_loss", "bce") == "asl":
        return AsymmetricLoss(settings.asl_gamma_neg, settings.asl_gamma_pos, settings.asl_clip)
    return None


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


def model_title(name):
    """The name of model `name` in tables and printouts (DSDL for a checkpoint that records none)."""
    return model_entry(name or "dsdl").network.title


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
