"""Sample quality against sampler steps, for one model trained on the offline MNIST digits.

    lit-ddpm fit --config configs/demo.yaml          # (make demo) -> checkpoints/demo/last.ckpt
    python benchmarks/sampler_quality.py --num-samples 500 --json sampler_quality.json --picture docs/sampler_steps.png

Every row draws --num-samples digits from the checkpoint's EMA weights with the same seed, and scores
them by classifier FID (benchmarks/digits_classifier.py: a small CNN's 64-d features, not Inception)
against the 500 held-out digits, plus the share of the 10 classes the classifier recognises. Time is
wall time per image for the whole batch on this machine, under torch.inference_mode.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from digits_classifier import features, train_classifier
from torchvision.utils import make_grid, save_image

from diffusion_lit.data import DemoMNISTDataModule
from diffusion_lit.metrics import frechet_distance
from diffusion_lit.sample import load_checkpoint

ROWS = [("ddpm", 1000), ("ddpm", 250), ("ddpm", 100), ("ddpm", 50), ("ddim", 100), ("ddim", 50), ("ddim", 20),
        ("ddim", 10), ("dpmpp", 20), ("dpmpp", 10)]  # fmt: skip
PICTURE_ROWS = [("dpmpp", 10), ("dpmpp", 20), ("ddim", 10), ("ddim", 50), ("ddpm", 50), ("ddpm", 1000)]


def main() -> None:
    """Sample every row, score it, print a markdown table; optionally a JSON file and a picture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="checkpoints/demo/last.ckpt")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--picture", help="a PNG of the same 8 seeds at several samplers and step counts")
    args = parser.parse_args()
    torch.manual_seed(0)

    data = DemoMNISTDataModule()
    data.setup("fit")
    images, labels = data.train_set.dataset.tensors  # both splits index one TensorDataset
    net = train_classifier(images[data.train_set.indices], labels[data.train_set.indices])
    reference = features(net, images[data.val_set.indices])
    floor = frechet_distance(*features(net, images[data.train_set.indices][: args.num_samples]), *reference)
    module = load_checkpoint(args.ckpt)
    print(f"checkpoint {args.ckpt}; real-vs-real floor at {args.num_samples} samples: {floor:.2f}", flush=True)

    rows = []
    for sampler, steps in ROWS:
        start = time.perf_counter()
        with torch.inference_mode():
            samples = module.sample(args.num_samples, sampler, steps, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        samples = samples * 2 - 1
        with torch.inference_mode():
            fid = frechet_distance(*features(net, samples), *reference)
            classes = int(net(samples).argmax(1).unique().numel())
        rows.append({"sampler": sampler, "steps": steps, "classifier_fid": fid, "classes": classes,
                     "ms_per_image": 1000 * seconds / args.num_samples})  # fmt: skip
        print(rows[-1], flush=True)

    print(f"\n| sampler | steps | classifier FID ({args.num_samples} samples) | classes | ms / image |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['sampler']} | {row['steps']} | {row['classifier_fid']:.2f} | {row['classes']}/10 "
              f"| {row['ms_per_image']:.1f} |")  # fmt: skip
    print(f"| real training digits (floor) | | {floor:.2f} | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "floor": floor, "rows": rows}, indent=2))
    if args.picture:
        with torch.inference_mode():
            grid = [module.sample(8, s, n, generator=torch.Generator().manual_seed(1)) for s, n in PICTURE_ROWS]
        save_image(make_grid(torch.cat(grid), nrow=8, padding=2, pad_value=1.0), args.picture)
        print(f"rows of {args.picture}: " + ", ".join(f"{s}-{n}" for s, n in PICTURE_ROWS))


if __name__ == "__main__":
    main()
