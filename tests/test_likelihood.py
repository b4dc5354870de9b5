"""The likelihood bound (bits/dim): each term against its closed form, the whole bound against the exact
likelihood of Gaussian data, the importance-sampled estimate against the full sum."""

import math

import pytest
import torch

from conftest import randomise
from diffusion_lit.diffusion.likelihood import (
    TERMS,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    image_bounds,
    normal_kl,
    prior_nats,
    proposal_from,
    quantized,
    reverse_variance,
    terms_nats,
)
from diffusion_lit.diffusion.schedule import NoiseSchedule
from diffusion_lit.nn import UNet

MEAN, STD = 0.1, 0.4  # the Gaussian data, per pixel
GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1
SHAPE = (3, 4, 4)  # 48 dimensions


def exact_x0(schedule: NoiseSchedule):
    """E[x0 | x_t] for data N(MEAN, STD^2) per pixel: an x0-predicting network with no error."""

    def network(x_t, t):
        a = schedule.sqrt_alpha_bar[t].view(-1, 1, 1, 1).to(x_t)
        var = (1 - schedule.alpha_bar[t]).view(-1, 1, 1, 1).to(x_t)
        return MEAN + a * STD**2 / (a * a * STD**2 + var) * (x_t - a * MEAN)

    return network


def gaussian_images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return quantized(torch.randn(count, *SHAPE, generator=generator) * STD + MEAN)


def exact_nats(x0: torch.Tensor) -> torch.Tensor:
    """-log P(x0) per image under the data's own distribution (the Gaussian, integrated over each pixel's bin)."""
    x0 = x0.double()
    log_p = discretized_gaussian_log_likelihood(x0, torch.full_like(x0, MEAN), torch.full_like(x0, STD))
    return -log_p.flatten(1).sum(1)


def test_normal_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean1, mean2 = torch.randn(2, 100, generator=generator, dtype=torch.float64)
    var1, var2 = torch.rand(2, 100, generator=generator, dtype=torch.float64) * 2 + 0.01
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, var1.sqrt()), torch.distributions.Normal(mean2, var2.sqrt())
    )
    torch.testing.assert_close(normal_kl(mean1, var1, mean2, var2), expected)


@pytest.mark.parametrize("mean, std", [(0.0, 0.3), (0.9, 0.01), (-1.3, 0.05), (0.5, 1e-4), (2.0, 0.001)])
def test_the_decoders_256_probabilities_sum_to_one_and_are_the_gaussians_mass_per_bin(mean, std):
    log_p = discretized_gaussian_log_likelihood(GRID, torch.full_like(GRID, mean), torch.full_like(GRID, std))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    inner = slice(1, 255)  # bins of width 2/255 around each value, where the plain CDF difference is exact enough
    mass = normal.cdf(GRID[inner] + 1 / 255) - normal.cdf(GRID[inner] - 1 / 255)
    big = mass > 1e-6
    torch.testing.assert_close(log_p[inner][big], mass[big].log(), rtol=1e-6, atol=1e-9)
    assert torch.isfinite(log_p).all()  # far tails too: log_ndtr on the lower side


def test_a_diffusion_term_is_half_the_snr_drop_times_the_squared_error_for_the_small_variance():
    # Kingma et al. 2021 (VDM), eq. 13: with sigma_t^2 = beta~_t, KL = (SNR(t-1) - SNR(t)) / 2 ||x0 - x0_hat||^2.
    schedule = NoiseSchedule(prediction="x0")
    generator = torch.Generator().manual_seed(1)
    x0 = gaussian_images(6).double()
    guess = torch.randn(6, *SHAPE, generator=generator, dtype=torch.float64) * 0.3
    t = torch.tensor([1, 2, 100, 500, 900, 999])
    noise = torch.randn(6, *SHAPE, generator=generator, dtype=torch.float64)
    kl = terms_nats(lambda x, t: guess, schedule, x0, t, noise, variance="small", threshold="none")
    snr = schedule.alpha_bar / (1 - schedule.alpha_bar)
    expected = (snr[t - 1] - snr[t]) / 2 * (x0 - guess).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(kl, expected, rtol=1e-6, atol=0)


def test_the_decoder_and_prior_terms_against_their_closed_forms():
    schedule = NoiseSchedule(prediction="x0")
    x0 = quantized(torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9).double()
    guess = x0 + 0.01  # off the bins' centres; the outer bins are not used (the test above covers them)
    decoder = terms_nats(lambda x, t: guess, schedule, x0, torch.zeros(3, dtype=torch.long), torch.randn_like(x0),
                         variance="large", threshold="none")  # fmt: skip
    std = schedule.betas[0].sqrt()  # beta_0 = 1e-4, the clipped minimum
    normal = torch.distributions.Normal(guess, std)
    expected = -(normal.cdf(x0 + 1 / 255) - normal.cdf(x0 - 1 / 255)).log().flatten(1).sum(1)
    torch.testing.assert_close(decoder, expected, rtol=1e-6, atol=0)
    assert reverse_variance(schedule, "small")[0] == reverse_variance(schedule, "small")[1] > 0
    a2 = schedule.alpha_bar[-1]
    expected_prior = 0.5 * ((1 - a2) + a2 * x0.pow(2) - 1 - (1 - a2).log()).flatten(1).sum(1)
    torch.testing.assert_close(prior_nats(schedule, x0), expected_prior)


