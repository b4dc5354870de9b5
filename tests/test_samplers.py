import pytest
import torch

from diffusion_lit.diffusion import NoiseSchedule, Sampling, reverse_process, timestep_spacing
from diffusion_lit.diffusion.samplers import ddim, ddpm
from diffusion_lit.diffusion.sampling import CONSISTENCY_GAMMA
from diffusion_lit.diffusion.steps import threshold_x0
from diffusion_lit.errors import UserError

SAMPLER_STEPS = [("ddpm", 1000), ("ddpm", 50), ("ddim", 20), ("dpmpp", 20), ("dpmpp_sde", 20), ("unipc", 10)]


def gaussian_denoiser(schedule: NoiseSchedule, data_std: float):
    """The exact eps-predictor for data ~ N(0, data_std^2): E[eps | x_t] = sqrt(1-ab) x_t / (ab s^2 + 1 - ab)."""

    def model(x_t, t):
        alpha_bar = schedule.alpha_bar[t].view(-1, *([1] * (x_t.dim() - 1))).to(x_t)
        return (1 - alpha_bar).sqrt() * x_t / (alpha_bar * data_std**2 + 1 - alpha_bar)

    return model


def point_mass_model(schedule: NoiseSchedule, c: torch.Tensor):
    """The ideal network output for data = the single point c, for the schedule's prediction target."""

    def model(x_t, t):
        a = schedule.sqrt_alpha_bar[t].view(-1, 1).to(x_t)
        s = schedule.sqrt_one_minus_alpha_bar[t].view(-1, 1).to(x_t)
        return schedule.target(c.expand_as(x_t), (x_t - a * c) / s, t)

    return model


# (sampler, steps, variance) -> relative error allowed on the std. Measured at T = 1000 with the cosine
# schedule and 20,000 samples: the bias of few-step samplers is real and known (DDIM-20 and ancestral
# DDPM-20 with the small variance come out too narrow), so each case gets a bound just above it.
GAUSSIAN_STD_TOLERANCE = {
    ("ddpm", 1000, "small"): 0.01,  # measured 0.2%
    ("ddpm", 1000, "large"): 0.01,  # 0.3%
    ("ddpm", 20, "small"): 0.16,  # 14%
    ("ddpm", 20, "large"): 0.05,  # 3%
    ("ddim", 20, "small"): 0.09,  # 7%
    ("dpmpp", 20, "small"): 0.01,  # 0.02%
    ("dpmpp_sde", 20, "small"): 0.04,  # 2.4% wide (3.5% with seed 1); 0.1-0.4% at 200 and 1000 steps
    ("unipc", 10, "small"): 0.04,  # 3.4% narrow
    ("unipc", 20, "small"): 0.01,  # 0.01%
}


@pytest.mark.parametrize("sampler,steps,variance", list(GAUSSIAN_STD_TOLERANCE))
def test_every_sampler_recovers_gaussian_data(sampler, steps, variance):
    # With the exact denoiser the reverse process must return samples of the data distribution.
    schedule = NoiseSchedule("cosine", prediction="eps")
    data_std = 0.5
    generator = torch.Generator().manual_seed(0)
    model = gaussian_denoiser(schedule, data_std)
    settings = Sampling(sampler, steps, variance=variance, threshold="none")
    x = reverse_process(model, schedule, (20_000, 1), settings, generator=generator)
    assert x.mean().item() == pytest.approx(0.0, abs=0.02)
    assert x.std().item() == pytest.approx(data_std, rel=GAUSSIAN_STD_TOLERANCE[sampler, steps, variance])


