"""`lit-ddpm`: LightningCLI over DiffusionModule and the datamodules."""

import inspect
import netrc
import os
import signal
import sys
import threading
import warnings

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from diffusion_lit.callbacks import InitFromTeacher, LastCheckpoint, NonFiniteGuard, SampleQuality
from diffusion_lit.checkpoints import check_checkpoint, one_segment_student
from diffusion_lit.cli import INTERRUPTED, distill, ema, sample
from diffusion_lit.cli.run_config import SaveRunConfig, say_what_the_checkpoint_changed, spelled
from diffusion_lit.cli.run_paths import cluster_plugins, fill, resolve_keyword, resume_command, run_name
from diffusion_lit.errors import OneLineErrors, UserError
from diffusion_lit.module import DiffusionModule
from diffusion_lit.signals import Aborted, abort_on_ctrl_c


class OneLineErrorParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, whose final errors (unknown key, wrong type) are one line."""


COMMANDS = {
    "fit": "train a model: lit-ddpm fit --config configs/demo.yaml (resume: --ckpt_path CKPT)",
    "validate": "the denoising loss of a checkpoint's EMA weights on the held-out images",
    "test": "FID and IS of a checkpoint's samples and bits/dim of held-out images, written beside it as JSON",
    "sample": "images from a checkpoint: grid.png, samples.npz, PNGs; needs only the checkpoint",
    "distill": "a few-step student of a trained model: lit-ddpm distill --config CONFIG --teacher CHECKPOINT",
    "ema": "a checkpoint of any EMA length, from a run's post-hoc EMA snapshots: lit-ddpm ema --run checkpoints/NAME",
}
USAGE = (
    "usage: lit-ddpm {fit,validate,test,sample,distill,ema} [--help] ...\n\ncommands:\n"
    + "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
    + "\n\n`lit-ddpm COMMAND --help` lists a command's options."
)


class DiffusionCLI(LightningCLI):
    """LightningCLI whose datamodule decides the image shape the model is built for, and whose run name is
    said once: `name` (and an overlay's `variant`) fills every `{run}` in the trainer's settings. With a
    `teacher` it distills (`lit-ddpm distill`): the teacher's network, its weights to start from, `_distill`
    after the run's name; `command_line` is what the user typed (for the resume command)."""

    def __init__(self, *args, teacher: str | None = None, command_line: list[str] | None = None, **kwargs) -> None:
        self.teacher = teacher
        self.command_line = command_line
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        """Say the image shape once, in the datamodule; FID/IS settings live under `evaluation`."""
        parser.add_argument("--name", default="run", help="the run's name: checkpoints/{run}/, samples/{run}/, logs")
        parser.add_argument("--variant", default=None, help="an overlay's suffix: the run is then NAME_VARIANT")
        parser.add_argument(
            "--distill.steps", type=int | None, default=None,
            help="lit-ddpm distill only: the student's optimizer steps (the trainer's max_steps, no epoch limit); "
            "null: the trainer's own length",
        )  # fmt: skip
        parser.add_argument(
            "--distill.lr", type=float | None, default=None,
            help="lit-ddpm distill only: the optimizer's learning rate for the student; null: the config's",
        )  # fmt: skip
        parser.add_argument(
            "--distill.warmup_steps", type=int | float | None, default=None,
            help="lit-ddpm distill only: the student's warm-up, in steps or below 1 as a share of its run; "
            "null: the config's model.warmup_steps",
        )  # fmt: skip
        parser.add_lightning_class_args(SampleQuality, "evaluation")
        parser.add_lightning_class_args(NonFiniteGuard, "guard")
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.link_arguments(
            "data.image_shape", "model.unet.init_args.in_channels", compute_fn=_channels, apply_on="instantiate"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Refuse what cannot run (predict; a --ckpt_path that is missing, truncated, not a checkpoint, or that
        names a class other than lit-ddpm's networks and the config's) right after parsing: LightningCLI reads
        the checkpoint's hyper-parameters next, and building them imports the classes they name."""
        self.argv = self.command_line or list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        settings = set(inspect.signature(DiffusionModule).parameters)
        if subcommand == "predict":
            raise UserError(
                "images come from `lit-ddpm sample --ckpt_path CKPT` (see `lit-ddpm sample --help`); "
                "`lit-ddpm test` scores a checkpoint"
            )
        precision = str(self.config[subcommand].trainer.precision) if subcommand else None
        if precision not in (None, "None", *PRECISIONS):
            raise UserError(f"--trainer.precision {precision} is not supported; use one of {', '.join(PRECISIONS)}")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in CHECKPOINT_KEYWORDS:  # resolved here, so that the file is checked as any other path is
            ckpt_path = self.config[subcommand].ckpt_path = resolve_keyword(self.config[subcommand], subcommand,
                                                                            bool(self.teacher), ckpt_path)  # fmt: skip
        if ckpt_path:
            model = self.config[subcommand].model  # the classes the user's own config names may be built
            named = {getattr(model.get(name), "class_path", None) for name in ("unet", "loss", "optimizer")}
            check_checkpoint(ckpt_path, settings, named - {None}, resume=subcommand == "fit")
        if self.teacher:
            unet = self.config.fit.model.unet.class_path
            self.config = distill.apply_teacher(self.config, parser, self.teacher, settings, {unet})
            chosen, fit = self.config.fit.distill, self.config.fit
            if chosen.steps is not None and chosen.steps < 1:
                raise UserError(f"--distill.steps must be at least 1, got {chosen.steps}")
            if chosen.warmup_steps is not None and chosen.warmup_steps < 0:
                raise UserError(f"--distill.warmup_steps must be at least 0, got {chosen.warmup_steps}")
            if chosen.steps is not None:
                fit.trainer.max_steps, fit.trainer.max_epochs = chosen.steps, -1
            if chosen.lr is not None:
                if fit.model.optimizer is None:
                    raise UserError("--distill.lr needs the optimizer named in the config (model.optimizer)")
                fit.model.optimizer.init_args.lr = chosen.lr
            if chosen.warmup_steps is not None:
                fit.model.warmup_steps = chosen.warmup_steps

    def instantiate_classes(self) -> None:
        """LightningCLI's; a constructor's one-line refusal (a batch size of 0) stays one line, where jsonargparse
        would wrap it in a paragraph about the types the setting may have."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = error.__cause__
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None and UserError.latest is not None and str(UserError.latest) in str(error):
                cause = UserError.latest
            if cause is None:
                raise
            raise cause from None

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """LightningCLI's, under SLURM with Lightning's own requeue off (`run_paths.cluster_plugins`)."""
        plugins = cluster_plugins(self._get(self.config_init, "trainer", default={}).get("plugins"))
        return super().instantiate_trainer(**kwargs, **({"plugins": plugins} if plugins else {}))

    def _parse_ckpt_path(self) -> None:
        """Lightning's: the checkpoint's model settings replace the config's and the command line's; one line
        says which of them differed, and a resumed fit that is already past its max_steps says so."""
        subcommand = self.config.get("subcommand")
        given = self.config[subcommand].model.as_dict() if subcommand else {}
        super()._parse_ckpt_path()
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            say_what_the_checkpoint_changed(ckpt_path, self.config[subcommand], given, subcommand == "fit")

    def before_fit(self) -> None:
        """Tell LastCheckpoint the command that resumes this run, for the line it prints when a signal stops it."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, LastCheckpoint):
                callback.resume_command = resume_command(self.argv, callback.path)
        if self.teacher:  # before the EMA's setup copies the weights (model callbacks come after the trainer's)
            self.trainer.callbacks.insert(0, InitFromTeacher(self.teacher))

    def before_instantiate_classes(self) -> None:
        """Put the run's name wherever the trainer's settings say `{run}` (folders, the logger's run name); read a
        student written before multistep students as the one-segment student it is (resumed or tested); and leave
        out the callbacks that a flag has made impossible: the progress bar with
        `--trainer.enable_progress_bar false`, the learning-rate monitor with `--trainer.logger false`
        (Lightning would stop with a traceback on either)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in CHECKPOINT_KEYWORDS and one_segment_student(ckpt_path):
            # the checkpoint's settings have replaced the command line's, but it names no segments: it had one
            config.model.loss.init_args.segments = 1
        config.trainer = fill(config.trainer, run_name(config, bool(self.teacher)))
        unwanted = set()
        if config.trainer.enable_progress_bar is False:
            unwanted.add("ProgressBar")
        if config.trainer.logger in (False, None):
            unwanted.add("LearningRateMonitor")
        callbacks = config.trainer.callbacks or []
        config.trainer.callbacks = [c for c in callbacks if c.class_path.rsplit(".", 1)[-1] not in unwanted]


# `distill` hands LightningCLI its own `fit` arguments while sys.argv holds the user's: intended, not a mistake.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")


# What the networks are trained in: float32 weights, with or without autocast (64-bit and pure half weights are not).
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed")

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
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, abort_on_ctrl_c)
    try:
        argv = sys.argv[1:] if args is None else args
        if not argv:
            print(USAGE, file=sys.stderr)
            sys.exit(2)
        if argv[0] in ("-h", "--help"):
            print(USAGE)
            return
        if argv[0] in ("sample", "ema"):
            {"sample": sample, "ema": ema}[argv[0]].main(argv[1:])
            return
        teacher, command_line = None, None
        if argv[0] == "distill":
            command_line, (args, teacher) = list(argv), distill.fit_arguments(argv)
        if not argv[0].startswith("-") and argv[0] not in (*COMMANDS, "predict"):
            choices = ", ".join(f"'{name}'" for name in COMMANDS)
            raise UserError(
                f"invalid choice: {argv[0]!r} (choose from {choices}; `lit-ddpm --help` says what each does)"
            )
        DiffusionCLI(
            DiffusionModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=args,
            save_config_callback=SaveRunConfig,
            parser_class=OneLineErrorParser,
            save_config_kwargs={"overwrite": True},
            teacher=teacher,
            command_line=command_line,
        )
    except (UserError, MisconfigurationException) as error:  # Lightning's: a trainer setting it refuses
        message = str(error)
        if "Original Traceback" in message:  # raised in a data-loading worker: torch adds the worker's traceback
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        message = " ".join(message.split())
        if isinstance(error, MisconfigurationException):
            message = f"the trainer refused its settings (--trainer.*): {message}"
        print(f"lit-ddpm: error: {spelled(message)}", file=sys.stderr)
        sys.exit(2)
    except (Aborted, KeyboardInterrupt):  # outside training steps: files are written whole or not at all
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_ctrl_c)
