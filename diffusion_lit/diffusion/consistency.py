"""Consistency models on the DDPM schedule: the consistency function of a diffusion network, its training loss
(consistency tuning: Geng et al. 2024, "Consistency models made easy", ECT) and the multistep sampler (Song et
al. 2023, algorithm 1).

The mapping. The schedule's x_t = a_t x0 + s_t eps (a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t)) is,
in the variance-exploding coordinates y = x_t / a_t, y = x0 + sigma_t eps with sigma_t = s_t / a_t; the
probability-flow ODE carries y along sigma, and its end at sigma = 0 is the sample. A consistency function
f(x_t, t) maps every point of a trajectory to one point of it: here the point at the grid's smallest noise
level, sigma_min = sigma_0, so that f(x_0, 0) = y_0 exactly (Song et al. 2023, eq. 5, with the boundary at
t_min = 0). Built on the network's own x0 estimate x0_hat (`NoiseSchedule.to_x0_eps`, any prediction target):

    f(x_t, t) = y_t + (1 - sigma_min / sigma_t) (x0_hat - y_t) = c_skip(t) x_t + c_out(t) x0_hat,
    c_skip(t) = sigma_min / s_t,    c_out(t) = 1 - sigma_min / sigma_t.

At t = 0, c_out = 0 and f = x_0 / a_0 = y_0, whatever the network says. Above it f is the diffusion model's
denoiser x0_hat, moved towards the input by sigma_min / sigma_t (1% at sigma = 1; sigma_min = 0.01), so
a student initialised with the teacher's weights starts as the teacher's one-step denoiser (ECT's starting
point). For an eps network, x0_hat - y_t = -sigma_t eps_hat, so f = y_t - (sigma_t - sigma_min) eps_hat, the
c_skip = 1, c_out = -sigma of EDM's eps parameterisation shifted to sigma_min; c_skip is written on x_t, so
that nothing is divided by a_t, which is 1.5e-5 at t = 999.

Segments (Heek et al. 2024, "multistep consistency models"). A student of K segments maps x_t to the point of
its trajectory at the end e of t's segment (`segment_ends`: for K = 4, 749, 499, 249 or 0), with sigma_e in
place of sigma_min: f_e = y_e = x0_hat + sigma_e eps_hat, DDIM's step from t to e in y, exactly y_e at t = e.
Its K-step sampler walks the ends deterministically, each evaluation crossing 1/K of the trajectory.
"""

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_lit.diffusion.schedule import NoiseSchedule, gather
from diffusion_lit.errors import UserError, check_range


