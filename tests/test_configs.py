"""The shipped configs: the three full recipes agree outside their name and data, and their comments hold."""

from pathlib import Path

import pytest
import torch
import yaml

from conftest import ONE_STEP, ROOT, TINY
from diffusion_lit.cli import main

FULL = ["mnist", "cifar10", "folder"]


def recipe(name: str) -> dict:
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    return {key: value for key, value in config.items() if key not in ("name", "data")}


@pytest.mark.parametrize("name", FULL[1:])
def test_the_full_configs_differ_only_in_name_and_data(name):
    # One recipe, said three times so that each stays one --config: a change to one must reach the others.
    assert recipe(name) == recipe(FULL[0])


def test_the_guard_turns_off_with_null_as_the_configs_say(tmp_path, monkeypatch):
    assert "null: no guard" in (ROOT / "configs" / "demo.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, *ONE_STEP, "--trainer.logger", "false",
          "--guard.max_nonfinite_steps", "null"])  # fmt: skip
    assert torch.load(Path("checkpoints/demo/last.ckpt"), weights_only=True)["global_step"] == 1
