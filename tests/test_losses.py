import itertools
import urllib.error

import pytest
import torch
from torch import nn

from conftest import randomise
from diffusion_lit.diffusion import NoiseSchedule
from diffusion_lit.diffusion.immiscible import assign_noise
from diffusion_lit.diffusion.losses import (
    DiffusionLoss,
    FeatureMatchingTerm,
    MSETerm,
    PerceptualTerm,
    edm_weight,
    lognormal_timesteps,
    min_snr_weight,
)
from diffusion_lit.diffusion.perceptual import load_vgg19_features, vgg19_cut
from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet


def random_vgg() -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["E"][:4])[: vgg19_cut("conv_4")]  # VGG19 up to conv2_2, random weights


def random_perceptual(vgg: nn.Module | None = None) -> PerceptualTerm:
    """A PerceptualTerm whose VGG is already there (random weights), so nothing is loaded."""
    term = PerceptualTerm()
    term.features = (vgg or random_vgg()).eval().requires_grad_(False)
    return term


def loss_with(perceptual_weight: float, feature_matching_weight: float, perceptual: PerceptualTerm) -> DiffusionLoss:
    loss = DiffusionLoss(perceptual_weight, feature_matching_weight)
    loss.perceptual = perceptual
    return loss


def test_layers_match_torchvision_vgg19(tmp_path):
    from torchvision.models import vgg19

    full = vgg19().features
    x = torch.randn(1, 3, 32, 32)
    for layer, cut in [("conv_1", 1), ("conv_4", 8), ("conv_9", 20)]:
        reference = full[:cut]
        assert isinstance(reference[-1], nn.Conv2d) and vgg19_cut(layer) == cut
        path = tmp_path / f"{layer}.pth"
        torch.save({f"features.{key}": value for key, value in full.state_dict().items()}, path)
        ours = load_vgg19_features(layer, str(path))
        assert len(ours) == cut and torch.equal(ours(x), reference(x))


def tiny_unet(channels: int = 1, dropout: float = 0.0) -> UNet:
    return randomise(UNet(channels, base_channels=8, num_heads=2, dropout=dropout))


