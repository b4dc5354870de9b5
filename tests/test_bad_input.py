"""The bad-input table: each row ends in one clear line on stderr and exit status 2, and loses no work.

Rows covered elsewhere: a dataset missing offline (test_data, test_commands), an image folder with no images
(test_data), missing VGG weights (test_losses), missing or unreadable Inception weights (test_metrics),
a --ckpt_path that does not exist (test_commands), bad `sample` options and checkpoints (test_sample).
"""

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ONE_STEP, ROOT, TINY, StandInExtractor, one_line_error
from diffusion_lit.cli import main
from diffusion_lit.data import ImageFolderDataModule
from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet

DEMO = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY]
MSE_ONLY = f"{ROOT}/configs/ablation/mse_only.yaml"
SHORT = ["--trainer.fast_dev_run", "false", "--trainer.max_steps", "2", "--trainer.max_epochs", "-1",
         "--trainer.limit_val_batches", "0"]  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_unknown_config_key(capsys):
    assert "unrecognized arguments: --model.lrr" in one_line_error(capsys, "fit", *DEMO, "--model.lrr", "1")


def test_wrong_type(capsys):
    error = one_line_error(capsys, "fit", *DEMO, "--model.timesteps", "fast")
    assert "Parser key \"model.timesteps\": Expected a <class 'int'>. Got value: fast" in error
    error = one_line_error(capsys, "fit", *DEMO, "--model.warmup_steps", "fast")  # steps, or a share of the run
    assert "--model.warmup_steps: expected int or float, got 'fast'" in error


def test_unknown_sampler_for_evaluation(capsys):
    error = one_line_error(capsys, "test", *DEMO, "--evaluation.sampling.sampler", "euler")
    assert "evaluation.sampling.sampler" in error


def test_evaluation_steps_out_of_range(capsys, demo_checkpoint):
    steps = ["--evaluation.sampling.steps", "21"]
    error = one_line_error(capsys, "test", *DEMO, "--ckpt_path", str(demo_checkpoint), *steps)
    assert "SampleQuality.sampling.steps (--evaluation.sampling.steps) must be between 1 and the model's 20" in error


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda path: path.write_bytes(path.read_bytes()[:2000]), "is not a readable checkpoint"),  # truncated
        (lambda path: path.write_bytes(b"\x00" * 100), "is not a readable checkpoint"),  # corrupt
        (lambda path: path.write_text("model: {}\n"), "is not a readable checkpoint"),  # not a checkpoint
        (lambda path: torch.save({"weights": torch.zeros(2)}, path), "not a Lightning checkpoint"),  # foreign
    ],
    ids=["truncated", "corrupt", "text", "foreign"],
)
def test_bad_checkpoint_files(capsys, demo_checkpoint, make, message):
    make(demo_checkpoint)
    for command in ("fit", "test"):
        assert message in one_line_error(capsys, command, *DEMO, "--ckpt_path", str(demo_checkpoint))


def test_the_cli_rebuilds_the_model_a_checkpoint_describes(demo_checkpoint, monkeypatch, tmp_path):
    # LightningCLI applies the checkpoint's hyper-parameters, so a config with another UNet still loads it.
    monkeypatch.setattr("diffusion_lit.callbacks.quality.load_inception", lambda *args, **kwargs: StandInExtractor())
    tested = []

    def write(trainer, module, *args):  # instead of the scores' files: which network was tested
        tested.append(module.unet.config["base_channels"])

    monkeypatch.setattr("diffusion_lit.callbacks.quality.write_test_scores", write)
    main(["test", *DEMO, "--ckpt_path", str(demo_checkpoint), "--model.unet.init_args.base_channels", "16",
          "--evaluation.num_samples", "2", "--evaluation.sampling.steps", "2", "--evaluation.reference", "test",
          "--evaluation.cache_dir", str(tmp_path / "cache")])  # fmt: skip
    assert tested == [8]  # tests/tiny.yaml's width, as the checkpoint says, not the 16 asked for


