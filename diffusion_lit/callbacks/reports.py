"""What `lit-ddpm test` writes beside the checkpoint, and the tables it shows: the FID/IS scores with their
samples, and the bits/dim. Every file whole or absent; a scores JSON is written last, after its samples."""

import json
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table
from torch import Tensor

from diffusion_lit import files
from diffusion_lit.errors import UserError
from diffusion_lit.files import written_whole
from diffusion_lit.generation import write_samples


def write_test_scores(
    trainer: "pl.Trainer", pl_module: "pl.LightningModule", quality, scores: dict, images: Tensor | None
) -> None:
    """`test`'s scores and how they were made (SampleQuality `quality`'s settings), and its samples, beside the
    checkpoint: `<checkpoint stem>-fid-<sampling name>-n<N>-seed<seed>.json` and `.npz` and/or PNGs."""
    checkpoint = Path(trainer.ckpt_path) if trainer.ckpt_path else Path("checkpoints") / "untrained.ckpt"
    stem = checkpoint.with_name(
        f"{checkpoint.stem}-fid-{quality.sampling.name}-n{quality.num_samples}-seed{quality.seed}"
    )
    report = {
        **scores,
        "checkpoint": str(checkpoint.resolve()),
        "sampling": asdict(quality.sampling),
        "precision": str(trainer.precision) if quality.precision == "run" else quality.precision,  # the network's
        "num_samples": quality.num_samples,
        "seed": quality.seed,
        "batch_size": quality.batch_size,
        "processes": trainer.world_size,
        "image_shape": list(pl_module.image_shape),
        "reference": {
            "split": quality.reference,
            "images": int(quality.metrics.fid.real_features_num_samples),
            "statistics": str(quality.reference_file),
        },
        "extractor": quality.extractor.name,
        "weights": getattr(quality.extractor, "source", None),
        "resize": "antialiased bilinear (torchmetrics)" if quality.antialias else "bilinear as TensorFlow 1.x",
    }
    if quality.metrics.inception_score is not None:
        report["inception_score_splits"] = quality.metrics.inception_score.splits
    write_scores(stem, report, images, quality.save_samples)


def write_scores(stem: Path, report: dict, images: Tensor | None, save_samples: str) -> None:
    """`stem`.npz and/or the PNG folder `stem`/ (as `save_samples` says), then `stem`.json, then the table."""
    # Suffixes added, not replaced: a sampling name may hold a dot (ddim50-eta0.5).
    npz = stem.with_name(f"{stem.name}.npz") if save_samples in ("npz", "both") else None
    if images is not None:
        write_samples(images, None, npz, stem if save_samples in ("png", "both") else None)
    path = stem.with_name(f"{stem.name}.json")
    with written_whole(path) as partial:  # last: a JSON says its samples are whole
        partial.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title="Sample quality", show_header=False)
    table.add_row("FID", f"{report['fid']:.2f}")
    if report["is"] is None:
        table.add_row("Inception Score", "not computed: the Inception weights have no classifier")
    else:
        table.add_row("Inception Score", f"{report['is']:.2f} ± {report['is_std']:.2f}")
    protocol = f"{report['sampling']['sampler']}, {report['sampling']['steps']} steps, seed {report['seed']}"
    table.add_row("samples", f"{report['num_samples']} ({protocol})")
    table.add_row("reference", f"{report['reference']['images']} {report['reference']['split']} images")
    table.add_row("extractor", f"{report['extractor']}, resize {report['resize']}")
    table.add_row("written to", str(path))
    Console().print(table)


def write_bits_per_dim(trainer: "pl.Trainer", report: dict) -> None:
    """`<checkpoint stem>-bpd-<variance>-n<N>-<k K | all>-seed<S>.json` beside the checkpoint (rank 0), and the
    table."""
    checkpoint = Path(trainer.ckpt_path) if trainer.ckpt_path else Path("checkpoints") / "untrained.ckpt"
    steps = "all" if report["timesteps"] == "all" else f"k{report['timesteps']}"
    name = f"{checkpoint.stem}-bpd-{report['variance']}-n{report['images']}-{steps}-seed{report['seed']}.json"
    path = checkpoint.with_name(name)
    try:
        with written_whole(path) as partial:
            partial.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as error:
        raise UserError(
            f"{report['bits_per_dim']:.4f} bits/dim, but the results could not be written beside the "
            f"checkpoint ({error.strerror or error}); free space and run again"
        ) from None
    table = Table(title="Likelihood (variational bound)", show_header=False)
    error = f" ± {report['standard_error']:.3f} (standard error)" if report["standard_error"] is not None else ""
    table.add_row("bits/dim", f"{report['bits_per_dim']:.3f}{error}")
    table.add_row("terms", ", ".join(f"{name} {value:.3f}" for name, value in report["terms"].items()))
    timesteps = "all" if report["timesteps"] == "all" else f"{report['timesteps']} importance-sampled"
    table.add_row("images", f"{report['images']} held-out, timesteps {timesteps}, variance {report['variance']}")
    table.add_row("seconds", f"{report['seconds']:.1f}")
    table.add_row("written to", str(path))
    Console().print(table)


def append_fit_scores(log: Path, record: dict) -> None:
    """One line of FID while fitting appended to the run's `fid.jsonl` (a resumed run continues it); a failed
    write is a warning: the scores are logged, and the run goes on."""
    try:
        with open(log, "a") as file:
            file.write(json.dumps(record) + "\n")
    except OSError as error:
        rank_zero_warn(f"could not append to {log} ({files.why(error, log)}); FID {record['fid']:.2f} is logged")
