"""The multistep exponential-integrator solvers of the diffusion ODE (and its SDE twin): DPM-Solver++(2M)
(Lu et al. 2022) and UniPC (Zhao et al. 2023). Each takes the network as an argument; `samplers.reverse_process`
is the entry point."""

import torch
from torch import Tensor

from diffusion_lit.diffusion.sampling import Threshold
from diffusion_lit.diffusion.schedule import NoiseSchedule
from diffusion_lit.diffusion.steps import Denoiser, alpha_bars_at, denoise, fresh_noise, log_snr_halves


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
    alpha_bars, alpha_bars_next = alpha_bars_at(schedule, timesteps, x)
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps.tolist()):
        x0, _ = denoise(model, schedule, x, t, threshold)
        if i == len(timesteps) - 1:
            return x0
        _, sigma, lam = log_snr_halves(alpha_bars[i])
        alpha_next, sigma_next, lam_next = log_snr_halves(alpha_bars_next[i])
        h = lam_next - lam
        data = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
        if sde:
            x = (
                sigma_next / sigma * (-h).exp() * x
                - alpha_next * torch.expm1(-2 * h) * data
                + sigma_next * (-torch.expm1(-2 * h)).sqrt() * fresh_noise(x, generator)
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
    alpha_bars, _ = alpha_bars_at(schedule, timesteps, x)
    points = [log_snr_halves(alpha_bar) for alpha_bar in alpha_bars]  # (alpha, sigma, lambda) at each step

    def step(i: int) -> tuple[Tensor, Tensor, Tensor]:  # from point i to point i + 1
        return points[i + 1][1] / points[i][1], points[i + 1][0], points[i + 1][2] - points[i][2]

    def ratio(i: int) -> Tensor | None:  # where point i - 1 lies, in units of the step from point i
        return None if i == 0 else (points[i - 1][2] - points[i][2]) / (points[i + 1][2] - points[i][2])

    x_prev = x0_prev = x0_older = None  # the corrected x and the x0 of the step before, and its x0 before that
    for i, t in enumerate(timesteps.tolist()):
        x0, _ = denoise(model, schedule, x, t, threshold)
        if i == len(timesteps) - 1:
            return x0
        if i > 0:
            x = _unipc_update(x_prev, x0_prev, x0_older, ratio(i - 1), step(i - 1), corrector=x0)
        x_prev, x0_older, x0_prev = x, x0_prev, x0
        x = _unipc_update(x, x0, x0_older, ratio(i), step(i), corrector=None)
    return x
