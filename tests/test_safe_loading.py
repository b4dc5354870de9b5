"""A checkpoint names classes to build; only lit-ddpm's networks, or ones the user names, are ever imported."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY
from diffusion_lit.cli import main
from diffusion_lit.errors import UserError
from diffusion_lit.loading import load_checkpoint
from diffusion_lit.module import DiffusionModule

DEMO = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY]
SHORT = ["--trainer.fast_dev_run", "false", "--trainer.max_steps", "1", "--trainer.max_epochs", "-1",
         "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]  # fmt: skip
HOSTILE = """
import pathlib
pathlib.Path(__file__).with_name("imported.marker").write_text("a checkpoint made this module run")
from diffusion_lit.nn import UNet
class Net(UNet):
    pass
"""


@pytest.fixture
def checkpoint(demo_checkpoint) -> Path:
    return demo_checkpoint


@pytest.fixture
def hostile(tmp_path, monkeypatch, checkpoint) -> Path:
    """The demo checkpoint, rewritten to name a class of an importable module whose import leaves a marker."""
    (tmp_path / "hostile_probe.py").write_text(HOSTILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    state = torch.load(checkpoint, weights_only=True)
    state["hyper_parameters"]["unet"]["class_path"] = "hostile_probe.Net"
    path = tmp_path / "hostile.ckpt"
    torch.save(state, path)
    yield path
    sys.modules.pop("hostile_probe", None)


def never_imported(tmp_path: Path) -> bool:
    return not (tmp_path / "imported.marker").exists() and "hostile_probe" not in sys.modules


@pytest.mark.parametrize("command", ["sample", "test", "fit", "validate"])
def test_a_checkpoint_naming_a_foreign_class_is_refused_before_any_import(hostile, tmp_path, capsys, command):
    args = ["--ckpt_path", str(hostile)] if command == "sample" else [*DEMO, "--ckpt_path", str(hostile)]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "hostile_probe.Net" in err[0] and "not one of lit-ddpm's" in err[0], err
    assert never_imported(tmp_path)


def test_python_loading_refuses_it_too(hostile, tmp_path):
    with pytest.raises(UserError, match="hostile_probe.Net"):
        load_checkpoint(str(hostile))
    with pytest.raises(UserError, match="hostile_probe.Net"):
        DiffusionModule.load_from_checkpoint(str(hostile), weights_only=True)
    assert never_imported(tmp_path)


@pytest.mark.parametrize(
    "where",
    [lambda hp: hp.update(unet="hostile_probe.Net"),  # a plain string is a class path to jsonargparse
     lambda hp: hp.update(extra={"class_path": "hostile_probe.Net"}),  # a class path anywhere
     lambda hp: hp.update(_instantiator="hostile_probe.Net")],  # the function that builds the model
    ids=["string", "nested", "instantiator"],
)  # fmt: skip
def test_every_class_path_in_the_hyper_parameters_is_checked(checkpoint, tmp_path, monkeypatch, where):
    (tmp_path / "hostile_probe.py").write_text(HOSTILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    state = torch.load(checkpoint, weights_only=True)
    where(state["hyper_parameters"])
    torch.save(state, checkpoint)
    with pytest.raises(UserError, match="hostile_probe.Net"):
        load_checkpoint(str(checkpoint))
    assert never_imported(tmp_path)


def test_a_class_the_user_names_is_allowed(hostile, tmp_path, capsys):
    main(["sample", "--ckpt_path", str(hostile), "--allow_class", "hostile_probe.Net", "--num_samples", "1",
          "--steps", "2"])  # fmt: skip
    assert (tmp_path / "imported.marker").exists()  # named by the user: built as the checkpoint says
    sys.modules.pop("hostile_probe", None)
    (tmp_path / "imported.marker").unlink()
    main(["validate", *DEMO, "--ckpt_path", str(hostile), "--model.unet.class_path", "hostile_probe.Net"])
    assert (tmp_path / "imported.marker").exists()
