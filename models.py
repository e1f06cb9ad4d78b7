"""Every model of this project, built by name: DSDL, the paper's baseline and their losses.

Zhou, Huang, Xing, "Deep Semantic Dictionary Learning for Multi-label Image Classification",
AAAI 2021. The method (semantic auto-encoder, closed-form coefficients, loss) is `DSDL` and
`DSDLLoss`; `Baseline` is the paper's ResNet-101 baseline row (one linear layer on the pooled
features). The trunk is any network of trunks.py, by its name.

Two tables name everything that can be trained, and nothing else keeps a list of them:
`MODELS` maps a model's name (--model) to its network and its loss, `LOSSES` a classification
loss's name (--cls-loss) to its class. Adding a model is a class and a line in `MODELS`; adding
a loss, a class `(scores, targets, known=None) -> loss` and a line in `LOSSES`. Everything else
receives the built object: `build_model` (a new run), `from_checkpoint` (--resume, -e,
predict.py, export.py, torch.hub) and `build_loss`.

A network's constructor gets what it sees of the data by the names of its arguments
(`ModelContext`: num_classes, classes, semantics, image_size, train_labels) and its settings by
theirs (the command line's options of those names, and --model-args); it keeps each setting as an
attribute of that name, so that `settings()` can rebuild it from a checkpoint. What it derives
from the data (e.g. label co-occurrences) it keeps in buffers, saved with its weights.
"""
import inspect
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from checkpoints import checkpoint_weights, infer_arch
from options import PAPER_ARCH, PAPER_IMAGE_SIZE
from trunks import load_trunk
from util import DSDLError

SEMANTIC_DIM = 300   # d_s of the paper's GloVe class vectors (any d_s works: W1 follows it)
HIDDEN_DIM = 1024    # width of the auto-encoder's hidden layer (W1 is d_s x 1024)


# --------------------------------------------------------------------------------------------
# What every model shares: trunk, global pooling, a linear read-out of the pooled features
# --------------------------------------------------------------------------------------------

POOLING = {"max": nn.AdaptiveMaxPool2d, "avg": nn.AdaptiveAvgPool2d}


class ModelContext(NamedTuple):
    """What a model sees of the data when it is built: a constructor argument of one of these
    names gets its value (`build_model`)."""
    classes: list                 # C class names, in the order of the scores
    image_size: int = PAPER_IMAGE_SIZE  # the input side it is trained and evaluated at
    semantics: Any = None         # C x d class vectors (models that need them), a tensor
    train_split: Any = None       # the training dataset; None when rebuilt from a checkpoint

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def train_labels(self):
        """The training labels, N x C in {1, 0, -1, -2} (dataset.py), or None (rebuilt from a
        checkpoint, or -e): a model keeps what it derives from them in buffers."""
        return None if self.train_split is None else self.train_split.labels


