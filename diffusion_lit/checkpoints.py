"""Checking a checkpoint file before anything is built from it."""

import os

import torch

from diffusion_lit.errors import UserError


def check_checkpoint(path: str) -> None:
    """One clear line for a --ckpt_path that is missing, truncated, corrupt or not a checkpoint."""
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
