"""End-to-end runs of `lit-ddpm` through main([...]) on data written in the temp dir."""

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import ONE_STEP, ROOT, TINY
from diffusion_lit.cli import main
from diffusion_lit.module import DiffusionModule


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints/, samples/, logs go here


def fit(*args: str) -> None:
    main(["fit", *args])


@pytest.fixture
def vgg(vgg_weights_file) -> list[str]:
    """The shipped MNIST/CIFAR-10/folder configs use the perceptual term: give them local VGG weights."""
    return ["--model.loss.init_args.vgg_weights", vgg_weights_file]


def assert_trained(run: str, image_shape: tuple[int, int, int]) -> None:
    """The run wrote a checkpoint of one optimizer step, for a model built for the data's image shape."""
    checkpoint = torch.load(f"checkpoints/{run}/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1
    assert tuple(checkpoint["hyper_parameters"]["image_shape"]) == image_shape
    assert checkpoint["hyper_parameters"]["unet"]["init_args"]["in_channels"] == image_shape[0]
    assert all(value.isfinite().all() for value in checkpoint["state_dict"].values() if value.is_floating_point())


def test_fit_mnist(mnist_dir, vgg):
    fit("--config", f"{ROOT}/configs/mnist.yaml", "--config", TINY, *ONE_STEP, "--data.init_args.data_dir",
        str(mnist_dir), *vgg)  # fmt: skip
    assert_trained("mnist", (1, 28, 28))


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_fit_cifar10(cifar10_dir, vgg, on_device):
    fit("--config", f"{ROOT}/configs/cifar10.yaml", "--config", TINY, *ONE_STEP, "--data.init_args.data_dir",
        str(cifar10_dir), "--data.init_args.on_device", on_device, *vgg)  # fmt: skip
    assert_trained("cifar10", (3, 32, 32))


def test_fit_image_folder(image_folder, vgg):
    fit("--config", f"{ROOT}/configs/folder.yaml", "--config", TINY, *ONE_STEP, "--data.init_args.root",
        str(image_folder), "--data.init_args.batch_size", "3", *vgg)  # fmt: skip
    assert_trained("folder", (3, 32, 32))


def test_every_loss_term_is_logged(image_folder, vgg):
    short_run(image_folder, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", *vgg)
    (metrics,) = Path("logs").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/loss_mse", "train/loss_perceptual", "train/loss_feature_matching"):
        assert name in header


def test_fit_demo_writes_a_sample_grid(tmp_path):
    pytest.importorskip("mlxtend")
    fit(
        "--config",
        f"{ROOT}/configs/demo.yaml",
        "--config",
        TINY,
        *ONE_STEP,
        "--trainer.limit_val_batches",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.val_check_interval",
        "1",
    )
    grid = tmp_path / "samples" / "demo" / "step=1.png"
    assert grid.is_file()
    assert Image.open(grid).size == (8 * 30 + 2, 8 * 30 + 2)  # 8x8 digits of 28 px, 2 px padding


def test_the_sample_grid_is_drawn_in_the_runs_precision(tmp_path, monkeypatch):
    # Lightning autocasts only inside *_step; the grid is drawn in an epoch-end hook, so it enters the run's
    # precision itself (bf16 here, as training ran).
    from diffusion_lit.module import DiffusionModule

    seen, sample = [], DiffusionModule.sample

    def draw(module, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return sample(module, *args, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample", draw)
    fit("--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, *ONE_STEP, "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval", "1", "--trainer.precision",
        "bf16-mixed")  # fmt: skip
    assert (tmp_path / "samples" / "demo" / "step=1.png").is_file() and seen == [(True, torch.bfloat16)]


def test_missing_dataset_exits_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit(
            "--config",
            f"{ROOT}/configs/mnist.yaml",
            "--config",
            TINY,
            "--data.init_args.download",
            "false",
            "--data.init_args.data_dir",
            str(tmp_path / "absent"),
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-ddpm: error: MNIST is not in")


def test_missing_checkpoint_exits_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit("--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--ckpt_path", "checkpoints/none.ckpt")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lit-ddpm: error: --ckpt_path 'checkpoints/none.ckpt' is not a file; give the path of a .ckpt file"]


def test_predict_is_a_clear_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", f"{ROOT}/configs/demo.yaml", "--config", TINY])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-ddpm: error: images come from `lit-ddpm sample --ckpt_path CKPT`")


def test_print_config_round_trips(tmp_path, capsys, mnist_dir, vgg):
    with pytest.raises(SystemExit):
        fit("--config", f"{ROOT}/configs/cifar10.yaml", "--print_config")
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["unet"]["init_args"]["base_channels"] == 64
    assert config["model"]["optimizer"]["init_args"]["lr"] == 1e-3 and config["data"]["init_args"]["batch_size"] == 64
    (tmp_path / "printed.yaml").write_text(printed)
    fit(
        "--config",
        str(tmp_path / "printed.yaml"),
        "--config",
        TINY,
        "--data.init_args.data_dir",
        str(mnist_dir),
        "--data.class_path",
        "diffusion_lit.data.MNISTDataModule",
        *vgg,
    )


def test_report_overlay_restores_the_reports_prediction_target_and_names_the_run(capsys):
    with pytest.raises(SystemExit):
        fit("--config", f"{ROOT}/configs/cifar10.yaml", "--config", f"{ROOT}/configs/report.yaml", "--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["prediction"] == "eps" and config["variant"] == "report"
    assert config["model"]["loss"]["init_args"]["snr_gamma"] is None
    optimizer = config["model"]["optimizer"]["init_args"]
    assert optimizer["lr"] == 2e-4 and optimizer["fused"] is True  # the report's learning rate, fused kept
    assert config["model"]["loss"]["init_args"]["perceptual_weight"] == 0.1  # the rest of the config is left alone
    with pytest.raises(SystemExit):
        fit("--config", f"{ROOT}/configs/cifar10.yaml", "--print_config")
    shipped = yaml.safe_load(capsys.readouterr().out)["model"]
    assert shipped["prediction"] == "v" and shipped["optimizer"]["init_args"]["lr"] == 1e-3


MSE_ONLY = ["--config", f"{ROOT}/configs/ablation/mse_only.yaml"]


def short_run(image_folder, *extra: str) -> None:
    fit(
        "--config",
        f"{ROOT}/configs/folder.yaml",
        "--config",
        TINY,
        "--trainer.fast_dev_run",
        "false",
        "--data.init_args.root",
        str(image_folder),
        "--data.init_args.image_size",
        "16",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        "logs",
        "--trainer.max_epochs",
        "-1",
        "--trainer.limit_val_batches",
        "0",
        *extra,
    )


def test_resume_restores_step_optimizer_and_ema(image_folder):
    short_run(image_folder, "--trainer.max_steps", "3", *MSE_ONLY)
    first = torch.load("checkpoints/folder/last.ckpt", weights_only=False)
    assert first["global_step"] == 3
    ema = first["state_dict"]["unet.stem.weight"]
    current = first["current_model_state"]["unet.stem.weight"]
    assert not torch.equal(ema, current)  # the EMA weights are what `state_dict` holds

    short_run(image_folder, "--trainer.max_steps", "5", "--ckpt_path", "checkpoints/folder/last.ckpt", *MSE_ONLY)
    second = torch.load("checkpoints/folder/last.ckpt", weights_only=False)
    assert second["global_step"] == 5
    adam_steps = second["optimizer_states"][0]["state"][0]["step"]
    assert adam_steps.item() == 5  # Adam's moments carried on, not restarted
    assert second["averaging_state"]["n_averaged"].item() == 5

    # A checkpoint describes itself: the module (UNet included) is rebuilt from it with the EMA weights.
    module = DiffusionModule.load_from_checkpoint("checkpoints/folder/last.ckpt", weights_only=True)
    assert module.image_shape == (3, 16, 16) and module.unet.in_channels == 3
    assert torch.equal(module.unet.stem.weight, second["state_dict"]["unet.stem.weight"])


def test_help_lists_every_command_with_a_line_each(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "sample"):
        assert any(line.strip().startswith(f"{command} ") for line in out.splitlines()), command
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "sample" in capsys.readouterr().err


def test_a_lower_layers_setting_is_followed_by_its_command_line_spelling(capsys, tmp_path):
    # The datamodule names its argument as Python does; the command line adds how a config spells it.
    with pytest.raises(SystemExit):
        fit("--config", f"{ROOT}/configs/folder.yaml", "--config", TINY, "--data.init_args.root", str(tmp_path / "no"))
    err = capsys.readouterr().err.strip()
    assert err.endswith("set ImageFolderDataModule.root (--data.init_args.root)") and len(err.splitlines()) == 1
