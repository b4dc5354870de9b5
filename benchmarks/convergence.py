"""Quality against wall-clock training time, for the demo recipe and variants of it, two seeds each.

    python -m benchmarks.convergence --json benchmarks/results/convergence-digits.json --plot docs/convergence.png
    python -m benchmarks.convergence --dataset photos --variants "eps (today)" v       # the RGB check
    python -m benchmarks.convergence --replot digits.json photos.json --plot both.png   # side by side, no training
    python -m benchmarks.convergence --dataset photos --train-per-photo 30 --variants v "v + augmentation" \
        --neighbours docs/neighbours.png                                      # a small folder: memorising?

Each variant (benchmarks/recipes.py) is `lit-ddpm fit --config configs/demo.yaml` plus a few flags, trained
(benchmarks/demo_runs.py) in its own folder under --workdir, --jobs runs at a time, each on cpu_count / jobs threads
(nothing else should run on the machine meanwhile: the budgets are wall time). A callback saves the weights when the
training time (from the first step; start-up, validation and sampling are not in it) crosses each budget, and at
step 2,520 (today's demo), and stops the run after the last. Every checkpoint is then sampled (--num-samples images,
seed 0) with the default sampler and with ancestral DDPM-50, and scored by classifier FID against held-out images:
the 500 held-out digits, or the held-out photo patches (benchmarks/common.py: write_photo_patches) for --dataset
photos. Each row also says how close the samples come to the training images: the median distance from a sample to
its nearest training image over the median distance from a held-out image to its nearest training image
(`nearest_ratio`; well under 1: the model draws its training images back).

The goal: the classifier FID today's demo reaches at 2,520 steps, in at most 60% of its wall time.
"""

import argparse
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from benchmarks.demo_runs import quality_measure, train
from benchmarks.recipes import TODAY, TODAY_STEPS, VARIANTS, planned
from diffusion_lit.diffusion import Sampling
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint
from diffusion_lit.pixels import to_signed

SAMPLERS = {"default": Sampling(), "ddpm50": Sampling("ddpm", 50)}  # default: auto, by the prediction target


