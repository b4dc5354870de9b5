"""Loss terms, each a small callable, and their weighted total as a dict of named terms.

The perceptual and feature-matching terms compare the x0 predicted from the network output with the
real x0. At high noise that prediction is a blur of the data mean, so both terms are weighted per
sample by alpha_bar_t: ~1 for nearly clean inputs, ~0 for nearly pure noise. The prediction is
clipped to [-1, 1] first, as at sampling time, so VGG and the UNet only see images in their range.
"""

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lit.diffusion.immiscible import assign_noise
from diffusion_lit.diffusion.perceptual import ImageNetInput, load_vgg19_features
from diffusion_lit.diffusion.schedule import NoiseSchedule, Prediction
from diffusion_lit.errors import UserError


def _per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """(B, ...) x2 -> (B,) mean squared difference, in float32."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def min_snr_weight(alpha_bar: Tensor, gamma: float, prediction: Prediction) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9 and sec. 3.4) for timesteps with these alpha_bar.

    SNR = alpha_bar / (1 - alpha_bar). Weighting the x0 error by min(SNR, gamma) caps the weight of the
    nearly clean timesteps, which otherwise dominate the gradient; the same weighting of the x0 error is
    min(SNR, gamma) / SNR on the eps error and min(SNR, gamma) / (SNR + 1) on the v error.
    """
    snr = alpha_bar / (1 - alpha_bar)
    capped = snr.clamp(max=gamma)
    return {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1)}[prediction]


SIGMA_DATA = 0.5  # EDM's standard deviation of the data, for images in [-1, 1] (Karras et al. 2022, sec. 5)


def edm_weight(alpha_bar: Tensor, prediction: Prediction) -> Tensor:
    """EDM's loss weights (Karras et al. 2022, Table 1: lambda = 1 / c_out^2) for timesteps with these alpha_bar.

    On the variance-preserving schedule sigma^2 = 1 / SNR = (1 - alpha_bar) / alpha_bar, and EDM weights the x0
    error by lambda(sigma) = 1 / sigma^2 + 1 / sigma_data^2 = SNR + 4; that is (SNR + 4) / SNR on the eps error
    and (SNR + 4) / (SNR + 1) on the v error (between 1 and 4: v prediction alone is this with sigma_data = 1).
    """
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr + 1 / SIGMA_DATA**2
    return {"eps": weight / snr, "x0": weight, "v": weight / (snr + 1)}[prediction]


def lognormal_timesteps(schedule: NoiseSchedule, batch_size: int, device: torch.device, mean: float, std: float):
    """Timesteps (B,) whose noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) is log-normal, ln sigma ~
    N(mean, std^2) (EDM's training distribution, Karras et al. 2022 sec. 5: -1.2, 1.2), on the schedule's grid:
    each draw goes to the timestep nearest in ln sigma (those beyond either end to the end), so timestep t has
    the normal's probability between the midpoints of ln sigma to its neighbours."""
    log_sigma = 0.5 * (1 / schedule.alpha_bar - 1).log()  # float64, increasing in t
    edges = ((log_sigma[1:] + log_sigma[:-1]) / 2).to(device)
    drawn = torch.randn(batch_size, device=device, dtype=torch.float64) * std + mean
    return torch.searchsorted(edges, drawn)


