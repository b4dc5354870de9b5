"""The consistency function on the DDPM schedule, its loss and its sampler, against closed forms."""

import math

import pytest
import torch
from test_samplers import gaussian_denoiser

from diffusion_lit.diffusion import NoiseSchedule, timestep_spacing
from diffusion_lit.diffusion.consistency import (
    ConsistencyLoss,
    consistency,
    lognormal_timesteps,
    paired_timesteps,
    pseudo_huber,
    scalings,
    segment_ends,
    sigmas,
    teacher_step,
)
from diffusion_lit.diffusion.samplers import consistency_multistep
from diffusion_lit.diffusion.solvers import dpmpp_2m
from diffusion_lit.errors import UserError


def random_network(seed: int = 0):
    weights = torch.randn(4, generator=torch.Generator().manual_seed(seed)).double()
    return lambda x, t: torch.tanh(x * weights[0] + weights[1]) * 3 + t.view(-1, 1).double() * 1e-3


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_the_boundary_holds_exactly_whatever_the_network_says(prediction):
    schedule = NoiseSchedule(prediction=prediction)
    x = torch.randn(16, 5, dtype=torch.float64)
    t = torch.zeros(16, dtype=torch.long)
    expected = x / schedule.sqrt_alpha_bar[0]  # y_0 = x_0 / a_0, the grid's least noisy point
    torch.testing.assert_close(consistency(random_network(), schedule, x, t), expected, rtol=1e-15, atol=0)