def test_checkpoint_of_another_model_config(demo_checkpoint):
    from lightning.pytorch import Trainer

    from diffusion_lit.data import DemoMNISTDataModule

    other = DiffusionModule(UNet(1, base_channels=16, num_heads=2), image_shape=(1, 28, 28), timesteps=20)
    trainer = Trainer(logger=False, enable_progress_bar=False, limit_val_batches=1)
    with pytest.raises(UserError, match=r"trained with another model configuration: unet\..* has shape"):
        trainer.validate(other, DemoMNISTDataModule(batch_size=4), ckpt_path=str(demo_checkpoint))


def test_image_size_the_model_cannot_take(capsys, image_folder):
    error = one_line_error(
        capsys, "fit", "--config", f"{ROOT}/configs/folder.yaml", "--config", TINY,
        "--data.init_args.root", str(image_folder), "--data.init_args.image_size", "8",
    )  # fmt: skip
    assert "8x8 images are too small for this UNet's 4 levels: the sides must be at least 16" in error


def test_one_channel_data_into_a_three_channel_model():
    with pytest.raises(UserError, match="1-channel images but the UNet takes 3; set UNet.in_channels to 1"):
        DiffusionModule(UNet(3, base_channels=8, num_heads=2), image_shape=(1, 28, 28))


def test_the_cli_builds_the_model_for_the_data_channels(mnist_dir, tmp_path):
    # The CLI links data.image_shape into the UNet's in_channels: gray data never meets an RGB model.
    main(["fit", "--config", f"{ROOT}/configs/cifar10.yaml", "--config", TINY, *ONE_STEP, "--config",
          f"{ROOT}/configs/ablation/mse_only.yaml", "--data.class_path", "diffusion_lit.data.MNISTDataModule",
          "--data.init_args.data_dir", str(mnist_dir)])  # fmt: skip
    hyper_parameters = torch.load("checkpoints/cifar10/last.ckpt", weights_only=True)["hyper_parameters"]
    assert hyper_parameters["unet"]["init_args"]["in_channels"] == 1 and hyper_parameters["image_shape"] == (1, 28, 28)


def broken_folder(image_folder: Path) -> Path:
    (image_folder / "part0" / "truncated.png").write_bytes((image_folder / "part0" / "0.jpg").read_bytes()[:50])
    (image_folder / "part1" / "text.png").write_text("not an image")
    return image_folder


def test_folder_with_unreadable_files_skips_them_by_default(image_folder):
    data = ImageFolderDataModule(str(broken_folder(image_folder)), image_size=8, val_fraction=0.2)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image files"):
        data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 10


def test_folder_with_unreadable_files_can_refuse(image_folder):
    data = ImageFolderDataModule(str(broken_folder(image_folder)), image_size=8, bad_files="error")
    with pytest.raises(UserError, match="2 files in .* are not readable images .*truncated.png"):
        data.setup("fit")


