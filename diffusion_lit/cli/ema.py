"""`lit-ddpm ema`: checkpoints with the EMA length chosen after training, from a run's post-hoc EMA snapshots."""

import json
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from rich.console import Console
from rich.table import Table

from diffusion_lit import files
from diffusion_lit.callbacks.posthoc_ema import reconstruct, snapshots
from diffusion_lit.checkpoints import check_checkpoint
from diffusion_lit.cli.sample import OneLineParser
from diffusion_lit.errors import UserError
from diffusion_lit.runs import STATE_KEY


def parser() -> ArgumentParser:
    """The `lit-ddpm ema` options."""
    p = OneLineParser(prog="lit-ddpm ema", description=__doc__)
    p.add_argument("--run", required=True, help="the run's folder, checkpoints/NAME (its last.ckpt and ema/)")
    p.add_argument("--sigma_rel", type=list[float], default=[0.05, 0.075, 0.1, 0.15, 0.2],
                   help="EMA lengths, as fractions of training; each writes NAME/ema-SIGMA-step=STEP.ckpt")  # fmt: skip
    p.add_argument("--step", type=int | None, default=None, help="the step to reconstruct at; default the last")
    p.add_argument("--config", default=None,
                   help="score each with `lit-ddpm test --config CONFIG` (FID), keep the best as NAME/ema-best.ckpt "
                   "and remove the others")  # fmt: skip
    return p


def write(run: Path, base: dict, found: list[dict], sigma_rel: float, step: int | None) -> Path:
    """The run's last.ckpt (`base`, loaded) with the reconstructed average as its weights: a checkpoint for sample
    and test (its optimizer and training weights are left out: resume the run from last.ckpt)."""
    state, coefficients = reconstruct(found, sigma_rel, step)
    if set(state) != set(base["state_dict"]):
        raise UserError(f"the snapshots in {run / 'ema'} are not of the model in {run / 'last.ckpt'}")
    step = step or max(s["global_step"] for s in found)
    used = [s["global_step"] for s in found if s["global_step"] <= step]
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": base["hyper_parameters"],
        "pytorch-lightning_version": base["pytorch-lightning_version"],
        "epoch": base["epoch"],
        "global_step": step,
        "callbacks": {STATE_KEY: base["callbacks"][STATE_KEY]} if STATE_KEY in base.get("callbacks", {}) else {},
        "posthoc_ema": {
            "sigma_rel": sigma_rel,
            "step": step,
            "snapshot_steps": used,
            "coefficients": [float(c) for c in coefficients],
        },  # fmt: skip
    }
    path = run / f"ema-{sigma_rel:.3f}-step={step}.ckpt"
    try:
        files.save(checkpoint, path)
    except OSError as error:
        raise UserError(f"could not write {path} ({files.why(error, path)}); nothing was written") from None
    return path


def fid_of(checkpoint: Path, config: str) -> float:
    """The FID `lit-ddpm test --config CONFIG` gives the checkpoint (FID and IS only)."""
    from diffusion_lit.cli.commands import main as lit_ddpm

    lit_ddpm(["test", "--config", config, "--ckpt_path", str(checkpoint), "--evaluation.nll_images", "null"])
    reports = sorted(checkpoint.parent.glob(f"{checkpoint.stem}-fid-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text())["fid"]


def main(args: list[str]) -> None:
    """Reconstruct (and score) each --sigma_rel; say what was written."""
    options = parser().parse_args(args)
    run = Path(options.run)
    if not (run / "last.ckpt").is_file():
        raise UserError(f"--run {run} has no last.ckpt: give a run's folder, e.g. checkpoints/demo")
    check_checkpoint(str(run / "last.ckpt"))
    found = snapshots(run)
    base = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    paths = [write(run, base, found, sigma_rel, options.step) for sigma_rel in options.sigma_rel]
    console = Console()
    if not options.config:
        for path in paths:
            print(f"wrote {path}")
        return
    scores = [fid_of(path, options.config) for path in paths]
    best = min(range(len(paths)), key=scores.__getitem__)
    table = Table(title=f"Post-hoc EMA of {run}")
    for column in ("sigma_rel", "FID", "checkpoint"):
        table.add_column(column)
    for sigma_rel, score, path in zip(options.sigma_rel, scores, paths, strict=True):
        table.add_row(f"{sigma_rel:.3f}", f"{score:.3f}", path.name + (" (best)" if path == paths[best] else ""))
    console.print(table)
    kept = run / "ema-best.ckpt"
    paths[best].replace(kept)
    for path in paths:
        path.unlink(missing_ok=True)
    console.print(f"kept sigma_rel {options.sigma_rel[best]} as {kept} (FID {scores[best]:.3f}); the others removed")
