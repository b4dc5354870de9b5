"""Bits/dim beside FID: the likelihood bound of demo-recipe models, what it costs, and how good its estimate is.

    python -m benchmarks.likelihood --steps 630 2520 --predictions v eps \
        --json benchmarks/results/likelihood-digits.json
    python -m benchmarks.likelihood --dataset photos --steps 2520 --predictions v \
        --json benchmarks/results/likelihood-photos.json

Trains the demo recipe (`lit-ddpm fit --config configs/demo.yaml`) once per --predictions target, keeping the
weights at each of --steps (two maturities), then scores every checkpoint: classifier FID of --num-samples
images from the auto sampler (benchmarks/common.py), and the bound of `diffusion.likelihood` in bits/dim
(what `lit-ddpm test --evaluation.nll_images N` reports): estimated from --timesteps importance-sampled
timesteps on the first --images held-out images and on as many training images (the gap between them is
what memorising looks like), with the small and the large reverse variance; and summed over all T terms on
the first --full-images held-out images, beside the estimate on the same images. The seconds are the
network's wall time on this machine, reported per 1,000 images.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.demo_runs import quality_measure, train
from diffusion_lit.diffusion import Sampling, likelihood
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint

PILOT = 4  # pilot images for the proposal, as bits_per_dim.PILOT_IMAGES (lit-ddpm test)


def bound(module, images: torch.Tensor, timesteps: int | None, variance: str, seed: int = 0) -> dict:
    """bits/dim of `images` (mean, standard error, per term) and the seconds it took, as `lit-ddpm test` does."""
    network, schedule = (lambda x, t: module.unet(x, t, None)), module.schedule
    images = likelihood.quantized(images)
    seeds = [seed * 1_000_000 + i for i in range(len(images))]
    options = {"variance": variance, "threshold": "clip", "batch_size": 256}
    start = time.perf_counter()
    with torch.inference_mode():
        if timesteps is None:
            parts = [likelihood.image_bounds(network, schedule, images[i : i + 1], seeds[i : i + 1], **options)
                     for i in range(len(images))]  # fmt: skip
        else:
            proposal, pilot = likelihood.proposal_from(network, schedule, images[:PILOT], seeds[:PILOT], **options)
            per_group = max(1, 256 // (timesteps + 1))
            parts = [pilot] + [
                likelihood.image_bounds(
                    network,
                    schedule,
                    images[i : i + per_group],
                    seeds[i : i + per_group],
                    proposal,
                    timesteps,
                    **options,
                )  # fmt: skip
                for i in range(PILOT, len(images), per_group)
            ]
    seconds = time.perf_counter() - start
    nats = torch.cat([torch.stack([p.prior, p.diffusion, p.decoder], 1) for p in parts])
    bits = likelihood.bits_per_dim(nats, images[0].numel())
    total = bits.sum(1)
    return {
        "bits_per_dim": total.mean().item(),
        "standard_error": (total.std() / len(total) ** 0.5).item(),
        "terms": {name: bits[:, i].mean().item() for i, name in enumerate(likelihood.TERMS)},
        "images": len(images),
        "timesteps": "all" if timesteps is None else timesteps,
        "variance": variance,
        "seconds_per_1000_images": seconds / len(images) * 1000,
    }


def main(argv: list[str] | None = None) -> None:
    """Train, score, print the table; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "photos"], default="digits")
    parser.add_argument("--steps", type=int, nargs="+", default=[630, 2520])
    parser.add_argument("--predictions", nargs="+", default=["v", "eps"], choices=["eps", "v", "x0"])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--full-images", type=int, default=50)
    parser.add_argument("--timesteps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--workdir", default="likelihood_runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    workdir, threads = Path(args.workdir).resolve(), os.cpu_count() or 1
    data, fid, ((train_images, _), (held_out, _)), _ = quality_measure(args.dataset, workdir, args.num_samples)
    rows = []
    for prediction in args.predictions:
        folder = workdir / f"{prediction}"
        for entry in train(folder, ["--model.prediction", prediction], 0, [], args.steps, data, threads):
            module = load_checkpoint(str(folder / f"{entry['checkpoint']}.ckpt"))
            images, _ = generate_all(module, args.num_samples, settings=Sampling().resolve(prediction, 1000),
                                     batch_size=args.num_samples)  # fmt: skip
            row = {"prediction": prediction, "step": entry["step"], **fid(images), "bounds": []}
            for variance in ("small", "large"):
                row["bounds"].append({"split": "held-out", **bound(module, held_out[: args.images], args.timesteps,
                                                                   variance)})  # fmt: skip
            row["bounds"].append({"split": "train", **bound(module, train_images[: args.images], args.timesteps,
                                                            "small")})  # fmt: skip
            full = held_out[: args.full_images]
            row["bounds"].append({"split": "held-out", **bound(module, full, None, "small")})
            row["bounds"].append({"split": "held-out", **bound(module, full, args.timesteps, "small")})
            rows.append(row)
            print_table(rows, fid.floors)
    if args.json:
        report = {"settings": vars(args), **fid.report_floors(), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))


def print_table(rows: list[dict], floors: dict[str, float]) -> None:
    """One line per (model, bound)."""
    print("\n| model | Inception FID | classifier FID | split | images | timesteps | variance | bits/dim "
          "| prior / diffusion / decoder | s per 1,000 images |")  # fmt: skip
    print("| --- | ---: | ---: | --- | ---: | --- | --- | ---: | --- | ---: |")
    for row in rows:
        for b in row["bounds"]:
            terms = " / ".join(f"{value:.3f}" for value in b["terms"].values())
            print(f"| {row['prediction']}, step {row['step']} | {row['inception_fid']:.1f} | "
                  f"{row['classifier_fid']:.1f} | {b['split']} | {b['images']} | {b['timesteps']} | {b['variance']} | "
                  f"{b['bits_per_dim']:.3f} ± "
                  f"{b['standard_error']:.3f} | {terms} | {b['seconds_per_1000_images']:.0f} |")  # fmt: skip
    print(f"| real training images (the FID floors) | {floors['inception_fid']:.1f} | {floors['classifier_fid']:.1f} "
          "| | | | | | | |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