CONTEXT = ("num_classes", "classes", "image_size", "semantics", "train_labels")


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

    def __init__(self, num_classes, arch, pretrained, pool, image_size=None):
        super().__init__()
        if pool not in POOLING:
            raise ValueError(f"pool must be one of {', '.join(POOLING)}, got {pool!r}")
        self.num_classes, self.arch, self.pool = num_classes, arch, pool
        self.image_size = image_size  # None: any (the trunk is checked at a small size)
        # The trunk is stored as `features` so that the state-dict keys are the release's
        # (features.0 ...); the code calls it `trunk`, and "features" means the pooled F.
        # feature_grid: h x w of the last map at image_size (None: not known)
        self.features, self.feature_dim, self.feature_grid = load_trunk(arch, pretrained, image_size)
        # The release used a fixed 14x14 max pool, i.e. global max pooling at 448 px.
        self.pooling = POOLING[pool](1)

    @property
    def trunk(self):
        """The CNN up to its last feature map (the module the release named `features`)."""
        return self.features

    def pooled(self, images):
        return self.pooling(self.trunk(images)).flatten(1)  # B x d_f

    @classmethod
    def setting_names(cls):
        """The constructor's arguments that are settings: not the context, not `pretrained`."""
        return [name for name in inspect.signature(cls.__init__).parameters
                if name not in ("self", "pretrained", *CONTEXT)]

    @classmethod
    def from_settings(cls, settings, context, pretrained=False):
        """This network, each constructor argument by its name from `context` (ModelContext)
        or from `settings` (a dict; absent or None: the argument's default)."""
        given = {name: settings[name] for name in cls.setting_names()
                 if settings.get(name) is not None}
        seen = {name: getattr(context, name) for name in CONTEXT
                if name in inspect.signature(cls.__init__).parameters}
        model = cls(pretrained=pretrained, **seen, **given)
        model.classes = list(context.classes)
        missing = [name for name in cls.setting_names() if not hasattr(model, name)]
        if missing:  # settings() could not save it, and the checkpoint could not rebuild it
            raise DSDLError(f"{cls.__name__} keeps no attribute {missing[0]!r} for its "
                            f"constructor argument of that name: keep each setting as an "
                            f"attribute of its name (models.PooledModel.settings)")
        return model

    def settings(self):
        """What rebuilds this network with its checkpoint's classes and vectors (`from_checkpoint`,
        export.py's classes.json): its name, input size and constructor settings."""
        return {"model": self.name, "image_size": self.image_size,
                **{name: getattr(self, name) for name in self.setting_names()}}

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
        if "pos_embed" in key:  # a transformer built for one input size
            return (f"position embeddings for another input size than --image-size "
                    f"{self.image_size}: pass the --image-size it was trained at")
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

    def __init__(self, num_classes, semantics, lambd=10.0, arch=PAPER_ARCH, pretrained=True,
                 pool="max", image_size=None):
        if semantics is None:
            raise DSDLError("DSDL needs class vectors (C x d_s): pass --embeddings")
        semantics = torch.as_tensor(semantics, dtype=torch.float32)
        if semantics.ndim != 2 or semantics.shape[0] != num_classes or semantics.shape[1] < 1:
            raise ValueError(f"semantics must be {num_classes} x d_s (one class vector per "
                             f"class, e.g. 300-d GloVe), got {tuple(semantics.shape)}")
        super().__init__(num_classes, arch, pretrained, pool, image_size)
        self.lambd = lambd
        # Tied-weight auto-encoder: the encoder uses W1, W2, the decoder their transposes.
        self.W1 = nn.Parameter(torch.empty(semantics.shape[1], HIDDEN_DIM))  # d_s x 1024
        self.W2 = nn.Parameter(torch.empty(HIDDEN_DIM, self.feature_dim))
        for weight in (self.W1, self.W2):
            bound = 1.0 / weight.shape[1] ** 0.5
            nn.init.uniform_(weight, -bound, bound)
        # Fixed class-level semantics S, one copy for the model (saved with its weights).
        self.register_buffer("semantics", semantics)

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

    The norms are over the whole batch, neither squared nor averaged, as in the release. L_cls
    is the release's binary cross-entropy (MultiLabelSoftMarginLoss's formula), or --cls-loss.
    """

    uses = ("lambd", "beta")  # the options it reads (`check_settings`)

    def __init__(self, lambd, beta, classification=None):
        super().__init__()
        self.lambd = lambd
        self.beta = beta
        self.classification = classification or BinaryCrossEntropy(soft_margin=True)

    @classmethod
    def from_settings(cls, settings):
        return cls(settings["lambd"], settings["beta"],
                   classification_loss(settings, soft_margin=True))

    def forward(self, output, targets, known=None):
        """`known` (B x C booleans, partial labels only): the pairs L_cls counts."""
        scores, dictionary, features, semantics, reconstructed = map(at_least_float32, (
            output.scores, output.dictionary, output.features, output.semantics, output.reconstruction))
        classification = self.classification(scores, targets.to(scores.dtype), known)
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

    def __init__(self, num_classes, arch=PAPER_ARCH, pretrained=True, pool="max", image_size=None):
        super().__init__(num_classes, arch, pretrained, pool, image_size)
        self.fc = nn.Linear(self.feature_dim, num_classes)  # PyTorch's default initialisation

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
    """The classification loss on the logits: binary cross-entropy, the mean over classes and
    images (what the release's MultiLabelSoftMarginLoss computes), or --cls-loss."""

    uses = ()

    def __init__(self, classification=None):
        super().__init__()
        self.classification = classification or BinaryCrossEntropy()

    @classmethod
    def from_settings(cls, settings):
        return cls(classification_loss(settings))

    def forward(self, output, targets, known=None):
        scores = at_least_float32(output.scores)
        return self.classification(scores, targets.to(scores.dtype), known)


# --------------------------------------------------------------------------------------------
# Classification losses (--cls-loss): each is `(scores B x C, targets B x C in {0, 1},
# known B x C booleans or None) -> loss`; with `known` (partial labels) only the known
# image-class pairs count, averaged over them (`known_mean`).
# --------------------------------------------------------------------------------------------

def known_mean(values, known=None):
    """The mean of B x C `values` over the pairs whose label is known (all without `known`)."""
    if known is None:
        return values.mean()
    return (values * known).sum() / known.sum().clamp(min=1)


class BinaryCrossEntropy(nn.Module):
    """Binary cross-entropy on logits, the mean over images and classes: the release's L_cls.

    `soft_margin`: computed as MultiLabelSoftMarginLoss computes it (the DSDL release's formula;
    the same value up to rounding), so that a run's numbers are the release's bit for bit.
    """

    def __init__(self, soft_margin=False):
        super().__init__()
        self.soft_margin = soft_margin

    def forward(self, scores, targets, known=None):
        if known is not None:
            return known_mean(F.binary_cross_entropy_with_logits(scores, targets, reduction="none"),
                              known)
        if self.soft_margin:
            return F.multilabel_soft_margin_loss(scores, targets)
        return F.binary_cross_entropy_with_logits(scores, targets)


class AsymmetricLoss(nn.Module):
    """The asymmetric loss of Ridnik et al., "Asymmetric Loss For Multi-Label Classification"
    (ICCV 2021), on logits x with targets y in {0, 1}: with p = sigmoid(x) and the shifted
    probability of the negatives p_m = max(p - clip, 0),

        L = -mean over images and classes of
            y (1 - p)^gamma_pos log(p) + (1 - y) p_m^gamma_neg log(1 - p_m).

    Averaged, not summed as in the paper's code, so that it takes the place of the binary
    cross-entropy at its scale (the learning rates need no change); with both exponents and the
    clip 0 it is the binary cross-entropy. The focusing weights are differentiated, as the
    paper's loss is written. Its settings are the options --asl-gamma-neg, --asl-gamma-pos and
    --asl-clip (`option_prefix`).
    """

    option_prefix = "asl_"

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


class FocalLoss(nn.Module):
    """The sigmoid focal loss of Lin et al., "Focal Loss for Dense Object Detection" (ICCV 2017),
    per image and class (torchvision.ops.sigmoid_focal_loss), averaged like the binary
    cross-entropy it replaces: with p_t the probability of the true label,

        L = -mean over images and classes of  alpha_t (1 - p_t)^gamma log(p_t),

    alpha_t = alpha for positives, 1 - alpha for negatives (alpha < 0: no weighting). With
    gamma 0 and alpha -1 it is the binary cross-entropy. Settings: --loss-args gamma=G alpha=A.
    """

    def __init__(self, gamma=2.0, alpha=0.25):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, scores, targets, known=None):
        losses = sigmoid_focal_loss(scores, targets, alpha=self.alpha, gamma=self.gamma,
                                    reduction="none")
        return known_mean(losses, known)

    def extra_repr(self):
        return f"gamma={self.gamma}, alpha={self.alpha}"


