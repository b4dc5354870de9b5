"""`lit-ddpm`: LightningCLI over DiffusionModule and the datamodules."""

import netrc
import os
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule


class DiffusionCLI(LightningCLI):
    """LightningCLI whose datamodule decides the image shape the model is built for."""

    def add_arguments_to_parser(self, parser) -> None:
        """Say the image shape once, in the datamodule."""
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.link_arguments(
            "data.image_shape", "model.unet.init_args.in_channels", compute_fn=_channels, apply_on="instantiate"
        )


def _channels(image_shape: tuple[int, int, int]) -> int:
    return image_shape[0]


def _wandb_logged_in() -> bool:
    """Whether Weights & Biases has credentials: WANDB_API_KEY, or `wandb login`'s netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def main(args: list[str] | None = None) -> None:
    """Entry point of `lit-ddpm`; `args` replaces sys.argv[1:] (for tests)."""
    # W&B runs offline (files under ./wandb, `wandb sync` later) unless the user has logged in or set WANDB_MODE.
    os.environ.setdefault("WANDB_MODE", "online" if _wandb_logged_in() else "offline")
    try:
        DiffusionCLI(
            DiffusionModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except UserError as error:
        print(f"lit-ddpm: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