@pytest.mark.parametrize("sampler,steps", SAMPLER_STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_point_mass_data_is_recovered_for_every_sampler_and_prediction(sampler, steps, prediction):
    schedule = NoiseSchedule("cosine", prediction=prediction)
    c = torch.tensor([0.3, -0.6])
    generator = torch.Generator().manual_seed(1)
    x = reverse_process(point_mass_model(schedule, c), schedule, (64, 2), Sampling(sampler, steps), generator)
    assert torch.allclose(x, c.expand(64, 2), atol=1e-3)


@pytest.mark.parametrize("sampler,steps", SAMPLER_STEPS[1:])
def test_seeded_samplers_are_deterministic_and_clipped(sampler, steps):
    schedule = NoiseSchedule()
    model = lambda x, t: -3 * x  # noqa: E731  (drives x0 far outside [-1, 1])
    first, second, other = (
        reverse_process(model, schedule, (2, 1, 4, 4), Sampling(sampler, steps), torch.Generator().manual_seed(seed))
        for seed in (3, 3, 4)
    )
    assert torch.equal(first, second) and first.shape == (2, 1, 4, 4)
    assert not torch.equal(first, other)
    assert first.abs().max() <= 1.0 + 1e-5  # the last step returns (a mean around) the clipped x0


def test_ddim_eta_zero_is_deterministic_given_the_noise_and_eta_one_is_not():
    schedule = NoiseSchedule(timesteps=100)
    model = gaussian_denoiser(schedule, 0.5)
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    timesteps = timestep_spacing(100, 10)
    runs = [ddim(model, schedule, noise, timesteps, 0.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(*runs)
    runs = [ddim(model, schedule, noise, timesteps, 1.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.allclose(*runs)


@pytest.mark.parametrize("steps", [1000, 25])
def test_ddim_eta_one_is_ancestral_ddpm(steps):
    # With eta = 1, DDIM's sigma is the posterior's and its mean the posterior mean (Song et al. 2021, eq. 16):
    # given the same noise the two samplers follow the same trajectory.
    schedule = NoiseSchedule(timesteps=1000)
    model = gaussian_denoiser(schedule, 0.5)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    timesteps = timestep_spacing(1000, steps)
    a = ddim(model, schedule, noise, timesteps, 1.0, "none", generator=torch.Generator().manual_seed(5))
    b = ddpm(model, schedule, noise, timesteps, "small", "none", generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "quadratic"])
@pytest.mark.parametrize("steps", [1, 7, 20, 333, 999, 1000])
def test_timestep_spacing_is_strictly_decreasing_and_in_range(spacing, steps):
    t = timestep_spacing(1000, steps, spacing)
    assert t.shape == (steps,) and t.dtype == torch.long
    assert t.min() >= 0 and t.max() <= 999
    assert bool((t[:-1] > t[1:]).all())


def test_timestep_spacing_values():
    assert timestep_spacing(1000, 4, "uniform").tolist() == [750, 500, 250, 0]
    assert timestep_spacing(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert timestep_spacing(1000, 1000, "trailing").tolist() == list(range(999, -1, -1))
    assert timestep_spacing(100, 3, "quadratic").tolist() == [99, 25, 0]


def test_bad_sampler_settings_are_refused():
    schedule = NoiseSchedule(timesteps=10)
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(UserError, match="unknown sampler 'euler'"):
        reverse_process(model, schedule, (1, 1), Sampling("euler"))
    with pytest.raises(UserError, match="steps must be between 1 and the model's 10"):
        reverse_process(model, schedule, (1, 1), Sampling("ddim", steps=11))
    with pytest.raises(UserError, match="eta is a DDIM setting"):
        reverse_process(model, schedule, (1, 1), Sampling("dpmpp", steps=5, eta=0.5))
    with pytest.raises(UserError, match="unknown threshold 'soft'"):
        reverse_process(model, schedule, (1, 1), Sampling("ddim", steps=5, threshold="soft"))
    with pytest.raises(UserError, match="gamma is the consistency sampler's share of fresh noise, between 0 and 1"):
        reverse_process(model, schedule, (1, 1), Sampling("consistency", steps=2, gamma=1.5))
    with pytest.raises(UserError, match="got 0.5 for the ddim sampler"):
        reverse_process(model, schedule, (1, 1), Sampling("ddim", steps=5, gamma=0.5))
    with pytest.raises(UserError, match="this model draws with ddpm: drop gamma"):  # auto, on a diffusion model
        reverse_process(model, NoiseSchedule(prediction="v"), (1, 1), Sampling(gamma=0.5))
    with pytest.raises(UserError, match="unknown timestep spacing"):
        timestep_spacing(10, 5, "cubic")


def test_ddpm_step_without_respacing_is_the_textbook_posterior_step():
    # From t = 30 to 29 the respaced step must equal the textbook posterior mean and beta~_t.
    schedule = NoiseSchedule(timesteps=50)
    x0 = torch.full((4, 1), 0.25)
    inputs = []

    def model(x, t):  # records what it sees, so the second call shows the result of the first step
        inputs.append(x)
        return point_mass_model(schedule, x0[0])(x, t)

    x_t = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
    ddpm(model, schedule, x_t, torch.tensor([30, 29]), generator=torch.Generator().manual_seed(9))
    # Ho et al. 2020 eq. 7 from the schedule's own betas.
    alpha_bar = torch.cumprod(1 - schedule.betas, 0)
    beta, ab, ab_prev = schedule.betas[30], alpha_bar[30], alpha_bar[29]
    mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x_t) / (1 - ab)
    variance = beta * (1 - ab_prev) / (1 - ab)
    noise = torch.randn(4, 1, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(inputs[1], (mean + variance.sqrt() * noise).float(), atol=1e-6)


def test_thresholds_keep_x0_in_range_and_dynamic_rescales_instead_of_saturating():
    x0 = torch.tensor([[0.5, -0.5, 0.9, -0.2] * 50, [3.0, -1.5, 0.5, 0.25] * 50])  # (2, 200)
    assert torch.equal(threshold_x0(x0, "none"), x0)
    assert torch.equal(threshold_x0(x0, "clip"), x0.clamp(-1, 1))
    dynamic = threshold_x0(x0, "dynamic")
    assert torch.equal(dynamic[0], x0[0])  # the 99.5th percentile of |x0| is below 1: nothing to do
    assert torch.allclose(dynamic[1], x0[1] / 3.0)  # s = 3: the whole image is divided, nothing saturates
    assert (dynamic[1] == 1.0).sum() == 50 and (x0[1].clamp(-1, 1).abs() == 1.0).sum() == 100


def test_sampling_settings_name_their_files():
    assert Sampling("dpmpp_sde", 20).name == "dpmpp_sde20"
    assert Sampling("ddim", 50, eta=0.5, threshold="dynamic").name == "ddim50-eta0.5-dynamic"
    assert Sampling("ddpm").resolve("eps", 1000).name == "ddpm50"  # a named sampler without steps: 50
    assert Sampling(steps=4).resolve("v", 1000, consistency_model=1).name == "consistency4"  # the default gamma
    assert Sampling("consistency", 2, gamma=0.5).name == "consistency2-gamma0.5"


def test_auto_sampling_follows_the_prediction_target_and_fits_the_model():
    assert Sampling().resolve("eps", 1000) == Sampling("ddpm", 50)
    assert Sampling().resolve("x0", 1000) == Sampling("dpmpp_sde", 50)
    assert Sampling().resolve("v", 1000) == Sampling("ddpm", 50)
    assert Sampling().resolve("eps", 20).steps == 20  # a model with fewer timesteps samples all of them
    assert Sampling(steps=30).resolve("v", 1000) == Sampling("ddpm", 30)
    assert Sampling("ddim", 7, eta=0.5).resolve("v", 1000) == Sampling("ddim", 7, eta=0.5)  # explicit: kept
    # a student: the consistency sampler, as many steps as segments (2 for one), gamma made concrete
    assert Sampling().resolve("v", 1000, consistency_model=1) == Sampling("consistency", 2, gamma=CONSISTENCY_GAMMA)
    assert Sampling(gamma=0.3).resolve("eps", 1000, consistency_model=4) == Sampling("consistency", 4, gamma=0.3)
    with pytest.raises(UserError, match="steps must be between 1 and the model's 20 timesteps, got 30"):
        Sampling(steps=30).check(20)
