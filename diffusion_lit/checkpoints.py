"""Checking a checkpoint file before anything is built from it."""

import argparse
import io
import os
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

from diffusion_lit import files
from diffusion_lit.errors import OneLineErrors, UserError

# Model settings of earlier versions, and where each went; their checkpoints name them in hyper_parameters.
DROPPED_SETTINGS = {
    "sample_variance": "evaluation.sampling.variance (`lit-ddpm sample --variance`)",
    "max_nonfinite_steps": "guard.max_nonfinite_steps",
}
LOSS_SETTINGS = ("perceptual_weight", "feature_matching_weight", "perceptual_layer", "vgg_weights", "snr_gamma",
                 "immiscible")  # fmt: skip
OPTIMIZER_SETTINGS = {"lr": "lr", "adam_betas": "betas", "weight_decay": "weight_decay", "fused_adam": "fused"}
MOVED_SETTINGS = {
    **DROPPED_SETTINGS,
    **{name: f"model.loss.init_args.{name}" for name in LOSS_SETTINGS},
    **{name: f"model.optimizer.init_args.{new}" for name, new in OPTIMIZER_SETTINGS.items()},
}
LOSS = "diffusion_lit.diffusion.losses.DiffusionLoss"

# The class paths a checkpoint may name without the user naming them too (torch's optimizers too), and the
# function that builds the model.
KNOWN_CLASSES = frozenset({"diffusion_lit.nn.UNet", "diffusion_lit.nn.unet.UNet", LOSS,
                           "diffusion_lit.diffusion.consistency.ConsistencyLoss"})  # fmt: skip
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
CLASS_SETTINGS = ("unet", "loss", "optimizer")  # classes to build: a plain string there is a class path too


def check_checkpoint(
    path: str, settings: set[str] | None = None, allowed_classes: Iterable[str] = (), resume: bool = False
) -> None:
    """One clear line for a --ckpt_path that is missing, truncated, corrupt or not a checkpoint; that names a class
    to build other than lit-ddpm's and `allowed_classes` (checked before anything is imported); (given the
    model's `settings`) whose hyper-parameters name settings the model does not have; or, to `resume` a run
    from, that holds weights alone."""
    checkpoint = _read(path)
    if resume and not {"optimizer_states", "loops"} <= set(checkpoint):
        what = "a post-hoc EMA checkpoint (lit-ddpm ema)" if "posthoc_ema" in checkpoint else "weights alone"
        raise UserError(f"--ckpt_path {path!r} is {what}, with no optimizer state or training progress to resume; "
                        "validate, test and sample read it, and fit resumes from a run's last.ckpt")  # fmt: skip
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    foreign = foreign_classes(hyper_parameters, allowed_classes)
    if foreign:
        raise UserError(
            f"--ckpt_path {path!r} names {foreign[0]!r} as a class to build, which is not one of lit-ddpm's; nothing "
            f"was imported. If you trust it, name it yourself, e.g. --model.unet.class_path {foreign[0]} (fit, "
            f"validate, test) or --allow_class {foreign[0]} (sample)"
        )
    unknown = sorted(set(hyper_parameters) - (settings or set()) - {"_instantiator"})
    if settings is None or not unknown:
        return
    moved = [f"{name} -> {MOVED_SETTINGS[name]}" for name in unknown if name in MOVED_SETTINGS]
    other = [name for name in unknown if name not in MOVED_SETTINGS]
    if other:
        raise UserError(
            f"--ckpt_path {path!r} names model settings this lit-ddpm does not have: {', '.join(other)} (written by "
            f"a newer lit-ddpm, or edited); upgrade lit-ddpm, or drop them from the file: python -m "
            f"diffusion_lit.checkpoints {' '.join(f'--drop {name}' for name in other)} {path}"
        )
    raise UserError(
        f"--ckpt_path {path!r} was written by an earlier lit-ddpm: its model settings {', '.join(unknown)} have "
        f"moved ({'; '.join(moved)}). `lit-ddpm sample` reads it as it is; to resume or test it, upgrade it once: "
        f"python -m diffusion_lit.checkpoints {path}"
    )