# --------------------------------------------------------------------------------------------
# The tables, and the builders everything else calls
# --------------------------------------------------------------------------------------------

LOSSES = {  # --cls-loss: the classification term of every model's loss
    "bce": BinaryCrossEntropy,
    "asl": AsymmetricLoss,
    "focal": FocalLoss,
}


class ModelEntry(NamedTuple):
    network: type  # built by its `from_settings(settings, context, pretrained)`
    loss: type     # built by its `from_settings(settings)`


MODELS = {  # --model
    "dsdl": ModelEntry(DSDL, DSDLLoss),
    "baseline": ModelEntry(Baseline, BaselineLoss),
}


def table_entry(table, name, option):
    if name not in table:
        raise DSDLError(f"unknown {option} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def model_entry(name):
    return table_entry(MODELS, name, "--model")


def model_title(name):
    """The name of model `name` in tables and printouts (DSDL for a checkpoint that records none)."""
    return model_entry(name or "dsdl").network.title


def needs_class_vectors(name):
    return model_entry(name).network.needs_class_vectors


def as_settings(settings):
    """Settings as a dict: the command line's options (a Namespace), or a dict already."""
    return dict(settings) if isinstance(settings, dict) else dict(vars(settings))


def keyword_arguments(kind, constructor, names, given, option):
    """`given` (--model-args or --loss-args, a dict) for the arguments `names` of `constructor`,
    refused when it names another, or gives text or a number where the argument's default is
    a number or a boolean."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise DSDLError(f"{option} {', '.join(unknown)}: {kind} takes "
                        f"{', '.join(names) or 'no settings'}")
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(constructor).parameters.items()}
    for name, value in given.items():
        default = defaults.get(name)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise DSDLError(f"{option} {name}={value!r}: {name} is True or False (default {default})")
        if (isinstance(default, (int, float)) and not isinstance(default, bool)
                and (isinstance(value, bool) or not isinstance(value, (int, float)))):
            raise DSDLError(f"{option} {name}={value!r}: {name} is a number (default {default})")
    return dict(given)


def classification_loss(settings, **release):
    """The classification term of --cls-loss (settings["cls_loss"], default bce), built with
    its settings: the options `<option_prefix><argument>` it has (asl: --asl-gamma-neg ...),
    then --loss-args. `release`: how the model's release computed the term, for the arguments
    the loss takes (DSDL: `soft_margin=True`)."""
    settings = as_settings(settings)
    name = settings.get("cls_loss") or "bce"
    loss = table_entry(LOSSES, name, "--cls-loss")
    names = [name for name in inspect.signature(loss.__init__).parameters if name != "self"]
    prefix = getattr(loss, "option_prefix", None)
    kwargs = {key: value for key, value in release.items() if key in names}
    if prefix:
        kwargs.update({key: settings[prefix + key] for key in names
                       if settings.get(prefix + key) is not None})
    kwargs.update(keyword_arguments(f"--cls-loss {name}", loss.__init__, names,
                                    settings.get("loss_args") or {}, "--loss-args"))
    return loss(**kwargs)


MODEL_OPTIONS = ("lambd", "beta", "embeddings")  # options that only some models read


def check_settings(settings):
    """--model, --model-args, --cls-loss and --loss-args name what the tables hold and what
    their constructors take, and the options given are the model's (the baseline has no
    class vectors, lambda or beta): one error now, before any data is read."""
    settings = as_settings(settings)
    entry = model_entry(settings.get("model") or "dsdl")
    network = entry.network
    given = settings.get("model_args") or {}
    keyword_arguments(f"--model {network.name}", network.__init__, network.setting_names(),
                      given, "--model-args")
    own = [key for key in given if key in settings and key != "model_args"]  # e.g. lambd
    if own:
        raise DSDLError(f"--model-args {', '.join(own)}: "
                        f"{'it has its' if len(own) == 1 else 'they have their'} own option: use "
                        f"{' and '.join('--' + key.replace('_', '-') for key in own)}")
    classification_loss(settings)
    used = {*network.setting_names(), *getattr(entry.loss, "uses", ())}
    if network.needs_class_vectors:
        used.add("embeddings")
    unused = [f"--{name}" for name in MODEL_OPTIONS
              if name in (settings.get("given") or ()) and name not in used]
    if unused:
        raise DSDLError(f"--model {network.name} does not use {' and '.join(unused)} (DSDL's): "
                        f"leave {'it' if len(unused) == 1 else 'them'} out")


def build_model(settings, context, pretrained=False):
    """The network `settings["model"]` for `context` (ModelContext: what it sees of the data).
    `settings`: the command line's options (or a dict); --model-args add to them."""
    settings = as_settings(settings)
    network = model_entry(settings.get("model") or "dsdl").network
    settings.update(keyword_arguments(f"--model {network.name}", network.__init__,
                                      network.setting_names(), settings.get("model_args") or {},
                                      "--model-args"))
    return network.from_settings(settings, context, pretrained)


