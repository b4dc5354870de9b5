import pytest
import torch

from conftest import randomise
from diffusion_lit.errors import UserError
from diffusion_lit.nn import UNet


def tiny(channels: int) -> UNet:
    return UNet(channels, base_channels=8, num_heads=2, dropout=0.0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(28, 28), (32, 32), (30, 20)])
def test_output_shape(channels, size):
    x = torch.randn(2, channels, *size)
    assert tiny(channels)(x, torch.tensor([0, 999])).shape == x.shape


def test_zero_initialised_output():
    x = torch.randn(2, 3, 32, 32)
    assert tiny(3)(x, torch.tensor([3, 7])).abs().max() == 0


def test_timestep_changes_output():
    model = randomise(tiny(1)).eval()
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(model(x, torch.tensor([10])), model(x, torch.tensor([900])))


def test_padding_does_not_leak_between_images():
    # Each image is padded alone: a batch gives the same output as its images one at a time.
    model = randomise(tiny(1)).eval()
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([1, 2, 3])
    batched = model(x, t)
    single = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_attention_at_16_and_8_for_32x32():
    seen = []
    model = UNet(3, base_channels=8, num_heads=2)
    for module in model.modules():
        if type(module).__name__ == "SelfAttention":
            module.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    model(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    assert sorted(set(seen)) == [(4, 4), (8, 8), (16, 16)]  # 4x4 is the middle block
    assert seen.count((16, 16)) == 3 and seen.count((8, 8)) == 3  # one down, two up per level


def test_default_parameter_count():
    # The CIFAR-10 configuration (docs/training.md "Models"): base 64, mults [1, 2, 4, 8], one ResBlock per level.
    assert sum(p.numel() for p in UNet().parameters()) == 40_700_867


def test_bad_attention_level_rejected():
    with pytest.raises(UserError, match="attention_levels"):
        UNet(attention_levels=(4,))


def test_feature_tap_one_map_per_level_and_middle():
    model = randomise(UNet(1, base_channels=8, num_heads=2, dropout=0.0))
    features = model.features(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
    assert [tuple(f.shape[1:]) for f in features] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4), (64, 4, 4)]
    assert all(f.abs().sum() > 0 for f in features)


def test_a_checkpoint_rebuilds_every_unet_argument(tmp_path):
    # Every constructor argument gets a value other than its default; the loaded model must have them all.
    import inspect

    from lightning.pytorch import Trainer

    from diffusion_lit.module import DiffusionModule

    chosen = {"in_channels": 1, "base_channels": 12, "channel_mults": [1, 2, 3], "num_res_blocks": 2,
              "attention_levels": [2], "num_heads": 3, "dropout": 0.25, "num_classes": 4, "augment_dim": 6}  # fmt: skip
    defaults = {name: p.default for name, p in inspect.signature(UNet).parameters.items()}
    assert set(chosen) == set(defaults)  # a new argument must be added here too
    assert all(chosen[name] != (list(d) if isinstance(d, tuple) else d) for name, d in defaults.items())
    module = DiffusionModule(UNet(**chosen), image_shape=(1, 16, 16), timesteps=10, ema_decay=None)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "unet.ckpt")
    loaded = DiffusionModule.load_from_checkpoint(tmp_path / "unet.ckpt", weights_only=True)
    assert loaded.unet.config == chosen
    assert torch.equal(loaded.unet.stem.weight, module.unet.stem.weight)
