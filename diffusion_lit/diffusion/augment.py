"""Non-leaky augmentation (Karras et al. 2022, appendix F.2): augment the training images, tell the network
which augmentation each one got, and sample with "none".

A network trained on flipped, rotated and shifted images learns to draw flipped, rotated and shifted images:
the augmentation leaks into the samples. Conditioned on a vector that says what was done (all zeros for "nothing
done"), it learns one distribution per augmentation, and sampling with zeros draws from the un-augmented one;
the other augmentations only share what the network learns. That helps where there are few images to learn
from (a folder of a few hundred), where a model otherwise memorises them.

Here each training image gets each of four exact (interpolation-free) geometric augmentations, independently
with probability p (EDM uses 0.12 on CIFAR-10), in this order:

| augmentation | label entries (zero when not applied) |
| --- | --- |
| mirror left-right | 1 |
| mirror top-bottom | 1 |
| rotation by 90, 180 or 270 degrees (uniform) | cos(angle) - 1, sin(angle) |
| shift by whole pixels, up to 1/8 of the side each way (uniform), reflecting at the border | dx / width, dy / height |
"""

import torch
from torch import Tensor

from diffusion_lit.errors import UserError

AUGMENT_DIM = 6  # the label's length: the UNet's augment_dim for a model trained with augmentation
MAX_SHIFT = 1 / 8  # of the image side, EDM's translate_int


def check_augment(probability: float, augment_dim: int | None, distilling: bool) -> None:
    """Non-leaky augmentation needs a probability in [0, 1], a UNet that takes its labels (`augment_dim`) and a
    diffusion loss (a distilled student is not augmented)."""
    if not 0.0 <= probability <= 1.0:
        raise UserError(f"DiffusionModule.augment is a probability in [0, 1], got {probability}")
    if probability and augment_dim != AUGMENT_DIM:
        raise UserError(
            f"DiffusionModule.augment needs a UNet told which augmentation was applied: set UNet.augment_dim to "
            f"{AUGMENT_DIM} (it is {augment_dim})"
        )
    if probability and distilling:
        raise UserError("distillation does not augment: set DiffusionModule.augment to 0 for lit-ddpm distill")


def augment(images: Tensor, probability: float) -> tuple[Tensor, Tensor]:
    """(images, labels): each of the module docstring's augmentations applied to each image (B, C, H, W) with
    `probability`, and the labels (B, AUGMENT_DIM) that say which; draws from torch's current random stream."""
    batch, _, height, width = images.shape
    if probability and height != width:
        raise ValueError(f"augmentation rotates by 90 degrees, so it needs square images, got {height}x{width}")
    labels = images.new_zeros(batch, AUGMENT_DIM, dtype=torch.float32)
    chosen = [torch.rand(batch, device=images.device) < probability for _ in range(4)]

    images = torch.where(_per_image(chosen[0]), images.flip(-1), images)
    images = torch.where(_per_image(chosen[1]), images.flip(-2), images)
    labels[:, 0], labels[:, 1] = chosen[0].float(), chosen[1].float()

    quarters = torch.randint(1, 4, (batch,), device=images.device) * chosen[2]  # 0: not rotated
    rotated = torch.stack([torch.rot90(images, int(k), dims=(-2, -1)) for k in range(4)])  # (4, B, C, H, W)
    images = rotated[quarters, torch.arange(batch, device=images.device)]
    angle = quarters.float() * (torch.pi / 2)
    labels[:, 2], labels[:, 3] = torch.cos(angle) - 1, torch.sin(angle)

    limit = int(MAX_SHIFT * height)
    shifts = torch.randint(-limit, limit + 1, (batch, 2), device=images.device) * chosen[3][:, None]
    images = shift(images, shifts[:, 0], shifts[:, 1])
    labels[:, 4], labels[:, 5] = shifts[:, 0] / width, shifts[:, 1] / height
    return images, labels


def shift(images: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Each image (B, C, H, W) moved right by dx and down by dy whole pixels (B,), |d| < side, the pixels that
    come in reflected from the border (no seam, unlike torch.roll)."""
    batch, _, height, width = images.shape
    rows = _reflect(torch.arange(height, device=images.device)[None] - dy[:, None], height)  # (B, H)
    cols = _reflect(torch.arange(width, device=images.device)[None] - dx[:, None], width)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    moved = images.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return moved.permute(0, 3, 1, 2).contiguous()


def _reflect(index: Tensor, size: int) -> Tensor:
    """Indices outside [0, size) reflected back in, without repeating the edge pixel (numpy's "reflect")."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _per_image(chosen: Tensor) -> Tensor:
    """(B,) booleans as (B, 1, 1, 1), to choose whole images."""
    return chosen[:, None, None, None]
