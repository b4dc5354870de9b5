"""The one place pixel ranges are converted: the model's [-1, 1], images' [0, 1], and uint8."""

import torch
from torch import Tensor


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] (what the model sees and makes) -> [0, 1]."""
    return (images + 1) / 2


def to_signed(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]; uint8 images are read as value / 255 first."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images * 2 - 1


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] -> uint8 with the same channels, clipped and rounded as PNG writers do."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def to_rgb(images: Tensor) -> Tensor:
    """(N, 1 or 3, H, W) -> (N, 3, H, W): gray repeated, as Inception-based metrics expect."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
