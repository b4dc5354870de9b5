"""The pieces the throughput benchmark and the GPU check share: one training step, autocast, device sync."""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from diffusion_lit.diffusion import NoiseSchedule
from diffusion_lit.diffusion.immiscible import assign_noise
from diffusion_lit.diffusion.losses import DiffusionLoss

LOSS = DiffusionLoss()  # eps-MSE, lit-ddpm's training loss code for every model measured


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on the device, or nothing for fp32."""
    return torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()


def train_step(
    network: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    optimizer: torch.optim.Optimizer,
    x0: Tensor,
    precision: str,
    criterion: DiffusionLoss = LOSS,
    immiscible: bool = False,
) -> Tensor:
    """One step of denoising training on the batch x0 at random timesteps; returns the loss (no host sync
    unless `immiscible`, whose assignment runs on the host)."""
    t = schedule.sample_timesteps(x0.shape[0], x0.device)
    noise = assign_noise(x0, torch.randn_like(x0)) if immiscible else torch.randn_like(x0)
    with autocast(x0.device, precision):
        loss = criterion(network, schedule, x0, noise, t)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock times cover the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