def nearest(images: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's Euclidean distance to its nearest training image, and that image's index (images [-1, 1])."""
    return torch.cdist(images.flatten(1).float(), train.flatten(1).float()).min(1)


def main(argv: list[str] | None = None) -> None:
    """Train every variant with every seed, score every checkpoint, print the table, write JSON and a plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "photos"], default="digits")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", type=float, nargs="+", default=[3, 6, 12], help="minutes of training")
    parser.add_argument("--today-steps", type=int, default=TODAY_STEPS, help="also save at this step (0: no)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each on cpu_count / jobs threads")
    parser.add_argument("--planned", action="store_true", help="each budget its own run (trainer.max_time), for "
                        "recipes planned over its length (the others stay one run: the same checkpoints)")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("convergence_runs"))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--plot", help="a PNG of quality against minutes, one line per variant")
    parser.add_argument("--train-per-photo", type=int, default=0, help="photos: train on the first N patches of "
                        "each photo only (a small folder); the classifier and the held-out patches stay")  # fmt: skip
    parser.add_argument("--neighbours", help="a PNG: per variant, 8 samples (seed 0, its last checkpoint), "
                        "each above its 3 nearest training images")  # fmt: skip
    parser.add_argument("--replot", nargs="+", metavar="JSON", help="train nothing: draw --plot from these reports "
                        "(written by --json), one panel each")  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot draws a picture: say where with --plot out.png")
        try:
            reports = [json.loads(Path(name).read_text()) for name in args.replot]
        except (OSError, ValueError) as error:
            parser.error(f"--replot: cannot read a report ({error}); give files written by --json")
        plot(reports, args.plot)
        return
    torch.manual_seed(0)
    workdir = args.workdir.resolve()
    flags, both, (train_set, held_out), fit_images = quality_measure(args.dataset, workdir, args.num_samples,
                                                                 args.train_per_photo)  # fmt: skip
    held_out_distance = nearest(held_out[0], fit_images)[0].median()
    fid = both.classifier  # the classifier FID runs with each sampler, Inception's with one

    def nearest_ratio(samples: torch.Tensor) -> float:
        """The samples' median distance to their nearest training image over the held-out images' own."""
        return (nearest(to_signed(samples), fit_images)[0].median() / held_out_distance).item()

    def own(name: str) -> bool:  # each budget its own run; a recipe with nothing planned is one run all the same
        return args.planned and planned(VARIANTS[name])

    def budgets(name: str) -> list[tuple]:
        return [(budget,) for budget in args.budgets] if own(name) else [tuple(args.budgets)]

    runs = [(name, seed, each) for name in args.variants for seed in args.seeds for each in budgets(name)]
    dataset = args.dataset + (f"-{args.train_per_photo}" if args.train_per_photo else "")
    folders = {run: workdir / dataset / re.sub(r"[^a-z0-9]+", "-", run[0].lower()).strip("-") / f"seed{run[1]}"
               / (f"planned-{run[2][0]:g}min" if own(run[0]) else "") for run in runs}  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def run(key: tuple[str, int, tuple]) -> list[dict]:
        steps = [args.today_steps] if key[0] == TODAY and args.today_steps and not own(key[0]) else []
        return train(folders[key], VARIANTS[key[0]], key[1], list(key[2]), steps, flags, threads, planned=own(key[0]))

    longest_first = sorted(runs, key=lambda key: -max(key[2]))  # so that the jobs end close together
    with ThreadPoolExecutor(args.jobs) as pool:  # the runs, `jobs` at a time; then scoring, one at a time
        done = dict(zip(longest_first, pool.map(run, longest_first), strict=True))
    logs = {key: done[key] for key in runs}
    rows, last_samples = [], {}
    for (name, seed, each), log in logs.items():
        for entry in log:
            module = load_checkpoint(str(folders[name, seed, each] / f"{entry['checkpoint']}.ckpt"))
            row, drawn = {"variant": name, "seed": seed, **entry}, {}  # drawn: images by their concrete settings
            for label, settings in SAMPLERS.items():
                settings = settings.resolve(module.hparams.prediction, module.hparams.timesteps)
                if settings not in drawn:  # auto is DDPM-50 for v: drawn once, scored under both labels
                    drawn[settings], _ = generate_all(module, args.num_samples, settings=settings,
                                                      batch_size=args.num_samples)  # fmt: skip
                images = drawn[settings]
                row[f"fid_{label}"] = fid(images)
                if label == "default":
                    row["inception_fid_default"] = both.inception(images)
                    row["nearest_ratio"] = nearest_ratio(images)
                    if seed == args.seeds[0]:
                        last_samples[name] = images  # the last checkpoint's, in the end
            rows.append(row)
            print(row, flush=True)

    report = {"settings": {**vars(args), "workdir": str(args.workdir), "default_sampler": "auto"},
              **both.report_floors(), "rows": rows}  # fmt: skip
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot([report], args.plot)
    if args.neighbours:
        neighbours_picture(last_samples, fit_images, args.neighbours)


def neighbours_picture(samples: dict[str, torch.Tensor], train: torch.Tensor, path: str, count: int = 8) -> None:
    """Per variant a block of `count` columns: a sample (uint8) on top, its 3 nearest training images below."""
    blocks = []
    for images in samples.values():
        chosen = to_signed(images[:count])
        order = torch.cdist(chosen.flatten(1), train.flatten(1)).argsort(1)[:, :3]  # (count, 3)
        rows = [chosen, *(train[order[:, k]] for k in range(3))]
        blocks.append(torch.cat(rows))
    grid = make_grid(torch.cat(blocks), nrow=count, padding=1, value_range=(-1, 1), normalize=True)
    save_image(grid, path)


def summary(rows: list[dict], variant: str, checkpoint: str, key: str) -> tuple[float, float, float, float]:
    """Mean and half-spread over seeds of `key`, and the mean minutes and steps, for one checkpoint of a variant."""
    chosen = [row for row in rows if row["variant"] == variant and row["checkpoint"] == checkpoint]
    values = [row[key] for row in chosen]
    minutes = sum(row["seconds"] for row in chosen) / len(chosen) / 60
    steps = sum(row["step"] for row in chosen) / len(chosen)
    return sum(values) / len(values), (max(values) - min(values)) / 2, minutes, steps


