"""Few-step generation: students of `lit-ddpm distill` against their teacher's own fast solvers, per compute.

    python -m benchmarks.distillation --teacher-steps 2520 --seeds 0 1 \
        --json benchmarks/results/distillation-digits.json --picture docs/distillation.png

Trains a teacher of the demo recipe (timed from its first step, as the convergence benchmark does) to each of
--teacher-steps, then distills each teacher (`lit-ddpm distill`, --seeds seeds) for the largest of
--fractions of the teacher's training time, keeping the student at each fraction, once per ConsistencyLoss
--targets (the teacher's ODE step, ECT's data pairs). Every teacher is scored with its auto sampler and with
DDIM, DPM-Solver++ and UniPC at 1, 2, 4 and 10 NFE (and the consistency sampler on the teacher itself: its
one-step denoiser at each step), every student with the consistency sampler at those of 1, 2 and 4 steps it
draws with (a K-segment student: multiples of K); --distill-args passes the student's flags (e.g.
"--model.loss.segments 1") and names its folders, so variants share one --workdir's teacher (and its scores,
kept beside it). The score is classifier FID (benchmarks/common.py) of --num-samples images against held-out
images. --dataset photos runs the same on the RGB photo patches.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from benchmarks.demo_runs import quality_measure, train
from diffusion_lit.diffusion import Sampling
from diffusion_lit.files import written_whole
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint

SOLVERS = [Sampling(name, nfe) for name in ("ddim", "dpmpp", "unipc") for nfe in (1, 2, 4, 10)]
SOLVERS += [Sampling("consistency", nfe) for nfe in (1, 2, 4)]


def student_rows(segments: int, gammas: tuple[float | None, ...] = (None,)) -> list[Sampling]:
    """The consistency sampler at those of 1, 2 and 4 steps that a student of `segments` draws with (multiples),
    with each of `gammas` where it re-noises (more steps than segments; None: the sampler's default)."""
    steps = [steps for steps in (1, 2, 4) if steps % segments == 0] or [segments]
    return [Sampling("consistency", n, gamma=gamma) for n in steps for gamma in (gammas if n > segments else [None])]


def score(
    checkpoint: Path, rows: list[Sampling] | None, fid, num_samples: int, gammas: tuple[float | None, ...] = (None,)
) -> list[dict]:
    """Inception and classifier FID (`fid`, a BothFID) of each sampling of one checkpoint (seed 0 of the noise,
    as `lit-ddpm sample`); rows None: a student's own (`student_rows`, with `gammas`)."""
    module = load_checkpoint(str(checkpoint))
    results = []
    for settings in student_rows(module.consistency_model, gammas) if rows is None else rows:
        settings = settings.resolve(module.hparams.prediction, module.hparams.timesteps, module.consistency_model)
        images, _ = generate_all(module, num_samples, settings=settings, batch_size=num_samples)
        results.append({"sampling": settings.name, "nfe": settings.steps, **fid(images)})
    return results


def teacher_scores(teacher: Path, fid, num_samples: int) -> list[dict]:
    """`score` of the teacher's auto sampler and every solver, once per --workdir: kept beside its checkpoint
    (deterministic given it) for later commands on the same workdir; delete the file to score again."""
    kept = teacher.with_name(f"{teacher.stem}-scores-{num_samples}-both-fids.json")
    if kept.exists():
        return json.loads(kept.read_text())
    results = score(teacher, [Sampling(), *SOLVERS], fid, num_samples)
    with written_whole(kept) as partial:  # whole or absent, whatever stops the command
        partial.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    """Train the teachers, distill them, score everything, print the table; optionally JSON and a picture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "photos"], default="digits")
    parser.add_argument("--teacher-steps", type=int, nargs="+", default=[2520])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--workdir", default="distillation_runs")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["teacher", "data"],
        choices=["teacher", "data"],
        help="ConsistencyLoss targets: the teacher's ODE step (distillation) or ECT's data pairs",
    )
    parser.add_argument("--distill-args", default="", help="extra flags for lit-ddpm distill, e.g. the loss's")
    parser.add_argument("--gammas", type=float, nargs="+", default=[None],
                        help="score the students with each of these consistency-sampler gammas where they re-noise "
                        "(default: the sampler's default only)")  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--picture", help="a PNG: the same noise, teacher's auto sampler and the students")
    args = parser.parse_args(argv)
    workdir, threads = Path(args.workdir).resolve(), os.cpu_count() or 1
    data, fid, _, _ = quality_measure(args.dataset, workdir, args.num_samples)

    log = train(workdir / "teacher", [], 0, [], args.teacher_steps, data, threads)
    rows = []
    for entry in log:
        teacher = workdir / "teacher" / f"{entry['checkpoint']}.ckpt"
        label = f"teacher {entry['step']}"
        rows += [{"model": label, "seed": None, **row} for row in teacher_scores(teacher, fid, args.num_samples)]
        budgets = [fraction * entry["seconds"] / 60 for fraction in args.fractions]
        for target, seed in [(target, seed) for target in args.targets for seed in args.seeds]:
            folder = workdir / f"student-{entry['step']}-{target}-seed{seed}{slug(args.distill_args)}"
            # --distill.steps null: the budgets decide the length
            variant = ["--teacher", str(teacher), "--model.loss.target", target, "--distill.steps", "null",
                       *args.distill_args.split()]  # fmt: skip
            for student in train(folder, variant, seed, budgets, [], data, threads, command="distill"):
                minutes = float(student["checkpoint"].split("=")[1])  # written with 6 digits
                fraction = min(args.fractions, key=lambda f: abs(f * entry["seconds"] / 60 - minutes))
                checkpoint = folder / f"{student['checkpoint']}.ckpt"
                for row in score(checkpoint, None, fid, args.num_samples, tuple(args.gammas)):
                    rows.append({"model": f"student ({target}) of {entry['step']}, {fraction:.0%} of its time",
                                 "seed": seed, "target": target, "steps": student["step"], **row})  # fmt: skip
        print_table(rows, fid.floors, args.num_samples)
    if args.json:
        report = {"settings": vars(args), **fid.report_floors(), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.picture:
        save_picture(workdir, log, args, args.picture)


def slug(flags: str) -> str:
    """A folder-name suffix for the students' extra flags ("" for none), so that one --workdir (and its teacher)
    serves several variants: "--model.loss.segments 2" -> "_model.loss.segments-2"."""
    return "".join(f"_{flag.lstrip('-')}" if flag.startswith("--") else f"-{flag}" for flag in flags.split())


def print_table(rows: list[dict], floors: dict[str, float], num_samples: int) -> None:
    """model | sampling | Inception FID | classifier FID (each the mean over seeds, and the spread)."""
    print(f"\n| model | sampling | NFE | Inception FID ({num_samples} samples) | classifier FID |")
    print("| --- | --- | ---: | ---: | ---: |")
    for model, sampling in dict.fromkeys((row["model"], row["sampling"]) for row in rows):
        chosen = [row for row in rows if row["model"] == model and row["sampling"] == sampling]
        cells = []
        for key in floors:
            scores = [row[key] for row in chosen]
            spread = f" ± {(max(scores) - min(scores)) / 2:.1f}" if len(scores) > 1 else ""
            cells.append(f"{sum(scores) / len(scores):.1f}{spread}")
        print(f"| {model} | {sampling} | {chosen[0]['nfe']} | {' | '.join(cells)} |")
    floor_cells = " | ".join(f"{value:.1f}" for value in floors.values())
    print(f"| real training images (the floor) | | | {floor_cells} |", flush=True)


def save_picture(workdir: Path, log: list[dict], args, path: str) -> None:
    """One row per model: the teacher's auto sampler, then the seed-0 student of each variant in `workdir` (this
    command's and earlier ones' --distill-args, by folder name) at its largest budget at each step count it draws
    with (`student_rows`); the same 8 noises in every row."""
    rows = []
    for entry in log:
        teacher = load_checkpoint(str(workdir / "teacher" / f"{entry['checkpoint']}.ckpt"))
        rows.append(generate_all(teacher, 8, batch_size=8)[0])
        for folder in sorted(workdir.glob(f"student-{entry['step']}-{args.targets[0]}-seed{args.seeds[0]}*")):
            last = max(folder.glob("minutes=*.ckpt"), key=lambda p: float(p.stem.split("=")[1]))
            student = load_checkpoint(str(last))
            rows += [generate_all(student, 8, settings=settings, batch_size=8)[0]
                     for settings in student_rows(student.consistency_model)]  # fmt: skip
    save_image(make_grid(torch.cat(rows).float() / 255, nrow=8, padding=2, pad_value=1), path)


if __name__ == "__main__":
    main()
