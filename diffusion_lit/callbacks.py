"""Training callbacks. They reach the model only through DiffusionModule.sample()."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader

from diffusion_lit.diffusion.samplers import Sampling
from diffusion_lit.errors import UserError
from diffusion_lit.generation import BATCH_SIZE, generate, generate_all, save_grid, shard, write_samples
from diffusion_lit.metrics import QualityMetrics, load_inception, reference_statistics
from diffusion_lit.pixels import to_uint8, to_unit


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing logged training values read only on logging steps.

    Lightning turns every value logged with `prog_bar=True` into a Python number after every training
    batch: a host synchronisation per step, which keeps the CPU from queueing the next step while the GPU
    works. The module therefore logs `train/loss` without `prog_bar`, and this bar shows it (and any other
    `metrics`) from the values Lightning keeps on the device, read every `trainer.log_every_n_steps`
    optimizer steps, when the logger reads them anyway.

    Args:
        metrics: logged training values to show beside the ones logged with `prog_bar=True`.
    """

    def __init__(self, metrics: tuple[str, ...] = ("train/loss",)) -> None:
        super().__init__()
        self.metrics = metrics
        self._read: dict[str, float] = {}
        self._read_at = -1

    def get_metrics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict:
        """The bar's numbers: the prog_bar ones, and the training values last read."""
        step = trainer.global_step
        every = max(trainer.log_every_n_steps, 1)
        if trainer.training and self._read_at != step and (step % every == 0 or self._read_at < 0):
            logged = trainer.callback_metrics
            self._read = {name: float(logged[name]) for name in self.metrics if name in logged}
            self._read_at = step
        return {**super().get_metrics(trainer, pl_module), **self._read}


class SampleGrid(Callback):
    """After every `every_n_epochs`-th validation, sample a grid from the EMA weights, save and log it.

    The same seed is used every time, so successive grids show the same noise turning into images.

    Args:
        num_samples: images in the grid.
        every_n_epochs: sample after every n-th validation epoch.
        dirpath: where the PNG files go (`step=<global step>.png`).
        seed: seed of the noise.
        sampling: the sampler and its settings (default: those of `lit-ddpm sample`).
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        dirpath: str = "samples",
        seed: int = 0,
        sampling: Sampling = Sampling(),
    ) -> None:
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.dirpath = Path(dirpath)
        self.seed = seed
        self.sampling = sampling

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Sample, write `dirpath/step=N.png` and hand the grid to the logger (rank 0 only)."""
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        options = {"settings": self.sampling, "seed": self.seed, "batch_size": self.num_samples}
        images, _ = generate_all(pl_module, self.num_samples, **options)  # a conditional model: classes in turn
        path = self.dirpath / f"step={trainer.global_step}.png"
        try:
            grid = save_grid(images, path)
        except OSError as error:  # a full disk must not end the training run: the grid is expendable
            rank_zero_warn(f"could not write the sample grid {path} ({error.strerror or error}); training goes on")
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, trainer.global_step)


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a pre-empted or cancelled job), write `last.ckpt` before the run exits.

    Lightning turns SIGTERM into a SIGTERMException at the next step boundary, on every process; this
    saves the state there, so a resume with `--ckpt_path <dir>/last.ckpt` loses at most one step.
    """

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Save into the first ModelCheckpoint's folder (the trainer's root folder without one)."""
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path}; resume with --ckpt_path {path}")


