"""DSDL: the network, the semantic auto-encoder, the closed-form coefficients and the loss.

Zhou, Huang, Xing, "Deep Semantic Dictionary Learning for Multi-label Image Classification",
AAAI 2021. Everything the method does lives in this file.
"""
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from options import ARCHS
from util import DSDLError

SEMANTIC_DIM = 300   # d_s: size of a GloVe class vector
HIDDEN_DIM = 1024    # width of the auto-encoder's hidden layer (W1 is 300 x 1024)


class DSDLOutput(NamedTuple):
    scores: torch.Tensor          # B x C, the coefficients A (logits)
    features: torch.Tensor        # B x d_f, max-pooled visual features F
    dictionary: torch.Tensor      # C x d_f, the semantic dictionary D
    semantics: torch.Tensor       # C x 300, the fixed class vectors S
    reconstruction: torch.Tensor  # C x 300, the decoder's S_hat


class ClassMaps(NamedTuple):
    scores: torch.Tensor  # B x C, the coefficients A
    maps: torch.Tensor    # B x C x h x w, each class's score spread over the layer-4 grid


def at_least_float32(tensor):
    """Half-precision tensors (from autocast) go up to float32; float64 stays (gradcheck)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def ridge_projection(dictionary, lambd):
    """P = D^T (D D^T + lambd I)^-1, d_f x C, in float32: the closed-form coefficients are A = F P.

    Solving the C x C system (never forming the inverse) keeps the solution accurate. The
    coefficients are linear in the features, so P also reads the scores of single positions of
    a feature map (see `DSDL.class_maps`).
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


def load_trunk(arch, pretrained):
    """The torchvision ResNet of `arch`, with ImageNet weights when `pretrained`.

    Returns (trunk, feature size). The trunk is conv1 .. layer4, in a Sequential whose indices
    (features.0 = conv1, features.1 = bn1, features.4-7 = layer1-4) are the release's key names.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    weights = None
    if pretrained:
        # IMAGENET1K_V1: the ImageNet weights the release used (torchvision's original ones).
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        resnet = torchvision.models.get_model(arch, weights=weights)
    except OSError as error:  # URLError and friends: no internet, proxy, interrupted download
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        filename = os.path.basename(weights.url)
        raise DSDLError(
            f"could not download the ImageNet weights of {arch} ({error}).\n"
            f"Either download {weights.url} on a machine with internet and place it as "
            f"{os.path.join(folder, filename)}, or pass --no-pretrained to start from random "
            f"weights.") from error
    trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                          resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    return trunk, resnet.fc.in_features


class DSDL(nn.Module):
    """ResNet trunk + global max pooling + semantic dictionary + closed-form ridge coefficients."""

    def __init__(self, num_classes, semantics, lambd, arch="resnet101", pretrained=True):
        super().__init__()
        semantics = torch.as_tensor(semantics, dtype=torch.float32)
        if semantics.shape != (num_classes, SEMANTIC_DIM):
            raise ValueError(f"semantics must be {num_classes} x {SEMANTIC_DIM} "
                             f"(one GloVe vector per class), got {tuple(semantics.shape)}")
        self.num_classes = num_classes
        self.lambd = lambd
        self.arch = arch
        # The CNN trunk, stored as `features` so that the state-dict keys are the release's
        # (features.0 ...); the code calls it `trunk`, and "features" means the pooled F.
        self.features, self.feature_dim = load_trunk(arch, pretrained)
        # The release used a fixed 14x14 max pool, i.e. global max pooling at 448 px.
        self.pooling = nn.AdaptiveMaxPool2d(1)
        # Tied-weight auto-encoder: the encoder uses W1, W2, the decoder their transposes.
        self.W1 = nn.Parameter(torch.empty(SEMANTIC_DIM, HIDDEN_DIM))
        self.W2 = nn.Parameter(torch.empty(HIDDEN_DIM, self.feature_dim))
        for weight in (self.W1, self.W2):
            bound = 1.0 / weight.shape[1] ** 0.5
            nn.init.uniform_(weight, -bound, bound)
        # Fixed class-level semantics S, one copy for the model (saved with its weights).
        self.register_buffer("semantics", semantics)

    @property
    def trunk(self):
        """conv1 .. layer4 of the ResNet (the module the release named `features`)."""
        return self.features

    def encode(self, semantics):
        """The semantic dictionary D = LeakyReLU(S W1) W2, C x d_f."""
        return F.leaky_relu(semantics @ self.W1, 0.2) @ self.W2

    def decode(self, dictionary):
        """The reconstruction S_hat = LeakyReLU(D W2^T) W1^T, C x 300."""
        return F.leaky_relu(dictionary @ self.W2.T, 0.2) @ self.W1.T

    def forward(self, images):
        feature_map = self.trunk(images)                      # B x d_f x h x w
        features = self.pooling(feature_map).flatten(1)          # B x d_f
        # The head runs in float32 even under autocast: the C x C solve needs the precision.
        with torch.autocast(images.device.type, enabled=False):
            features = at_least_float32(features)
            dictionary = self.encode(self.semantics)             # C x d_f
            reconstruction = self.decode(dictionary)             # C x 300
            scores = ridge_coefficients(features, dictionary, self.lambd)  # B x C
        return DSDLOutput(scores, features, dictionary, self.semantics, reconstruction)

    def class_maps(self, images):
        """The scores and, for each class, where on the layer-4 grid its score comes from.

        The scores are linear in the max-pooled features: A = F P, P = D^T (D D^T + lambd I)^-1
        (d_f x C). Feature k is the layer-4 map M_k read at the one position x_k that its max
        pool picks, so A_c = sum_k P_kc M_k(x_k): channel k adds P_kc M_k(x_k) to the score of
        class c, at x_k. The map of class c collects these shares where they are read,

            m_c(x) = sum of P_kc M_k(x) over the channels k pooled at x,

        i.e. the layer-4 map projected on column c of P, pooled the way the model pools. Summed
        over positions it is the score, exactly; it is also the gradient of A_c with respect to
        the layer-4 map times that map. (The projection at every position, sum_k P_kc M_k(x),
        is not used: its maximum is not the score, because channels peak at different places.)
        Returns ClassMaps(scores B x C as `forward` computes them, maps B x C x h x w).
        """
        feature_map = self.trunk(images)                      # B x d_f x h x w
        with torch.autocast(images.device.type, enabled=False):
            feature_map = at_least_float32(feature_map)
            # The model's own pooling (global max), with the position each maximum is read at.
            features, where = F.adaptive_max_pool2d(feature_map, 1, return_indices=True)
            features, where = features.flatten(1), where.flatten(1)  # B x d_f, flat positions
            projection = ridge_projection(self.encode(self.semantics), self.lambd)  # d_f x C
            scores = features @ projection                       # B x C, as in forward
            pooled = torch.zeros_like(feature_map.flatten(2)).scatter(
                2, where.unsqueeze(2), features.unsqueeze(2))    # B x d_f x hw, M_k kept at x_k
            maps = torch.einsum("bkx,kc->bcx", pooled, projection)
        return ClassMaps(scores, maps.unflatten(2, feature_map.shape[2:]))

    def parameter_groups(self, lr, lrp):
        """The release's two groups: the CNN trunk at lr * lrp, the dictionary (W1, W2) at lr."""
        return [
            {"params": self.trunk.parameters(), "lr": lr * lrp},
            {"params": [self.W1, self.W2], "lr": lr},
        ]

    @torch.no_grad()
    def folded(self):
        """This model for inference with the head folded into one bias-free linear layer
        (`FoldedDSDL`): the dictionary is fixed once trained, so the coefficients are A = F P with
        one constant P = D^T (D D^T + lambd I)^-1. Shares this model's trunk (no copy)."""
        projection = ridge_projection(self.encode(self.semantics), self.lambd)  # d_f x C
        return FoldedDSDL(self.trunk, projection).train(self.training)


