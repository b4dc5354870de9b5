"""Training the demo's recipe for the benchmarks: one `lit-ddpm fit` (or distill) per variant and seed, saved as
its training time crosses each budget (TimedCheckpoints), and the data and the measures it is scored with."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from benchmarks.common import ROOT, BothFID, ClassifierFID, demo_digits, load_folder, write_photo_patches
from benchmarks.recipes import DEMO_BEFORE, hyper_flags


class TimedCheckpoints(Callback):
    """Save `minutes=M.ckpt` when the training time crosses each budget and `step=N.ckpt` at each of `steps`;
    stop once all are written. Appends (file, step, seconds) lines to `dirpath/log.jsonl`."""

    def __init__(self, dirpath: str, budgets: list[float], steps: list[int], at_end: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.budgets = sorted(budgets)
        self.steps = sorted(steps)
        self.at_end = at_end  # a planned run of one budget (trainer.max_time): saved when Lightning's Timer ends it
        self.start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        """The clock starts with the first training step."""
        self.start = self.start or time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        """A planned run: its one budget, where the time ended it."""
        if self.at_end and not self.saved:
            self._save(trainer, f"minutes={self.budgets[0]:g}", time.perf_counter() - self.start)

    def _save(self, trainer, name: str, seconds: float) -> None:
        trainer.save_checkpoint(self.dirpath / f"{name}.ckpt", weights_only=False)
        with open(self.dirpath / "log.jsonl", "a") as log:
            log.write(json.dumps({"checkpoint": name, "step": trainer.global_step, "seconds": seconds}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        """Save the checkpoints that are due."""
        if self.at_end:
            return
        seconds = time.perf_counter() - self.start
        due = [f"minutes={m:g}" for m in self.budgets if 60 * m <= seconds and f"minutes={m:g}" not in self.saved]
        due += [f"step={s}" for s in self.steps if trainer.global_step >= s and f"step={s}" not in self.saved]
        for name in due:
            self._save(trainer, name, seconds)
        if len(self.saved) == len(self.budgets) + len(self.steps):
            trainer.should_stop = True

    @property
    def saved(self) -> set[str]:
        """The checkpoints written so far."""
        log = self.dirpath / "log.jsonl"
        return {json.loads(line)["checkpoint"] for line in log.read_text().splitlines()} if log.exists() else set()


def train(
    folder: Path, variant: list[str], seed: int, budgets: list[float], steps: list[int], data: list[str], threads: int,
    command: str = "fit", planned: bool = False,
) -> list[dict]:  # fmt: skip
    """One run of the demo recipe (`lit-ddpm COMMAND`: fit, or distill with --teacher among the flags) with
    `variant`'s flags on `threads` CPU threads; returns its checkpoint log. `planned`: a run of its one budget
    (trainer.max_time), so that a schedule planned over the run ends with it; else one run saved at each of
    its budgets and steps, in the demo's recipe before it planned its runs (DEMO_BEFORE) where `variant` is
    silent, so that each checkpoint is a run of that length."""
    folder.mkdir(parents=True, exist_ok=True)
    timed = {"dirpath": str(folder), "budgets": budgets, "steps": steps, "at_end": planned}
    callback = {"class_path": "benchmarks.demo_runs.TimedCheckpoints", "init_args": timed}
    if planned:  # its one budget, as Lightning's DD:HH:MM:SS
        settings = ["--trainer.max_time", f"00:00:{int(budgets[0]):02d}:{round(60 * (budgets[0] % 1)):02d}"]
    else:
        settings = hyper_flags(DEMO_BEFORE)
    command = [
        sys.executable, "-m", "diffusion_lit.cli", command, "--config", str(ROOT / "configs" / "demo.yaml"), *data,
        "--seed_everything", str(seed), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", json.dumps([callback]), *settings, *variant,
    ]  # fmt: skip
    if not (folder / "log.jsonl").exists():
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}  # benchmarks.demo_runs
        subprocess.run(command, cwd=folder, check=True, env=env)
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def real_images(
    dataset: str, workdir: Path, per_photo: int = 0
) -> tuple[list[str], tuple[tuple[torch.Tensor, torch.Tensor], ...], torch.Tensor]:  # fmt: skip
    """Flags that point `fit` at the data, ((training images, labels), (held-out images, labels)) for the
    classifier, and the images `fit` trains on (the first `per_photo` of each photo's, if set), all [-1, 1]."""
    if dataset == "digits":
        train, held_out = demo_digits()
        return [], (train, held_out), train[0]
    train_folder, held_out_folder = write_photo_patches(workdir / "photo_patches")
    train = load_folder(train_folder)
    fit_folder, fit_images = train_folder, train[0]
    if per_photo:
        fit_folder = first_of_each(train_folder, workdir / f"photo_patches_{per_photo}", per_photo)
        fit_images = load_folder(fit_folder)[0]
    flags = ["--data.class_path", "diffusion_lit.data.ImageFolderDataModule", "--data.init_args.root",
             str(fit_folder), "--data.init_args.channels", "3", "--data.init_args.num_workers", "0"]  # fmt: skip
    return flags, (train, load_folder(held_out_folder)), fit_images


def first_of_each(folder: Path, subset: Path, count: int) -> Path:
    """A copy of the first `count` images (by name) of each class sub-folder of `folder`, in `subset`."""
    for source in sorted(path for path in folder.iterdir() if path.is_dir()):
        (subset / source.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(source.iterdir())[:count]:
            shutil.copyfile(image, subset / source.name / image.name)
    return subset


def quality_measure(dataset: str, workdir: Path, num_samples: int, per_photo: int = 0):
    """(flags for `fit`, a BothFID of uint8 samples against the held-out images (Inception and classifier FID,
    each with its floor: the training images' own), real_images' ((training images, labels), (held-out images,
    labels)), and the images `fit` trains on)."""
    flags, (train, held_out), fit_images = real_images(dataset, workdir, per_photo)
    quality = ClassifierFID(train, held_out, num_samples)
    print(f"{dataset}: classifier accuracy on held-out images {quality.accuracy:.3f}; floor {quality.floor:.2f}")
    return flags, BothFID(quality, train[0], held_out[0]), (train, held_out), fit_images
