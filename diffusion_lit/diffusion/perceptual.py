"""The frozen VGG19 feature extractor behind the perceptual loss term (Johnson et al. 2016)."""

import os
import re
import urllib.error

import torch
from torch import Tensor, nn
from torchvision.models import VGG19_Weights
from torchvision.models.vgg import cfgs, make_layers

from diffusion_lit.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


VGG19_CONFIG = cfgs["E"]  # conv widths and "M" (max-pool) of torchvision's vgg19().features


def _vgg19_prefix(layer: str) -> list:
    """VGG19's layer config up to and including the named conv.

    Layers are named as in the PyTorch neural-style tutorial: "conv_N" is the N-th conv layer (its
    output, before the ReLU), so "conv_4" is conv2_2.
    """
    match = re.fullmatch(r"conv_(\d+)", layer)
    conv_positions = [i for i, entry in enumerate(VGG19_CONFIG) if entry != "M"]
    if not match or not 1 <= int(match.group(1)) <= len(conv_positions):
        raise UserError(
            f"perceptual layer {layer!r} is not one of conv_1 .. conv_{len(conv_positions)} (conv_4 is conv2_2)"
        )
    return VGG19_CONFIG[: conv_positions[int(match.group(1)) - 1] + 1]


def vgg19_cut(layer: str) -> int:
    """Number of `vgg19().features` layers up to and including the named conv (its ReLU excluded)."""
    prefix = _vgg19_prefix(layer)
    return sum(1 if entry == "M" else 2 for entry in prefix) - 1


def _imagenet_state_dict() -> dict[str, Tensor]:
    """torchvision's ImageNet VGG19 weights, from torch's hub cache or downloaded into it."""
    weights = VGG19_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise UserError(
            f"the perceptual loss needs VGG19 ImageNet weights: {cached} is missing and could not be downloaded "
            f"({str(error).splitlines()[0]}); copy {weights.url} there, or set DiffusionLoss.vgg_weights to a local "
            f"copy, or turn the term off with DiffusionLoss.perceptual_weight 0"
        ) from None


def load_vgg19_features(layer: str = "conv_4", weights_path: str | None = None) -> nn.Sequential:
    """VGG19's layers up to `layer` with ImageNet weights, frozen and in eval mode.

    `weights_path` is a local torchvision VGG19 state dict (full, or only the kept `features.*` layers);
    without it the weights come from torchvision (cache or download).
    """
    # Built from torchvision's own config, so layer indices match `vgg19().features` and its weights;
    # the prefix ends with the named conv, and [:-1] drops the ReLU that make_layers puts after it.
    features = make_layers(_vgg19_prefix(layer))[:-1]
    if weights_path is not None and not os.path.isfile(weights_path):
        raise UserError(f"VGG19 weights file {weights_path!r} does not exist; fix DiffusionLoss.vgg_weights")
    state = torch.load(weights_path, map_location="cpu", weights_only=True) if weights_path else _imagenet_state_dict()
    kept = {key[len("features.") :]: value for key, value in state.items() if key.startswith("features.")}
    kept = {key: value for key, value in kept.items() if int(key.split(".")[0]) < len(features)}
    try:
        features.load_state_dict(kept)
    except RuntimeError as error:
        raise UserError(f"{weights_path or 'the VGG19 weights'} do not fit VGG19 up to {layer}: {error}") from None
    return features.eval().requires_grad_(False)


class ImageNetInput(nn.Module):
    """Images in [-1, 1] with 1 or 3 channels -> VGG's 3-channel ImageNet-normalised input.

    ImageNet's mean and std are buffers, made once and moved with the VGG: built from Python numbers in each
    step they would be four host-to-device copies a step, queued right behind the UNet's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        images = (images + 1) / 2
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean) / self.std