class DSDLLoss(nn.Module):
    """(L_cls + beta (||A D - F||_F + lambd ||A||_F)) / mean_c cos(S_c, S_hat_c)  (spec section 3).

    The norms are over the whole batch, neither squared nor averaged, as in the release.
    """

    def __init__(self, lambd, beta):
        super().__init__()
        self.lambd = lambd
        self.beta = beta

    def forward(self, output, targets):
        scores, dictionary, features, semantics, reconstructed = map(at_least_float32, (
            output.scores, output.dictionary, output.features, output.semantics, output.reconstruction))
        classification = F.multilabel_soft_margin_loss(scores, targets.to(scores.dtype))
        reconstruction = torch.linalg.norm(scores @ dictionary - features)
        sparsity = torch.linalg.norm(scores)
        cosine = F.cosine_similarity(semantics, reconstructed, dim=1).mean()
        return (classification + self.beta * (reconstruction + self.lambd * sparsity)) / cosine


class FoldedDSDL(nn.Module):
    """A trained DSDL as it runs at inference: trunk, global max pooling, and the closed-form
    coefficients as one linear map without bias, A = F P (weight P^T, C x d_f): no solve at run
    time. `forward` returns the scores A (B x C), the same as `DSDL.forward(images).scores`."""

    def __init__(self, trunk, projection):
        super().__init__()
        self.features = trunk  # the release's name for the trunk, as in DSDL
        self.pooling = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(*projection.shape, bias=False)
        self.classifier.weight = nn.Parameter(projection.T.contiguous())  # C x d_f

    def forward(self, images):
        features = self.pooling(self.features(images)).flatten(1)  # B x d_f
        return self.classifier(features)                            # B x C
