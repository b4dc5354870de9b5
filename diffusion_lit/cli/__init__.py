"""The `lit-ddpm` command: fit, validate and test through LightningCLI (`commands`), and `sample` (`sample`)."""

from diffusion_lit.cli.commands import main

__all__ = ["main"]
