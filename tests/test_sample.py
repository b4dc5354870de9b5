"""`lit-ddpm sample` on tiny checkpoints, and fitting the class-conditional configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY
from diffusion_lit.cli import main
from diffusion_lit.diffusion import Sampling

SHORT = ["--config", TINY, "--config", f"{ROOT}/configs/ablation/mse_only.yaml", "--trainer.fast_dev_run", "false",
         "--trainer.max_steps", "2", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs"]  # fmt: skip


@pytest.fixture
def conditional_checkpoint(tmp_path, monkeypatch, mnist_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", f"{ROOT}/configs/mnist.yaml", "--config", f"{ROOT}/configs/cond.yaml", *SHORT,
          "--data.init_args.data_dir", str(mnist_dir)])  # fmt: skip
    return tmp_path / "checkpoints" / "mnist_cond" / "last.ckpt"


def sample(*args: str) -> None:
    main(["sample", *args])


def test_sample_writes_grid_pngs_and_npz_and_is_seeded(demo_checkpoint, tmp_path, capsys):
    common = ["--ckpt_path", str(demo_checkpoint), "--num_samples", "6", "--steps", "5", "--batch_size", "4"]
    sample(*common, "--output", "a", "--png", "true")
    sample(*common, "--output", "b", "--sampler", "ddim", "--npz", "true")
    sample(*common, "--output", "c", "--seed", "1", "--grid", "false")
    assert "6 samples written to a/" in capsys.readouterr().out
    a = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    assert a.shape == (6, 28, 28, 1) and a.dtype == np.uint8  # native channels
    assert Image.open(tmp_path / "a" / "grid.png").size == (3 * 30 + 2, 2 * 30 + 2)  # 3 per row, 2 px padding
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "images" / "000005.png")), a[5, ..., 0])
    sample(*common, "--output", "a2")
    assert np.array_equal(np.load(tmp_path / "a2" / "samples.npz")["arr_0"], a)  # same seed, same images
    assert not np.array_equal(np.load(tmp_path / "c" / "samples.npz")["arr_0"], a)
    assert not (tmp_path / "c" / "grid.png").exists()


def test_sample_default_output_folder(demo_checkpoint, tmp_path):
    sample("--ckpt_path", str(demo_checkpoint), "--num_samples", "2", "--steps", "2")
    prediction = torch.load(demo_checkpoint, weights_only=True)["hyper_parameters"]["prediction"]
    assert (tmp_path / "samples" / f"last-{Sampling(steps=2).resolve(prediction, 20).name}" / "grid.png").is_file()


def test_conditional_checkpoint_samples_one_class_or_all(conditional_checkpoint, tmp_path):
    common = ["--ckpt_path", str(conditional_checkpoint), "--steps", "3", "--guidance", "2"]
    sample(*common, "--num_samples", "4", "--class", "7", "--output", "seven")
    assert np.load(tmp_path / "seven" / "samples.npz")["labels"].tolist() == [7, 7, 7, 7]
    sample(*common, "--num_samples", "20", "--class", "all", "--output", "all")
    saved = np.load(tmp_path / "all" / "samples.npz")
    assert saved["labels"].tolist() == [c for c in range(10) for _ in range(2)]  # one row of 2 per class
    assert Image.open(tmp_path / "all" / "grid.png").size == (2 * 30 + 2, 10 * 30 + 2)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--class", "3"], "needs a class-conditional checkpoint"),
        (["--steps", "0"], "--steps must be between 1 and the model's 20 timesteps"),
        (["--steps", "21"], "--steps must be between 1 and the model's 20 timesteps"),
        (["--num_samples", "0"], "--num_samples and --batch_size must be at least 1"),
    ],
)
def test_bad_sample_options_are_one_line(demo_checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        sample("--ckpt_path", str(demo_checkpoint), *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_sampler_and_bad_checkpoints_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"\x00not a checkpoint")
    for args, message in [
        (["--ckpt_path", "missing.ckpt"], "is not a file"),
        (["--ckpt_path", "junk.ckpt"], "is not a readable checkpoint"),
        (["--ckpt_path", "junk.ckpt", "--sampler", "euler"], "euler"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            sample(*args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_class_count_mismatch_between_model_and_data_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", f"{ROOT}/configs/folder.yaml", *SHORT, "--data.init_args.root", str(image_folder),
              "--data.init_args.image_size", "16", "--model.unet.init_args.num_classes", "10"])  # fmt: skip
    err = capsys.readouterr().err
    assert "conditional on 10 classes but the data has no classes" in err
    assert "ImageFolderDataModule.class_folders (--data.init_args.class_folders) true" in err


def test_sample_under_bf16_autocast(demo_checkpoint, tmp_path):
    args = ("--ckpt_path", str(demo_checkpoint), "--num_samples", "2", "--steps", "3")
    sample(*args, "--precision", "bf16", "--output", "bf16")
    sample(*args, "--output", "fp32")
    images, reference = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("bf16", "fp32"))
    assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8
    # The same images up to bf16 rounding (NaN would come out as a constant image, far from these).
    assert images.std() > 10 and np.abs(images.astype(int) - reference).mean() < 8


def test_sample_compiled_gives_the_same_images(demo_checkpoint, tmp_path, monkeypatch):
    compiled = []

    calls = []

    def compile_spy(function):  # stands in for torch.compile (no C++ toolchain needed); records the target
        compiled.append(function)

        def compiled_function(*args):
            calls.append(1)
            return function(*args)

        return compiled_function

    args = ("--ckpt_path", str(demo_checkpoint), "--num_samples", "2", "--steps", "3")
    sample(*args, "--output", "eager")
    monkeypatch.setattr(torch, "compile", compile_spy)
    sample(*args, "--output", "compiled", "--compile", "true")
    assert len(compiled) == 1 and compiled[0].__name__ == "forward"
    assert len(calls) == 3  # every network evaluation went through the compiled function
    eager, fast = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("eager", "compiled"))
    assert np.array_equal(eager, fast)


def test_an_unknown_sampler_is_exactly_one_line(demo_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample("--ckpt_path", str(demo_checkpoint), "--sampler", "foo")
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "foo" in err[0] and "--sampler" in err[0], err