def test_the_scalings_against_their_closed_forms():
    schedule = NoiseSchedule()
    t = torch.arange(1000)
    alpha_bar = schedule.alpha_bar
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    c_skip, c_out = scalings(schedule, t, torch.zeros(1000, 1, dtype=torch.float64))
    torch.testing.assert_close(c_skip[:, 0], sigma[0] / (1 - alpha_bar).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(c_out[:, 0], 1 - sigma[0] / sigma, rtol=1e-12, atol=1e-15)
    assert c_out[0, 0] == 0 and c_out[999, 0] == pytest.approx(1, abs=1e-6) and torch.all(c_out[1:, 0] > 0)
    assert torch.all(sigmas(schedule).diff() > 0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_consistency_function_in_the_terms_of_each_prediction_target(prediction):
    # eps: f = y - (sigma_t - sigma_min) eps_hat; v: f = y - (sigma_t - sigma_min) (sigma y + v_hat) / (1 + sigma^2)
    # ... (1 + sigma^2)^(1/2) written out: the mapping of the module docstring, per target.
    schedule = NoiseSchedule(prediction=prediction)
    x = torch.randn(50, 3, dtype=torch.float64)
    t = torch.randint(0, 1000, (50,))
    output = random_network(1)(x, t)
    a = schedule.sqrt_alpha_bar[t].view(-1, 1)
    sigma, sigma_min = sigmas(schedule)[t].view(-1, 1), sigmas(schedule)[0]
    y = x / a
    if prediction == "eps":
        expected = y - (sigma - sigma_min) * output
    else:
        expected = y - (sigma - sigma_min) * (sigma * y + output * (1 + sigma**2).sqrt()) / (1 + sigma**2)
    torch.testing.assert_close(consistency(lambda *_: output, schedule, x, t), expected, rtol=1e-9, atol=1e-9)


MEAN, STD = 0.3, 0.5  # 1-d Gaussian data


def exact_endpoint(schedule: NoiseSchedule, x_t, t, sigma_end=None):
    """Where the probability-flow ODE from (x_t, t) is at sigma_end (default sigma_min), in y = x / a, for data
    N(MEAN, STD^2): the marginal of y is N(MEAN, STD^2 + sigma^2), and the flow keeps the standardised value
    (y - MEAN) / sqrt(STD^2 + sigma^2)."""
    sigma = sigmas(schedule)[t].view(-1, 1)
    sigma_end = sigmas(schedule)[0] if sigma_end is None else sigma_end
    y = x_t / schedule.sqrt_alpha_bar[t].view(-1, 1)
    return MEAN + (y - MEAN) * ((STD**2 + torch.as_tensor(sigma_end) ** 2) / (STD**2 + sigma**2)).sqrt()


def test_the_closed_form_endpoint_is_where_the_exact_denoisers_ode_ends():
    # Integrate the probability-flow ODE with the exact denoiser (DPM-Solver++(2M) through every timestep; its
    # last step, to sigma = 0, is first order) from t = 500 to the clean end: the closed form at sigma = 0, up to
    # the solver's error (DDIM, first order throughout, is off by 3.6e-3; this by 3.7e-4).
    schedule = NoiseSchedule(prediction="eps")
    centred = gaussian_denoiser(schedule, STD)  # the exact eps of zero-mean data; shift by MEAN

    def model(x_t, t):
        return centred(x_t - schedule.sqrt_alpha_bar[t].view(-1, 1) * MEAN, t)

    x = torch.randn(2000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = torch.full((2000,), 500)
    timesteps = torch.arange(500, -1, -1)
    x_end = dpmpp_2m(model, schedule, x, timesteps, "none")  # its last step goes to sigma = 0
    torch.testing.assert_close(x_end, exact_endpoint(schedule, x, start, sigma_end=0.0), rtol=0, atol=1e-3)


def exact_segment_network(schedule: NoiseSchedule, segments: int):
    """An x0-predicting network whose K-segment consistency function is exact: f(x_t, t) = exact_endpoint at the
    sigma of t's segment end."""

    def network(x_t, t):
        end = segment_ends(1000, segments, t)
        c_skip, c_out = scalings(schedule, t, x_t, end)
        exact = exact_endpoint(schedule, x_t, t, sigmas(schedule)[end].view(-1, 1))
        return (exact - c_skip * x_t) / torch.where(c_out > 0, c_out, 1)

    return network


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_sampler_with_the_exact_consistency_function_draws_the_data(steps):
    # With fresh noise (gamma = 1, Song et al.'s algorithm 1) every step draws from the data's distribution.
    schedule = NoiseSchedule(prediction="x0")
    x = torch.randn(40_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    samples = consistency_multistep(exact_segment_network(schedule, 1), schedule, x, timestep_spacing(1000, steps),
                                    "none", torch.Generator().manual_seed(2), gamma=1.0)  # fmt: skip
    assert samples.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert samples.std().item() == pytest.approx(STD, rel=0.01)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_re_noising_with_part_of_the_steps_own_noise_against_its_closed_form(gamma):
    # Two steps, 999 then 499, of the exact consistency function on N(MEAN, STD^2) data, re-noising with
    # sqrt(1 - gamma^2) eps_hat + gamma z. Every map is affine in (x_T, z), so the samples are Gaussian with a
    # mean and standard deviation that follow from the maps' coefficients. With gamma < 1, eps_hat is a function
    # of the first step's x0, so the second step's input is not distributed as x_499 is: the exact model's samples
    # spread too wide (gamma 0: 1.33 STD), the price of the help imperfect students get (docs/distillation.md).
    schedule = NoiseSchedule(prediction="x0")
    a, s = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
    k = ((STD**2 + sigmas(schedule)[0] ** 2) / (STD**2 + sigmas(schedule) ** 2)).sqrt()  # exact_endpoint's slope in y
    # x0 = c0 + c1 x_T; eps_hat = (x_T - a_T x0) / s_T = e0 + e1 x_T; x_499 = a x0 + s (sqrt(1-g^2) eps_hat + g z)
    c0, c1 = MEAN * (1 - k[999]), k[999] / a[999]
    e0, e1 = -a[999] * c0 / s[999], (1 - a[999] * c1) / s[999]
    keep = (1 - gamma**2) ** 0.5
    mean_499 = a[499] * c0 + s[499] * keep * e0
    slope_499, fresh_499 = a[499] * c1 + s[499] * keep * e1, s[499] * gamma
    mean = MEAN + (mean_499 / a[499] - MEAN) * k[499]
    std = (slope_499**2 + fresh_499**2).sqrt() * k[499] / a[499]
    x = torch.randn(200_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    samples = consistency_multistep(exact_segment_network(schedule, 1), schedule, x, timestep_spacing(1000, 2),
                                    "none", torch.Generator().manual_seed(2), gamma=gamma)  # fmt: skip
    assert samples.mean().item() == pytest.approx(mean.item(), abs=0.005)
    assert samples.std().item() == pytest.approx(std.item(), rel=0.005)
    assert (std.item() > STD * 1.01) and (gamma > 0 or std.item() == pytest.approx(1.33 * STD, rel=0.01))


def test_with_gamma_zero_the_second_step_starts_where_ddim_goes_with_the_models_x0():
    # gamma = 0 draws no randomness: from x_999 the model's clean image x0 and the noise it implies take x to
    # a_499 x0 + s_499 eps_hat, DDIM's step, which the second evaluation maps.
    schedule = NoiseSchedule(prediction="x0")
    seen = []

    def network(x_t, t):
        seen.append(x_t)
        return random_network()(x_t, t)

    x = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    first = consistency_multistep(network, schedule, x, timestep_spacing(1000, 2), "none", None, gamma=0.0)
    again = consistency_multistep(network, schedule, x, timestep_spacing(1000, 2), "none", None, gamma=0.0)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    x0 = consistency(random_network(), schedule, x, torch.full((8,), 999))
    eps_hat = (x - schedule.sqrt_alpha_bar[999] * x0) / schedule.sqrt_one_minus_alpha_bar[999]
    ddim_step = schedule.sqrt_alpha_bar[499] * x0 + schedule.sqrt_one_minus_alpha_bar[499] * eps_hat
    torch.testing.assert_close(seen[1], ddim_step, rtol=1e-12, atol=1e-12)


def test_segment_ends_are_the_samplers_later_timesteps():
    t = torch.arange(1000)
    torch.testing.assert_close(segment_ends(1000, 1, t), torch.zeros(1000, dtype=torch.long))
    two = segment_ends(1000, 2, t)
    assert torch.all(two[:500] == 0) and torch.all(two[500:] == 499)  # t = 499 itself maps onward, to 0
    four = segment_ends(1000, 4, t)
    for ends, start in ((four, 999), (two, 999)):
        later = timestep_spacing(1000, len(ends.unique()))[1:].tolist()
        assert sorted(ends.unique().tolist()) == sorted([0, *later]) and ends[start] == max(later, default=0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_a_segment_map_is_the_identity_at_its_end_and_ddim_to_the_end_above_it(prediction):
    # f(x_t, t) with end e is y_e = x0_hat + sigma_e eps_hat: DDIM's step from t to e in y = x / a; at t = e it is
    # x_e / a_e whatever the network says.
    schedule = NoiseSchedule(prediction=prediction)
    x = torch.randn(16, 5, dtype=torch.float64)
    end = torch.full((16,), 499)
    torch.testing.assert_close(consistency(random_network(), schedule, x, end, (), end),
                               x / schedule.sqrt_alpha_bar[499], rtol=1e-14, atol=0)  # fmt: skip
    t = torch.randint(500, 1000, (16,))
    x0_hat, eps_hat = schedule.to_x0_eps(x, t, random_network()(x, t))
    ddim = x0_hat + sigmas(schedule)[499] * eps_hat
    torch.testing.assert_close(consistency(random_network(), schedule, x, t, (), end), ddim, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("segments", "steps"), [(2, 2), (4, 4), (2, 4), (4, 8)])
def test_a_multistep_student_with_the_exact_maps_draws_the_data(segments, steps):
    # K steps of a K-segment student walk the exact ODE deterministically; a multiple of K re-noises inside a
    # segment and still draws the data.
    schedule = NoiseSchedule(prediction="x0")
    x = torch.randn(40_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    samples = consistency_multistep(exact_segment_network(schedule, segments), schedule, x,
                                    timestep_spacing(1000, steps), "none", torch.Generator().manual_seed(2),
                                    segments, gamma=1.0)  # fmt: skip
    assert samples.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert samples.std().item() == pytest.approx(STD, rel=0.01)
    if steps == segments:  # deterministic: each sample is the ODE's end from its own noise
        torch.testing.assert_close(samples, exact_endpoint(schedule, x, torch.full((40_000,), 999)),
                                   rtol=0, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(("steps", "spacing"), [(2, "trailing"), (6, "trailing"), (4, "uniform")])
def test_a_multistep_student_refuses_steps_that_miss_its_segment_ends(steps, spacing):
    schedule = NoiseSchedule(prediction="x0")
    with pytest.raises(UserError, match="distilled in 4 segments: it draws with a multiple of 4 steps"):
        consistency_multistep(exact_segment_network(schedule, 4), schedule, torch.randn(2, 1, dtype=torch.float64),
                              timestep_spacing(1000, steps, spacing), "none", None, 4)  # fmt: skip


def test_paired_timesteps_shrink_the_gap_by_q_per_stage():
    schedule = NoiseSchedule()
    grid = sigmas(schedule)
    t = torch.arange(1, 1000)
    assert torch.all(paired_timesteps(schedule, t, 0) == -1)  # stage 0: down to the clean image
    for stage in (1, 2, 5):
        r = paired_timesteps(schedule, t, stage)
        assert torch.all(r < t)
        target = grid[t] * (1 - 2.0**-stage)
        below = r >= 0
        assert torch.all(grid[r[below]] <= target[below] * (1 + 1e-12))
        nxt = (r + 1).clamp(max=999)
        assert torch.all((grid[nxt] > target) | (nxt >= t))  # r is the largest such index below t


def test_lognormal_timesteps_are_the_nearest_grid_points_and_never_the_boundary():
    schedule = NoiseSchedule()
    generator = torch.Generator().manual_seed(0)
    t = lognormal_timesteps(schedule, 5000, "cpu", generator=generator)
    ln_sigma = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.1
    nearest = (sigmas(schedule).log().view(1, -1) - ln_sigma.view(-1, 1).double()).abs().argmin(1).clamp(min=1)
    assert torch.equal(t, nearest) and t.min() >= 1


def test_pseudo_huber_against_its_formula():
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    c = 0.00054 * math.sqrt(32)
    expected = ((a - b).pow(2).flatten(1).sum(1) + c**2).sqrt() - c
    torch.testing.assert_close(pseudo_huber(a, b), expected)
    assert torch.all(pseudo_huber(a, a) == 0)


def test_at_stage_zero_the_loss_is_the_distance_to_the_clean_image_and_both_passes_share_dropout():
    schedule = NoiseSchedule(prediction="eps")
    masks = []
    dropout = torch.nn.Dropout(0.5)

    def network(x_t, t):
        mask = dropout(torch.ones_like(x_t))
        masks.append(mask)
        return x_t * mask

    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.randint(1, 1000, (8,))
    terms = ConsistencyLoss(target="data", huber_c=0.01, segments=1)(network, schedule, x0, noise, t, step=0)
    online = consistency(lambda *_: masks[1] * schedule.q_sample(x0, t, noise), schedule,
                         schedule.q_sample(x0, t, noise), t)  # fmt: skip
    expected = ((online - x0).pow(2).flatten(1).sum(1) + 1e-4).sqrt() - 0.01
    torch.testing.assert_close(terms["loss"], (expected / sigmas(schedule)[t].float()).mean(), rtol=1e-5, atol=0)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1]) and 0 < masks[0].mean() < 2


def shifted_gaussian_eps(schedule: NoiseSchedule):
    """The exact eps of data N(MEAN, STD^2), for an eps-predicting schedule."""
    centred = gaussian_denoiser(schedule, STD)
    return lambda x_t, t: centred(x_t - schedule.sqrt_alpha_bar[t].view(-1, 1) * MEAN, t)


def test_the_teachers_step_follows_the_exact_ode_to_second_order_in_the_gap():
    # One DDIM step of the exact denoiser lands on the exact flow (closed form) up to O(gap^2): 2e-6 over one
    # grid step, 100x more over a 10x larger step, and far off over half the way down.
    schedule = NoiseSchedule(prediction="eps")
    x_t = torch.randn(500, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.full((500,), 600)
    errors = []
    for r in (599, 590, 300):
        exact = exact_endpoint(schedule, x_t, t, sigma_end=sigmas(schedule)[r].item()) * schedule.sqrt_alpha_bar[r]
        step = teacher_step(shifted_gaussian_eps(schedule), schedule, x_t, t, torch.full((500,), r))
        errors.append((step - exact).abs().max().item())
    assert errors[0] < 1e-5 and 30 < errors[1] / errors[0] < 300 and errors[2] > 1e-2


@pytest.mark.parametrize("segments", [1, 2])
def test_with_the_teacher_target_the_exact_consistency_function_has_almost_no_loss_and_a_wrong_one_has_some(segments):
    # Gaussian data, the exact denoiser as the teacher: the exact consistency function's loss is only the
    # teacher step's error, small once the gap is small (stage 9: 1/512 of sigma_t); a network that drifts along
    # the trajectory by 0.01% per timestep has a loss 30x larger (87x today).
    schedule = NoiseSchedule(prediction="x0")
    eps = shifted_gaussian_eps(schedule)
    a, s = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(4000, 1, dtype=torch.float64, generator=generator) * STD + MEAN
    noise = torch.randn(4000, 1, dtype=torch.float64, generator=generator)
    t = torch.randint(1, 1000, (4000,), generator=generator)
    loss = ConsistencyLoss(steps_per_stage=1, huber_c=1e-6, segments=segments)
    loss.teacher = lambda x_t, t: (x_t - s[t].view(-1, 1) * eps(x_t, t)) / a[t].view(-1, 1)  # the loss only calls it
    exact = exact_segment_network(schedule, segments)

    def wrong(x_t, t):  # not constant along a trajectory: 10% more at t = 999 than at t = 0
        return exact(x_t, t) * (1 + t.view(-1, 1) / 10_000)

    right = loss(exact, schedule, x0, noise, t, step=8)["loss"].item()
    assert right < 1e-3 and loss(wrong, schedule, x0, noise, t, step=8)["loss"].item() > 30 * right


def test_the_teacher_target_pairs_half_the_way_down_at_the_first_stage_and_needs_a_teacher():
    schedule = NoiseSchedule(prediction="eps")
    calls = []

    def network(x_t, t):
        calls.append(t.clone())
        return torch.zeros_like(x_t)

    loss = ConsistencyLoss(steps_per_stage=10, segments=1)
    x0, t = torch.zeros(6, 1, 2, 2), torch.tensor([100, 300, 500, 700, 900, 999])
    with pytest.raises(Exception, match="needs its teacher"):
        loss(network, schedule, x0, torch.randn_like(x0), t, step=0)
    loss.teacher = network
    loss(network, schedule, x0, torch.randn_like(x0), t, step=15)  # stage 1: r at sigma_t (1 - 1/4)
    teacher_t, target_r, online_t = calls
    assert torch.equal(teacher_t, t) and torch.equal(online_t, t)
    assert torch.equal(target_r, paired_timesteps(schedule, t, 2).clamp(min=0))
    calls.clear()
    loss.segments = 4  # the pair stops at the end of t's segment: 249, 499, 749 or 0
    loss(network, schedule, x0, torch.randn_like(x0), t, step=15)
    ends = segment_ends(1000, 4, t)
    assert ends.tolist() == [0, 249, 499, 499, 749, 749]
    assert torch.equal(calls[1], torch.maximum(paired_timesteps(schedule, t, 2).clamp(min=0), ends))
    assert torch.any(calls[1] == ends) and torch.any(calls[1] > ends)  # both kinds of pair in this batch
