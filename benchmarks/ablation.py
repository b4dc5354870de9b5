"""Loss-term ablation on the offline MNIST digits: equal training steps, FID in a classifier's feature space.

    python benchmarks/ablation.py --epochs 9 --num-samples 256

Each variant trains the demo config (configs/demo.yaml) in its own folder under --workdir, with only
the loss weights changed; then draws --num-samples digits from its EMA weights (same seed for every
variant, full 1,000-step ancestral sampler) and scores them against the 500 held-out digits.

"Classifier FID" is the Frechet distance between Gaussians fitted to the 64-d penultimate features
of a small CNN trained here on the 4,500 training digits (not Inception features, so the numbers
are not comparable with published FIDs, only with each other at the same --num-samples). The same
distance between 256 real training digits and the held-out ones is printed as the floor.

The perceptual variants need ImageNet VGG19 weights; pass --vgg-weights FILE to include them.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from digits_classifier import features, train_classifier

from diffusion_lit.data import DemoMNISTDataModule
from diffusion_lit.metrics import frechet_distance
from diffusion_lit.module import DiffusionModule

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"mse": (0.0, 0.0), "mse + feature matching": (0.0, 0.05)}
PERCEPTUAL_VARIANTS = {"mse + perceptual": (0.1, 0.0), "mse + perceptual + feature matching": (0.1, 0.05)}


def train_variant(folder: Path, perceptual: float, matching: float, epochs: int, vgg: str | None) -> Path:
    """`lit-ddpm fit` on the demo config in `folder`; returns its last checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "diffusion_lit.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(epochs),
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
        "--trainer.callbacks+=diffusion_lit.callbacks.LastCheckpoint", "--trainer.callbacks.dirpath", "checkpoints",
        "--model.loss.init_args.perceptual_weight", str(perceptual),
        "--model.loss.init_args.feature_matching_weight", str(matching),
    ]  # fmt: skip
    if vgg:
        command += ["--model.loss.init_args.vgg_weights", vgg]
    subprocess.run(command, cwd=folder, check=True)
    return folder / "checkpoints" / "last.ckpt"


def main() -> None:
    """Train every variant, score it, print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=9, help="training epochs of 140 steps (batch 32)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--workdir", default="ablation_runs")
    parser.add_argument("--vgg-weights", help="ImageNet VGG19 weights: adds the perceptual variants")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    data = DemoMNISTDataModule()
    data.setup("fit")
    images, labels = data.train_set.dataset.tensors  # both splits index one TensorDataset
    train_images, train_labels = images[data.train_set.indices], labels[data.train_set.indices]
    held_out, held_labels = images[data.val_set.indices], labels[data.val_set.indices]
    net = train_classifier(train_images, train_labels)
    accuracy = (net(held_out).argmax(1) == held_labels).float().mean().item()
    reference = features(net, held_out)
    floor = frechet_distance(*features(net, train_images[: args.num_samples]), *reference)
    print(f"classifier accuracy on the held-out digits: {accuracy:.3f}; real-vs-real floor: {floor:.2f}")

    variants = VARIANTS | (PERCEPTUAL_VARIANTS if args.vgg_weights else {})
    rows = []
    for name, (perceptual, matching) in variants.items():
        folder = Path(args.workdir) / name.replace(" + ", "_").replace(" ", "_")
        module = DiffusionModule.load_from_checkpoint(
            train_variant(folder, perceptual, matching, args.epochs, args.vgg_weights), weights_only=True
        )
        samples = module.sample(args.num_samples, generator=torch.Generator().manual_seed(0)) * 2 - 1
        predicted = net(samples).argmax(1)
        rows.append(
            {
                "terms": name,
                "classifier_fid": frechet_distance(*features(net, samples), *reference),
                "classes_covered": int(predicted.unique().numel()),
                "steps": args.epochs * 140,
            }
        )
        print(rows[-1], flush=True)

    print(f"\n| loss terms | training steps | classifier FID ({args.num_samples} samples) | classes covered |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['terms']} | {row['steps']} | {row['classifier_fid']:.2f} | {row['classes_covered']}/10 |")
    print(f"| real training digits (floor) | | {floor:.2f} | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "floor": floor, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
