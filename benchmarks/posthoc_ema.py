"""Post-hoc EMA at the demo's scale: which EMA length, for the same training run, gives the best samples?

    python -m benchmarks.posthoc_ema --json benchmarks/results/posthoc-ema-digits.json
    python -m benchmarks.posthoc_ema --dataset photos --minutes 10 20 40 --jobs 2 --every 100 \
        --json benchmarks/results/posthoc-ema-photos-40min.json

Trains the demo recipe (`lit-ddpm fit --config configs/demo.yaml` predicting v, its fixed EMA: decay 0.995)
with the PostHocEMA callback (sigma_rel 0.05 and 0.10, a snapshot every --every steps), once per seed, to
--steps or, with --minutes, to the last of those training times, saving a checkpoint as it crosses each.
Nothing in the recipe depends on the run's length (a warm-up in steps, a constant rate), so a 40-minute run's
checkpoint at 10 minutes is a 10-minute run. At each checkpoint it scores, in Inception and classifier FID of
--num-samples images from the auto sampler (benchmarks/common.py), the run's own EMA weights and the
reconstruction (`lit-ddpm ema`'s) at each of --sigma-rels, from the snapshots before that step and the
checkpoint's own averages (exactly at its step). All of one checkpoint's rows share the training weights: the
only difference is the average. The done-when of issue 21: the best width at least 5% better than the fixed
EMA, beyond the seeds' spread.
"""

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.demo_runs import quality_measure, train
from benchmarks.recipes import VARIANTS
from diffusion_lit.callbacks.posthoc_ema import at_checkpoint, reconstruct, snapshots
from diffusion_lit.diffusion import Sampling
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint

EMA_DECAY = 0.995  # the demo recipe's fixed EMA (recipes.DEMO_BEFORE), which VARIANTS["v"] trains with


def fid_of(module, fid, num_samples: int) -> dict[str, float]:
    """Inception and classifier FID (`fid`, a BothFID) of the auto sampler's images (seed 0)."""
    settings = Sampling().resolve(module.hparams.prediction, module.schedule.timesteps)
    with torch.inference_mode():
        images, _ = generate_all(module, num_samples, settings=settings, batch_size=num_samples)
    return fid(images)


def score_run(folder: Path, sigma_rels: list[float], fid, num_samples: int) -> list[dict]:
    """One row per checkpoint of the run in `folder`: its own EMA's scores and each reconstruction's."""
    found, rows = snapshots(folder / "run"), []
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    for entry in log:
        checkpoint = folder / f"{entry['checkpoint']}.ckpt"
        module = load_checkpoint(str(checkpoint))
        row = {"seed": int(folder.name.removeprefix("seed")), **entry, "fixed_ema": fid_of(module, fid, num_samples)}
        used, step = at_checkpoint(found, checkpoint)  # step: entry's, or one before (saved before their update)
        row["posthoc"] = {}
        for sigma_rel in sigma_rels:
            state, _ = reconstruct(used, sigma_rel, step)
            module.load_state_dict(state)
            row["posthoc"][f"{sigma_rel:g}"] = fid_of(module, fid, num_samples)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Train, reconstruct, score, print the tables; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "photos"], default="digits")
    parser.add_argument("--steps", type=int, default=2520)
    parser.add_argument("--minutes", type=float, nargs="+", help="score at these training times, not at --steps")
    parser.add_argument("--every", type=int, default=252)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=[0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once, each on cpu_count / jobs threads")
    parser.add_argument("--workdir", default="posthoc_ema_runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    data, fid, _, _ = quality_measure(args.dataset, workdir, args.num_samples)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def run(seed: int) -> Path:
        folder = workdir / f"seed{seed}"
        callbacks = [
            "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=diffusion_lit.callbacks.LastCheckpoint",
            f"--trainer.callbacks.dirpath={folder / 'run'}",
            "--trainer.callbacks.every_n_train_steps=0",
            "--trainer.callbacks+=diffusion_lit.callbacks.PostHocEMA",
            f"--trainer.callbacks.every_n_train_steps={args.every}",
        ]
        budgets, steps = (args.minutes, []) if args.minutes else ([], [args.steps])
        train(folder, VARIANTS["v"] + callbacks, seed, budgets, steps, data, threads)  # not redone if trained
        return folder

    with ThreadPoolExecutor(args.jobs) as pool:
        folders = list(pool.map(run, args.seeds))
    rows = []
    for folder in folders:  # scored one at a time; a seed already scored is not redone
        done = folder / "scores.json"
        if not done.exists():
            done.write_text(json.dumps(score_run(folder, args.sigma_rels, fid, args.num_samples)))
        rows += json.loads(done.read_text())
    for checkpoint in dict.fromkeys(row["checkpoint"] for row in rows):
        for key, floor in fid.floors.items():
            print_table([row for row in rows if row["checkpoint"] == checkpoint], checkpoint, key, floor)
    if args.json:
        report = {"settings": vars(args), **fid.report_floors(), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))


def print_table(rows: list[dict], checkpoint: str, key: str, floor: float) -> None:
    """One line per EMA: `key` (inception_fid or classifier_fid) per seed, and the mean."""
    seeds = " | ".join(f"seed {row['seed']}" for row in rows)
    print(f"\n| {checkpoint}, EMA: {key.replace('_', ' ')} | {seeds} | mean |\n| --- |{' ---: |' * (len(rows) + 1)}")
    lines = {f"fixed, decay {EMA_DECAY}": [row["fixed_ema"][key] for row in rows]}
    lines |= {f"post-hoc, sigma_rel {width}": [row["posthoc"][width][key] for row in rows]
              for width in rows[0]["posthoc"]}  # fmt: skip
    for name, values in lines.items():
        cells = " | ".join(f"{value:.2f}" for value in values)
        print(f"| {name} | {cells} | {sum(values) / len(values):.2f} |")
    print(f"| real training images (the floor) | {floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
