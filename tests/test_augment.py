"""Non-leaky augmentation: each augmentation against numpy's, its labels, its frequencies, and the plumbing."""

import numpy as np
import pytest
import torch

from conftest import ONE_STEP, ROOT, TINY, one_line_error, randomise
from diffusion_lit.cli import main
from diffusion_lit.diffusion.augment import AUGMENT_DIM, augment
from diffusion_lit.diffusion.consistency import ConsistencyLoss
from diffusion_lit.errors import UserError
from diffusion_lit.loading import load_checkpoint
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet


def numpy_augmentation(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The augmentation a label (AUGMENT_DIM,) describes, done on a (C, H, W) array with numpy's own operations."""
    _, height, width = image.shape
    if label[0]:
        image = image[:, :, ::-1]
    if label[1]:
        image = image[:, ::-1, :]
    quarters = int(round(np.arctan2(label[3], label[2] + 1) / (np.pi / 2))) % 4
    image = np.rot90(image, quarters, axes=(1, 2))
    dx, dy = int(round(label[4] * width)), int(round(label[5] * height))
    padded = np.pad(image, ((0, 0), (height, height), (width, width)), mode="reflect")
    return padded[:, height - dy : 2 * height - dy, width - dx : 2 * width - dx]


def test_each_image_is_what_numpy_makes_of_its_label():
    torch.manual_seed(0)
    images = torch.randn(200, 3, 16, 16)
    augmented, labels = augment(images, 0.5)
    assert labels.shape == (200, AUGMENT_DIM) and labels.dtype == torch.float32
    for image, result, label in zip(images.numpy(), augmented.numpy(), labels.numpy(), strict=True):
        np.testing.assert_array_equal(result, numpy_augmentation(image, label))
    assert (labels != 0).any(1).float().mean() > 0.8  # 1 - 0.5**4 of them are augmented at all
    assert not torch.equal(augmented, images)


def test_not_augmented_is_the_image_itself_with_zero_labels():
    torch.manual_seed(0)
    images = torch.randn(64, 1, 8, 8)
    augmented, labels = augment(images, 0.3)
    untouched = (labels == 0).all(1)
    assert 5 < untouched.sum() < 64
    assert torch.equal(augmented[untouched], images[untouched])
    same, zeros = augment(images, 0.0)
    assert torch.equal(same, images) and not zeros.any()


def test_each_augmentation_is_drawn_with_its_probability_and_its_parameters_uniformly():
    torch.manual_seed(0)
    count, probability = 20_000, 0.12
    _, labels = augment(torch.zeros(count, 1, 32, 32), probability)
    standard_error = (probability * (1 - probability) / count) ** 0.5
    rotated = (labels[:, 2:4] != 0).any(1)
    shifted = (labels[:, 4:6] != 0).any(1)
    for share in (labels[:, 0].mean(), labels[:, 1].mean(), rotated.float().mean()):
        assert abs(share - probability) < 4 * standard_error
    angles = torch.atan2(labels[rotated, 3], labels[rotated, 2] + 1).div(torch.pi / 2).round().remainder(4)
    assert torch.bincount(angles.long(), minlength=4)[0] == 0  # chosen to rotate: by 90, 180 or 270
    shares = torch.bincount(angles.long(), minlength=4)[1:] / rotated.sum()
    assert torch.allclose(shares, torch.tensor(1 / 3), atol=0.03)
    pixels = torch.cat([labels[shifted, 4], labels[shifted, 5]]) * 32  # whole pixels, up to 32 / 8 = 4
    assert torch.equal(pixels, pixels.round()) and pixels.abs().max() == 4
    # chosen to shift: (dx, dy) uniform over the 81 pairs in [-4, 4]^2, so (0, 0) is 1 in 81 of them
    assert abs(shifted.float().mean() - probability * 80 / 81) < 4 * standard_error


def test_rotation_needs_square_images():
    with pytest.raises(ValueError, match="square"):
        augment(torch.zeros(2, 3, 8, 16), 0.1)


def test_unet_reads_no_labels_as_not_augmented_and_the_labels_change_its_output():
    unet = UNet(3, base_channels=8, channel_mults=(1, 2), attention_levels=(), augment_dim=AUGMENT_DIM)
    unet = randomise(unet).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 500])
    labels = torch.zeros(4, AUGMENT_DIM)
    assert torch.equal(unet(x, t), unet(x, t, None, labels))
    labels[:, 0] = 1
    assert not torch.allclose(unet(x, t), unet(x, t, None, labels))
    features = unet.features(x, t, None, labels)
    assert not torch.allclose(features[-1], unet.features(x, t)[-1])
    with pytest.raises(UserError, match="augment_dim"):
        UNet(3, base_channels=8, channel_mults=(1, 2), attention_levels=())(x, t, None, labels)


def _module(augment: float, augment_dim: int = AUGMENT_DIM, **kwargs) -> DiffusionModule:
    unet = UNet(1, base_channels=8, channel_mults=(1, 2), attention_levels=(), augment_dim=augment_dim)
    return DiffusionModule(unet, image_shape=(1, 8, 8), timesteps=20, augment=augment, **kwargs)


def test_the_training_step_feeds_the_network_the_labels_of_the_images_it_augmented(monkeypatch):
    module = _module(0.5)
    seen = {}

    def spy(network, schedule, x0, noise, t, labels, step, augment):
        seen["x0"], seen["augment"] = x0, augment
        return {"loss": x0.sum() * 0}

    monkeypatch.setattr(module, "criterion", spy)
    images = torch.randn(16, 1, 8, 8)
    module.training_step((images, torch.zeros(16)), 0)
    for image, result, label in zip(images.numpy(), seen["x0"].numpy(), seen["augment"].numpy(), strict=True):
        np.testing.assert_array_equal(result, numpy_augmentation(image, label))
    assert seen["augment"].any()


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"augment": 1.5}, "probability in"), ({"augment": 0.1, "augment_dim": 0}, "augment_dim to 6"),
     ({"augment": 0.1, "loss": ConsistencyLoss()}, "distillation does not augment")],
)  # fmt: skip
def test_settings_that_cannot_work_are_one_clear_error(settings, message):
    with pytest.raises(UserError, match=message):
        _module(**settings)


@pytest.mark.slow  # three commands end to end
def test_fit_with_augmentation_then_sample_and_distill(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "augmented.yaml").write_text("model:\n  augment: 0.12\n  unet:\n    init_args:\n      augment_dim: 6\n")
    configs = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, "--config", "augmented.yaml"]
    main(["fit", *configs, *ONE_STEP, "--trainer.logger", "false"])
    assert load_checkpoint("checkpoints/demo/last.ckpt").hparams.augment == 0.12
    main(["sample", "--ckpt_path", "checkpoints/demo/last.ckpt", "--num_samples", "4", "--output", "out"])
    assert (tmp_path / "out" / "grid.png").exists()
    # distillation turns augmentation off after the configs: the student keeps the UNet that takes the labels
    main(["distill", *configs, *ONE_STEP, "--trainer.logger", "false", "--teacher", "checkpoints/demo/last.ckpt"])
    student = load_checkpoint("checkpoints/demo_distill/last.ckpt")
    assert student.hparams.augment == 0 and student.unet.augment_dim == AUGMENT_DIM
    error = one_line_error(capsys, "fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY,
                           "--model.augment", "0.12")  # fmt: skip
    assert "set UNet.augment_dim (--model.unet.init_args.augment_dim) to 6" in error
