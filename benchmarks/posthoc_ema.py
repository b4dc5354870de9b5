"""Post-hoc EMA at the demo's scale: does choosing the EMA length after training beat the config's fixed EMA?

    python -m benchmarks.posthoc_ema --json benchmarks/results/posthoc-ema-digits.json

Trains the demo recipe (`lit-ddpm fit --config configs/demo.yaml`, its fixed EMA: decay 0.995) for --steps
with the PostHocEMA callback (sigma_rel 0.05 and 0.10, a snapshot every --every steps), once per seed. Then
scores, by classifier FID of --num-samples images from the auto sampler (benchmarks/common.py), the run's own
EMA weights and the reconstruction (`lit-ddpm ema`'s) at each of --sigma-rels; the two stored widths are
among them (reconstructed exactly). The done-when of issue 21: the best width at least 5% better than the
fixed EMA, beyond the seeds' spread.
"""

import argparse
import json
import os
from pathlib import Path

import torch

from benchmarks.convergence import quality_measure, train
from diffusion_lit.callbacks.posthoc_ema import reconstruct, snapshots
from diffusion_lit.diffusion import Sampling
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint

EMA_DECAY = 0.995  # configs/demo.yaml's model.ema_decay


def fid_of(module, fid, num_samples: int) -> dict[str, float]:
    """Inception and classifier FID (`fid`, a BothFID) of the auto sampler's images (seed 0)."""
    settings = Sampling().resolve(module.hparams.prediction, module.schedule.timesteps)
    with torch.inference_mode():
        images, _ = generate_all(module, num_samples, settings=settings, batch_size=num_samples)
    return fid(images)


def main(argv: list[str] | None = None) -> None:
    """Train, reconstruct, score, print the table; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "photos"], default="digits")
    parser.add_argument("--steps", type=int, default=2520)
    parser.add_argument("--every", type=int, default=252)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=[0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default="posthoc_ema_runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    data, fid, _, _ = quality_measure(args.dataset, workdir, args.num_samples)
    rows = []
    for seed in args.seeds:
        folder = workdir / f"seed{seed}"
        callbacks = [
            "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=diffusion_lit.callbacks.LastCheckpoint",
            f"--trainer.callbacks.dirpath={folder / 'run'}",
            "--trainer.callbacks.every_n_train_steps=0",
            "--trainer.callbacks+=diffusion_lit.callbacks.PostHocEMA",
            f"--trainer.callbacks.every_n_train_steps={args.every}",
        ]
        done = folder / "scores.json"  # a seed already trained and scored is not redone
        if not done.exists():
            if not (folder / f"step={args.steps}.ckpt").exists():
                train(folder, callbacks, seed, [], [args.steps], data, args.threads)
            module = load_checkpoint(str(folder / f"step={args.steps}.ckpt"))
            row = {"seed": seed, "fixed_ema": fid_of(module, fid, args.num_samples), "posthoc": {}}
            found = snapshots(folder / "run")
            for sigma_rel in args.sigma_rels:
                state, _ = reconstruct(found, sigma_rel, args.steps)
                module.load_state_dict(state)
                row["posthoc"][f"{sigma_rel:g}"] = fid_of(module, fid, args.num_samples)
            done.write_text(json.dumps(row))
        rows.append(json.loads(done.read_text()))
        for key, floor in fid.floors.items():
            print_table(rows, EMA_DECAY, key, floor)
    if args.json:
        report = {"settings": vars(args), **fid.report_floors(), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))


def print_table(rows: list[dict], decay: float, key: str, floor: float) -> None:
    """One line per EMA: `key` (inception_fid or classifier_fid) per seed, and the mean."""
    seeds = " | ".join(f"seed {row['seed']}" for row in rows)
    print(f"\n| EMA: {key.replace('_', ' ')} | {seeds} | mean |\n| --- |{' ---: |' * (len(rows) + 1)}")
    lines = {f"fixed, decay {decay}": [row["fixed_ema"][key] for row in rows]}
    lines |= {f"post-hoc, sigma_rel {width}": [row["posthoc"][width][key] for row in rows]
              for width in rows[0]["posthoc"]}  # fmt: skip
    for name, values in lines.items():
        cells = " | ".join(f"{value:.2f}" for value in values)
        print(f"| {name} | {cells} | {sum(values) / len(values):.2f} |")
    print(f"| real training images (the floor) | {floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
