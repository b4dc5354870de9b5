"""Each sampler against the diffusers scheduler of the same name: same betas, same model outputs, same noise.

A fake network returns a fixed sequence of random outputs and records the x it is given, so both
implementations are compared at every step, in float64.
"""

import pytest
import torch

from diffusion_lit.diffusion import NoiseSchedule, timestep_spacing
from diffusion_lit.diffusion.samplers import ddim, ddpm
from diffusion_lit.diffusion.solvers import dpmpp_2m, unipc
from diffusion_lit.diffusion.steps import threshold_x0

schedulers = pytest.importorskip("diffusers.schedulers")

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SHAPE = (2, 3, 4, 4)


class ReplayModel:
    """Returns outputs[i] on its i-th call and records the x it was called with."""

    def __init__(self, steps: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.outputs = [torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(steps)]
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.inputs.append(x.clone())
        return self.outputs[len(self.inputs) - 1]


def run_diffusers(scheduler, model: ReplayModel, x: torch.Tensor, seed: int | None, **step_kwargs) -> torch.Tensor:
    if seed is not None:  # a stochastic scheduler
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, **step_kwargs).prev_sample
    return x


class InjectedNoise:
    """Hands diffusers' SDE step, as `variance_noise`, the noise our sampler draws: float64 draws of
    `generator` in step order (none on the last step, whose noise term is zero)."""

    def __init__(self, steps: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.noise = [torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(steps - 1)]
        self.noise.append(torch.zeros(SHAPE, dtype=torch.float64))

    def step(self, scheduler, model: ReplayModel, x: torch.Tensor) -> torch.Tensor:
        for t, noise in zip(scheduler.timesteps, self.noise, strict=True):
            x = scheduler.step(model(x, t), t, x, variance_noise=noise).prev_sample
        return x


def make_scheduler(cls, schedule: NoiseSchedule, prediction: str, **config):
    scheduler = cls(
        num_train_timesteps=schedule.timesteps,
        trained_betas=schedule.betas.double().numpy(),
        prediction_type=PREDICTION_TYPES[prediction],
        **config,
    )
    # The very same alpha_bar values as ours, in float64 so that diffusers' arithmetic is float64 too
    # (it would take the cumulative product, and 1 - alpha_bar, in float32).
    scheduler.alphas_cumprod = schedule.alpha_bar.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def assert_same_trajectory(ours: ReplayModel, theirs: ReplayModel, x_ours, x_theirs):
    # 1e-5, relative to |x| once |x| > 1: random eps outputs at t = 999 (alpha_bar = 2.4e-10 for the cosine
    # schedule) imply x0 predictions of size 1e4-1e5, and float64 keeps about 11 digits through them.
    assert len(ours.inputs) == len(theirs.inputs)
    for step, (a, b) in enumerate([*zip(ours.inputs, theirs.inputs, strict=True), (x_ours, x_theirs)]):
        bound = 1e-5 * max(1.0, b.abs().max().item())
        assert (a - b).abs().max() <= bound, f"x differs at step {step}: {(a - b).abs().max():.2e} > {bound:.1e}"


def assert_matches_diffusers(
    scheduler, spacing: str, steps: int, run_ours, final_is_mean: bool = False, inject: bool = False,
    deterministic: bool = False, **step,
):  # fmt: skip
    """Same timesteps, initial noise, replayed outputs and step noise (seed 2) through both; same x at every step.

    run_ours(model, noise, timesteps) -> x. With final_is_mean, the result is compared before the last
    step (diffusers adds noise on the last step too). With inject, diffusers is handed our step noise;
    a deterministic scheduler takes none.
    """
    timesteps = timestep_spacing(1000, steps, spacing)
    assert timesteps.tolist() == scheduler.timesteps.tolist()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, theirs = ReplayModel(steps), ReplayModel(steps)
    x_ours = run_ours(ours, noise, timesteps)
    if inject:
        x_theirs = InjectedNoise(steps, seed=2).step(scheduler, theirs, noise)
    else:
        x_theirs = run_diffusers(scheduler, theirs, noise, seed=None if deterministic else 2, **step)
    if final_is_mean:
        x_ours, x_theirs = ours.inputs[-1], theirs.inputs[-1]
    assert_same_trajectory(ours, theirs, x_ours, x_theirs)


DIFFUSERS_SPACING = {"uniform": "leading", "trailing": "trailing"}


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing,steps", [("uniform", 50), ("trailing", 50), ("trailing", 1000)])
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_matches_diffusers_ddpm_scheduler(prediction, spacing, steps, variance):
    schedule = NoiseSchedule("cosine", 1000, prediction)
    variance_type = {"small": "fixed_small", "large": "fixed_large"}[variance]
    scheduler = make_scheduler(
        schedulers.DDPMScheduler, schedule, prediction, clip_sample=False, variance_type=variance_type,
        timestep_spacing=DIFFUSERS_SPACING[spacing], steps_offset=0,
    )  # fmt: skip
    scheduler.set_timesteps(steps)

    def run_ours(model, noise, timesteps):
        return ddpm(model, schedule, noise, timesteps, variance, "none", torch.Generator().manual_seed(2))

    # diffusers adds beta_t-sized noise on the last step too with the large variance; we stop at the mean,
    # as Ho et al. do.
    assert_matches_diffusers(scheduler, spacing, steps, run_ours, final_is_mean=variance == "large")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing,steps", [("uniform", 20), ("trailing", 50), ("trailing", 10)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_ddim_scheduler(prediction, spacing, steps, eta):
    schedule = NoiseSchedule("cosine", 1000, prediction)
    scheduler = make_scheduler(
        schedulers.DDIMScheduler, schedule, prediction, clip_sample=False, set_alpha_to_one=True,
        timestep_spacing=DIFFUSERS_SPACING[spacing], steps_offset=0,
    )  # fmt: skip
    scheduler.set_timesteps(steps)

    def run_ours(model, noise, timesteps):
        return ddim(model, schedule, noise, timesteps, eta, "none", torch.Generator().manual_seed(2))

    assert_matches_diffusers(scheduler, spacing, steps, run_ours, eta=eta)


def float64_sigmas(scheduler, schedule: NoiseSchedule) -> None:
    """diffusers rounds its sigma table to float32; the same formula in float64 instead."""
    alpha_bar = schedule.alpha_bar[scheduler.timesteps]
    scheduler.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(prediction, steps, sde):
    schedule = NoiseSchedule("cosine", 1000, prediction)
    scheduler = make_scheduler(
        schedulers.DPMSolverMultistepScheduler, schedule, prediction,
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="trailing", steps_offset=0,
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    float64_sigmas(scheduler, schedule)

    def run_ours(model, noise, timesteps):
        return dpmpp_2m(model, schedule, noise, timesteps, "none", torch.Generator().manual_seed(2), sde=sde)

    assert_matches_diffusers(scheduler, "trailing", steps, run_ours, inject=sde)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("steps", [2, 3, 5, 10, 20, 50])
def test_unipc_matches_diffusers_unipc_multistep(prediction, steps):
    schedule = NoiseSchedule("cosine", 1000, prediction)
    scheduler = make_scheduler(
        schedulers.UniPCMultistepScheduler, schedule, prediction, solver_order=2, solver_type="bh2",
        predict_x0=True, lower_order_final=True, final_sigmas_type="zero", timestep_spacing="trailing",
        steps_offset=0,
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    float64_sigmas(scheduler, schedule)

    def run_ours(model, noise, timesteps):
        return unipc(model, schedule, noise, timesteps, "none")

    assert_matches_diffusers(scheduler, "trailing", steps, run_ours, deterministic=True)


@pytest.mark.parametrize("percentile_value", [0.2, 1.0, 3.0])
def test_dynamic_threshold_matches_diffusers(percentile_value):
    # diffusers' _threshold_sample with no upper bound on s is Saharia et al.'s dynamic thresholding.
    scheduler = schedulers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e9)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64) * percentile_value
    ours = threshold_x0(x0, "dynamic")
    assert torch.allclose(ours, scheduler._threshold_sample(x0), atol=1e-6)
    assert ours.abs().max() <= 1
    if percentile_value <= 0.25:  # the 99.5th percentile of |x0| is below 1: untouched
        assert torch.equal(ours, x0)
    else:
        assert not torch.equal(ours, x0)
