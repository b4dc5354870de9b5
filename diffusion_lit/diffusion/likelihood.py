"""Likelihood: the variational bound on the negative log-likelihood of 8-bit images, in bits per dimension.

Ho et al. 2020, eq. 5 and sec. 3.3, the number their Table 1 reports beside FID (3.75 bits/dim for CIFAR-10;
3.70 for the model trained on the bound itself). For an image x0 on the 8-bit grid, with the model's
reverse process p(x_{t-1} | x_t) = N(mu(x_t, t), sigma_t^2 I) (the DDPM sampler's: mu is the posterior mean
at the network's x0 estimate, thresholded as the sampler does, sigma_t^2 its `variance` choice):

    -log p(x0) <= prior + diffusion + decoder,
    prior     = KL(q(x_T | x0) || N(0, I))                                         (no network)
    diffusion = sum over t = 1 .. T-1 of KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), x_t ~ q(x_t | x0)
    decoder   = -log p(x0 | x_1): N(mu(x_1, 1), sigma_1^2) integrated over each pixel's bin (eq. 13)

in this project's 0-based timesteps (t = 0 is DDPM's x_1). Each diffusion term is one network evaluation at
one draw of x_t, so the sum is itself an unbiased one-sample estimate of the bound, as in the papers. Bits
per dimension: nats / (C H W ln 2).

The diffusion sum costs T - 1 evaluations per image. `estimate_bound` can instead draw K timesteps per image
from a proposal q_t and weight each term by 1 / (K q_t): unbiased for any proposal that is never 0. The
proposal is iDDPM's (Nichol & Dhariwal 2021, sec. 3.3), q_t proportional to sqrt(E[L_t^2]), measured on pilot
images whose full sums are computed (and kept as their own results), mixed with 10% uniform so that no term is
starved; the K draws are systematic (one uniform offset per image), which spreads them over the proposal.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lit.diffusion.sampling import Threshold, Variance
from diffusion_lit.diffusion.schedule import NoiseSchedule, posterior
from diffusion_lit.diffusion.steps import threshold_x0

BIN = 1 / 255  # half the width of a pixel's bin on [-1, 1]
UNIFORM_SHARE = 0.1  # of the proposal: no timestep is drawn with probability below 0.1 / (T - 1)
TERMS = ("prior", "diffusion", "decoder")


def normal_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log P(x) per element for x on the 8-bit grid of [-1, 1] (k / 127.5 - 1): N(mean, std^2) integrated over
    the pixel's bin [x - 1/255, x + 1/255], the outer bins extended to -inf and +inf (Ho et al. 2020, eq. 13),
    so that the 256 probabilities sum to 1. Computed as log(Phi(b) - Phi(a)) on whichever side of the mean
    keeps both in the lower tail, where log_ndtr is exact."""
    lower = torch.where(x < -1 + BIN, torch.full_like(x, -math.inf), (x - BIN - mean) / std)
    upper = torch.where(x > 1 - BIN, torch.full_like(x, math.inf), (x + BIN - mean) / std)
    flip = lower > 0  # the bin is above the mean: Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper)
    a, b = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def reverse_variance(schedule: NoiseSchedule, variance: Variance) -> Tensor:
    """sigma_t^2 of the reverse process (T,), float64: "small" the posterior's beta~_t (at t = 0, where it is 0,
    beta~_1, as iDDPM does), "large" beta_t (Ho et al. 2020, sec. 3.2)."""
    if variance == "large":
        return schedule.betas
    alpha_bar_prev = torch.cat([torch.ones_like(schedule.alpha_bar[:1]), schedule.alpha_bar[:-1]])
    small = schedule.betas * (1 - alpha_bar_prev) / (1 - schedule.alpha_bar)
    return torch.cat([small[1:2], small[1:]])


