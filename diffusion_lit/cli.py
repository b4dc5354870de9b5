"""`lit-ddpm`: LightningCLI over DiffusionModule and the datamodules."""

import netrc
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from diffusion_lit import sample
from diffusion_lit.callbacks import SampleQuality
from diffusion_lit.checkpoints import check_checkpoint
from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule


class SaveRunConfig(SaveConfigCallback):
    """Also keep the resolved config in each W&B run's files, since W&B's log_dir is shared by all runs."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write config.yaml into the W&B run folder (it is uploaded with the run)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                path = os.path.join(logger.experiment.dir, self.config_filename)
                self.parser.save(self.config, path, skip_none=False, overwrite=True)


class OneLineErrorParser(LightningArgumentParser):
    """A parser whose final errors (unknown key, wrong type) are one line instead of usage plus message."""

    def error(self, message: str, ex: Exception | None = None):
        """Raise UserError for errors that would exit; keep jsonargparse's internal ones as they are."""
        if not self.exit_on_error:
            super().error(message, ex)
        flat = " ".join(line.strip() for line in message.splitlines() if line.strip())
        flat = flat.replace("'test', 'predict')", "'test', 'predict', 'sample')")  # sample has its own parser
        raise UserError(f"{flat} (`{self.prog.split(' [')[0]} --help` lists the options)")


class DiffusionCLI(LightningCLI):
    """LightningCLI whose datamodule decides the image shape the model is built for."""

    def add_arguments_to_parser(self, parser) -> None:
        """Say the image shape once, in the datamodule; FID/IS settings live under `evaluation`."""
        parser.add_lightning_class_args(SampleQuality, "evaluation")
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.link_arguments(
            "data.image_shape", "model.unet.init_args.in_channels", compute_fn=_channels, apply_on="instantiate"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Refuse what cannot run (predict; a --ckpt_path that is missing, truncated or not a checkpoint)
        right after parsing: LightningCLI reads the checkpoint's hyper-parameters next."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand == "predict":
            raise UserError(
                "images come from `lit-ddpm sample --ckpt_path CKPT` (see `lit-ddpm sample --help`); "
                "`lit-ddpm test` scores a checkpoint"
            )
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in CHECKPOINT_KEYWORDS:
            check_checkpoint(ckpt_path)


# Names the Trainer resolves itself rather than reading as paths.
CHECKPOINT_KEYWORDS = {"last", "best", "hpc", "registry"}


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
        argv = sys.argv[1:] if args is None else args
        if argv[:1] == ["sample"]:
            sample.main(argv[1:])
            return
        DiffusionCLI(
            DiffusionModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=args,
            save_config_callback=SaveRunConfig,
            parser_class=OneLineErrorParser,
            save_config_kwargs={"overwrite": True},
        )
    except UserError as error:
        print(f"lit-ddpm: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