def upgrade_hyper_parameters(hyper_parameters: dict) -> list[str]:
    """An earlier lit-ddpm's model settings rewritten in today's layout, in place: the loss settings into `loss`,
    the Adam ones into `optimizer`, the dropped ones removed (each has its own place and default now). Returns
    the names moved or dropped."""
    changed = sorted(set(hyper_parameters) & set(MOVED_SETTINGS))
    if _one_segment_student(hyper_parameters):
        hyper_parameters["loss"]["init_args"]["segments"] = 1
        changed.append("loss.init_args.segments (1)")
    for name in DROPPED_SETTINGS:
        hyper_parameters.pop(name, None)
    loss = {name: hyper_parameters.pop(name) for name in LOSS_SETTINGS if name in hyper_parameters}
    if loss:
        hyper_parameters["loss"] = {"class_path": LOSS, "init_args": loss}
    adam = {new: hyper_parameters.pop(old) for old, new in OPTIMIZER_SETTINGS.items() if old in hyper_parameters}
    if adam:
        adam = {name: list(value) if isinstance(value, tuple) else value for name, value in adam.items()}
        hyper_parameters["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": adam}
    return changed


def upgraded(path: str) -> str | io.BytesIO:
    """`path`, or, for a checkpoint of an earlier lit-ddpm, its contents with the settings in today's layout, in
    memory (the file is left as it is)."""
    checkpoint = _read(path)
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    if not set(hyper_parameters) & set(MOVED_SETTINGS) and not _one_segment_student(hyper_parameters):
        return path
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    upgrade_hyper_parameters(checkpoint["hyper_parameters"])
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def checkpoint_step(path: str) -> int | None:
    """The optimizer step a checkpoint was saved at (None where it does not say)."""
    return _read(path).get("global_step")


def one_segment_student(path: str) -> bool:
    """Whether the checkpoint at `path` is a student written before multistep students (`_one_segment_student`)."""
    return _one_segment_student(_read(path).get("hyper_parameters", {}))


def _one_segment_student(hyper_parameters: dict) -> bool:
    """A student of a lit-ddpm before multistep students: its ConsistencyLoss names no segments, and was one."""
    loss = hyper_parameters.get("loss")
    return (
        isinstance(loss, dict)
        and str(loss.get("class_path", "")).endswith("ConsistencyLoss")
        and "segments" not in loss.get("init_args", {})
    )