def print_table(report: dict) -> None:
    """Markdown: one row per variant and checkpoint, FID with each sampler (mean ± half the seed spread), led by
    Inception FID with the default sampler where the report has it."""
    rows, default = report["rows"], report["settings"]["default_sampler"]
    near = all("nearest_ratio" in row for row in rows)  # not in reports written before it was measured
    inception = all("inception_fid_default" in row for row in rows)  # nor Inception FID
    count = report["settings"]["num_samples"]
    print("\n| variant | checkpoint | minutes | steps |" + f" Inception FID ({count}), {default} |" * inception
          + f" classifier FID, {default} | classifier FID, ddpm50 |" + " nearest ratio |" * near)  # fmt: skip
    print("| --- | --- | ---: | ---: |" + " ---: |" * (2 + inception + near))
    for variant in dict.fromkeys(row["variant"] for row in rows):
        for checkpoint in dict.fromkeys(row["checkpoint"] for row in rows if row["variant"] == variant):
            fid, spread, minutes, steps = summary(rows, variant, checkpoint, "fid_default")
            ddpm, ddpm_spread, *_ = summary(rows, variant, checkpoint, "fid_ddpm50")
            lead = ""
            if inception:
                mean, half, *_ = summary(rows, variant, checkpoint, "inception_fid_default")
                lead = f" {mean:.1f} ± {half:.1f} |"
            ratio = f" {summary(rows, variant, checkpoint, 'nearest_ratio')[0]:.2f} |" if near else ""
            print(f"| {variant} | {checkpoint} | {minutes:.1f} | {steps:.0f} |{lead} {fid:.1f} ± {spread:.1f} "
                  f"| {ddpm:.1f} ± {ddpm_spread:.1f} |{ratio}")  # fmt: skip
    floor = f" {report['inception_floor']:.1f} |" if inception else ""
    print(f"| real images (the floor) | | | |{floor} {report['floor']:.1f} | |" + " 1.00 |" * near)


def plot(reports: list[dict], path: str) -> None:
    """Classifier FID (default sampler) against minutes, one panel per report (data set), a line and a seed band
    per variant; a variant keeps its colour across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row["variant"] for report in reports for row in report["rows"]))
    figure, panels = plt.subplots(1, len(reports), figsize=(7 * len(reports), 4.5), squeeze=False)
    for axes, report in zip(panels[0], reports, strict=True):
        rows = report["rows"]
        for variant in dict.fromkeys(row["variant"] for row in rows):
            k = names.index(variant)
            budgets = [c for c in dict.fromkeys(r["checkpoint"] for r in rows if r["variant"] == variant) if "min" in c]
            points = sorted((summary(rows, variant, c, "fid_default") for c in budgets), key=lambda p: p[2])
            minutes, means = [p[2] for p in points], [p[0] for p in points]
            colour = f"C{k % 10}"  # 10 colours, then dashed lines
            axes.plot(minutes, means, marker="o", color=colour, linestyle="-" if k < 10 else "--", label=variant)
            band = [p[0] - p[1] for p in points], [p[0] + p[1] for p in points]
            axes.fill_between(minutes, *band, color=colour, alpha=0.2)
        today = f"step={report['settings']['today_steps']}"
        if any(row["checkpoint"] == today for row in rows if row["variant"] == TODAY):
            target, _, today_minutes, _ = summary(rows, TODAY, today, "fid_default")
            axes.axhline(target, color="gray", linestyle="--", label=f"today's demo at {today}")
            axes.axvline(0.6 * today_minutes, color="gray", linestyle=":", label="60% of its time")
        axes.set_yscale("log")  # the variants and the floor are orders of magnitude apart
        axes.axhline(report["floor"], color="black", linewidth=0.8, label="real images (the floor)")
        axes.set_xlabel("training minutes (wall clock, this machine)")
        axes.set_ylabel(f"classifier FID, {report['settings']['default_sampler']} (lower is better)")
        axes.set_title(f"{report['settings']['dataset']}: quality against training time (mean of seeds, band: min-max)")
    handles = {}  # one legend for all panels, each label once
    for axes in panels[0]:
        handles.update(zip(*reversed(axes.get_legend_handles_labels()), strict=True))
    panels[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
