"""Plain torch networks that know nothing of diffusion or Lightning."""

from diffusion_lit.nn.unet import UNet

__all__ = ["UNet"]
