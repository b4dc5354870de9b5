"""Checking a checkpoint file before anything is built from it."""

import os

import torch
from torch import Tensor

from diffusion_lit.errors import UserError

# Model settings of earlier versions, and where each went; their checkpoints name them in hyper_parameters.
MOVED_SETTINGS = {
    "sample_variance": "evaluation.sampling.variance (`lit-ddpm sample --variance`)",
    "max_nonfinite_steps": "guard.max_nonfinite_steps",
}


def check_checkpoint(path: str, settings: set[str] | None = None) -> None:
    """One clear line for a --ckpt_path that is missing, truncated, corrupt or not a checkpoint, or (given the
    model's `settings`) one whose hyper-parameters name settings the model no longer has."""
    if not os.path.isfile(path):
        raise UserError(f"--ckpt_path {path!r} is not a file; give the path of a .ckpt file")
    try:  # memory-mapped: only the index is read, so this costs little even for large checkpoints
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (truncated zip, foreign pickle, random bytes: one answer)
        raise UserError(
            f"--ckpt_path {path!r} is not a readable checkpoint (truncated, corrupt, or not a file torch.save wrote)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"--ckpt_path {path!r} is a torch file but not a Lightning checkpoint (no state_dict)")
    unknown = sorted(set(checkpoint.get("hyper_parameters", {})) - (settings or set()) - {"_instantiator"})
    if settings is not None and unknown:
        moved = [f"{name} -> {MOVED_SETTINGS[name]}" for name in unknown if name in MOVED_SETTINGS]
        raise UserError(
            f"--ckpt_path {path!r} was written by an earlier lit-ddpm: its model settings {', '.join(unknown)} no "
            f"longer exist{' (' + '; '.join(moved) + ')' if moved else ''}. `lit-ddpm sample` still reads it; to "
            f"resume or test it, upgrade it once: python -m diffusion_lit.checkpoints {path}"
        )


def upgrade_checkpoint(path: str) -> list[str]:
    """Drop the settings of MOVED_SETTINGS from a checkpoint's hyper-parameters, in place (atomically);
    returns the names dropped. Their values are not needed: each now has its own place (and default)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    dropped = sorted(set(hyper_parameters) & set(MOVED_SETTINGS))
    for name in dropped:
        del hyper_parameters[name]
    partial = f"{path}.partial"
    torch.save(checkpoint, partial)
    os.replace(partial, path)
    return dropped


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


def check_finite(state_dict: dict[str, Tensor]) -> None:
    """Refuse to save non-finite weights (over a good checkpoint)."""
    for name, value in state_dict.items():
        if value.is_floating_point() and not value.isfinite().all():
            raise UserError(f"refusing to save a checkpoint: {name} has non-finite values")


if __name__ == "__main__":
    import sys

    for file in sys.argv[1:]:
        print(f"{file}: dropped {', '.join(upgrade_checkpoint(file)) or 'nothing'}")