def sigmas(schedule: NoiseSchedule) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every t (T,), float64, increasing."""
    return schedule.sqrt_one_minus_alpha_bar / schedule.sqrt_alpha_bar


def scalings(schedule: NoiseSchedule, t: Tensor, like: Tensor, end: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """c_skip(t) (on x_t) and c_out(t) (on x0_hat), broadcastable against `like` (B, ...), for a map to the
    timestep `end` (B,) (None: 0, the grid's end; a later one for a multistep student, `segment_ends`)."""
    sigma = sigmas(schedule)
    t = t.to(sigma.device)
    sigma_end = sigma[torch.zeros_like(t) if end is None else end.to(sigma.device)]
    c_skip = sigma_end / schedule.sqrt_one_minus_alpha_bar[t]
    c_out = 1 - sigma_end / sigma[t]
    shape = (-1, *[1] * (like.dim() - 1))
    return c_skip.to(like).reshape(shape), c_out.to(like).reshape(shape)


def segment_boundaries(timesteps: int, segments: int, device=None) -> Tensor:
    """The ends of a K-segment student's segments (K,), increasing: 0 and the K-step sampler's later timesteps
    (the trailing spacing, e.g. 0, 249, 499, 749 for 4 segments of 1,000)."""
    ends = (torch.arange(1, segments, device=device) * timesteps / segments).round().long() - 1
    return torch.cat([torch.zeros(1, dtype=torch.long, device=device), ends])


def segment_ends(timesteps: int, segments: int, t: Tensor) -> Tensor:
    """For each t (B,), the end of its segment (B,): the largest of `segment_boundaries` below t (0 for t = 0).
    A student with K segments maps each x_t to the point of its trajectory at that end (Heek et al. 2024,
    "multistep consistency models"); with one segment, to the grid's end, t = 0."""
    ends = segment_boundaries(timesteps, segments, t.device)
    return ends[(torch.searchsorted(ends, t) - 1).clamp(min=0)]


def consistency(
    network, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, labels: tuple = (), end: Tensor | None = None
) -> Tensor:
    """f(x_t, t): the consistency function built on `network` (module docstring); x_t (B, ...), t (B,); with
    `end` (B,), the map to y_end = x_end / a_end on the trajectory rather than to y_0."""
    x0_hat, _ = schedule.to_x0_eps(x_t, t, network(x_t, t, *labels))
    c_skip, c_out = scalings(schedule, t, x_t, end)
    return c_skip * x_t + c_out * x0_hat


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """sqrt(|a - b|^2 + c^2) - c per sample (B,) (Song & Dhariwal 2024, "improved consistency training", sec. 3.3:
    c = 0.00054 sqrt(d) for d dimensions when None), in float32."""
    dims = a[0].numel()
    c = 0.00054 * math.sqrt(dims) if c is None else c
    return ((a.float() - b.float()).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def lognormal_timesteps(
    schedule: NoiseSchedule, batch_size: int, device, mean: float = -1.1, std: float = 2.0, generator=None
) -> Tensor:
    """Timesteps t (B,) whose sigma_t is the grid's nearest to ln sigma ~ N(mean, std^2) (ECT's sampling of noise
    levels, EDM's P_mean and P_std for CIFAR-10), never 0: t = 0 is the boundary, where f needs no training."""
    ln_sigma = torch.randn(batch_size, generator=generator, device=device) * std + mean
    grid = sigmas(schedule).log().to(device)
    t = torch.searchsorted(grid.float(), ln_sigma.float()).clamp(1, len(grid) - 1)
    nearer_below = (ln_sigma - grid[t - 1]).abs() < (grid[t] - ln_sigma).abs()
    return (t - nearer_below.long()).clamp(min=1)


def paired_timesteps(schedule: NoiseSchedule, t: Tensor, stage: int, q: float = 2.0) -> Tensor:
    """r < t for each t: the timestep whose sigma is nearest below sigma_t (1 - q^-stage), so the gap shrinks by q
    each stage (ECT's schedule of Delta t). At stage 0 r = -1, the clean image: the consistency loss is then the
    diffusion model's own denoising loss, where the teacher already is."""
    if stage == 0:
        return torch.full_like(t, -1)
    grid = sigmas(schedule).to(t.device)
    target = grid[t] * (1 - q ** (-stage))
    r = torch.searchsorted(grid, target, right=True) - 1  # the largest sigma_r <= the target
    return torch.minimum(r, t - 1)


def teacher_step(teacher, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, r: Tensor, labels: tuple = ()) -> Tensor:
    """x_r from x_t by one DDIM step of the teacher (the probability-flow ODE's Euler step in y = x / a, sigma):
    x_r = a_r x0_hat + s_r eps_hat with the teacher's (x0_hat, eps_hat) at (x_t, t); r < t, both (B,)."""
    x0_hat, eps_hat = schedule.to_x0_eps(x_t, t, teacher(x_t, t, *labels))
    a_r, s_r = gather(schedule.sqrt_alpha_bar, r, x_t), gather(schedule.sqrt_one_minus_alpha_bar, r, x_t)
    return a_r * x0_hat + s_r * eps_hat


class ConsistencyLoss:
    """Consistency training of a network initialised from a diffusion model, its teacher: for a noise level t and
    one below it, r, f(x_t, t) is pulled towards f(x_r, r) computed without gradient, by a pseudo-Huber distance
    weighted 1 / (sigma_t - sigma_r). The gap sigma_t - sigma_r shrinks by `q` every `steps_per_stage`
    optimizer steps (ECT's schedule, Geng et al. 2024). Both forward passes draw the same dropout noise.

    Where x_r comes from (`target`):
        "teacher": one DDIM step of the frozen teacher from x_t (consistency distillation, Song et al. 2023,
            sec. 4), starting at half the way down: the pairs follow the teacher's own ODE, the student learns
            its map to the end. `lit-ddpm distill` gives the loss its teacher (`teacher`).
        "data": the same image and noise at r (consistency tuning, ECT), starting at r = the clean image,
            where the loss is the diffusion model's denoising loss; no teacher network needed.
    At equal steps on the digits, "teacher" drew better samples at 1, 2 and 4 steps (docs/distillation.md).

    Returns {"consistency", "loss"}.

    Args:
        target: "teacher" or "data", above.
        steps_per_stage: optimizer steps per stage of the gap schedule (100: with 4 segments, best after 400
            steps, a quarter of the demo teacher's time; after 800 worse, with the gap at 1/256 of sigma_t, and
            with 200 per stage level with 400 steps: a run of another length wants about its length / 4;
            docs/distillation.md).
        q: the factor the gap shrinks by each stage.
        huber_c: pseudo-Huber's c; None: 0.00054 sqrt(dimensions) (Song & Dhariwal 2024).
        p_mean: mean of ln sigma for the noise levels drawn (1.0 measured best of -1.1, 0.5, 1.0, 2.0 on the
            digits; EDM has -1.1 for its denoiser on CIFAR-10).
        p_std: its standard deviation (ECT's 2.0).
        segments: K: the student maps x_t to the end of t's segment of the trajectory (`segment_ends`) and draws
            with K steps (Heek et al. 2024); 4: at 4 steps within 1.3x of its teacher's 20-step FID on the
            digits, where 1 segment's students were 1.7x; 1: to the end of the trajectory (Song et al.), a
            student that draws with any number of steps, the one for 1 or 2 (docs/distillation.md).
    """

    perceptual_weight = 0.0  # no VGG to load (DiffusionModule.setup asks)

    def __init__(
        self, target: Literal["teacher", "data"] = "teacher", steps_per_stage: int = 100, q: float = 2.0,
        huber_c: float | None = None, p_mean: float = 1.0, p_std: float = 2.0, segments: int = 4,
    ) -> None:  # fmt: skip
        if target not in ("teacher", "data"):
            raise UserError(f"ConsistencyLoss target must be 'teacher' or 'data', got {target!r}")
        check_range("ConsistencyLoss", 1, segments=segments, steps_per_stage=steps_per_stage)
        self.config = {name: value for name, value in locals().items() if name != "self"}  # for checkpoints
        self.target = target
        self.steps_per_stage = steps_per_stage
        self.q = q
        self.huber_c = huber_c
        self.p_mean = p_mean
        self.p_std = p_std
        self.segments = segments
        self.teacher = None  # the frozen teacher network on the student's device (InitFromTeacher), for "teacher"

    def __call__(
        self, network, schedule: NoiseSchedule, x0: Tensor, noise: Tensor | None = None, t: Tensor | None = None,
        labels: Tensor | None = None, step: int = 0,
    ) -> dict[str, Tensor]:  # fmt: skip
        """The loss for clean images x0 (B, C, H, W) at training step `step`; noise and t are drawn if not given."""
        noise = torch.randn_like(x0) if noise is None else noise
        if t is None:
            t = lognormal_timesteps(schedule, x0.shape[0], x0.device, self.p_mean, self.p_std)
        extra = () if labels is None else (labels,)
        stage = step // self.steps_per_stage
        x_t = schedule.q_sample(x0, t, noise)
        end = segment_ends(schedule.timesteps, self.segments, t)  # 0 for one segment
        if self.target == "teacher":
            if self.teacher is None:
                raise UserError("ConsistencyLoss(target='teacher') needs its teacher: run lit-ddpm distill --teacher")
            r = torch.maximum(paired_timesteps(schedule, t, stage + 1, self.q), end)  # never past the segment's end
            with torch.no_grad():
                x_r = teacher_step(self.teacher, schedule, x_t, t, r, extra).to(x_t.dtype)
        else:
            r = paired_timesteps(schedule, t, stage, self.q)
            r = torch.where(end > 0, torch.maximum(r, end), r)  # r = -1 (the clean image) stays in the last segment
            x_r = schedule.q_sample(x0, r.clamp(min=0), noise)
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # the online pass then redraws the same dropout
            target = consistency(network, schedule, x_r, r.clamp(min=0), extra, end)  # r = end: x_end / a_end
            target = torch.where((r < 0).view(-1, *[1] * (x0.dim() - 1)), x0, target)  # r = -1: the clean image
        online = consistency(network, schedule, x_t, t, extra, end)
        grid = sigmas(schedule).to(x0.device)
        gap = grid[t] - torch.where(r < 0, torch.zeros_like(grid[t]), grid[r.clamp(min=0)])
        loss = (pseudo_huber(online, target, self.huber_c) / gap.float()).mean()
        return {"consistency": loss, "loss": loss}
