import math

import pytest
import torch

from diffusion_lit.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas, posterior
from diffusion_lit.errors import UserError


def test_cosine_alpha_bar_matches_closed_form():
    # Nichol & Dhariwal 2021 eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi / 2).
    steps, s = 1000, 0.008
    alpha_bar = torch.cumprod(1 - cosine_betas(steps, min_beta=0.0), 0)  # unclipped below, so the formula holds
    f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 10, 100, 500, 900):  # t is 0-based: alpha_bar_t = f(t + 1) / f(0)
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    # The shipped clipping to [1e-4, 0.9999] only raises the first, tiny betas.
    unclipped, clipped = cosine_betas(steps, min_beta=0.0, max_beta=1.0), cosine_betas(steps)
    assert torch.equal(clipped, unclipped.clamp(1e-4, 0.9999))
    assert (clipped != unclipped).sum() == 13 + 1  # the first 13 betas and the last one


def test_cosine_betas_clipped_and_alpha_bar_decreasing():
    betas = cosine_betas(1000)
    assert betas.min().item() == pytest.approx(1e-4) and betas.max().item() == pytest.approx(0.9999)
    assert betas[-1].item() == pytest.approx(0.9999)  # the unclipped last beta is 1
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert alpha_bar[-1] < 1e-6


def test_linear_betas_endpoints():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), betas.diff()[0].expand(999))


def test_tables_are_non_persistent_float64_buffers():
    schedule = NoiseSchedule()
    assert schedule.state_dict() == {}
    assert schedule.alpha_bar.dtype == torch.float64 and len(schedule.alpha_bar) == 1000


def test_unknown_schedule_and_prediction_rejected():
    with pytest.raises(UserError, match="unknown schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(UserError, match="unknown prediction"):
        NoiseSchedule(prediction="score")


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_mean_and_variance(t):
    schedule = NoiseSchedule()
    x0 = torch.full((200_000,), 0.7)
    steps = torch.full((200_000,), t)
    x_t = schedule.q_sample(x0, steps, torch.randn_like(x0))
    alpha_bar = schedule.alpha_bar[t].item()
    assert x_t.mean().item() == pytest.approx(0.7 * math.sqrt(alpha_bar), abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - alpha_bar, rel=2e-2, abs=1e-6)


def test_posterior_matches_formula():
    # Ho et al. 2020 eq. 7, written out from betas with float64 arithmetic, for neighbouring timesteps.
    schedule = NoiseSchedule("linear")
    betas = linear_betas(1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    x0, x_t = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    t = torch.tensor([1, 2, 100, 500, 999])
    for i, step in enumerate(t.tolist()):
        mean, variance = posterior(x0[i], x_t[i], schedule.alpha_bar[step], schedule.alpha_bar[step - 1])
        ab, ab_prev, beta = alpha_bar[step], alpha_bar[step - 1], betas[step]
        expected_mean = ab_prev.sqrt() * beta / (1 - ab) * x0[i] + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t[i]
        expected_var = (1 - ab_prev) / (1 - ab) * beta
        assert torch.allclose(mean.float(), expected_mean.float(), atol=1e-5)
        assert variance.item() == pytest.approx(expected_var.item(), rel=1e-5)
    # At t = 0 (alpha_bar_prev = 1) the posterior mean is x0 itself.
    mean0, variance0 = posterior(x0, x_t, schedule.alpha_bar[0], torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(mean0.float(), x0, atol=1e-6) and variance0 == 0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_target_and_conversion_round_trip(prediction):
    schedule = NoiseSchedule(prediction=prediction)
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 300, 600, 900, 998])  # t = 999 (alpha_bar ~ 0) makes x0 unrecoverable from eps
    x_t = schedule.q_sample(x0, t, noise)
    x0_hat, eps_hat = schedule.to_x0_eps(x_t, t, schedule.target(x0, noise, t))
    assert torch.allclose(x0_hat, x0, atol=2e-3, rtol=1e-3)
    assert torch.allclose(eps_hat, noise, atol=2e-3, rtol=1e-3)


def test_v_target_closed_form():
    schedule = NoiseSchedule(prediction="v")
    x0, noise, t = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.tensor([0, 10, 500, 999])
    a = schedule.sqrt_alpha_bar[t].view(-1, 1, 1, 1).float()
    s = schedule.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1).float()
    assert torch.allclose(schedule.target(x0, noise, t), a * noise - s * x0)
