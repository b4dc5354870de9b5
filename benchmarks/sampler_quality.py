"""Sample quality against NFE for every sampler, on models trained on the offline digits or the RGB patches.

    lit-ddpm fit --config configs/demo.yaml           # (make demo) -> checkpoints/demo/last.ckpt
    python -m benchmarks.sampler_quality --model demo=checkpoints/demo/last.ckpt --json quality.json
    python -m benchmarks.sampler_quality --dataset photos --model v=<a convergence run's checkpoint> ...

Every row draws --num-samples images from each checkpoint's EMA weights, through the same path as
`lit-ddpm sample` (the same seeds give the same images), and scores them in Inception FID and classifier
FID (benchmarks/common.py: a small CNN's 64-d features) against the held-out images: the 500 held-out
digits, or the held-out photo patches (written under --workdir, as benchmarks.convergence writes them).
Cost is the number of network evaluations (NFE): every sampler here costs one forward pass per step and
next to nothing else, so NFE is wall time up to a constant (printed once, measured on the first row).
With two or more --seeds the table shows the mean and the spread (max - min) over them.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from benchmarks.common import BothFID, ClassifierFID, autocast, demo_digits, photo_patches
from diffusion_lit.diffusion import Sampling
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint

SAMPLERS = ["ddpm", "ddim", "dpmpp", "dpmpp_sde", "unipc"]
ROWS = [Sampling(name, nfe) for name in SAMPLERS for nfe in (10, 20, 50)] + [Sampling("ddpm", 1000)]
ROWS += [Sampling(name, 20, threshold="dynamic") for name in SAMPLERS]
# The settings `sampler: auto` is chosen from (`--rows auto`): every solver at 50 NFE or fewer.
AUTO_ROWS = "unipc:10,unipc:20,unipc:50,dpmpp:10,dpmpp:20,dpmpp:50,dpmpp_sde:20,dpmpp_sde:50,ddpm:20,ddpm:50,ddim:50"
PICTURE_ROWS = [Sampling("ddim", 20), Sampling("dpmpp", 20), Sampling("unipc", 20), Sampling("dpmpp_sde", 20),
                Sampling("dpmpp_sde", 50), Sampling("ddpm", 50), Sampling("ddpm", 1000)]  # fmt: skip


def parse_rows(text: str | None) -> list[Sampling]:
    """ "dpmpp_sde:20,ddpm:1000,unipc:10:dynamic" -> Sampling rows; "auto": AUTO_ROWS; None: every row."""
    if not text:
        return ROWS
    text = AUTO_ROWS if text == "auto" else text
    rows = []
    for item in text.split(","):
        name, nfe, *threshold = item.split(":")
        rows.append(Sampling(name, int(nfe), threshold=threshold[0] if threshold else "clip"))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Sample every row from every model, score it, print a markdown table; optionally JSON and a picture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="LABEL=CHECKPOINT, once per model")
    parser.add_argument("--rule-of", nargs="+", metavar="JSON", help="print the auto rule of these result files")
    parser.add_argument("--dataset", choices=["digits", "photos"], default="digits")
    parser.add_argument("--workdir", type=Path, default=Path("convergence_runs"), help="photos: where the patches are")
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
    if args.rule_of:
        rule = rule_of(args.rule_of, table=True)
        print(f"\nthe auto rule of {len(args.rule_of)} files, in Inception FID above its floor: {rule}")
        return
    if not args.model:
        parser.error("--model LABEL=CHECKPOINT is required (or --rule-of)")
    models = dict(item.split("=", 1) for item in args.model)

    train, held_out = demo_digits() if args.dataset == "digits" else photo_patches(args.workdir)
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
                results.append({"model": label, "checkpoint": path, "dataset": args.dataset,
                                "prediction": module.hparams.prediction, "sampling": name,
                                "sampler": settings.sampler, "nfe": settings.steps, "precision": precision,
                                "seed": seed, **quality(samples), "seconds": elapsed})  # fmt: skip
                print(results[-1], flush=True)

    for key, floor in quality.floors.items():
        print_table(results, list(models), args.seeds, key, floor, args.num_samples)
    print(f"\nwall time: {1000 * seconds_per_nfe:.2f} ms per image and NFE (batch {args.num_samples}, this machine)")
    floors = {args.dataset: quality.floors["inception_fid"]}
    print(f"the auto rule of these rows, in Inception FID above its floor: {choose_auto(results, floors)}")
    if args.json:
        report = {
            "settings": {**vars(args), "workdir": str(args.workdir)},
            **quality.report_floors(),
            "ms_per_image_nfe": 1000 * seconds_per_nfe,
            "rows": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.picture:
        save_picture(models, args.picture)


def worst_ratios(rows: list[dict], floors: dict[str, float], key: str = "inception_fid", max_nfe: int = 50) -> dict:
    """prediction target -> {(sampler, NFE): its worst ratio to the best setting at `max_nfe` or fewer, over the
    target's cells (a cell: one data set, model and seed)}, for the settings every cell has. Only plain rows
    count (fp32, clipped x0: the auto sampler's other settings).

    Scores are compared above their data set's floor (`floors`: data set -> the score of as many real images):
    at a few hundred samples FID's bias is most of the score (62.6 of the patches' 232-294), and a ratio of raw
    scores calls a setting 9x worse in classifier FID "within 10%"."""
    cells: dict[tuple, dict[tuple[str, int], float]] = {}
    for row in rows:
        plain = row["sampling"] == f"{row['sampler']}{row['nfe']}" and row.get("precision", "fp32") == "fp32"
        if plain and row["nfe"] <= max_nfe:
            cell = (row["prediction"], row["dataset"], row["model"], row["seed"])
            cells.setdefault(cell, {})[row["sampler"], row["nfe"]] = row[key] - floors[row["dataset"]]
    ratios = {}
    for prediction in sorted({cell[0] for cell in cells}):
        tables = [scores for cell, scores in cells.items() if cell[0] == prediction]
        common = set.intersection(*(set(scores) for scores in tables))
        ratios[prediction] = {s: max(t[s] / max(min(t.values()), 1e-9) for t in tables) for s in common}
    return ratios


def choose_auto(rows: list[dict], floors: dict[str, float], key: str = "inception_fid", tolerance: float = 0.1) -> dict:
    """The `sampler: auto` rule a table implies: for each prediction target, the cheapest setting (fewest NFE,
    then the smallest worst ratio) within `tolerance` of the best at 50 NFE or fewer in every cell of that
    target (`worst_ratios`), as (sampler, NFE), or None where no setting is."""
    rule = {}
    for prediction, worst in worst_ratios(rows, floors, key).items():
        fits = [s for s in worst if worst[s] <= 1 + tolerance]
        rule[prediction] = min(fits, key=lambda s: (s[1], worst[s])) if fits else None
    return rule


def rule_of(paths: list[str], key: str = "inception_fid", table: bool = False) -> dict:
    """`choose_auto` over the rows of result files this script wrote, each scored above its own floor; `table`:
    also print each plain setting's scores per file (one per model) and its worst ratio above the floor."""
    rows, floors, columns = [], {}, []
    for path in paths:
        report = json.loads(Path(path).read_text())
        dataset = report["settings"].get("dataset", "digits")  # the digits' files from before photos
        floor = report["inception_floor" if key == "inception_fid" else "floor"]
        if floors.setdefault(dataset, floor) != floor:  # the rows are compared above one floor per data set
            raise SystemExit(f"{path}: its {dataset} floor {floor:.2f} is not the other files' {floors[dataset]:.2f}: "
                             "score every file of one data set with the same --num-samples")  # fmt: skip
        rows += [{"dataset": dataset, **row} for row in report["rows"]]
        columns.append((Path(path).stem.removeprefix("sampler_quality-"), report["rows"], floors[dataset]))
    if table:
        ratios = worst_ratios(rows, floors, key)
        print(f"\n| {key.replace('_', ' ')} | NFE | " + " | ".join(f"{c[0]} (floor {c[2]:.1f})" for c in columns)
              + " | worst ratio above the floor |\n| --- | ---: |" + " ---: |" * (len(columns) + 1))  # fmt: skip
        for setting in sorted({s for worst in ratios.values() for s in worst}):
            name = f"{setting[0]}{setting[1]}"
            cells = [" / ".join(f"{r[key]:.1f}" for r in c[1] if r["sampling"] == name) for c in columns]
            worst = ", ".join(f"{p} {w[setting]:.2f}" for p, w in ratios.items() if setting in w)
            print(f"| {name} | {setting[1]} | {' | '.join(cells)} | {worst} |")
    return choose_auto(rows, floors, key)


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
    print(f"| real training images (the floor at {num_samples}) | | {floor:.1f} |" + " |" * (len(models) - 1))
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