def build_loss(settings):
    """The training loss of `settings["model"]`."""
    settings = as_settings(settings)
    return model_entry(settings.get("model") or "dsdl").loss.from_settings(settings)


def stored_settings(checkpoint, infer=True):
    """What rebuilds the model of `checkpoint`: its `model_settings` (PooledModel.settings), or
    for an earlier checkpoint of this project the same read from its options, or for the
    authors' release (which records neither) the ResNet its weights show (with `infer`)."""
    if checkpoint.get("model_settings"):
        return dict(checkpoint["model_settings"])
    options = checkpoint.get("args") or {}
    settings = {key: options[key] for key in ("model", "arch", "pool", "lambd", "image_size")
                if options.get(key) is not None}
    settings.setdefault("model", "dsdl")
    if "arch" not in settings and checkpoint.get("arch"):
        settings["arch"] = checkpoint["arch"]
    if "arch" not in settings and infer:
        settings["arch"] = infer_arch(checkpoint_weights(checkpoint))
    return settings


def from_checkpoint(checkpoint, path, settings=None, classes=None, semantics=None,
                    train_split=None, class_independent_only=False, training=False):
    """The model of a checkpoint (read from `path`), rebuilt and with its weights: what -e,
    --resume, predict.py, export.py and torch.hub use.

    The model, its input size and settings are the checkpoint's (`stored_settings`), except
    where `settings` gives a value; its classes and class vectors too, unless `classes` and
    `semantics` are given (scoring other labels: then only the class-independent weights load,
    `class_independent_only`). `training` (--resume): the weights training continues from.
    The model built by `build_model` has `classes` (names in the order of its scores).
    """
    given = {key: value for key, value in as_settings(settings or {}).items() if value is not None}
    settings = {**stored_settings(checkpoint, infer="arch" not in given), **given}
    classes = list(classes if classes is not None else checkpoint.get("classes") or [])
    if not classes:
        raise DSDLError(f"{path} stores no class names (a checkpoint of the authors' release?): "
                        f"say which dataset it was trained on")
    if semantics is None:
        semantics = checkpoint.get("semantics", checkpoint_weights(checkpoint).get("semantics"))
    context = ModelContext(classes, settings.get("image_size") or PAPER_IMAGE_SIZE, semantics,
                           train_split)
    model = build_model(settings, context)
    model.load_weights(checkpoint_weights(checkpoint, training), path, class_independent_only)
    return model