@pytest.mark.parametrize("variance, tolerance", [("large", 0.02), ("small", 0.10)])
def test_on_gaussian_data_with_the_exact_denoiser_the_bound_is_above_the_exact_nll_and_close_to_it(variance, tolerance):
    # T = 1000, 200 images of 48 pixels; measured: 0.057 +- 0.013 bits/dim above the exact 7.63 with the
    # large variance (0.7%), 0.66 +- 0.02 with the small one (9%), whose decoder and KL terms are wider.
    schedule = NoiseSchedule(prediction="x0")
    x0 = gaussian_images(200)
    bound = image_bounds(exact_x0(schedule), schedule, x0, list(range(200)), variance=variance, threshold="none",
                         batch_size=1000)  # fmt: skip
    exact = bits_per_dim(exact_nats(x0), 48)
    gap = bits_per_dim(bound.total, 48) - exact
    standard_error = gap.std() / math.sqrt(200)
    assert gap.mean() > 2 * standard_error, "a bound below the exact likelihood"
    assert gap.mean() < tolerance * exact.mean()
    assert bits_per_dim(bound.prior, 48).max() < 1e-6  # x_T is pure noise: the prior term vanishes


def test_an_untrained_network_bounds_far_worse_than_the_exact_denoiser():
    # T = 100, large variance, x0 clipped (the sampler's default): measured 9.36 bits/dim for a random UNet, worse
    # than the 8 of the raw bytes, against 7.74 for the exact denoiser (the data's own 7.66).
    schedule = NoiseSchedule(timesteps=100, prediction="eps")
    torch.manual_seed(0)
    unet = randomise(UNet(3, base_channels=8, num_heads=2, dropout=0.0)).eval()
    x0 = quantized(torch.randn(4, 3, 8, 8) * STD + MEAN)
    with torch.no_grad():
        untrained = image_bounds(lambda x, t: unet(x, t), schedule, x0, [0, 1, 2, 3], variance="large")
    exact_schedule = NoiseSchedule(timesteps=100, prediction="x0")
    exact = image_bounds(exact_x0(exact_schedule), exact_schedule, x0, [0, 1, 2, 3], variance="large")
    untrained, exact = bits_per_dim(untrained.total, 192), bits_per_dim(exact.total, 192)
    assert untrained.mean() > 8 and untrained.mean() > exact.mean() + 1 and exact.mean() < 7.8


def test_the_importance_sampled_estimate_agrees_with_the_full_sum_and_costs_a_tenth():
    # Unbiased: over 100 images the mean difference from each image's full sum is within 3 standard errors.
    schedule = NoiseSchedule(prediction="x0")
    network = exact_x0(schedule)
    x0 = gaussian_images(100, seed=1)
    options = {"variance": "large", "threshold": "none", "batch_size": 1000}
    proposal, pilot = proposal_from(network, schedule, gaussian_images(4, seed=2), [7, 8, 9, 10], **options)
    assert proposal.shape == (999,) and proposal.sum().item() == pytest.approx(1.0) and proposal.min() >= 0.1 / 999
    assert pilot.total.shape == (4,)
    calls = []

    def counted(x, t):
        calls.append(len(t))
        return network(x, t)

    full = image_bounds(network, schedule, x0, list(range(100)), **options)
    estimate = image_bounds(counted, schedule, x0, list(range(100)), proposal, 99, **options)
    assert sum(calls) == 100 * 100  # the decoder and 99 draws per image
    difference = bits_per_dim(estimate.total - full.total, 48)
    assert difference.mean().abs() < 3 * difference.std() / 10
    torch.testing.assert_close(estimate.decoder, full.decoder)  # computed exactly in both (the same noise draw)
    assert set(TERMS) == {"prior", "diffusion", "decoder"}


def test_an_images_bound_does_not_depend_on_its_batch():
    schedule = NoiseSchedule(timesteps=50, prediction="x0")
    x0 = gaussian_images(5)
    together = image_bounds(exact_x0(schedule), schedule, x0, [3, 4, 5, 6, 7], batch_size=64)
    alone = image_bounds(exact_x0(schedule), schedule, x0[2:3], [5], batch_size=7)
    torch.testing.assert_close(alone.total, together.total[2:3])