def test_folder_of_mixed_sizes_and_modes_gives_uniform_batches(image_folder):
    # The fixture mixes widths 40-76, RGB PNGs and grayscale JPEGs.
    for channels in (1, 3):
        data = ImageFolderDataModule(str(image_folder), image_size=16, channels=channels, batch_size=9)
        data.setup("fit")
        images, labels = next(iter(data.train_dataloader()))
        assert images.shape == (9, channels, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_disk_full_while_writing_samples_does_not_end_training(monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("diffusion_lit.generation.save_image", full)
    with pytest.warns(UserWarning, match="could not write the sample grid .*No space left on device"):
        main(["fit", *DEMO, *SHORT, "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1",
              "--trainer.val_check_interval", "2", "--trainer.logger", "false"])  # fmt: skip
    checkpoint = torch.load(tmp_path / "checkpoints" / "demo" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # the run finished and saved its work


def test_disk_full_while_writing_sample_files_is_one_line(capsys, demo_checkpoint, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("diffusion_lit.generation.save_image", full)
    error = one_line_error(capsys, "sample", "--ckpt_path", str(demo_checkpoint), "--num_samples", "2", "--steps", "2")
    assert "could not write the samples to" in error and "No space left on device" in error


def test_secrets_never_reach_saved_configs_or_checkpoints(monkeypatch, tmp_path, demo_checkpoint):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    main(["fit", *DEMO, *SHORT, "--name", "with_logs", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.save_dir", "logs"])  # fmt: skip
    for path in [*tmp_path.rglob("*.yaml"), *tmp_path.rglob("*.ckpt"), *tmp_path.rglob("*.csv")]:
        assert secret.encode() not in path.read_bytes(), path


def test_demo_pixels_are_unchanged_by_the_checks():
    # Guard against a check that "fixes" data silently: a readable PNG passes through unchanged.
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    folder = Path("plain")
    (folder / "a").mkdir(parents=True)
    for name in ("x.png", "y.png"):
        Image.fromarray(pixels, "L").save(folder / "a" / name)
    data = ImageFolderDataModule(str(folder), image_size=8, channels=1, hflip=False, val_fraction=0.5)
    data.setup("fit")
    image, _ = data.train_set[0]
    assert torch.equal(((image + 1) * 127.5).round().to(torch.uint8)[0], torch.from_numpy(pixels))
    shutil.rmtree(folder)


def test_unknown_subcommand_lists_sample_too(capsys):
    error = one_line_error(capsys, "fitt")
    assert "invalid choice: 'fitt'" in error and "'sample'" in error


def test_fid_off_trains_past_the_fid_epoch_and_keeps_no_best_checkpoint(image_folder, tmp_path, monkeypatch):
    # The best-FID checkpoint belongs to evaluation itself, so turning FID off cannot leave a checkpoint
    # callback waiting for a val/fid that never comes (Lightning stopped such runs at epoch 5).
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", f"{ROOT}/configs/folder.yaml", "--config", TINY, "--config", MSE_ONLY,
          "--trainer.fast_dev_run", "false", "--data.init_args.root", str(image_folder),
          "--data.init_args.image_size", "16", "--trainer.max_epochs", "6"])  # fmt: skip
    assert torch.load(tmp_path / "checkpoints" / "folder" / "last.ckpt", weights_only=True)["epoch"] == 6
    assert not list((tmp_path / "checkpoints" / "folder").glob("best-fid*"))


def test_checkpoint_of_an_earlier_version_is_one_line_and_upgrades_in_place(capsys, demo_checkpoint):
    from diffusion_lit.checkpoints import LOSS_SETTINGS, upgrade_checkpoint

    checkpoint = torch.load(demo_checkpoint, weights_only=True)
    today = dict(checkpoint["hyper_parameters"])
    earlier = checkpoint["hyper_parameters"]  # the same settings as lit-ddpm 0.1 wrote them: flat, two more
    loss, adam = earlier.pop("loss")["init_args"], earlier.pop("optimizer")["init_args"]
    loss = {name: loss[name] for name in LOSS_SETTINGS}  # the loss settings 0.1 had; later ones take their defaults
    earlier.update(loss, lr=adam["lr"], adam_betas=tuple(adam["betas"]), weight_decay=adam["weight_decay"],
                   fused_adam=adam["fused"], sample_variance="small", max_nonfinite_steps=50)  # fmt: skip
    torch.save(checkpoint, demo_checkpoint)
    for command in ("fit", "test"):
        error = one_line_error(capsys, command, *DEMO, "--ckpt_path", str(demo_checkpoint))
        assert "adam_betas, feature_matching_weight" in error and "have moved" in error
        assert "perceptual_weight -> model.loss.init_args.perceptual_weight" in error
        assert f"python -m diffusion_lit.checkpoints {demo_checkpoint}" in error
    main(["sample", "--ckpt_path", str(demo_checkpoint), "--num_samples", "2", "--steps", "2", "--output", "early"])
    assert Path("early/samples.npz").is_file()  # sample reads it as it is
    assert "sample_variance" in upgrade_checkpoint(str(demo_checkpoint))
    upgraded = torch.load(demo_checkpoint, weights_only=True)["hyper_parameters"]
    assert upgraded["loss"]["init_args"] == {name: today["loss"]["init_args"][name] for name in LOSS_SETTINGS}
    assert {name: upgraded["optimizer"]["init_args"][name] for name in ("lr", "betas", "weight_decay", "fused")} == {
        name: today["optimizer"]["init_args"][name] for name in ("lr", "betas", "weight_decay", "fused")}  # fmt: skip
    main(["fit", *DEMO, *SHORT, "--trainer.logger", "false", "--trainer.max_steps", "3", "--ckpt_path",
          str(demo_checkpoint)])  # fmt: skip
    assert torch.load(demo_checkpoint, weights_only=True)["global_step"] == 3


def test_an_unknown_model_setting_is_named_and_its_advice_works(capsys, demo_checkpoint):
    from diffusion_lit import checkpoints

    state = torch.load(demo_checkpoint, weights_only=True)
    state["hyper_parameters"]["attention_window"] = 8  # a setting this lit-ddpm never had (a newer one's?)
    torch.save(state, demo_checkpoint)
    for command in ("fit", "test"):
        error = one_line_error(capsys, command, *DEMO, "--ckpt_path", str(demo_checkpoint))
        assert "attention_window" in error and f"--drop attention_window {demo_checkpoint}" in error
    checkpoints.main(["--drop", "attention_window", str(demo_checkpoint)])  # the advice, followed
    assert "dropped attention_window" in capsys.readouterr().out
    main(["fit", *DEMO, *SHORT, "--trainer.logger", "false", "--trainer.max_steps", "3", "--ckpt_path",
          str(demo_checkpoint)])  # fmt: skip
    assert torch.load(demo_checkpoint, weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    "make",
    [lambda path: path.write_bytes(path.read_bytes()[:2000]),  # truncated
     lambda path: path.write_bytes(b"\x80\x04cos\nsystem\nq\x00."),  # a pickle that would call os.system
     lambda path: path.unlink()],  # missing
    ids=["truncated", "hostile", "missing"],
)  # fmt: skip
def test_the_upgrade_tool_answers_bad_files_in_one_line(capsys, demo_checkpoint, make):
    from diffusion_lit import checkpoints

    make(demo_checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        checkpoints.main([str(demo_checkpoint)])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(demo_checkpoint) in err[0], err


def test_guidance_for_an_unconditional_model_is_one_line(capsys, demo_checkpoint):
    error = one_line_error(capsys, "sample", "--ckpt_path", str(demo_checkpoint), "--guidance", "3")
    assert "--guidance" in error and "unconditional" in error
    error = one_line_error(capsys, "test", *DEMO, "--ckpt_path", str(demo_checkpoint),
                           "--evaluation.sampling.guidance", "3")  # fmt: skip
    assert "evaluation.sampling.guidance" in error and "unconditional" in error


def test_a_file_as_the_image_folder_is_named_as_such(tmp_path, image_folder):
    data = ImageFolderDataModule(str(image_folder / "part1" / "1.png"), image_size=16)
    with pytest.raises(UserError, match=r"is a file, not a folder"):
        data.setup("fit")


def test_the_last_progress_line_counts_the_epochs_run(capsys):
    # The demo config's ProgressBar writes plain lines here: pytest's stdout is not a terminal.
    main(["fit", *DEMO, "--trainer.logger", "false"])  # fast_dev_run: one step of one epoch
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("step 1/1 · epoch 1/1 · ")
    main(["fit", *DEMO, *SHORT, "--trainer.logger", "false", "--trainer.max_steps", "3", "--trainer.max_epochs", "18"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("step 3/3 · epoch 1/18 · ")


def test_a_write_cut_short_leaves_no_file_that_looks_complete(capsys, demo_checkpoint, monkeypatch):
    real_savez = np.savez

    def half_then_full(file, **arrays):  # writes part of the file, then the disk is full
        real_savez(file, arr_0=arrays["arr_0"][:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("diffusion_lit.generation.np.savez", half_then_full)
    one_line_error(capsys, "sample", "--ckpt_path", str(demo_checkpoint), "--num_samples", "2", "--steps", "2",
                   "--output", "out")  # fmt: skip
    assert not Path("out/samples.npz").exists()
    assert not [p for p in Path("out").rglob("*") if p.is_file() and p.name != "grid.png"]  # no partial file left

    monkeypatch.setattr("diffusion_lit.callbacks.quality.load_inception", lambda *args, **kwargs: StandInExtractor())
    test = ["test", *DEMO, "--ckpt_path", str(demo_checkpoint), "--evaluation.num_samples", "2",
            "--evaluation.sampling.steps", "2", "--evaluation.reference", "test",
            "--evaluation.cache_dir", "cache"]  # fmt: skip
    one_line_error(capsys, *test)
    written = sorted(p.name for p in demo_checkpoint.parent.iterdir())
    # neither the scores' JSON nor a partial npz; bits/dim (tests/tiny.yaml), written whole before the samples
    assert written == ["last-bpd-small-n8-all-seed0.json", "last.ckpt"], written


def test_an_interrupted_grid_write_leaves_no_grid(demo_checkpoint, monkeypatch):
    from diffusion_lit import generation

    real_save_image = generation.save_image

    def interrupted(grid, path):
        real_save_image(grid[:, :10], path)  # part of the picture, then the signal
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusion_lit.generation.save_image", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt_path", str(demo_checkpoint), "--num_samples", "2", "--steps", "2", "--output", "out"])
    assert exit_info.value.code == 130
    assert not [p for p in Path("out").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--data.init_args.batch_size", "0"],
         "DemoMNISTDataModule.batch_size (--data.init_args.batch_size) must be at least 1, got 0"),
        (["--data.init_args.batch_size", "-3"], "(--data.init_args.batch_size) must be at least 1, got -3"),
        (["--data.init_args.num_workers", "-1"], "(--data.init_args.num_workers) must be at least 0, got -1"),
        (["--model.timesteps", "0"], "DiffusionModule.timesteps (--model.timesteps) must be at least 1, got 0"),
        (["--model.timesteps", "-10"], "(--model.timesteps) must be at least 1, got -10"),
        (["--model.optimizer.init_args.lr", "-1"],
         "the optimizer (model.optimizer in a config) refused its settings: Invalid learning rate: -1.0"),
        (["--trainer.precision", "64"],
         "--trainer.precision 64 is not supported; use one of 32-true, 32, 16-mixed, bf16-mixed"),
        (["--model.unet.init_args.num_heads", "0"],
         "UNet.num_heads (--model.unet.init_args.num_heads) must be at least 1, got 0"),
        (["--trainer.max_steps", "-5"],
         "the trainer refused its settings (--trainer.*): `max_steps` must be a non-negative integer or -1"),
        (["--model.warmup_steps", "-5"], "(--model.warmup_steps) must be at least 0, got -5"),
        (["--model.label_dropout", "2"], "(--model.label_dropout) must be between 0 and 1, got 2.0"),
    ],
)  # fmt: skip
def test_a_setting_out_of_its_range_is_one_line(capsys, args, says):
    assert says in one_line_error(capsys, "fit", *DEMO, "--trainer.logger", "false", *args)


def test_distilling_with_out_of_range_settings_is_one_line(capsys, demo_checkpoint):
    distill = ["distill", *DEMO, "--trainer.logger", "false", "--teacher", str(demo_checkpoint)]
    assert "--distill.steps must be at least 1, got -3" in one_line_error(capsys, *distill, "--distill.steps", "-3")
    error = one_line_error(capsys, *distill, "--distill.warmup_steps", "-0.5")
    assert "--distill.warmup_steps must be at least 0, got -0.5" in error
    error = one_line_error(capsys, *distill, "--model.loss.init_args.segments", "0")
    assert "ConsistencyLoss.segments (--model.loss.init_args.segments) must be at least 1, got 0" in error


def test_sampling_with_a_seed_too_large_or_more_images_than_memory_is_one_line(capsys, demo_checkpoint, monkeypatch):
    sample = ["sample", "--ckpt_path", str(demo_checkpoint), "--steps", "2"]
    error = one_line_error(capsys, *sample, "--seed", "99999999999999999")
    assert error.endswith("--seed must be between 0 and 9,223,372,036,853, got 99999999999999999")
    error = one_line_error(capsys, *sample, "--num_samples", "100000000", "--batch_size", "100000000")
    assert "the samples take 78.4 GB of memory" in error
    monkeypatch.setattr("os.sysconf", lambda name: 2**40 if name == "SC_AVPHYS_PAGES" else 4096)  # memory: plenty
    error = one_line_error(capsys, *sample, "--num_samples", "100000000", "--output", "out")
    assert "the samples take 78.4 GB, and " in error and "set --output" in error
    assert not Path("out").exists()

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 313600000000 bytes")

    monkeypatch.setattr("diffusion_lit.cli.sample.generate_all", no_memory)
    error = one_line_error(capsys, *sample, "--batch_size", "1000")
    assert error.endswith("out of memory sampling batches of 1000; lower --batch_size")


def test_lightnings_checkpoint_keywords_are_resolved_or_refused_in_one_line(capsys, demo_checkpoint):
    run = ["--trainer.logger", "false", "--trainer.limit_val_batches", "1"]
    assert "lit-ddpm writes no hpc_ckpt files" in one_line_error(capsys, "test", *DEMO, "--ckpt_path", "hpc")
    assert "does not read Lightning's model registry" in one_line_error(capsys, "fit", *DEMO, "--ckpt_path", "registry")
    error = one_line_error(capsys, "validate", *DEMO, *run, "--ckpt_path", "best")
    assert "checkpoints/demo holds no best-fid-epoch=N.ckpt" in error
    shutil.copyfile(demo_checkpoint, demo_checkpoint.with_name("best-fid-epoch=3.ckpt"))
    shutil.copyfile(demo_checkpoint, demo_checkpoint.with_name("best-fid-epoch=11.ckpt"))
    assert "best is for validate and test" in one_line_error(capsys, "fit", *DEMO, "--ckpt_path", "best")
    main(["validate", *DEMO, *run, "--ckpt_path", "best"])
    assert "--ckpt_path best: checkpoints/demo/best-fid-epoch=11.ckpt" in capsys.readouterr().err


def test_fit_does_not_resume_from_weights_alone(capsys, demo_checkpoint):
    full = torch.load(demo_checkpoint, weights_only=True)
    kept = ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")
    torch.save({**{key: full[key] for key in kept}, "posthoc_ema": {"sigma_rel": 0.1}}, "ema.ckpt")
    torch.save(full["state_dict"], "weights.pt")
    error = one_line_error(capsys, "fit", *DEMO, "--ckpt_path", "ema.ckpt")
    assert "is a post-hoc EMA checkpoint (lit-ddpm ema), with no optimizer state or training progress" in error
    assert "not a Lightning checkpoint (no state_dict)" in one_line_error(
        capsys, "fit", *DEMO, "--ckpt_path", "weights.pt"
    )


def test_a_run_folder_that_is_a_file_a_lock_that_is_a_folder_and_an_empty_name_are_one_line(capsys):
    Path("checkpoints/demo/run.lock").mkdir(parents=True)
    assert "run.lock is a folder, where the run keeps its lock file" in one_line_error(capsys, "fit", *DEMO, *SHORT)
    Path("checkpoints/other").write_text("not a folder")
    error = one_line_error(capsys, "fit", *DEMO, *SHORT, "--name", "other")
    assert "checkpoints/other is a file, where the run's folder would be" in error
    assert "--name '' names no folder of its own" in one_line_error(capsys, "fit", *DEMO, *SHORT, "--name", "")
    assert not Path("checkpoints/last.ckpt").exists()


def test_a_checkpoint_with_a_non_finite_weight_makes_no_images(capsys, demo_checkpoint, monkeypatch):
    checkpoint = torch.load(demo_checkpoint, weights_only=True)
    name = next(name for name, value in checkpoint["state_dict"].items() if value.is_floating_point())
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, demo_checkpoint)
    error = one_line_error(capsys, "sample", "--ckpt_path", str(demo_checkpoint), "--steps", "2", "--output", "out")
    assert f"cannot make images (use an earlier checkpoint of the run): {name} has non-finite values" in error
    assert not Path("out").exists()
    # `test` too: no FID of images of one colour (nor bits/dim of a broken model)
    monkeypatch.setattr("diffusion_lit.callbacks.quality.load_inception", lambda *args, **kwargs: StandInExtractor())
    error = one_line_error(capsys, "test", *DEMO, "--ckpt_path", str(demo_checkpoint), "--evaluation.num_samples", "2")
    assert f"checkpoints/demo/last.ckpt cannot make images: {name} has non-finite values" in error
    assert sorted(p.name for p in demo_checkpoint.parent.iterdir()) == ["last.ckpt"]


def test_an_image_gone_while_training_is_skipped_by_name_and_past_the_limit_stops_in_one_line(
    image_folder, capfd, monkeypatch
):
    """With a data-loading worker: its warnings and its one-line stop reach the user as such."""
    real = ImageFolderDataModule._readable
    gone = image_folder / "gone.png"  # passed the start-up check, deleted since
    monkeypatch.setattr(ImageFolderDataModule, "_readable", lambda self, paths: [gone, *real(self, paths)])
    run = ["fit", "--config", f"{ROOT}/configs/folder.yaml", "--config", TINY, "--config", MSE_ONLY,
           "--data.init_args.root", str(image_folder), "--data.init_args.image_size", "16",
           "--data.init_args.num_workers", "1", "--data.init_args.val_fraction", "0.01", *SHORT,
           "--trainer.max_steps", "8", "--trainer.logger", "false"]  # fmt: skip
    main(run)  # every image is read within the 8 steps' 32 images
    assert f"skipped {gone}, which failed to read" in capfd.readouterr().err
    assert torch.load("checkpoints/folder/last.ckpt", weights_only=True)["global_step"] == 8
    error = one_line_error(capfd, *run, "--name", "strict", "--data.init_args.max_unreadable", "0")
    assert "1 images failed to read while training, more than ImageFolderDataModule.max_unreadable" in error
    assert "(--data.init_args.max_unreadable) 0 (the last: " in error and "resume the run" in error


def test_sample_refuses_a_missing_gpu_a_file_as_output_and_negative_guidance_by_name(capsys, demo_checkpoint,
                                                                                     monkeypatch):  # fmt: skip
    sample = ["sample", "--ckpt_path", str(demo_checkpoint), "--steps", "2"]
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert "--device cuda: torch sees no CUDA device" in one_line_error(capsys, *sample, "--device", "cuda")
    Path("taken").write_text("a file")
    assert "--output taken is a file; name a folder" in one_line_error(capsys, *sample, "--output", "taken")
    assert "--guidance must be 0 or more" in one_line_error(capsys, *sample, "--guidance", "-2")


def test_a_resume_says_what_the_checkpoint_changed_and_never_replaces_a_newer_last_ckpt(capsys, demo_checkpoint):
    run = ["fit", *DEMO, *SHORT, "--trainer.logger", "false"]
    older = demo_checkpoint.with_name("step-2.ckpt")
    shutil.copyfile(demo_checkpoint, older)
    main([*run, "--trainer.max_steps", "3", "--ckpt_path", "last", "--model.label_dropout", "0.2"])
    err = capsys.readouterr().err
    assert "lit-ddpm: warning: the checkpoint's model settings are used: model.label_dropout 0.1 (not 0.2)" in err
    assert "unet.class_path" not in err and "in_channels" not in err  # the same class; a linked setting
    with pytest.raises(SystemExit):
        main([*run, "--trainer.max_steps", "2", "--ckpt_path", str(older)])
    err = capsys.readouterr().err
    assert f"{older} is at step 2, and --trainer.max_steps is 2: nothing to train" in err
    assert f"last.ckpt is at step 3, newer than {older} (step 2) of the same run, which would replace it" in err
    assert torch.load(demo_checkpoint, weights_only=True)["global_step"] == 3
