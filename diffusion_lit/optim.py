"""The optimizer and the gradient clipping of DiffusionModule: Adam by default, any torch optimizer by injection,
a linear warm-up, and clipping that works with fused Adam under mixed precision."""

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from diffusion_lit.errors import UserError

# DiffusionModule's optimizer when none is given: Adam at 2e-4 (Ho et al. 2020), with its fused kernel (CUDA and
# CPU: fewer kernel launches; callbacks.NonFiniteGuard then skips a non-finite step on the device).
DEFAULT_OPTIMIZER = functools.partial(torch.optim.Adam, lr=2e-4, fused=True)


def optimizer_config(optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]) -> dict:
    """{"class_path", "init_args"} of an optimizer given as a torch optimizer class or a functools.partial of one
    (jsonargparse's, from a config, too), as checkpoints keep it and configs spell it."""
    partial = isinstance(optimizer, functools.partial)
    candidates = (optimizer.func, *optimizer.args) if partial else (optimizer,)
    kinds = [kind for kind in candidates if isinstance(kind, type) and issubclass(kind, torch.optim.Optimizer)]
    if not kinds:
        raise UserError(f"optimizer must be a torch optimizer class or a functools.partial of one, got {optimizer!r}")
    factory, arguments = kinds[0], optimizer.keywords if partial else {}
    init_args = {name: list(value) if isinstance(value, tuple) else value for name, value in arguments.items()}
    return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": init_args}


def build(make_optimizer: Callable, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer over `parameters`; a setting it refuses (a negative learning rate, betas outside [0, 1)) is
    one line."""
    try:
        return make_optimizer(parameters)
    except ValueError as error:
        raise UserError(f"the optimizer (model.optimizer in a config) refused its settings: {error}") from None


def scheduled(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> dict:
    """Lightning's configure_optimizers answer: the optimizer, and its rate times `factor(step)` (the run's plan,
    `plan.RunPlan.factor`), stepped every optimizer step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
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