class SampleQuality(Callback):
    """FID and Inception Score of samples from the EMA weights, for `lit-ddpm test` and optionally while fitting.

    `test` samples `num_samples` images split across processes, logs test/fid, test/is and test/is_std, and
    writes `<checkpoint stem>-fid-<sampling name>-n<N>-seed<seed>.json` (the numbers and how they were
    made) beside the checkpoint, plus the images as `.npz` (uint8 NHWC under "arr_0", as `lit-ddpm sample`
    writes them) and/or a folder of PNGs. While fitting, every `every_n_epochs` validation epochs it samples
    `fit_num_samples` images and logs val/fid and val/is. Class-conditional models are given the classes in
    turn (image i gets class i mod num_classes), guided by `sampling.guidance`.

    Args:
        num_samples: images generated by `test` (50,000 for the papers' protocol).
        sampling: the sampler and its settings (default: those of `lit-ddpm sample`); sampler "ddpm" with
            steps 1000 is the original DDPM.
        batch_size: images generated (and scored) at once per process; with the same seed, N and batch size,
            `test` and `sample` draw the same images.
        seed: seed of the noise; batch b of the run draws from seed * 1,000,000 + b on any number of processes.
        reference: the real images: "train" (the DDPM convention) or "test" (the held-out split).
        inception_weights: a local copy of the Inception weights file, for machines without internet.
        antialias: resize with antialiasing (torchmetrics' default) instead of TensorFlow 1.x's way, which
            the published numbers use.
        cache_dir: where reference statistics are kept, one file per dataset, split, image size and extractor.
        save_samples: "npz", "png", "both" or "none".
        every_n_epochs: while fitting, compute FID after every n-th validation epoch; None: never.
        fit_num_samples: images generated for each FID while fitting.
    """

    def __init__(
        self,
        num_samples: int = 10_000,
        sampling: Sampling = Sampling(),
        batch_size: int = BATCH_SIZE,
        seed: int = 0,
        reference: Literal["train", "test"] = "train",
        inception_weights: str | None = None,
        antialias: bool = False,
        cache_dir: str = "~/.cache/lit-ddpm",
        save_samples: Literal["npz", "png", "both", "none"] = "npz",
        every_n_epochs: int | None = None,
        fit_num_samples: int = 2_000,
    ) -> None:
        if num_samples < 2 or fit_num_samples < 2:
            raise UserError("FID needs at least 2 samples: raise evaluation.num_samples / fit_num_samples")
        self.num_samples = num_samples
        self.sampling = sampling
        self.batch_size = batch_size
        self.seed = seed
        self.reference = reference
        self.inception_weights = inception_weights
        self.antialias = antialias
        self.cache_dir = Path(cache_dir).expanduser()
        self.save_samples = save_samples
        self.every_n_epochs = every_n_epochs
        self.fit_num_samples = fit_num_samples
        self.extractor: nn.Module | None = None  # tests may set a stand-in before the run
        self.metrics: QualityMetrics | None = None
        self.reference_file: Path | None = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Load the extractor and the reference statistics (computing them once) before any sampling."""
        if stage == "fit":
            self._check_fid_checkpoints(trainer)
        if stage not in ("fit", "test") or (stage == "fit" and not self.every_n_epochs) or self.metrics is not None:
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "reference_set"):
            raise UserError("FID needs a lit-ddpm datamodule (one with reference_set); set data.class_path")
        self.sampling.check(pl_module.schedule.timesteps, prefix="evaluation.sampling.")
        if self.extractor is None:
            try:
                self.extractor = load_inception(self.inception_weights, self.antialias)
            except UserError as error:
                if stage != "fit":
                    raise
                raise UserError(f"{error} (or fit without FID: --evaluation.every_n_epochs null)") from None
        device = trainer.strategy.root_device
        self.metrics = QualityMetrics(self.extractor).to(device)
        shape = "x".join(map(str, datamodule.image_shape))
        dataset_name = datamodule.reference_name(self.reference)  # hashes an image folder's files: once
        self.reference_file = self.cache_dir / f"{dataset_name}-{shape}-{self.extractor.name}.pt"
        if trainer.is_global_zero:  # loaded on one process only: the reference states are summed across them
            description = {"dataset": dataset_name, "extractor": self.extractor.name}
            if reference_statistics(self.metrics, self.reference_file, self._real_batches(datamodule), description):
                count = int(self.metrics.fid.real_features_num_samples)
                rank_zero_info(f"FID reference statistics of {count} images saved to {self.reference_file}")
        trainer.strategy.barrier("fid-reference")

    def _real_batches(self, datamodule: "pl.LightningDataModule"):
        """The reference images as uint8 batches on the metrics' device; opened only when iterated."""
        real = datamodule.reference_set(self.reference)
        loader = DataLoader(real, batch_size=self.batch_size, num_workers=getattr(datamodule, "num_workers", 0))
        device = self.metrics.fid.real_features_sum.device
        for images, *_ in loader:
            yield to_uint8(to_unit(images.to(device)))

    def _check_fid_checkpoints(self, trainer: "pl.Trainer") -> None:
        """A ModelCheckpoint on val/fid must run on epochs that have one, or Lightning stops the run there
        (it does so only once validation has run: not with fast_dev_run or without validation batches)."""
        if trainer.fast_dev_run or trainer.limit_val_batches == 0:
            return
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "monitor", None) not in ("val/fid", "val/is"):
                continue
            every = getattr(callback, "_every_n_epochs", 1)
            if not self.every_n_epochs or every % self.every_n_epochs:
                raise UserError(
                    f"a ModelCheckpoint monitors {callback.monitor} every {every} epochs but FID runs "
                    f"{'never' if not self.every_n_epochs else f'every {self.every_n_epochs} epochs'} while "
                    f"fitting; match its every_n_epochs to evaluation.every_n_epochs, or remove that callback"
                )

    def _evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", num_samples: int) -> Tensor:
        """Generate this process's share of `num_samples` images into the metrics; returns them (uint8)."""
        self.metrics.reset()
        options = {"settings": self.sampling, "seed": self.seed, "batch_size": self.batch_size}
        images = []
        for batch, _ in generate(
            pl_module, num_samples, **options, rank=trainer.global_rank, world_size=trainer.world_size
        ):
            images.append(batch)
            self.metrics.update(batch)
        shape = (0, *pl_module.image_shape)
        return torch.cat(images) if images else torch.empty(shape, dtype=torch.uint8, device=pl_module.device)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """While fitting: val/fid and val/is after every n-th validation epoch."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self.every_n_epochs:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._evaluate(trainer, pl_module, self.fit_num_samples)
        scores = self.metrics.compute(self.seed)
        pl_module.log_dict({"val/fid": scores["fid"], "val/is": scores["is"]}, sync_dist=True)

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Sample, score, log test/fid and test/is, and write the JSON and the images (rank 0)."""
        rank_zero_info(
            f"FID/IS: sampling {self.num_samples} images ({self.sampling.name}) on {trainer.world_size} process(es)"
        )
        images = self._evaluate(trainer, pl_module, self.num_samples)
        scores = self.metrics.compute(self.seed)
        pl_module.log_dict({f"test/{name}": value for name, value in scores.items()}, sync_dist=True)
        if self.save_samples != "none":
            images = self._gather(trainer, images)
        if trainer.is_global_zero:
            try:
                self._write(trainer, pl_module, scores, images)
            except OSError as error:
                raise UserError(
                    f"FID {scores['fid']:.3f}, IS {scores['is']:.3f}, but the results could not be written beside "
                    f"the checkpoint ({error.strerror or error}); free space, or set evaluation.save_samples: none"
                ) from None

    def _gather(self, trainer: "pl.Trainer", images: Tensor) -> Tensor:
        """Every process's images on every process, in the global order (padded to equal size for all_gather)."""
        if trainer.world_size == 1:
            return images
        world = trainer.world_size
        counts = [sum(size for _, size in shard(self.num_samples, self.batch_size, r, world)) for r in range(world)]
        padded = images.new_zeros((max(counts), *images.shape[1:]))
        padded[: len(images)] = images
        gathered = trainer.strategy.all_gather(padded)  # (world, max_count, 3, H, W)
        return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])

    def _write(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", scores: dict, images: Tensor) -> None:
        """The JSON beside the checkpoint, and the images."""
        checkpoint = Path(trainer.ckpt_path) if trainer.ckpt_path else Path("checkpoints") / "untrained.ckpt"
        stem = checkpoint.with_name(f"{checkpoint.stem}-fid-{self.sampling.name}-n{self.num_samples}-seed{self.seed}")
        report = {
            **scores,
            "checkpoint": str(checkpoint.resolve()),
            "sampling": asdict(self.sampling),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "processes": trainer.world_size,
            "image_shape": list(pl_module.image_shape),
            "reference": {
                "split": self.reference,
                "images": int(self.metrics.fid.real_features_num_samples),
                "statistics": str(self.reference_file),
            },
            "extractor": self.extractor.name,
            "resize": "antialiased bilinear (torchmetrics)" if self.antialias else "bilinear as TensorFlow 1.x",
            "inception_score_splits": self.metrics.inception_score.splits,
        }
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        npz = stem.with_suffix(".npz") if self.save_samples in ("npz", "both") else None
        write_samples(images, None, npz, stem if self.save_samples in ("png", "both") else None)
        _print_scores(report, stem.with_suffix(".json"))


def _print_scores(report: dict, path: Path) -> None:
    """A rich table of the scores and the protocol they were measured with."""
    table = Table(title="Sample quality", show_header=False)
    table.add_row("FID", f"{report['fid']:.2f}")
    table.add_row("Inception Score", f"{report['is']:.2f} ± {report['is_std']:.2f}")
    protocol = f"{report['sampling']['sampler']}, {report['sampling']['steps']} steps, seed {report['seed']}"
    table.add_row("samples", f"{report['num_samples']} ({protocol})")
    table.add_row("reference", f"{report['reference']['images']} {report['reference']['split']} images")
    table.add_row("extractor", f"{report['extractor']}, resize {report['resize']}")
    table.add_row("written to", str(path))
    Console().print(table)
