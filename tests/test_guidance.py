"""Class-conditional UNet, label dropout and classifier-free guidance."""

import pytest
import torch

from conftest import randomise
from diffusion_lit.data import ImageFolderDataModule
from diffusion_lit.diffusion import Sampling
from diffusion_lit.diffusion.guidance import drop_labels, guided
from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet


def conditional_module(**kwargs) -> DiffusionModule:
    torch.manual_seed(0)
    unet = randomise(UNet(1, base_channels=8, num_heads=2, dropout=0.0, num_classes=10))
    return DiffusionModule(unet, image_shape=(1, 16, 16), timesteps=20, **kwargs).eval()


def test_labels_condition_the_output_and_none_means_the_no_class_label():
    unet = conditional_module().unet
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    three, five = unet(x, t, torch.tensor([3, 3])), unet(x, t, torch.tensor([5, 5]))
    assert not torch.allclose(three, five)
    assert torch.equal(unet(x, t), unet(x, t, torch.tensor([10, 10])))  # label 10 = "no class"
    assert unet.config["num_classes"] == 10


def test_an_unconditional_unet_refuses_labels():
    unet = UNet(1, base_channels=8, num_heads=2)
    with pytest.raises(UserError, match="unconditional"):
        unet(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_guidance_zero_is_unconditional_one_is_conditional_and_others_extrapolate():
    module = conditional_module()
    x, t, labels = torch.randn(4, 1, 16, 16), torch.tensor([1, 5, 9, 19]), torch.tensor([0, 1, 2, 3])
    cond, uncond = module.unet(x, t, labels), module.unet(x, t)
    assert torch.allclose(guided(module.unet, labels, 0.0, 10)(x, t), uncond, atol=1e-6)
    assert torch.allclose(guided(module.unet, labels, 1.0, 10)(x, t), cond, atol=1e-6)
    assert torch.allclose(guided(module.unet, labels, 3.0, 10)(x, t), uncond + 3 * (cond - uncond), atol=1e-5)


def test_guided_sampling_batches_both_halves_in_one_forward():
    module = conditional_module()
    calls = []
    module.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    module.sample(3, Sampling("ddim", 4, guidance=2.0), labels=torch.tensor([1, 2, 3]))
    assert calls == [6, 6, 6, 6]


def test_label_dropout_replaces_that_share_of_labels_with_no_class():
    module = conditional_module(label_dropout=0.3)
    labels = torch.randint(0, 10, (20_000,))
    dropped = drop_labels(labels, 0.3, module.num_classes)
    share = (dropped == 10).float().mean().item()
    assert share == pytest.approx(0.3, abs=0.02)
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    assert conditional_module()._labels((None, labels)) is labels  # validation: no dropout


def test_unconditional_model_refuses_labels_when_sampling():
    module = DiffusionModule(UNet(1, base_channels=8, num_heads=2), image_shape=(1, 16, 16), timesteps=20)
    with pytest.raises(UserError, match="unconditional"):
        module.sample(2, Sampling("ddim", 2), labels=torch.tensor([0, 1]))


def test_image_folder_classes_come_from_sub_folders(image_folder):
    data = ImageFolderDataModule(str(image_folder), image_size=8, class_folders=True, val_fraction=0.2)
    assert data.classes == ["part0", "part1"] and data.num_classes == 2
    data.setup("fit")
    for dataset in (data.train_set, data.val_set):
        for path, label in zip(dataset.paths, dataset.labels, strict=True):
            assert label == int(path.parent.name[-1])
    assert ImageFolderDataModule(str(image_folder)).num_classes is None


def test_image_folder_without_sub_folders_cannot_give_classes(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no sub-folders"):
        ImageFolderDataModule(str(tmp_path / "flat"), class_folders=True)