def _read(path: str, label: str = "--ckpt_path ") -> dict:
    """A checkpoint file's contents, loaded safely (weights only; memory-mapped, so only the index is read);
    `label` is how the messages name the file's origin."""
    if not os.path.isfile(path):
        raise UserError(f"{label}{path!r} is not a file; give the path of a .ckpt file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (truncated zip, foreign pickle, random bytes: one answer)
        raise UserError(
            f"{label}{path!r} is not a readable checkpoint (truncated, corrupt, or not a file torch.save wrote)"
        ) from None
    keys = checkpoint if isinstance(checkpoint, dict) else {}
    missing = [key for key in ("state_dict", "pytorch-lightning_version") if key not in keys]
    if missing:
        raise UserError(f"{label}{path!r} is a torch file but not a Lightning checkpoint (no {missing[0]})")
    return checkpoint


def foreign_classes(hyper_parameters: dict, allowed: Iterable[str] = ()) -> list[str]:
    """The class paths in a checkpoint's hyper-parameters that are neither lit-ddpm's, nor torch's optimizers, nor
    `allowed`: every `class_path` (jsonargparse imports it to build the object), a plain string where a class
    setting is, and an instantiator other than Lightning's. Nothing is imported."""
    found = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("class_path", "_class_path"):
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(hyper_parameters)
    found += [hyper_parameters[name] for name in CLASS_SETTINGS if isinstance(hyper_parameters.get(name), str)]
    if hyper_parameters.get("_instantiator", INSTANTIATOR) != INSTANTIATOR:
        found.append(hyper_parameters["_instantiator"])
    allowed = KNOWN_CLASSES | set(allowed)
    return [str(path) for path in found if not isinstance(path, str) or not (path in allowed or _torch_optimizer(path))]


def _torch_optimizer(path: str) -> bool:
    """Whether `path` names one of torch's optimizers (torch.optim.Adam, torch.optim.adam.Adam): looked up among
    the names torch.optim has already imported, importing nothing."""
    name = path.rsplit(".", 1)[-1]
    kind = getattr(torch.optim, name, None)
    is_optimizer = isinstance(kind, type) and issubclass(kind, torch.optim.Optimizer)
    return is_optimizer and path in (f"torch.optim.{name}", f"{kind.__module__}.{name}")


def upgrade_checkpoint(path: str, drop: Iterable[str] = ()) -> list[str]:
    """Rewrite an earlier lit-ddpm's model settings in today's layout (`upgrade_hyper_parameters`) and drop those
    named in `drop`, in the file (atomically); returns the names moved or dropped."""
    checkpoint = _read(path, label="")
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    absent = sorted(set(drop) - set(hyper_parameters))
    if absent:
        raise UserError(
            f"{path!r} has no model setting {absent[0]!r} to drop (it has {', '.join(sorted(hyper_parameters))})"
        )
    for name in drop:
        del hyper_parameters[name]
    dropped = sorted({*upgrade_hyper_parameters(hyper_parameters), *drop})
    try:
        files.save(checkpoint, path)
    except OSError as error:
        raise UserError(f"could not rewrite {path!r} ({files.why(error, path)}); it is unchanged") from None
    return dropped


def component_config(component: object, init_args: dict) -> dict:
    """A component as a config names it: {"class_path", "init_args"}."""
    kind = type(component)
    return {"class_path": f"{kind.__module__}.{kind.__qualname__}", "init_args": init_args}


def check_weights_fit(expected: dict[str, Tensor], loaded: dict[str, Tensor]) -> None:
    """One clear line when a checkpoint's weights are of another model configuration, or incomplete."""
    for name, value in loaded.items():
        if name in expected and expected[name].shape != value.shape:
            raise UserError(
                f"the checkpoint was trained with another model configuration: {name} has shape "
                f"{tuple(value.shape)} there but {tuple(expected[name].shape)} here; use the config it was "
                f"trained with (its hyper_parameters) or another checkpoint"
            )
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} of this model's weights (e.g. {missing[0]})")


def check_finite(state_dict: dict[str, Tensor], refusal: str = "refusing to save a checkpoint") -> None:
    """Refuse non-finite weights: to save them (over a good checkpoint), or to sample from them (images of a
    single colour, with no word)."""
    for name, value in state_dict.items():
        if value.is_floating_point() and not value.isfinite().all():
            raise UserError(f"{refusal}: {name} has non-finite values")


class _OneLineParser(OneLineErrors, argparse.ArgumentParser):
    """argparse, with one-line errors."""


def main(args: list[str] | None = None) -> None:
    """`python -m diffusion_lit.checkpoints [--drop NAME]... CKPT...`: upgrade checkpoints in place."""
    parser = _OneLineParser(
        prog="python -m diffusion_lit.checkpoints",
        description="Upgrade lit-ddpm checkpoints in place: drop the model settings an earlier version wrote.",
    )
    parser.add_argument("paths", nargs="+", metavar="CKPT")
    parser.add_argument("--drop", action="append", default=[], metavar="NAME", help="also drop this model setting")
    try:
        options = parser.parse_args(args)
        for path in options.paths:
            print(f"{path}: moved or dropped {', '.join(upgrade_checkpoint(path, options.drop)) or 'nothing'}")
    except UserError as error:
        print(f"lit-ddpm: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
