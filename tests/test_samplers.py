import math

import pytest
import torch

from diffusion_lit.diffusion import NoiseSchedule, p_sample, p_sample_loop


def gaussian_denoiser(schedule: NoiseSchedule, data_std: float):
    """The exact eps-predictor for data ~ N(0, data_std^2): E[eps | x_t] = sqrt(1-ab) x_t / (ab s^2 + 1 - ab)."""

    def model(x_t, t):
        alpha_bar = schedule.alpha_bar[t].view(-1, *([1] * (x_t.dim() - 1)))
        return (1 - alpha_bar).sqrt() * x_t / (alpha_bar * data_std**2 + 1 - alpha_bar)

    return model


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ancestral_sampler_recovers_gaussian_data(variance):
    # With the exact denoiser the reverse chain must return samples of the data distribution.
    schedule = NoiseSchedule("linear", prediction="eps")
    data_std = 0.5
    generator = torch.Generator().manual_seed(0)
    x = p_sample_loop(
        gaussian_denoiser(schedule, data_std), schedule, (20_000, 1), variance, clip_x0=False, generator=generator
    )
    assert x.mean().item() == pytest.approx(0.0, abs=0.02)
    # The "large" variance is only exact as T -> inf; both must be close at T = 1000.
    assert x.std().item() == pytest.approx(data_std, rel=0.03 if variance == "small" else 0.06)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_point_mass_data_is_recovered_for_every_prediction(prediction):
    # Data = a single point c; the ideal network output follows from x_t in closed form for each target.
    schedule = NoiseSchedule("cosine", prediction=prediction)
    c = torch.tensor([0.3, -0.6])

    def model(x_t, t):
        a = schedule.sqrt_alpha_bar[t].view(-1, 1)
        s = schedule.sqrt_one_minus_alpha_bar[t].view(-1, 1)
        eps = (x_t - a * c) / s
        return schedule.target(c.expand_as(x_t), eps, t)

    x = p_sample_loop(model, schedule, (64, 2), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x, c.expand(64, 2), atol=1e-3)


def test_last_step_adds_no_noise_and_first_does():
    schedule = NoiseSchedule()
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.zeros(4, 3)
    zero = torch.zeros(4, dtype=torch.long)
    a = p_sample(model, schedule, x, zero, generator=torch.Generator().manual_seed(0))
    b = p_sample(model, schedule, x, zero, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    t = torch.full((4,), 500)
    c = p_sample(model, schedule, x, t, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(c, p_sample(model, schedule, x, t, generator=torch.Generator().manual_seed(1)))
    expected_std = math.exp(0.5 * schedule.posterior_log_variance[500].item())
    assert c.std().item() == pytest.approx(expected_std, rel=0.6)


def test_seeded_loop_is_deterministic_and_clipped():
    schedule = NoiseSchedule(timesteps=50)
    model = lambda x, t: -3 * x  # noqa: E731  (drives x0 far outside [-1, 1])
    first = p_sample_loop(model, schedule, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    second = p_sample_loop(model, schedule, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and first.shape == (2, 1, 4, 4)
    assert first.abs().max() <= 1.0 + 1e-5  # the last step's mean is the clipped x0 (its variance is 0)
