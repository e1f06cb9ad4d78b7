"""Trunks: any torchvision image-classification network by its name (`list_archs`), or any timm
model as `timm/<name>`, up to its last feature map (B x d_f x h x w), which the models pool.

The classifier is dropped; the feature width d_f is read from the network. ResNets keep the
release's weight names (its checkpoints load); the other networks keep torchvision's (timm's).
"""
import difflib
import importlib.util
import inspect
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from util import DSDLError

TIMM_PREFIX = "timm/"
# The ResNets of the release: their ImageNet weights are the ones it used (torchvision's V1).
RELEASE_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")



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


def release_trunk(network):
    """conv1 .. layer4 of a ResNet in a Sequential whose indices are the release's key names
    (features.0 = conv1, features.1 = bn1, features.4-7 = layer1-4)."""
    return nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool,
                         network.layer1, network.layer2, network.layer3, network.layer4)


# torchvision's network class -> the trunk made of it.
TRUNKS = {
    "ConvNeXt": Trunk, "EfficientNet": Trunk, "MobileNetV2": Trunk, "MobileNetV3": Trunk,
    "MNASNet": MNASNetTrunk, "VGG": Trunk, "AlexNet": Trunk, "SqueezeNet": Trunk,
    "DenseNet": DenseNetTrunk, "SwinTransformer": SwinTrunk, "RegNet": RegNetTrunk,
    "ShuffleNetV2": ShuffleNetTrunk, "VisionTransformer": ViTTrunk, "ResNet": release_trunk,
}


# The torchvision families left out, and why.
UNSUPPORTED = {"GoogLeNet": "its auxiliary classifiers read inner stages",
               "Inception3": "its auxiliary classifiers read inner stages",
               "MaxVit": "it is built for one fixed input size"}


def network_class(arch):
    """The torchvision class that `arch`'s builder returns (from its annotation: nothing built)."""
    annotation = inspect.signature(torchvision.models.get_model_builder(arch)).return_annotation
    return getattr(annotation, "__name__", str(annotation))


def list_archs():
    """The torchvision classification networks that can be a trunk, by name."""
    return [name for name in torchvision.models.list_models(module=torchvision.models)
            if network_class(name) in TRUNKS]


def timm_available():
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
    listed = list_archs()
    if arch in listed:
        return
    if arch in torchvision.models.list_models(module=torchvision.models):
        why = UNSUPPORTED.get(network_class(arch), "no trunk is defined for its family")
        raise DSDLError(f"--arch {arch} ({network_class(arch)}) cannot be a trunk here: {why}; "
                        f"`--arch list` prints the choices")
    close = difflib.get_close_matches(arch, listed, n=3)
    raise DSDLError(f"unknown --arch {arch!r}" + did_you_mean(close)
                    + " `--arch list` prints the choices")


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


def load_trunk(arch, pretrained, image_size=None):
    """The trunk of `arch` (with ImageNet weights when `pretrained`) for images of `image_size`
    pixels (None: any), its feature size d_f and the grid (h, w) of its last map at that size
    (None when `image_size` is None).

    A ResNet's trunk is conv1 .. layer4 in a Sequential whose indices (features.0 = conv1,
    features.1 = bn1, features.4-7 = layer1-4) are the release's key names. A timm model built
    for one input size (a ViT, a Swin) is built for `image_size` (timm's img_size) when it takes
    one. d_f is read from the network: the channels of the map it makes of one image of
    `image_size` (a small one when None), which also finds an input it cannot take (too small
    for its pooling, not a multiple of its patch) before any data is read.
    """
    check_arch(arch)
    if arch.startswith(TIMM_PREFIX):
        network, probe = timm_network(arch[len(TIMM_PREFIX):], pretrained, image_size)
        trunk = TimmTrunk(network)
    else:
        weights = imagenet_weights(arch) if pretrained else None
        try:
            network = torchvision.models.get_model(arch, weights=weights)
        except OSError as error:  # URLError and friends: no internet, proxy, interrupted download
            raise download_advice(arch, weights, error) from error
        trunk = TRUNKS[type(network).__name__](network)
        probe = 4 * getattr(network, "patch_size", 16)
    channels, height, width = map_shape(trunk, image_size or probe, arch)
    return trunk, channels, (height, width) if image_size else None


def timm_network(name, pretrained, image_size):
    """timm's model `name` without its classifier and pooling, and the side it was made for.
    One made for a fixed input size is built for `image_size` where its constructor takes
    img_size (timm resizes the position embeddings of its weights); one that does not is refused
    at another size."""
    import timm
    config = timm.models.get_pretrained_cfg(name)
    native = (getattr(config, "input_size", None) or (3, 224, 224))[-1]
    fixed = bool(getattr(config, "fixed_input_size", False))
    size = {"img_size": image_size} if fixed and image_size and image_size != native else {}
    try:
        network = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="",
                                    **size)
    except TypeError as error:
        if not size:
            raise
        raise DSDLError(f"--arch timm/{name} is built for {native} x {native} images and cannot "
                        f"be built for --image-size {image_size} ({error}); pass --image-size "
                        f"{native}") from error
    except OSError as error:  # huggingface_hub's errors when offline are OSErrors
        where = getattr(config, "hf_hub_id", None) or "its weights"
        raise DSDLError(f"could not download the ImageNet weights of timm/{name} ({error}).\n"
                        f"Either fetch {where} from the Hugging Face hub on a machine with "
                        f"internet (huggingface-cli download {where}) into the cache that "
                        f"HF_HOME names (default ~/.cache/huggingface), or pass --no-pretrained "
                        f"to start from random weights.") from error
    return network, native


@torch.no_grad()
def map_shape(trunk, side, arch="the trunk"):
    """(channels, h, w) of the trunk's map of one side x side image (in eval mode: no statistics
    change); an input the trunk cannot take is one error naming --image-size."""
    mode = trunk.training
    try:
        feature_map = trunk.eval()(torch.zeros(1, 3, side, side))
    except DSDLError:
        raise
    except (RuntimeError, ValueError, AssertionError) as error:  # too small for a pooling, ...
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DSDLError(f"--arch {arch} cannot take {side} x {side} images ({message}); pass "
                        f"a larger --image-size") from error
    finally:
        trunk.train(mode)
    if feature_map.ndim != 4:
        raise DSDLError(f"the trunk makes a {feature_map.ndim}-d output, not a B x C x h x w map")
    return tuple(feature_map.shape[1:])
