"""Samplers: each takes the network as an argument and never owns it.

Every sampler walks a decreasing subsequence of the training timesteps (`timestep_spacing`) and works
with any prediction target, through `NoiseSchedule.to_x0_eps`. The last step goes to alpha_bar = 1 (clean
images) and adds no noise. All arithmetic is in the dtype of the initial noise.
"""

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from diffusion_lit.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> network output
Variance = Literal["small", "large"]
Spacing = Literal["uniform", "trailing", "quadratic"]
SamplerName = Literal["ddpm", "ddim", "dpmpp"]


def timestep_spacing(timesteps: int, steps: int, spacing: Spacing = "trailing") -> Tensor:
    """The `steps` timesteps a sampler visits, decreasing (S,) long.

    uniform: 0, k, 2k, ... with k = T // S (Song et al. 2021, "leading" in diffusers); trailing: evenly
    spaced and ending at T - 1 (Lin et al. 2024, table 2), so the first step starts from (almost) pure
    noise; quadratic: denser near t = 0 (Song et al. 2021, sec. D.2), made strictly increasing.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and the {timesteps} training timesteps, got {steps}")
    if spacing == "uniform":
        ascending = torch.arange(steps) * (timesteps // steps)
    elif spacing == "trailing":
        ascending = (torch.arange(timesteps, 0, -timesteps / steps, dtype=torch.float64).round() - 1).long().flip(0)
    elif spacing == "quadratic":
        ascending = (torch.linspace(0, 1, steps, dtype=torch.float64) ** 2 * (timesteps - 1)).round().long()
        for i in range(1, steps):  # the squares repeat near 0 when S is large: push them apart
            ascending[i] = max(ascending[i], ascending[i - 1] + 1)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose uniform, trailing or quadratic")
    return ascending.flip(0)


def _alpha_bars(schedule: NoiseSchedule, timesteps: Tensor, like: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """alpha_bar at each visited timestep and at the one after it (1 after the last), as 0-dim tensors."""
    alpha_bar = schedule.alpha_bar[timesteps.to(schedule.alpha_bar.device)].to(like)
    after = torch.cat([alpha_bar[1:], torch.ones_like(alpha_bar[:1])])
    return list(alpha_bar), list(after)


def _denoise(model: Denoiser, schedule: NoiseSchedule, x: Tensor, t: int, clip_x0: bool) -> tuple[Tensor, Tensor]:
    """The network's (x0, eps) at x_t; with clip_x0, x0 is clipped to [-1, 1] and eps made consistent with it."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x0, eps = schedule.to_x0_eps(x, t_batch, model(x, t_batch))
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        alpha_bar = schedule.alpha_bar[t].to(x)
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    return x0, eps


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm(
    model: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    timesteps: Tensor,
    variance: Variance = "small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, algorithm 2) on a respaced schedule (Nichol & Dhariwal 2021, sec. 4).

    Between visited timesteps the respaced beta is 1 - alpha_bar_t / alpha_bar_prev; variance "small" is
    the posterior's beta~ (Ho et al. 2020, eq. 7), "large" is beta itself.
    """
    alpha_bars, alpha_bars_prev = _alpha_bars(schedule, timesteps, x)
    for i, t in enumerate(timesteps.tolist()):
        alpha_bar, alpha_bar_prev = alpha_bars[i], alpha_bars_prev[i]
        beta = 1 - alpha_bar / alpha_bar_prev
        x0, _ = _denoise(model, schedule, x, t, clip_x0)
        # Posterior mean of q(x_prev | x_t, x0), Ho et al. 2020 eq. 7.
        x = (alpha_bar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - alpha_bar_prev) * x) / (1 - alpha_bar)
        if i < len(timesteps) - 1:
            var = beta * (1 - alpha_bar_prev) / (1 - alpha_bar) if variance == "small" else beta
            x = x + var.sqrt() * _noise(x, generator)
    return x


def ddim(
    model: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    timesteps: Tensor,
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16): eta = 0 is deterministic, eta = 1 is ancestral DDPM."""
    alpha_bars, alpha_bars_prev = _alpha_bars(schedule, timesteps, x)
    for i, t in enumerate(timesteps.tolist()):
        alpha_bar, alpha_bar_prev = alpha_bars[i], alpha_bars_prev[i]
        x0, eps = _denoise(model, schedule, x, t, clip_x0)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x = x + sigma * _noise(x, generator)
    return x


def dpmpp_2m(model: Denoiser, schedule: NoiseSchedule, x: Tensor, timesteps: Tensor, clip_x0: bool = True) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, algorithm 2: multistep second order in lambda = log(alpha / sigma).

    The first step is first order (no history yet) and so is the last, to sigma = 0, where the update
    reduces to the data prediction itself.
    """
    alpha_bars, alpha_bars_next = _alpha_bars(schedule, timesteps, x)
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps.tolist()):
        x0, _ = _denoise(model, schedule, x, t, clip_x0)
        if i == len(timesteps) - 1:
            return x0
        alpha, sigma = alpha_bars[i].sqrt(), (1 - alpha_bars[i]).sqrt()
        alpha_next, sigma_next = alpha_bars_next[i].sqrt(), (1 - alpha_bars_next[i]).sqrt()
        h = (alpha_next / sigma_next).log() - (alpha / sigma).log()
        data = x0
        if x0_prev is not None:
            r = h_prev / h
            data = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)
        x = sigma_next / sigma * x - alpha_next * torch.expm1(-h) * data
        x0_prev, h_prev = x0, h
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm, "ddim": ddim, "dpmpp": dpmpp_2m}


def batch_generator(seed: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise generator of batch `batch` of a seeded run, seeded seed * 1,000,000 + batch, so that the
    images of a run do not depend on how its batches are shared out among processes."""
    return torch.Generator(device).manual_seed(seed * 1_000_000 + batch)


@torch.inference_mode()
def sample(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    sampler: SamplerName = "ddpm",
    steps: int | None = None,
    spacing: Spacing = "trailing",
    eta: float = 0.0,
    variance: Variance = "small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw x_T ~ N(0, I) of `shape` and run the named sampler for `steps` steps (None: all T)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is a DDIM setting; the {sampler} sampler does not take it")
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; choose small or large")
    timesteps = timestep_spacing(schedule.timesteps, steps or schedule.timesteps, spacing)
    x = torch.randn(shape, generator=generator, device=device)
    if sampler == "ddpm":
        return ddpm(model, schedule, x, timesteps, variance, clip_x0, generator)
    if sampler == "ddim":
        return ddim(model, schedule, x, timesteps, eta, clip_x0, generator)
    return dpmpp_2m(model, schedule, x, timesteps, clip_x0)
