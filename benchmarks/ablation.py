"""Loss-term ablation on the offline MNIST digits: equal training steps, FID in a classifier's feature space.

    python -m benchmarks.ablation --epochs 12 --seeds 0 1 --json benchmarks/results/ablation-digits.json

Each variant trains today's demo recipe (configs/demo.yaml) in its own folder under --workdir, once per
seed, with only the loss weights changed; then draws --num-samples digits from its EMA weights with the
default sampler (`lit-ddpm sample`'s: the auto choice for the recipe's prediction target; the same noise
for every variant) and scores them by classifier FID (benchmarks/common.py) against the 500 held-out
digits. The distance of as many real training digits is printed as the floor.

The perceptual variants need ImageNet VGG19 weights; pass --vgg-weights FILE to include them.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, ClassifierFID, demo_digits
from diffusion_lit.diffusion import Sampling
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint

VARIANTS = {"mse": (0.0, 0.0), "mse + feature matching": (0.0, 0.05)}
PERCEPTUAL_VARIANTS = {"mse + perceptual": (0.1, 0.0), "mse + perceptual + feature matching": (0.1, 0.05)}
STEPS_PER_EPOCH = 140  # 4,500 digits in batches of 32


def train_variant(folder: Path, weights: tuple[float, float], epochs: int, seed: int, vgg: str | None) -> Path:
    """`lit-ddpm fit` on the demo config in `folder` (once); returns its last checkpoint."""
    last = folder / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    folder.mkdir(parents=True, exist_ok=True)
    loss = "--model.loss.init_args"
    command = [
        sys.executable, "-m", "diffusion_lit.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
        "--trainer.check_val_every_n_epoch", str(epochs), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.callbacks", "[]",
        "--trainer.callbacks+=diffusion_lit.callbacks.LastCheckpoint", "--trainer.callbacks.dirpath", "checkpoints",
        f"{loss}.perceptual_weight", str(weights[0]), f"{loss}.feature_matching_weight", str(weights[1]),
        *([f"{loss}.vgg_weights", vgg] if vgg else []),
    ]  # fmt: skip
    subprocess.run(command, cwd=folder, check=True)
    return last


def main(argv: list[str] | None = None) -> None:
    """Train every variant for every seed, score it, print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help=f"training epochs of {STEPS_PER_EPOCH} steps")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (seed_everything)")
    parser.add_argument("--workdir", default="ablation_runs")
    parser.add_argument("--vgg-weights", help="ImageNet VGG19 weights: adds the perceptual variants")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    quality = ClassifierFID(*demo_digits(), args.num_samples)
    print(f"classifier accuracy on the held-out digits: {quality.accuracy:.3f}; floor: {quality.floor:.2f}")
    variants = VARIANTS | (PERCEPTUAL_VARIANTS if args.vgg_weights else {})
    rows = []
    for name, weights in variants.items():
        for seed in args.seeds:
            folder = Path(args.workdir) / f"{name.replace(' + ', '_').replace(' ', '_')}-seed{seed}"
            module = load_checkpoint(str(train_variant(folder, weights, args.epochs, seed, args.vgg_weights)))
            settings = Sampling().resolve(module.hparams.prediction, module.hparams.timesteps)
            samples, _ = generate_all(module, args.num_samples, settings=settings, batch_size=args.num_samples)
            rows.append({"terms": name, "seed": seed, "steps": args.epochs * STEPS_PER_EPOCH,
                         "sampling": settings.name, "classifier_fid": quality(samples),
                         "classes_covered": quality.classes(samples)})  # fmt: skip
            print(rows[-1], flush=True)

    print(f"\n| loss terms | training steps | sampler | classifier FID ({args.num_samples} samples), per seed |")
    print("| --- | ---: | --- | ---: |")
    for name in variants:
        mine = [row for row in rows if row["terms"] == name]
        scores = " / ".join(f"{row['classifier_fid']:.1f}" for row in mine)
        print(f"| {name} | {mine[0]['steps']} | {mine[0]['sampling']} | {scores} |")
    print(f"| real training digits (floor) | | | {quality.floor:.1f} |")
    if args.json:
        report = {"settings": vars(args), "floor": quality.floor, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
