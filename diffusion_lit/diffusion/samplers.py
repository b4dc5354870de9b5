"""Samplers: each takes the network as an argument and never owns it."""

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from diffusion_lit.diffusion.schedule import NoiseSchedule, gather

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> network output
Variance = Literal["small", "large"]


def p_sample(
    model: Denoiser,
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    variance: Variance = "small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One ancestral step x_t -> x_{t-1} of p(x_{t-1} | x_t); Ho et al. 2020, algorithm 2.

    variance "small" is the posterior variance beta~_t, "large" is beta_t (sec. 3.2 of the paper).
    """
    x0, _ = schedule.to_x0_eps(x_t, t, model(x_t, t))
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean, _, log_variance = schedule.q_posterior(x0, x_t, t)
    if variance == "large":
        log_variance = gather(schedule.large_log_variance, t, x_t)
    noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    nonzero = (t > 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))  # no noise on the last step
    return mean + nonzero * (0.5 * log_variance).exp() * noise


@torch.no_grad()
def p_sample_loop(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    variance: Variance = "small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Run all T ancestral steps from pure noise and return x_0 in [-1, 1]-ish space, shape `shape`."""
    x = torch.randn(shape, generator=generator, device=device)
    for step in reversed(range(schedule.timesteps)):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        x = p_sample(model, schedule, x, t, variance, clip_x0, generator)
    return x
