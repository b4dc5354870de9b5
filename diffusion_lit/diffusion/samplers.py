"""Samplers: each takes the network as an argument and never owns it.

Every sampler walks a decreasing subsequence of the training timesteps (`steps.timestep_spacing`) and works
with any prediction target, through `NoiseSchedule.to_x0_eps`. The last step goes to alpha_bar = 1 (clean
images) and adds no noise. All arithmetic is in the dtype of the initial noise. `reverse_process` is the one
entry point; `sampling.Sampling` holds every setting of a draw. Here: ancestral DDPM, DDIM and the consistency
sampler; the multistep ODE solvers are in `solvers`."""

import torch
from torch import Tensor

from diffusion_lit.diffusion.consistency import consistency, segment_boundaries, segment_ends
from diffusion_lit.diffusion.sampling import CONSISTENCY_GAMMA, Sampling, Threshold, Variance
from diffusion_lit.diffusion.schedule import NoiseSchedule, gather, posterior
from diffusion_lit.diffusion.solvers import dpmpp_2m, unipc
from diffusion_lit.diffusion.steps import (
    Denoiser,
    alpha_bars_at,
    denoise,
    fresh_noise,
    implied_noise,
    threshold_x0,
    timestep_spacing,
)
from diffusion_lit.errors import UserError


def ddpm(
    model: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    timesteps: Tensor,
    variance: Variance = "small",
    threshold: Threshold = "clip",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, algorithm 2) on a respaced schedule (Nichol & Dhariwal 2021, sec. 4).

    Between visited timesteps the respaced beta is 1 - alpha_bar_t / alpha_bar_prev; variance "small" is
    the posterior's beta~ (Ho et al. 2020, eq. 7), "large" is beta itself.
    """
    alpha_bars, alpha_bars_prev = alpha_bars_at(schedule, timesteps, x)
    for i, t in enumerate(timesteps.tolist()):
        x0, _ = denoise(model, schedule, x, t, threshold)
        x, posterior_variance = posterior(x0, x, alpha_bars[i], alpha_bars_prev[i])
        if i < len(timesteps) - 1:
            var = posterior_variance if variance == "small" else 1 - alpha_bars[i] / alpha_bars_prev[i]
            x = x + var.sqrt() * fresh_noise(x, generator)
    return x


def ddim(
    model: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    timesteps: Tensor,
    eta: float = 0.0,
    threshold: Threshold = "clip",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 and 16): eta = 0 is deterministic, eta = 1 is ancestral DDPM."""
    alpha_bars, alpha_bars_prev = alpha_bars_at(schedule, timesteps, x)
    for i, t in enumerate(timesteps.tolist()):
        alpha_bar, alpha_bar_prev = alpha_bars[i], alpha_bars_prev[i]
        x0, eps = denoise(model, schedule, x, t, threshold)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x = x + sigma * fresh_noise(x, generator)
    return x


def consistency_multistep(
    model: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    timesteps: Tensor,
    threshold: Threshold = "clip",
    generator: torch.Generator | None = None,
    segments: int = 1,
    gamma: float = CONSISTENCY_GAMMA,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, algorithm 1) from x = x_T ~ N(0, I) at timesteps[0]:
    x0 = f(x, timesteps[0]) (`consistency.consistency`); then for each later t, x0 is noised back to x_t and
    mapped again. One network evaluation per step; for a model distilled by `lit-ddpm distill`, and, as a
    one-step denoiser at each step, for any diffusion model.

    x0 is noised back with gamma fresh noise z and the rest the noise the step implies, eps_hat = (x - a x0) / s
    at the step's own (x, t): sqrt(1 - gamma^2) eps_hat + gamma z (Kim et al. 2023, "consistency trajectory
    models", gamma-sampling). gamma = 1 is algorithm 1, right for an exact consistency function; 0 is DDIM's
    step with the model's x0. Students short of exact draw better in between (0.9, the default:
    docs/distillation.md).

    A student of K `segments` (Heek et al. 2024) maps x_t to the end e of t's segment (`segment_ends`) and draws
    with a multiple of K steps, which visit every end: from e the walk goes on deterministically when the next
    timestep is e (K steps), and with fresh noise from x_e up to the next timestep when that is later."""
    boundaries = set(segment_boundaries(schedule.timesteps, segments).tolist())
    if len(timesteps) % segments or not boundaries - {0} <= set(timesteps.tolist()):
        raise UserError(
            f"this student was distilled in {segments} segments: it draws with a multiple of {segments} steps at the "
            f"trailing spacing (--steps {segments}), not {len(timesteps)} steps at this spacing; for 1 or 2 steps, "
            "distill with --model.loss.segments 1"
        )
    ends = segment_ends(schedule.timesteps, segments, timesteps.to(x.device))
    for i, t in enumerate(timesteps.tolist()):
        t, end = torch.full((len(x),), t, device=x.device), ends[i].expand(len(x))
        y = consistency(model, schedule, x, t, (), end)  # x_end / a_end
        following = timesteps[i + 1].item() if i + 1 < len(timesteps) else None
        if ends[i] == 0:  # y is a clean image: Song et al.'s algorithm 1
            x0 = threshold_x0(y, threshold)
            if following is None:
                return x0
            noise = gamma * fresh_noise(x, generator)
            if gamma < 1:  # the step's own noise estimate
                noise = noise + (1 - gamma**2) ** 0.5 * implied_noise(schedule, x, int(timesteps[i]), x0)
            x = schedule.q_sample(x0, torch.full_like(t, following), noise)
        else:  # x_end, then forward to the following timestep (no noise when it is the end)
            ratio = schedule.alpha_bar[following].to(x) / schedule.alpha_bar[ends[i]].to(x)
            x = ratio.sqrt() * gather(schedule.sqrt_alpha_bar, end, x) * y
            if following > ends[i]:
                x = x + (1 - ratio).sqrt() * fresh_noise(x, generator)
    raise AssertionError("unreachable: the last step returns")


@torch.inference_mode()
def reverse_process(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    settings: Sampling = Sampling(),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    consistency_model: int = 0,
) -> Tensor:
    """Draw x_T ~ N(0, I) of `shape` and run the sampler `settings` name (guidance is the denoiser's business);
    "auto" picks the consistency sampler for a `consistency_model` (its number of segments; 0: a diffusion model)."""
    settings.check(schedule.timesteps)
    settings = settings.resolve(schedule.prediction, schedule.timesteps, consistency_model)
    timesteps = timestep_spacing(schedule.timesteps, settings.steps, settings.spacing)
    x = torch.randn(shape, generator=generator, device=device)
    name, threshold = settings.sampler, settings.threshold
    if name == "ddpm":
        return ddpm(model, schedule, x, timesteps, settings.variance, threshold, generator)
    if name == "ddim":
        return ddim(model, schedule, x, timesteps, settings.eta, threshold, generator)
    if name == "unipc":
        return unipc(model, schedule, x, timesteps, threshold)
    if name == "consistency":
        segments = max(consistency_model, 1)
        return consistency_multistep(model, schedule, x, timesteps, threshold, generator, segments, settings.gamma)
    return dpmpp_2m(model, schedule, x, timesteps, threshold, generator, sde=name == "dpmpp_sde")
