"""Sample quality against NFE for every sampler, on models trained on the offline MNIST digits.

    lit-ddpm fit --config configs/demo.yaml           # (make demo) -> checkpoints/demo/last.ckpt
    python -m benchmarks.sampler_quality --model demo=checkpoints/demo/last.ckpt --json quality.json

Every row draws --num-samples digits from each checkpoint's EMA weights, through the same path as
`lit-ddpm sample` (the same seeds give the same images), and scores them by classifier FID
(benchmarks/common.py: a small CNN's 64-d features, not Inception) against the 500 held-out
digits. Cost is the number of network evaluations (NFE): every sampler here costs one forward pass per
step and next to nothing else, so NFE is wall time up to a constant (printed once, measured on the first
row). With two or more --seeds the table shows the mean and the spread (max - min) over them.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from benchmarks.common import BothFID, ClassifierFID, autocast, demo_digits
from diffusion_lit.diffusion import Sampling
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint

SAMPLERS = ["ddpm", "ddim", "dpmpp", "dpmpp_sde", "unipc"]
ROWS = [Sampling(name, nfe) for name in SAMPLERS for nfe in (10, 20, 50)] + [Sampling("ddpm", 1000)]
ROWS += [Sampling(name, 20, threshold="dynamic") for name in SAMPLERS]
PICTURE_ROWS = [Sampling("ddim", 20), Sampling("dpmpp", 20), Sampling("unipc", 20), Sampling("dpmpp_sde", 20),
                Sampling("dpmpp_sde", 50), Sampling("ddpm", 50), Sampling("ddpm", 1000)]  # fmt: skip


def parse_rows(text: str | None) -> list[Sampling]:
    """ "dpmpp_sde:20,ddpm:1000,unipc:10:dynamic" -> Sampling rows; None: every row."""
    if not text:
        return ROWS
    rows = []
    for item in text.split(","):
        name, nfe, *threshold = item.split(":")
        rows.append(Sampling(name, int(nfe), threshold=threshold[0] if threshold else "clip"))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Sample every row from every model, score it, print a markdown table; optionally JSON and a picture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=CHECKPOINT, once per model")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", help='only these rows, e.g. "dpmpp_sde:20,ddpm:1000,unipc:10:dynamic"')
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="the network's precision while sampling (bf16: autocast, as `test` under bf16-mixed)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--picture", help="a PNG: the same 8 seeds, one row per sampler, one block per model")
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model)

    train, held_out = demo_digits()
    quality = BothFID(ClassifierFID(train, held_out, args.num_samples), train[0], held_out[0])

    results, seconds_per_nfe = [], None
    for label, path in models.items():
        module = load_checkpoint(path)
        for settings, precision in [(row, p) for row in parse_rows(args.rows) for p in args.precision]:
            for seed in args.seeds:
                start = time.perf_counter()
                samples, _ = generate_all(module, args.num_samples, settings=settings, seed=seed,
                                          batch_size=args.num_samples,
                                          precision=lambda p=precision, d=module.device: autocast(d, p))  # fmt: skip
                elapsed = time.perf_counter() - start
                seconds_per_nfe = seconds_per_nfe or elapsed / settings.steps / args.num_samples
                name = settings.name if len(args.precision) == 1 else f"{settings.name} {precision}"
                results.append({"model": label, "checkpoint": path, "sampling": name, "nfe": settings.steps,
                                "precision": precision, "seed": seed, **quality(samples),
                                "seconds": elapsed})  # fmt: skip
                print(results[-1], flush=True)

    for key, floor in quality.floors.items():
        print_table(results, list(models), args.seeds, key, floor, args.num_samples)
    print(f"\nwall time: {1000 * seconds_per_nfe:.2f} ms per image and NFE (batch {args.num_samples}, this machine)")
    if args.json:
        report = {
            "settings": vars(args),
            **quality.report_floors(),
            "ms_per_image_nfe": 1000 * seconds_per_nfe,
            "rows": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.picture:
        save_picture(models, args.picture)


def print_table(
    results: list[dict], models: list[str], seeds: list[int], key: str, floor: float, num_samples: int
) -> None:  # fmt: skip
    """One row per sampler setting, one column per model: the mean of `key` (and the spread over seeds)."""
    print(f"\n{key.replace('_', ' ')} ({num_samples} samples)")
    print(f"\n| sampler | NFE | {' | '.join(models)} |")
    print("| --- | ---: |" + " ---: |" * len(models))
    names = dict.fromkeys(row["sampling"] for row in results)
    for name in names:
        cells, nfe = [], None
        for model in models:
            fids = [r[key] for r in results if r["model"] == model and r["sampling"] == name]
            nfe = next(r["nfe"] for r in results if r["sampling"] == name)
            spread = f" ± {(max(fids) - min(fids)) / 2:.1f}" if len(fids) > 1 else ""
            cells.append(f"{sum(fids) / len(fids):.1f}{spread}" if fids else "")
        print(f"| {name} | {nfe} | {' | '.join(cells)} |")
    print(f"| real training digits (the floor at {num_samples}) | | {floor:.1f} |" + " |" * (len(models) - 1))
    print(f"(seeds {seeds})")


def save_picture(models: dict[str, str], path: str) -> None:
    """8 digits per row, the same seed in every row; a block of PICTURE_ROWS per model."""
    grids = []
    for checkpoint in models.values():
        module = load_checkpoint(checkpoint)
        for settings in PICTURE_ROWS:
            grids.append(generate_all(module, 8, settings=settings, seed=1, batch_size=8)[0])
    save_image(make_grid(torch.cat(grids).float() / 255, nrow=8, padding=2, pad_value=1.0), path)
    print(f"rows of {path}, per model ({', '.join(models)}): " + ", ".join(s.name for s in PICTURE_ROWS))


if __name__ == "__main__":
    main()
