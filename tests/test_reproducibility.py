"""The same seed on the same hardware gives the same loss curve; another seed does not."""

import csv

from conftest import ROOT, TINY
from diffusion_lit.cli import main


def loss_curve(folder, seed: int) -> list[float]:
    folder.mkdir()
    args = ["fit", "--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--seed_everything", str(seed),
            "--trainer.fast_dev_run", "false", "--trainer.max_steps", "6", "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1", "--trainer.enable_checkpointing",
            "false", "--trainer.callbacks", "[]", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(folder)]  # fmt: skip
    main(args)
    with open(next(folder.rglob("metrics.csv"))) as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_same_seed_same_loss_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, again, other = (loss_curve(tmp_path / name, seed) for name, seed in [("a", 7), ("b", 7), ("c", 8)])
    assert len(first) == 6
    assert first == again
    assert first != other