class MSETerm:
    """Mean squared error between the network output and its target (Ho et al. 2020 eq. 14), optionally
    weighted per sample (B,) before the batch mean."""

    def __call__(self, output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        if weight is None:
            return F.mse_loss(output.float(), target.float())
        return (weight.float() * _per_sample_mse(output, target)).mean()


class PerceptualTerm:
    """Weighted MSE between VGG19 features of predicted and real images (Johnson et al. 2016).

    A plain object rather than an nn.Module, so the VGG inside is never registered with the model:
    it is not saved in checkpoints, not put in train mode, not handed to the optimizer. It runs in
    float32 outside autocast, since fp16 VGG activations overflow. The VGG is loaded on first use (or
    by `load()`): `features` holds it once loaded.

    Args:
        layer: the VGG19 layer compared, "conv_N" = the N-th conv (conv_4 is conv2_2).
        weights_path: a local torchvision VGG19 state-dict file; None: torchvision's cache or download.
    """

    def __init__(self, layer: str = "conv_4", weights_path: str | None = None) -> None:
        self.layer = layer
        self.weights_path = weights_path
        self.features: nn.Module | None = None
        self.input = ImageNetInput()

    def load(self) -> nn.Module:
        """The frozen VGG19 features, loaded once; one clear line when the weights are missing."""
        if self.features is None:
            self.features = load_vgg19_features(self.layer, self.weights_path)
        return self.features

    def __call__(self, x0_pred: Tensor, x0: Tensor, weight: Tensor) -> Tensor:
        self.load()
        if next(self.features.parameters()).device != x0.device:
            self.features.to(x0.device)
            self.input.to(x0.device)
        with torch.autocast(x0.device.type, enabled=False):
            predicted = self.features(self.input(x0_pred.float()))
            with torch.no_grad():
                target = self.features(self.input(x0.float()))
        return (weight * _per_sample_mse(predicted, target)).mean()


class FeatureMatchingTerm:
    """Weighted distance between the network's own features of predicted and real images.

    Each level's squared error is divided by the mean square of its target activations, so that no
    level dominates by scale; the levels are then averaged. The tap runs with dropout off, so that
    identical images give identical features; the target features are detached.
    """

    def __call__(
        self, network: nn.Module, x0_pred: Tensor, x0: Tensor, t: Tensor, weight: Tensor, labels: tuple = ()
    ) -> Tensor:
        was_training = network.training
        network.eval()
        try:
            predicted = network.features(x0_pred, t, *labels)
            with torch.no_grad():
                target = network.features(x0, t, *labels)
        finally:
            network.train(was_training)
        levels = [
            _per_sample_mse(p, q) / (q.float().pow(2).flatten(1).mean(1) + 1e-6)
            for p, q in zip(predicted, target, strict=True)
        ]
        return (weight * torch.stack(levels).mean(0)).mean()


class DiffusionLoss:
    """The training loss: MSE on the prediction target, plus optional perceptual and feature-matching terms.

    Returns {"mse", "perceptual"?, "feature_matching"?, "loss"}; a term whose weight is 0 is not computed at all.

    Args:
        perceptual_weight: weight of the VGG19 perceptual term (0: not computed, VGG never loaded).
        feature_matching_weight: weight of the term on the network's own features (0: not computed).
        perceptual_layer: the VGG19 layer compared, "conv_N" = the N-th conv (conv_4 is conv2_2).
        vgg_weights: a local torchvision VGG19 state-dict file, for machines without internet access;
            None: torchvision's cache, downloading into it when missing.
        snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023; 5 in the paper): each sample's MSE is weighted as
            if its x0 error were weighted by min(SNR, gamma). None: the plain mean (Ho et al. 2020).
        immiscible: pair the images of each batch with the noise samples nearest to them (a linear assignment,
            Li et al. 2024) instead of at random; costs one host round trip per step.
        lognormal_timesteps: (mean, std) of ln sigma for the training timesteps, EDM's noise levels (Karras et al.
            2022: -1.2, 1.2), mapped to the schedule's grid (`lognormal_timesteps`). None: uniform over the T steps.
        edm_weighting: weight each sample's MSE by EDM's lambda(sigma) = 1 / sigma^2 + 1 / 0.5^2 on its x0 error
            (`edm_weight`); not with snr_gamma.
    """

    def __init__(
        self,
        perceptual_weight: float = 0.0,
        feature_matching_weight: float = 0.0,
        perceptual_layer: str = "conv_4",
        vgg_weights: str | None = None,
        snr_gamma: float | None = None,
        immiscible: bool = False,
        lognormal_timesteps: tuple[float, float] | None = None,
        edm_weighting: bool = False,
    ) -> None:
        if snr_gamma is not None and edm_weighting:
            raise UserError("DiffusionLoss: snr_gamma and edm_weighting are two weightings; set one of them")
        if lognormal_timesteps is not None and not lognormal_timesteps[1] > 0:
            raise UserError(f"DiffusionLoss.lognormal_timesteps is (mean, std) with std > 0, got {lognormal_timesteps}")
        self.config = {name: value for name, value in locals().items() if name in SETTINGS}  # for checkpoints
        self.perceptual_weight = perceptual_weight
        self.feature_matching_weight = feature_matching_weight
        self.snr_gamma = snr_gamma
        self.immiscible = immiscible
        self.lognormal_timesteps = None if lognormal_timesteps is None else tuple(lognormal_timesteps)
        self.edm_weighting = edm_weighting
        self.mse = MSETerm()
        self.perceptual = PerceptualTerm(perceptual_layer, vgg_weights)
        self.feature_matching = FeatureMatchingTerm()

    def __call__(
        self,
        network: Callable[[Tensor, Tensor], Tensor],
        schedule: NoiseSchedule,
        x0: Tensor,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        labels: Tensor | None = None,
        step: int = 0,
        augment: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """All terms for clean images x0 (B, C, H, W), class labels (B,) and augmentation labels (B, D) if any
        (`diffusion.augment`); the noise and the timesteps (B,) are drawn (in that order) where not given.
        `step` (the training step) is for losses that change over training (ConsistencyLoss); this one does not."""
        if noise is None:
            noise = torch.randn_like(x0)
            noise = assign_noise(x0, noise) if self.immiscible else noise
        if t is None and self.lognormal_timesteps is not None:
            t = lognormal_timesteps(schedule, x0.shape[0], x0.device, *self.lognormal_timesteps)
        t = schedule.sample_timesteps(x0.shape[0], x0.device) if t is None else t
        extra = () if labels is None else (labels,)  # unconditional networks take (x_t, t) only
        extra = extra if augment is None else (labels, augment)
        x_t = schedule.q_sample(x0, t, noise)
        output = network(x_t, t, *extra)
        weight = None
        if self.snr_gamma is not None:
            weight = min_snr_weight(schedule.alpha_bar[t], self.snr_gamma, schedule.prediction)
        elif self.edm_weighting:
            weight = edm_weight(schedule.alpha_bar[t], schedule.prediction)
        terms = {"mse": self.mse(output, schedule.target(x0, noise, t), weight)}
        total = terms["mse"]
        if self.perceptual_weight or self.feature_matching_weight:
            x0_pred = schedule.to_x0_eps(x_t, t, output.float())[0].clamp(-1, 1)
            weight = schedule.alpha_bar[t].float()  # (B,)
        if self.perceptual_weight:
            terms["perceptual"] = self.perceptual(x0_pred, x0, weight)
            total = total + self.perceptual_weight * terms["perceptual"]
        if self.feature_matching_weight:
            terms["feature_matching"] = self.feature_matching(network, x0_pred, x0, t, weight, extra)
            total = total + self.feature_matching_weight * terms["feature_matching"]
        terms["loss"] = total
        return terms


SETTINGS = tuple(inspect.signature(DiffusionLoss).parameters)  # what a checkpoint keeps of a loss
