"""What every sampler's step shares: the timesteps it visits, the x0 and noise a network output implies (x0
thresholded), the log-SNR at a timestep, fresh noise. `samplers` and `solvers` build on it."""

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lit.diffusion.sampling import Spacing, Threshold
from diffusion_lit.diffusion.schedule import NoiseSchedule
from diffusion_lit.errors import UserError

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> network output
DYNAMIC_PERCENTILE = 0.995  # Saharia et al. 2022, sec. 2.3 and appendix E


def timestep_spacing(timesteps: int, steps: int, spacing: Spacing = "trailing") -> Tensor:
    """The `steps` timesteps a sampler visits, decreasing (S,) long.

    uniform: 0, k, 2k, ... with k = T // S (Song et al. 2021, "leading" in diffusers); trailing: evenly
    spaced and ending at T - 1 (Lin et al. 2024, table 2), so the first step starts from (almost) pure
    noise; quadratic: denser near t = 0 (Song et al. 2021, sec. D.2), made strictly increasing.
    """
    if not 1 <= steps <= timesteps:
        raise UserError(f"steps must be between 1 and the {timesteps} training timesteps, got {steps}")
    if spacing == "uniform":
        ascending = torch.arange(steps) * (timesteps // steps)
    elif spacing == "trailing":
        ascending = (torch.arange(timesteps, 0, -timesteps / steps, dtype=torch.float64).round() - 1).long().flip(0)
    elif spacing == "quadratic":
        ascending = (torch.linspace(0, 1, steps, dtype=torch.float64) ** 2 * (timesteps - 1)).round().long()
        for i in range(1, steps):  # the squares repeat near 0 when S is large: push them apart
            ascending[i] = max(ascending[i], ascending[i - 1] + 1)
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; choose uniform, trailing or quadratic")
    return ascending.flip(0)


def alpha_bars_at(schedule: NoiseSchedule, timesteps: Tensor, like: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """alpha_bar at each visited timestep and at the one after it (1 after the last), as 0-dim tensors."""
    alpha_bar = schedule.alpha_bar[timesteps.to(schedule.alpha_bar.device)].to(like)
    after = torch.cat([alpha_bar[1:], torch.ones_like(alpha_bar[:1])])
    return list(alpha_bar), list(after)


def log_snr_halves(alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """alpha, sigma and lambda = log(alpha / sigma) for one alpha_bar (lambda = inf at alpha_bar = 1)."""
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return alpha, sigma, alpha.log() - sigma.log()


def threshold_x0(x0: Tensor, threshold: Threshold) -> Tensor:
    """Keep a predicted x0 (B, ...) in the data range: clip to [-1, 1], or dynamic thresholding.

    Dynamic (Saharia et al. 2022, sec. 2.3): s = the 99.5th percentile of |x0| per image, at least 1; x0 is
    clipped to [-s, s] and divided by s, so saturated pixels are pushed inwards instead of piling up at +-1.
    """
    if threshold == "clip":
        return x0.clamp(-1, 1)
    if threshold == "dynamic":
        s = torch.quantile(x0.flatten(1).abs().float(), DYNAMIC_PERCENTILE, dim=1).to(x0).clamp(min=1)
        s = s.view(-1, *([1] * (x0.dim() - 1)))
        return torch.minimum(torch.maximum(x0, -s), s) / s
    return x0


def denoise(model: Denoiser, schedule: NoiseSchedule, x: Tensor, t: int, threshold: Threshold) -> tuple[Tensor, Tensor]:
    """The network's (x0, eps) at x_t; x0 thresholded, and eps made consistent with it."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x0, eps = schedule.to_x0_eps(x, t_batch, model(x, t_batch))
    if threshold != "none":
        x0 = threshold_x0(x0, threshold)
        eps = implied_noise(schedule, x, t, x0)
    return x0, eps


def implied_noise(schedule: NoiseSchedule, x: Tensor, t: int, x0: Tensor) -> Tensor:
    """The noise eps with x = a_t x0 + s_t eps: a (thresholded) x0's own noise estimate at x_t."""
    alpha_bar = schedule.alpha_bar[t].to(x)
    return (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def fresh_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
