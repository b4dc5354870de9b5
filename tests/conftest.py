"""Shared fixtures: tiny datasets written in the test's temp dir, and a way to shrink any config."""

import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).with_name("tiny.yaml"))
# After TINY: one real training step (fast_dev_run is a dry run and writes no checkpoint), no validation.
ONE_STEP = ["--trainer.fast_dev_run", "false", "--trainer.max_steps", "1", "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0"]  # fmt: skip


if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: one thread each (more made 2 cores many times slower)
    torch.set_num_threads(1)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the zero-initialised weights so that every path carries signal."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return model


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def without_offline_inception(monkeypatch):
    """The tests run as on a machine without the Inception weights (the package `make install` adds is hidden):
    a `test` that does not bring a stand-in would otherwise score 4,500 reference images with the real network,
    minutes on a CPU. tests/test_inception.py overrides this fixture to reach the package."""
    import importlib.util

    from diffusion_lit import inception

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(inception.importlib.util, "find_spec",
                        lambda name, *args: None if name == inception.PACKAGE else find_spec(name, *args))  # fmt: skip


@pytest.fixture(scope="session")
def _trained_demo(tmp_path_factory) -> Path:
    """The demo config shrunk by tiny.yaml, trained for 2 steps once per session: its last.ckpt."""
    from diffusion_lit.cli import main

    folder = tmp_path_factory.mktemp("trained_demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("WANDB_MODE", "disabled")
        torch.manual_seed(0)
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, *ONE_STEP,
              "--trainer.max_steps", "2", "--trainer.logger", "false"])  # fmt: skip
    return folder / "checkpoints" / "demo" / "last.ckpt"


@pytest.fixture
def demo_checkpoint(_trained_demo, tmp_path, monkeypatch) -> Path:
    """A copy of the session's 2-step demo checkpoint at tmp_path/checkpoints/demo/last.ckpt, the working
    directory being tmp_path: as if this test had just run `lit-ddpm fit` there (a copy: tests may spoil it)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoints" / "demo" / "last.ckpt"
    path.parent.mkdir(parents=True)
    shutil.copyfile(_trained_demo, path)
    return path


def one_line_error(capsys, *args: str) -> str:
    """Run lit-ddpm, expect exit status 2 and a single `lit-ddpm: error: ...` line on stderr; return it."""
    from diffusion_lit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lit-ddpm: error:")]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.fixture(autouse=True)
def _seed_and_quiet(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in MNIST's IDX format (magic: 0, 0, dtype 0x08, ndim)."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_dir(tmp_path) -> Path:
    """A 16-image MNIST in torchvision's raw layout."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (16, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (16,)))
    return tmp_path / "mnist"


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch) -> Path:
    """An 8-image-per-batch CIFAR-10 in its python pickle layout (checksums bypassed: the files are fakes)."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 8))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return tmp_path / "cifar"


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A nested folder of 10 small images of mixed sizes and modes, plus a text file to ignore."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(10):
        sub = root / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        size = (40 + 4 * i, 36)
        if i % 3:
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(sub / f"{i}.png")
        else:
            Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(sub / f"{i}.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def vgg_weights_file(tmp_path_factory) -> str:
    """A random VGG19 state dict of the layers up to conv_4, saved like torchvision's (`features.N.*` keys); made
    once per session (building VGG19 takes a second), read only."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    state = {f"features.{key}": value for key, value in vgg19().features[:8].state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save(state, path)
    return str(path)


class StandInExtractor(torch.nn.Module):
    """A small fixed random feature extractor in Inception's place: uint8 (N, 3, H, W) -> (16 features, 10 logits).

    It counts its calls, so tests can tell whether statistics were recomputed.
    """

    num_features = 16
    num_logits = 10
    name = "stand-in"

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("project", torch.randn(3 * 4 * 4, self.num_features, generator=generator))
        self.register_buffer("classify", torch.randn(self.num_features, self.num_logits, generator=generator))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        features = pooled @ self.project
        return features, features @ self.classify / 10  # soft enough that IS varies


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a filesystem of its own: a 32 MB tmpfs mounted at tmp_path/disk (root only; where it cannot be
    mounted, the test is skipped and says why). On clusters checkpoints are on another filesystem than $TMPDIR,
    and disks fill up: this is both."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)], capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill `folder`'s filesystem until `leave` bytes are free; returns the filler file."""
    import os

    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "ab") as file:
        file.write(b"\0" * max(0, free - leave))
    return filler