def prior_nats(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """KL(q(x_T | x0) || N(0, I)) per image (B,), nats."""
    alpha_bar = schedule.alpha_bar[-1].to(torch.float64)
    x0 = x0.to(torch.float64)
    mean, var = alpha_bar.sqrt() * x0, (1 - alpha_bar).expand_as(x0)
    return normal_kl(mean, var, torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(1)


def terms_nats(
    network, schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, variance: Variance = "small",
    threshold: Threshold = "clip",
) -> Tensor:  # fmt: skip
    """The bound's term at each pair (image x0[i], timestep t[i]) (B,), nats, one network evaluation each:
    the decoder's -log p(x0 | x_0) where t = 0, else KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), at
    x_t = q_sample(x0, t, noise). `network` (x_t, t) -> output."""
    x_t = schedule.q_sample(x0, t, noise)
    x0_hat, _ = schedule.to_x0_eps(x_t, t, network(x_t, t))
    x0_hat = threshold_x0(x0_hat, threshold)
    x0, x_t, x0_hat = x0.double(), x_t.double(), x0_hat.double()
    shape = (-1, *[1] * (x0.dim() - 1))
    alpha_bar = schedule.alpha_bar[t].view(shape)
    alpha_bar_prev = torch.where(t > 0, schedule.alpha_bar[(t - 1).clamp(min=0)], 1.0).view(shape)
    var_p = reverse_variance(schedule, variance)[t].view(shape)
    mean_q, var_q = posterior(x0, x_t, alpha_bar, alpha_bar_prev)
    mean_p, _ = posterior(x0_hat, x_t, alpha_bar, alpha_bar_prev)  # at t = 0: x0_hat itself
    kl = normal_kl(mean_q, var_q.clamp(min=1e-30), mean_p, var_p).flatten(1).sum(1)
    decoder = -discretized_gaussian_log_likelihood(x0, mean_p, var_p.sqrt()).flatten(1).sum(1)
    return torch.where(t == 0, decoder, kl)


@dataclass
class Bound:
    """Per-image nats (B,) of each term of the bound, and which timesteps were summed ("all" or K drawn)."""

    prior: Tensor
    diffusion: Tensor
    decoder: Tensor

    @property
    def total(self) -> Tensor:
        return self.prior + self.diffusion + self.decoder


def quantized(images: Tensor) -> Tensor:
    """Images in [-1, 1] moved onto the 8-bit grid k / 127.5 - 1 (the data the bound is a likelihood of)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def image_bounds(
    network, schedule: NoiseSchedule, x0: Tensor, seeds: list[int], proposal: Tensor | None = None,
    num_timesteps: int | None = None, variance: Variance = "small", threshold: Threshold = "clip",
    batch_size: int = 256,
) -> Bound:  # fmt: skip
    """The bound's terms for each image of x0 (B, C, H, W) on the 8-bit grid.

    Image i draws its x_t noise (and its timesteps) from its own generator seeded by seeds[i], so an image's
    result does not depend on which images share its batch, nor on the number of processes. With `proposal`
    (T - 1,) over t = 1 .. T-1 and `num_timesteps` K, the diffusion sum is estimated from K systematic draws;
    else all T - 1 terms are summed. Network evaluations run `batch_size` (image, timestep) pairs at a time."""
    images, times, weights, nats = _pairs(network, schedule, x0, seeds, proposal, num_timesteps, variance,
                                          threshold, batch_size)  # fmt: skip
    weighted, none = nats * weights, torch.zeros(len(seeds), dtype=torch.float64)
    decoder = none.index_add(0, images[times == 0], weighted[times == 0])
    diffusion = none.index_add(0, images[times > 0], weighted[times > 0])
    return Bound(prior_nats(schedule, x0).cpu(), diffusion, decoder)


def proposal_from(network, schedule: NoiseSchedule, x0: Tensor, seeds: list[int], **options) -> tuple[Tensor, Bound]:
    """The importance proposal over t = 1 .. T-1 (T - 1,) from pilot images x0 (their seeds): sqrt of the mean
    squared term, mixed with UNIFORM_SHARE uniform; and the pilot images' own full bounds."""
    _, _, _, nats = _pairs(network, schedule, x0, seeds, **options)
    terms = nats.view(len(seeds), schedule.timesteps)
    shape = terms[:, 1:].pow(2).mean(0).sqrt()
    proposal = (1 - UNIFORM_SHARE) * shape / shape.sum() + UNIFORM_SHARE / (schedule.timesteps - 1)
    return proposal, Bound(prior_nats(schedule, x0).cpu(), terms[:, 1:].sum(1), terms[:, 0])


def _pairs(
    network, schedule: NoiseSchedule, x0: Tensor, seeds: list[int], proposal: Tensor | None = None,
    num_timesteps: int | None = None, variance: Variance = "small", threshold: Threshold = "clip",
    batch_size: int = 256,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Every (image, timestep) pair `image_bounds` evaluates: image index, t, weight and the term in nats, each
    (P,), image by image in order (all T timesteps, in order, without a proposal)."""
    T, device = schedule.timesteps, x0.device  # noqa: N806 (the papers' T)
    images, times, weights, noises = [], [], [], []
    for i, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        noises.append(torch.randn((T if proposal is None else num_timesteps + 1, *x0.shape[1:]), generator=generator))
        if proposal is None:
            t, weight = torch.arange(T), torch.ones(T, dtype=torch.float64)
        else:
            offset = torch.rand(1, generator=generator, dtype=torch.float64)
            points = (torch.arange(num_timesteps, dtype=torch.float64) + offset) / num_timesteps
            drawn = torch.searchsorted(proposal.cumsum(0) / proposal.sum(), points).clamp(max=T - 2)
            t = torch.cat([torch.zeros(1, dtype=torch.long), drawn + 1])
            weight = torch.cat([torch.ones(1, dtype=torch.float64), 1 / (num_timesteps * proposal[drawn])])
        images.append(torch.full_like(t, i))
        times.append(t)
        weights.append(weight)
    images, times, weights, noises = (torch.cat(parts) for parts in (images, times, weights, noises))
    nats = torch.empty(len(times), dtype=torch.float64)
    for start in range(0, len(times), batch_size):
        part = slice(start, start + batch_size)
        nats[part] = terms_nats(network, schedule, x0[images[part].to(device)], times[part].to(device),
                                noises[part].to(x0), variance, threshold).cpu()  # fmt: skip
    return images, times, weights, nats


def bits_per_dim(nats: Tensor, dims: int) -> Tensor:
    """Nats per image -> bits per dimension."""
    return nats / (dims * math.log(2))
