"""The optimizer and the gradient clipping of DiffusionModule: Adam with a linear warm-up, and clipping that
works with fused Adam under mixed precision."""

from collections.abc import Iterable

import torch
from torch import nn


def adam_with_warmup(
    parameters: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    warmup_steps: int,
    fused: bool,
) -> dict:
    """Lightning's configure_optimizers answer: Adam, and a linear warm-up of its rate stepped every step."""
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)
    warmup = max(warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_gradients(
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    value: float | None,
    algorithm: str | None,
) -> None:
    """Clip by norm (or by value), also for fused Adam under mixed precision.

    Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales fp16 gradients inside
    its step (fused Adam), in bf16 as well. Here the fp16 loss scaler, if any, unscales them first
    (GradScaler.unscale_, which the fused step then takes into account), and the clipping follows.
    """
    if not value:
        return
    if scaler is not None and optimizer.defaults.get("fused"):
        scaler.unscale_(optimizer)
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(parameters, value)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, value)
