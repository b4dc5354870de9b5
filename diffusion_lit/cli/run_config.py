"""A run's settings: the resolved config written beside the run, what a checkpoint's settings changed, and how
the command line spells a setting that a lower layer's message names."""

import os
import re
import sys

from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from diffusion_lit import files
from diffusion_lit.callbacks import LastCheckpoint
from diffusion_lit.checkpoints import checkpoint_step

# Settings the datamodule decides (DiffusionCLI's links): a config's own value of them is never used.
LINKED = {"image_shape", "unet.init_args.in_channels"}


class SaveRunConfig(SaveConfigCallback):
    """The resolved config of each run, written whole (`files.write_text`): in the logger's folder (Lightning's
    place), and, since W&B's log_dir is shared by all runs, in each W&B run's files (uploaded with it). Without a
    logger a fit writes it beside its checkpoints, never in the working folder, where runs would overwrite each
    other's. A failed write is a warning: the run goes on."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write it once per run, from the main process, into the loggers' folders."""
        if self.already_saved:
            return
        folders = [trainer.log_dir] if trainer.loggers else []  # every process: log_dir broadcasts
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and not logger.experiment.disabled:  # WANDB_MODE=disabled: no files
                folders.append(logger.experiment.dir)
        self._write(trainer, folders)
        self.already_saved = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Without a logger: beside the checkpoints, once the run has taken its folder (a refused run writes
        nothing; a dry run takes no folder)."""
        if not trainer.loggers:
            taken = [str(c.dirpath) for c in trainer.callbacks if isinstance(c, LastCheckpoint) and c.writes]
            self._write(trainer, taken[:1])

    def _write(self, trainer: Trainer, folders: list[str]) -> None:
        if not trainer.is_global_zero or not folders:
            return
        text = self.parser.dump(self.config, skip_none=False)
        for folder in folders:
            path = os.path.join(folder, self.config_filename)
            try:
                files.write_text(path, text)
            except OSError as error:
                rank_zero_warn(f"could not write {path} ({files.why(error, path)}); the run goes on without it")


def say_what_the_checkpoint_changed(ckpt_path: str, config: Namespace, given: dict, fitting: bool) -> None:
    """One line for each surprise of a run from a checkpoint: the checkpoint's model settings replaced `given`
    (the config's and the command line's) where they differ; a resumed fit is already at its max_steps."""
    used, given = _flat(config.model.as_dict()), _flat(given)
    changed = [f"model.{key} {used[key]!r} (not {given[key]!r})" for key in sorted(given)
               if key in used and key not in LINKED and not _same(given[key], used[key])]  # fmt: skip
    if changed:
        _warn(f"the checkpoint's model settings are used: {', '.join(changed)}")
    max_steps, step = config.trainer.max_steps, checkpoint_step(ckpt_path)
    if fitting and step is not None and 0 <= max_steps <= step:
        _warn(f"{ckpt_path} is at step {step}, and --trainer.max_steps is {max_steps}: nothing to train "
              "(raise max_steps to train on)")  # fmt: skip


def _same(given, used) -> bool:
    """Equal, or the same class by two import paths (diffusion_lit.nn.UNet, diffusion_lit.nn.unet.UNet)."""
    if isinstance(given, str) and isinstance(used, str) and given.startswith("diffusion_lit."):
        return given.rsplit(".", 1)[-1] == used.rsplit(".", 1)[-1]
    return given == used


def _flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as {"unet.init_args.dropout": 0.1, ...}, tuples as lists (a checkpoint keeps lists)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


@rank_zero_only
def _warn(line: str) -> None:
    print(f"lit-ddpm: warning: {line}", file=sys.stderr)


# Where each class's arguments are in a config: the lower layers' messages name a setting as `Class.argument`
# (Python's spelling); the command line adds its own.
DATAMODULES = ("MNISTDataModule", "CIFAR10DataModule", "ImageFolderDataModule", "DemoMNISTDataModule")
SPELLINGS = {
    "DiffusionModule": "model", "UNet": "model.unet.init_args", "DiffusionLoss": "model.loss.init_args",
    "ConsistencyLoss": "model.loss.init_args",
    "optimizer": "model.optimizer.init_args", "SampleQuality": "evaluation", "NonFiniteGuard": "guard",
    "Trainer": "trainer", **dict.fromkeys(DATAMODULES, "data.init_args"),
}  # fmt: skip
SETTING = re.compile(rf"\b({'|'.join(SPELLINGS)})\.([a-z_]\w*(?:\.[a-z_]\w*)*)")


def spelled(message: str) -> str:
    """`message` with each `Class.argument` it names followed by the command line's spelling of it."""
    return SETTING.sub(lambda match: f"{match[0]} (--{SPELLINGS[match[1]]}.{match[2]})", message)
