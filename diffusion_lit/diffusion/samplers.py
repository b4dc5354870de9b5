"""Samplers: each takes the network as an argument and never owns it.

Every sampler walks a decreasing subsequence of the training timesteps (`timestep_spacing`) and works
with any prediction target, through `NoiseSchedule.to_x0_eps`. The last step goes to alpha_bar = 1 (clean
images) and adds no noise. All arithmetic is in the dtype of the initial noise. `reverse_process` is the one
entry point; `sampling.Sampling` holds every setting of a draw."""

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lit.diffusion.consistency import consistency, segment_boundaries, segment_ends
from diffusion_lit.diffusion.sampling import CONSISTENCY_GAMMA, Sampling, Spacing, Threshold, Variance
from diffusion_lit.diffusion.schedule import NoiseSchedule, gather, posterior
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


def _alpha_bars(schedule: NoiseSchedule, timesteps: Tensor, like: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """alpha_bar at each visited timestep and at the one after it (1 after the last), as 0-dim tensors."""
    alpha_bar = schedule.alpha_bar[timesteps.to(schedule.alpha_bar.device)].to(like)
    after = torch.cat([alpha_bar[1:], torch.ones_like(alpha_bar[:1])])
    return list(alpha_bar), list(after)


def _log_snr_halves(alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def _denoise(
    model: Denoiser, schedule: NoiseSchedule, x: Tensor, t: int, threshold: Threshold
) -> tuple[Tensor, Tensor]:
    """The network's (x0, eps) at x_t; x0 thresholded, and eps made consistent with it."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x0, eps = schedule.to_x0_eps(x, t_batch, model(x, t_batch))
    if threshold != "none":
        x0 = threshold_x0(x0, threshold)
        eps = _implied_noise(schedule, x, t, x0)
    return x0, eps


def _implied_noise(schedule: NoiseSchedule, x: Tensor, t: int, x0: Tensor) -> Tensor:
    """The noise eps with x = a_t x0 + s_t eps: a (thresholded) x0's own noise estimate at x_t."""
    alpha_bar = schedule.alpha_bar[t].to(x)
    return (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


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
    alpha_bars, alpha_bars_prev = _alpha_bars(schedule, timesteps, x)
    for i, t in enumerate(timesteps.tolist()):
        x0, _ = _denoise(model, schedule, x, t, threshold)
        x, posterior_variance = posterior(x0, x, alpha_bars[i], alpha_bars_prev[i])
        if i < len(timesteps) - 1:
            var = posterior_variance if variance == "small" else 1 - alpha_bars[i] / alpha_bars_prev[i]
            x = x + var.sqrt() * _noise(x, generator)
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
    alpha_bars, alpha_bars_prev = _alpha_bars(schedule, timesteps, x)
    for i, t in enumerate(timesteps.tolist()):
        alpha_bar, alpha_bar_prev = alpha_bars[i], alpha_bars_prev[i]
        x0, eps = _denoise(model, schedule, x, t, threshold)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x = x + sigma * _noise(x, generator)
    return x


def dpmpp_2m(
    model: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    timesteps: Tensor,
    threshold: Threshold = "clip",
    generator: torch.Generator | None = None,
    sde: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2), or with `sde` its stochastic twin SDE-DPM-Solver++(2M)
    (Lu et al. 2022, appendix; diffusers' "sde-dpmsolver++"): multistep second order in lambda = log(alpha / sigma).

    Both use the same second-order data estimate D = x0 + (x0 - x0_prev) / (2 r). The SDE step shrinks x by a
    further e^-h and replaces that share of it with fresh noise, which washes out the errors of an imperfect
    model as ancestral sampling does (Karras et al. 2022, sec. 4). The first step is first order (no history
    yet) and so is the last, to sigma = 0, where the update is the data prediction itself (diffusers'
    `lower_order_final`).
    """
    alpha_bars, alpha_bars_next = _alpha_bars(schedule, timesteps, x)
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps.tolist()):
        x0, _ = _denoise(model, schedule, x, t, threshold)
        if i == len(timesteps) - 1:
            return x0
        _, sigma, lam = _log_snr_halves(alpha_bars[i])
        alpha_next, sigma_next, lam_next = _log_snr_halves(alpha_bars_next[i])
        h = lam_next - lam
        data = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
        if sde:
            x = (
                sigma_next / sigma * (-h).exp() * x
                - alpha_next * torch.expm1(-2 * h) * data
                + sigma_next * (-torch.expm1(-2 * h)).sqrt() * _noise(x, generator)
            )
        else:
            x = sigma_next / sigma * x - alpha_next * torch.expm1(-h) * data
        x0_prev, h_prev = x0, h
    return x


def _unipc_update(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None, r: Tensor | None, step: tuple[Tensor, ...], corrector: Tensor | None
) -> Tensor:
    """One UniPC update from (x at lambda_s, its x0) to lambda_t (Zhao et al. 2023, eq. 8 with B(h) = e^h - 1).

    step = (sigma_t / sigma_s, alpha_t, h). With the previous x0 at r = (lambda_prev - lambda_s) / h it is
    second order; the predictor UniP-2 then weighs the difference by 1/2, which makes it DPM-Solver++(2M).
    With `corrector`, the network's x0 at the predicted point, it is UniC: the weights solve the order
    conditions R rho = b over the nodes (r, 1) (or (1,) alone, with rho = 1/2).
    """
    sigma_ratio, alpha_t, h = step
    hh = -h  # the data-prediction form runs in -lambda
    phi_1 = torch.expm1(hh)  # h phi_1(h) = e^hh - 1, and also B(h) for "bh2"
    g1 = phi_1 / hh - 1  # b_k = k! phi_{k+1}(hh) / B(h)
    b1, b2 = g1 / phi_1, 2 * (g1 / hh - 0.5) / phi_1
    x = sigma_ratio * x - alpha_t * phi_1 * x0
    d_prev = None if x0_prev is None else (x0_prev - x0) / r
    if corrector is None:
        return x if d_prev is None else x - alpha_t * phi_1 * 0.5 * d_prev
    if d_prev is None:
        return x - alpha_t * phi_1 * 0.5 * (corrector - x0)
    rho_prev = (b1 - b2) / (1 - r)  # the 2x2 system [[1, 1], [r, 1]] (rho_prev, rho_new) = (b1, b2)
    return x - alpha_t * phi_1 * (rho_prev * d_prev + (b1 - rho_prev) * (corrector - x0))


def unipc(
    model: Denoiser, schedule: NoiseSchedule, x: Tensor, timesteps: Tensor, threshold: Threshold = "clip"
) -> Tensor:
    """UniPC-2 with B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, algorithms 1 and 2).

    Each step predicts with UniP (order 1 on the first step, 2 after it), and once the network has been
    evaluated at the predicted point, corrects that point with UniC at the predictor's order, from the same
    evaluation: one order more accuracy at no extra NFE. The last step returns the network's x0 there
    (a first-order step to sigma = 0, diffusers' `lower_order_final`).
    """
    alpha_bars, _ = _alpha_bars(schedule, timesteps, x)
    points = [_log_snr_halves(alpha_bar) for alpha_bar in alpha_bars]  # (alpha, sigma, lambda) at each step

    def step(i: int) -> tuple[Tensor, Tensor, Tensor]:  # from point i to point i + 1
        return points[i + 1][1] / points[i][1], points[i + 1][0], points[i + 1][2] - points[i][2]

    def ratio(i: int) -> Tensor | None:  # where point i - 1 lies, in units of the step from point i
        return None if i == 0 else (points[i - 1][2] - points[i][2]) / (points[i + 1][2] - points[i][2])

    x_prev = x0_prev = x0_older = None  # the corrected x and the x0 of the step before, and its x0 before that
    for i, t in enumerate(timesteps.tolist()):
        x0, _ = _denoise(model, schedule, x, t, threshold)
        if i == len(timesteps) - 1:
            return x0
        if i > 0:
            x = _unipc_update(x_prev, x0_prev, x0_older, ratio(i - 1), step(i - 1), corrector=x0)
        x_prev, x0_older, x0_prev = x, x0_prev, x0
        x = _unipc_update(x, x0, x0_older, ratio(i), step(i), corrector=None)
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
            noise = gamma * _noise(x, generator)
            if gamma < 1:  # the step's own noise estimate
                noise = noise + (1 - gamma**2) ** 0.5 * _implied_noise(schedule, x, int(timesteps[i]), x0)
            x = schedule.q_sample(x0, torch.full_like(t, following), noise)
        else:  # x_end, then forward to the following timestep (no noise when it is the end)
            ratio = schedule.alpha_bar[following].to(x) / schedule.alpha_bar[ends[i]].to(x)
            x = ratio.sqrt() * gather(schedule.sqrt_alpha_bar, end, x) * y
            if following > ends[i]:
                x = x + (1 - ratio).sqrt() * _noise(x, generator)
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