class Counting:
    """Wraps a callable and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_conv_4_is_conv2_2():
    assert vgg19_cut("conv_4") == 8  # conv1_1, relu, conv1_2, relu, pool, conv2_1, relu, conv2_2
    assert vgg19_cut("conv_1") == 1
    assert vgg19_cut("conv_16") == 35
    with pytest.raises(UserError, match="conv_1 .. conv_16"):
        vgg19_cut("relu_3")


@pytest.mark.parametrize("channels", [1, 3])
def test_each_term_zero_at_target_and_positive_elsewhere(channels):
    x0 = torch.rand(3, channels, 16, 16) * 2 - 1
    other = torch.rand(3, channels, 16, 16) * 2 - 1
    weight, t = torch.ones(3), torch.tensor([1, 5, 9])
    assert MSETerm()(x0, x0) == 0 and MSETerm()(other, x0) > 0
    perceptual = random_perceptual()
    assert perceptual(x0, x0, weight) == 0 and perceptual(other, x0, weight) > 0
    unet = tiny_unet(channels, dropout=0.5)  # dropout is off inside the tap, so equal images match exactly
    unet.train()
    assert FeatureMatchingTerm()(unet, x0, x0, t, weight) == 0
    assert FeatureMatchingTerm()(unet, other, x0, t, weight) > 0
    assert unet.training


def test_timestep_weight_scales_the_terms():
    x0, other = torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 16, 16) * 0.5
    perceptual = random_perceptual()
    full = perceptual(other, x0, torch.ones(2))
    assert perceptual(other, x0, torch.zeros(2)) == 0
    assert perceptual(other, x0, torch.full((2,), 0.25)).item() == pytest.approx(0.25 * full.item(), rel=1e-5)


def test_terms_sum_to_total_with_weights():
    schedule = NoiseSchedule(timesteps=100)
    unet = tiny_unet()
    loss = loss_with(0.1, 0.05, random_perceptual())
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    terms = loss(unet, schedule, x0, torch.randn_like(x0), torch.tensor([0, 10, 50, 99]))
    assert set(terms) == {"mse", "perceptual", "feature_matching", "loss"}
    expected = terms["mse"] + 0.1 * terms["perceptual"] + 0.05 * terms["feature_matching"]
    assert torch.allclose(terms["loss"], expected)
    assert terms["perceptual"] > 0 and terms["feature_matching"] > 0


def test_zero_weight_skips_the_computation():
    schedule = NoiseSchedule(timesteps=100)
    unet = tiny_unet()
    perceptual = random_perceptual()
    perceptual.features = Counting(perceptual.features)
    perceptual.features.parameters = lambda: iter([torch.zeros(1)])
    loss = loss_with(0.0, 0.0, perceptual)
    loss.feature_matching = Counting(loss.feature_matching)
    unet.features = Counting(unet.features)
    x0 = torch.rand(2, 1, 28, 28)
    terms = loss(unet, schedule, x0, torch.randn_like(x0), torch.tensor([3, 4]))
    assert set(terms) == {"mse", "loss"} and torch.equal(terms["loss"], terms["mse"])
    assert perceptual.features.calls == 0 and loss.feature_matching.calls == 0 and unet.features.calls == 0
    loss.perceptual_weight = 0.1
    loss(unet, schedule, x0, torch.randn_like(x0), torch.tensor([3, 4]))
    assert perceptual.features.calls == 2 and loss.feature_matching.calls == 0


def test_gradients_reach_the_unet_and_not_vgg():
    schedule = NoiseSchedule(timesteps=100)
    unet = tiny_unet()
    vgg = random_vgg()
    loss = loss_with(0.1, 0.05, random_perceptual(vgg))
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    terms = loss(unet, schedule, x0, torch.randn_like(x0), torch.tensor([1, 2]))
    (terms["perceptual"] + terms["feature_matching"]).backward()
    assert all(p.grad is None for p in vgg.parameters()) and not any(p.requires_grad for p in vgg.parameters())
    assert unet.stem.weight.grad is not None and unet.stem.weight.grad.abs().sum() > 0
    assert not vgg.training


def test_finite_under_bf16_autocast():
    schedule = NoiseSchedule()
    unet = tiny_unet()
    loss = loss_with(0.1, 0.05, random_perceptual())
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(unet, schedule, x0, torch.randn_like(x0), torch.tensor([0, 1, 500, 999]))
    assert all(torch.isfinite(value) for value in terms.values())
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


def test_vgg_stays_out_of_checkpoints_and_train_mode(vgg_weights_file):
    module = DiffusionModule(
        UNet(1, base_channels=8, num_heads=2),
        DiffusionLoss(perceptual_weight=0.1, vgg_weights=vgg_weights_file),
        image_shape=(1, 28, 28),
    )
    module.setup("fit")
    module.train()
    vgg = module.criterion.perceptual.features
    assert not vgg.training
    assert not any(key.startswith("criterion") or "features.0" in key for key in module.state_dict())
    assert all(p.requires_grad for p in module.parameters())  # only the UNet's parameters are the module's
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.unet.parameters())


def test_local_weights_file_is_loaded(vgg_weights_file):
    state = torch.load(vgg_weights_file, weights_only=True)
    features = load_vgg19_features("conv_4", vgg_weights_file)
    assert torch.equal(features[7].weight, state["features.7.weight"])
    with pytest.raises(UserError, match="do not fit VGG19 up to conv_5"):
        load_vgg19_features("conv_5", vgg_weights_file)
    with pytest.raises(UserError, match="does not exist"):
        load_vgg19_features("conv_4", vgg_weights_file + ".missing")


def test_missing_weights_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    loss = DiffusionLoss(perceptual_weight=0.1)
    module = DiffusionModule(UNet(1, base_channels=8, num_heads=2), loss, image_shape=(1, 28, 28))
    with pytest.raises(UserError) as error:
        module.setup("fit")
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in message
    assert "DiffusionLoss.vgg_weights" in message and "DiffusionLoss.perceptual_weight 0" in message


def test_min_snr_weights_for_known_snrs():
    alpha_bar = torch.tensor([0.5, 0.9, 0.1, 0.999], dtype=torch.float64)  # SNR 1, 9, 1/9, 999 (float64, as schedules)
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.allclose(
        min_snr_weight(alpha_bar, 5.0, "eps"), torch.tensor([1.0, 5 / 9, 1.0, 5 / 999], dtype=torch.float64)
    )
    assert torch.allclose(
        min_snr_weight(alpha_bar, 5.0, "x0"), torch.tensor([1.0, 5.0, 1 / 9, 5.0], dtype=torch.float64)
    )
    assert torch.allclose(min_snr_weight(alpha_bar, 5.0, "v"), snr.clamp(max=5.0) / (snr + 1))
    assert torch.allclose(
        min_snr_weight(alpha_bar, 5.0, "v"), torch.tensor([0.5, 0.5, 0.1, 5 / 1000], dtype=torch.float64)
    )


X0_WEIGHTS = {  # a weighting option, and the weight it puts on each sample's x0 error, in closed form of the SNR
    "min-SNR-5": ({"snr_gamma": 5.0}, lambda snr: snr.clamp(max=5.0)),  # Hang et al. 2023: min(SNR, gamma)
    "EDM": ({"edm_weighting": True}, lambda snr: snr + 4),  # Karras et al. 2022: 1 / sigma^2 + 1 / 0.5^2
}


@pytest.mark.parametrize("weighting", X0_WEIGHTS)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_weighted_mse_is_the_closed_form_weighting_of_the_x0_error(prediction, weighting):
    # whatever the target, the weighted loss equals mean_b weight(SNR_b) * |x0_pred - x0|^2
    settings, x0_weight = X0_WEIGHTS[weighting]
    schedule = NoiseSchedule(prediction=prediction)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 1, 4, 4, generator=generator) * 2 - 1, torch.randn(6, 1, 4, 4, generator=generator)
    t = torch.tensor([0, 50, 300, 600, 900, 990])
    output = torch.randn(6, 1, 4, 4, generator=generator)
    loss = DiffusionLoss(**settings)(lambda x_t, t: output, schedule, x0, noise, t)["mse"]
    x0_pred, _ = schedule.to_x0_eps(schedule.q_sample(x0, t, noise), t, output.double())
    alpha_bar = schedule.alpha_bar[t]
    expected = (x0_weight(alpha_bar / (1 - alpha_bar)) * (x0_pred - x0).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    unweighted = DiffusionLoss()(lambda x_t, t: output, schedule, x0, noise, t)["mse"]
    assert unweighted.item() != pytest.approx(loss.item(), rel=1e-2)


def test_edm_weights_for_known_snrs():
    # Karras et al. 2022: lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error; sigma^2 = 1 / SNR
    alpha_bar = torch.tensor([0.5, 0.9, 0.1, 0.999], dtype=torch.float64)  # SNR 1, 9, 1/9, 999
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = torch.tensor([5.0, 13.0, 4 + 1 / 9, 1003.0], dtype=torch.float64)
    assert torch.allclose(edm_weight(alpha_bar, "x0"), expected)
    assert torch.allclose(edm_weight(alpha_bar, "x0"), lam)
    assert torch.allclose(edm_weight(alpha_bar, "eps"), lam * sigma**2)  # |x0 error| = sigma |eps error|
    assert torch.allclose(edm_weight(alpha_bar, "v"), torch.tensor([2.5, 1.3, 3.7, 1003 / 1000], dtype=torch.float64))


def test_lognormal_timesteps_have_the_normal_mass_of_their_bin_of_log_sigma():
    from math import erf, sqrt

    schedule, mean, std, n = NoiseSchedule(), -1.2, 1.2, 400_000
    torch.manual_seed(0)
    t = lognormal_timesteps(schedule, n, torch.device("cpu"), mean, std)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    log_sigma = 0.5 * (1 / schedule.alpha_bar - 1).log()
    edges = [-float("inf"), *((log_sigma[1:] + log_sigma[:-1]) / 2).tolist(), float("inf")]
    cdf = [0.5 * (1 + erf((e - mean) / (std * sqrt(2)))) if abs(e) != float("inf") else float(e > 0) for e in edges]
    expected = torch.tensor(cdf[1:]).double() - torch.tensor(cdf[:-1]).double()
    counts = torch.bincount(t, minlength=1000).double()

    # each bin within 5 standard errors of its binomial count; the drawn sigmas' log has the stated mean and spread
    def within(counts):
        return ((counts - n * expected).abs() <= 5 * (n * expected * (1 - expected)).sqrt() + 1).all()

    assert within(counts)
    drawn = log_sigma[t]
    assert drawn.mean().item() == pytest.approx(mean, abs=0.01) and drawn.std().item() == pytest.approx(std, abs=0.01)
    assert not within(torch.bincount(schedule.sample_timesteps(n, torch.device("cpu")), minlength=1000).double())


def test_lognormal_timesteps_are_what_the_loss_draws():
    schedule = NoiseSchedule()
    seen = []
    loss = DiffusionLoss(lognormal_timesteps=(-1.2, 1.2))
    torch.manual_seed(3)
    x0 = torch.zeros(64, 1, 4, 4)
    noise = torch.randn_like(x0)
    loss(lambda x_t, t: seen.append(t) or torch.zeros_like(x_t), schedule, x0, noise)
    torch.manual_seed(3)
    torch.randn_like(x0)
    assert torch.equal(seen[0], lognormal_timesteps(schedule, 64, torch.device("cpu"), -1.2, 1.2))


@pytest.mark.parametrize(
    "settings", [{"snr_gamma": 5.0, "edm_weighting": True}, {"lognormal_timesteps": (-1.2, 0.0)}], ids=str
)
def test_contradictory_or_impossible_edm_settings_are_one_line(settings):
    with pytest.raises(UserError, match="DiffusionLoss"):
        DiffusionLoss(**settings)


def test_immiscible_assignment_is_the_optimal_permutation_of_the_batch_noise():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x0, noise = torch.rand(6, 1, 3, 3, generator=generator) * 2 - 1, torch.randn(6, 1, 3, 3, generator=generator)
        assigned = assign_noise(x0, noise)
        assert sorted(assigned.flatten().tolist()) == sorted(noise.flatten().tolist())  # the same N(0, I) draws
        assert any(torch.equal(assigned[i], noise[j]) for i in range(6) for j in range(6))

        def total(images, candidate):
            return (images - candidate).flatten(1).norm(dim=1).sum().item()

        best = min(total(x0, noise[list(order)]) for order in itertools.permutations(range(6)))  # brute force
        assert total(x0, assigned) == pytest.approx(best, rel=1e-6) and total(x0, assigned) <= total(x0, noise) + 1e-9


def test_immiscible_training_noise_is_still_standard_normal_per_image():
    loss = DiffusionLoss(immiscible=True)
    module = DiffusionModule(tiny_unet(), loss, image_shape=(1, 16, 16), timesteps=20, ema_decay=None)
    seen = []
    schedule = module.schedule
    schedule.q_sample = lambda x0, t, noise: seen.append(noise) or x0  # the noise the loss paired with x0
    x0 = torch.rand(16, 1, 16, 16) * 2 - 1
    for _ in range(50):
        module.losses(x0)
    noise = torch.cat(seen)  # (800, 1, 16, 16)
    assert noise.mean().abs() < 0.02 and (noise.std() - 1).abs() < 0.02
    first_image = torch.cat([batch[0] for batch in seen])  # what image 0 was paired with, over 50 batches
    assert first_image.std().item() == pytest.approx(1.0, abs=0.1)
