"""Noise schedules and the closed-form maths of the forward process q(x_t | x_0)."""

import math
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_lit.errors import UserError

ScheduleName = Literal["cosine", "linear"]
Prediction = Literal["eps", "v", "x0"]


def cosine_betas(timesteps: int, s: float = 0.008, min_beta: float = 1e-4, max_beta: float = 0.9999) -> Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 eq. 17; betas clipped to [min_beta, max_beta], float64 (T,)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min_beta, max_beta)


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear schedule of Ho et al. 2020 (sec. 4), rescaled so that other T keep the same shape; float64 (T,)."""
    scale = 1000 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)


BETA_SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


def gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against `like`, in like's dtype."""
    return values[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule(nn.Module):
    """The forward process and its conversions, for one beta schedule and one prediction target.

    Every table is computed and kept in float64 as a non-persistent buffer, so `.to(device)` moves it and
    checkpoints never carry it; `gather` rounds it once to the dtype of the images it meets (float64
    sampling keeps full precision, which matters where alpha_bar = 2.4e-10 at t = 999 of the cosine schedule).
    Timesteps are 0-based: t = 0 is the first noising step.
    """

    def __init__(
        self, schedule: ScheduleName = "cosine", timesteps: int = 1000, prediction: Prediction = "eps"
    ) -> None:
        super().__init__()
        if schedule not in BETA_SCHEDULES:
            raise UserError(f"unknown schedule {schedule!r}; choose one of {sorted(BETA_SCHEDULES)}")
        if prediction not in ("eps", "v", "x0"):
            raise UserError(f"unknown prediction target {prediction!r}; choose eps, v or x0")
        self.timesteps = timesteps
        self.prediction = prediction
        betas = BETA_SCHEDULES[schedule](timesteps)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        tables = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
        }
        for name, values in tables.items():
            self.register_buffer(name, values, persistent=False)

    def sample_timesteps(self, batch_size: int, device: torch.device) -> Tensor:
        """Uniform random timesteps (B,) for training."""
        return torch.randint(0, self.timesteps, (batch_size,), device=device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar) x_0, (1 - alpha_bar) I); Ho et al. 2020 eq. 4."""
        return gather(self.sqrt_alpha_bar, t, x0) * x0 + gather(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output for this prediction type (v: Salimans & Ho 2022, sec. 4)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return gather(self.sqrt_alpha_bar, t, x0) * noise - gather(self.sqrt_one_minus_alpha_bar, t, x0) * x0

    def to_x0_eps(self, x_t: Tensor, t: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """The one conversion point: a network output of any prediction type -> (x0, eps)."""
        sqrt_ab = gather(self.sqrt_alpha_bar, t, x_t)
        sqrt_1m_ab = gather(self.sqrt_one_minus_alpha_bar, t, x_t)
        if self.prediction == "eps":
            eps = output
            x0 = (x_t - sqrt_1m_ab * eps) / sqrt_ab
        elif self.prediction == "x0":
            x0 = output
            eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab
        else:
            x0 = sqrt_ab * x_t - sqrt_1m_ab * output
            eps = sqrt_1m_ab * x_t + sqrt_ab * output
        return x0, eps


def posterior(x0: Tensor, x_t: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_prev | x_t, x0) between any two timesteps (alpha_bar_prev > alpha_bar).

    Ho et al. 2020 eq. 6-7 with beta = 1 - alpha_bar / alpha_bar_prev, the beta of a respaced schedule
    (Nichol & Dhariwal 2021, sec. 4); for neighbouring timesteps it is the schedule's own beta_t.
    """
    beta = 1 - alpha_bar / alpha_bar_prev
    mean = (alpha_bar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar)
    return mean, beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
