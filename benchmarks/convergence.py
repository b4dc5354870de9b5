"""Quality against wall-clock training time, for the demo recipe and variants of it, two seeds each.

    python -m benchmarks.convergence --json benchmarks/results/convergence-digits.json --plot docs/convergence.png
    python -m benchmarks.convergence --dataset photos --variants "eps (today)" v       # the RGB check
    python -m benchmarks.convergence --replot digits.json photos.json --plot both.png   # side by side, no training
    python -m benchmarks.convergence --dataset photos --train-per-photo 30 --variants v "v + augmentation" \
        --neighbours docs/neighbours.png                                      # a small folder: memorising?

Each variant is `lit-ddpm fit --config configs/demo.yaml` plus a few flags, run in its own folder under
--workdir, --jobs runs at a time, each on cpu_count / jobs threads (nothing else should run on the machine
meanwhile: the budgets are wall time). A callback saves the weights when the training time (from the
first step; start-up, validation and sampling are not in it) crosses each budget, and at step 2,520
(today's demo), and stops the run after the last. Every checkpoint is then sampled (--num-samples images,
seed 0) with the default sampler and with ancestral DDPM-50, and scored by classifier FID against
held-out images: the 500 held-out digits, or the held-out photo patches (benchmarks/common.py: write_photo_patches)
for --dataset photos. Each row also says how close the samples come to the training images: the median
distance from a sample to its nearest training image over the median distance from a held-out image to its
nearest training image (`nearest_ratio`; well under 1: the model draws its training images back).

The goal: the classifier FID today's demo reaches at 2,520 steps, in at most 60% of its wall time.
"""

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback
from torchvision.utils import make_grid, save_image

from benchmarks.common import ROOT, BothFID, ClassifierFID, demo_digits, load_folder, write_photo_patches
from diffusion_lit.diffusion import Sampling
from diffusion_lit.generation import generate_all
from diffusion_lit.loading import load_checkpoint
from diffusion_lit.pixels import to_signed
from diffusion_lit.plan import depends_on_length

TODAY_STEPS = 2520  # configs/demo.yaml: 18 epochs of 140 steps
TODAY = "eps (today)"  # the demo recipe as it was: noise prediction, plain MSE, random noise pairing


def _variant(
    prediction: str, snr_gamma="null", immiscible="false", lognormal="null", edm="false", **hyper: str
) -> list[str]:  # fmt: skip
    """The flags of one variant: its loss settings in full, and `hyper` (HYPER's names) where it departs from
    the demo's recipe as it was before the configs planned their runs (DEMO_BEFORE, on configs/demo.yaml)."""
    hyper = {**DEMO_BEFORE, **hyper}
    loss = "--model.loss.init_args"
    flags = ["--model.prediction", prediction, f"{loss}.snr_gamma", snr_gamma, f"{loss}.immiscible", immiscible,
             f"{loss}.lognormal_timesteps", lognormal, f"{loss}.edm_weighting", edm]  # fmt: skip
    return flags + hyper_flags(hyper)


def hyper_flags(hyper: dict[str, str]) -> list[str]:
    """The command-line flags of training hyper-parameters named as in HYPER."""
    return [flag for name, value in hyper.items() for flag in (HYPER[name], value)]


# configs/demo.yaml's length-like settings until it shipped the planned recipe: every variant starts from them
DEMO_BEFORE = {"warmup": "100", "ema": "0.995", "sigma_rel": "null"}
HYPER = {  # the training hyper-parameters a variant may change, and their flags
    "lr": "--model.optimizer.init_args.lr",
    "warmup": "--model.warmup_steps",
    "batch": "--data.init_args.batch_size",
    "ema": "--model.ema_decay",
    "augment": "--model.augment",
    "augment_dim": "--model.unet.init_args.augment_dim",
    "dropout": "--model.unet.init_args.dropout",
    "clip": "--trainer.gradient_clip_val",
    "decay": "--model.lr_decay",
    "decay_from": "--model.decay_from",
    "sigma_rel": "--model.ema_sigma_rel",
}
# A recipe relative to the run's length (plan.py): 5% warm-up, constant, linear cool-down over the last 20%;
# the EMA as a share of the run so far (EDM2's sigma_rel); Adam 1e-3, the demo's batch and dropout.
PLANNED = {"lr": "1e-3", "warmup": "0.05", "decay": "wsd", "decay_from": "0.8", "sigma_rel": "0.1"}
# configs/folder.yaml's (and cifar10.yaml's) training hyper-parameters before this sweep, on the demo's UNet
FOLDER_BEFORE = {"lr": "2e-4", "warmup": "5000", "batch": "64", "ema": "0.9999", "dropout": "0.1", "clip": "1.0"}


EDM_LEVELS = "[-1.2,1.2]"  # ln sigma ~ N(-1.2, 1.2^2), Karras et al. 2022
VARIANTS = {  # each says its prediction target, so that the table does not depend on configs/demo.yaml's
    TODAY: _variant("eps"),
    "eps + min-SNR-5": _variant("eps", snr_gamma="5"),
    "eps + immiscible": _variant("eps", immiscible="true"),
    "v": _variant("v"),
    "v + min-SNR-5": _variant("v", snr_gamma="5"),
    "v + EDM noise levels": _variant("v", lognormal=EDM_LEVELS),
    "v + EDM levels and weighting": _variant("v", lognormal=EDM_LEVELS, edm="true"),
    "eps + EDM levels and weighting": _variant("eps", lognormal=EDM_LEVELS, edm="true"),
    "folder.yaml before (eps + min-SNR-5, its hyper-parameters)": _variant("eps", snr_gamma="5", **FOLDER_BEFORE),
    "v, folder.yaml's hyper-parameters": _variant("v", **FOLDER_BEFORE),  # the shipped recipe before this sweep
    "v, folder.yaml's hyper-parameters with Adam 1e-3": _variant("v", **{**FOLDER_BEFORE, "lr": "1e-3"}),
    "v, lr 2e-3": _variant("v", lr="2e-3"),
    "v, lr 5e-4": _variant("v", lr="5e-4"),
    "v, batch 64": _variant("v", batch="64"),
    "v, batch 16": _variant("v", batch="16"),
    "v, dropout 0.1": _variant("v", dropout="0.1"),
    "v, no clipping": _variant("v", clip="0"),
    "v, warm-up 320 (6% of the run, as folder.yaml's)": _variant("v", warmup="320"),  # 5,000 of 78,200 steps
    "v, EMA 0.999": _variant("v", ema="0.999"),
    "v + augmentation": _variant("v", augment="0.12", augment_dim="6"),  # non-leaky, EDM's probability
    "v, planned: 5% warm-up, WSD over the last 20%, EMA sigma_rel 0.1": _variant("v", **PLANNED),
    "v, planned, EMA 0.995": _variant("v", **{**PLANNED, "sigma_rel": "null", "ema": "0.995"}),
    "v, planned, cosine from the warm-up": _variant("v", **{**PLANNED, "decay": "cosine", "decay_from": "0"}),
    "v, planned, WSD over the last 40%": _variant("v", **{**PLANNED, "decay_from": "0.6"}),
    "v, planned, EMA sigma_rel 0.05": _variant("v", **{**PLANNED, "sigma_rel": "0.05"}),
    "v, planned, constant rate (no cool-down)": _variant("v", **{**PLANNED, "decay": "constant"}),
}


@functools.cache
def demo_model() -> dict:
    """configs/demo.yaml's model section, read once."""
    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]


def planned(flags: list[str]) -> bool:
    """Whether a variant's recipe depends on its run's length (plan.py): a warm-up given as a share, a decaying
    rate or the EMA as a share of the run. Else its checkpoint at 10 minutes of a 40-minute run is a 10-minute run."""
    demo = demo_model()  # where a flag is not given
    value = dict(zip(flags[::2], flags[1::2], strict=True))
    warmup = float(value.get(HYPER["warmup"], demo.get("warmup_steps", 0)))
    rate = depends_on_length(warmup, value.get(HYPER["decay"], demo.get("lr_decay", "constant")))
    return rate or value.get(HYPER["sigma_rel"], str(demo.get("ema_sigma_rel"))) not in ("null", "None")


SAMPLERS = {"default": Sampling(), "ddpm50": Sampling("ddpm", 50)}  # default: auto, by the prediction target


class TimedCheckpoints(Callback):
    """Save `minutes=M.ckpt` when the training time crosses each budget and `step=N.ckpt` at each of `steps`;
    stop once all are written. Appends (file, step, seconds) lines to `dirpath/log.jsonl`."""

    def __init__(self, dirpath: str, budgets: list[float], steps: list[int], at_end: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.budgets = sorted(budgets)
        self.steps = sorted(steps)
        self.at_end = at_end  # a planned run of one budget (trainer.max_time): saved when Lightning's Timer ends it
        self.start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        """The clock starts with the first training step."""
        self.start = self.start or time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        """A planned run: its one budget, where the time ended it."""
        if self.at_end and not self.saved:
            self._save(trainer, f"minutes={self.budgets[0]:g}", time.perf_counter() - self.start)

    def _save(self, trainer, name: str, seconds: float) -> None:
        trainer.save_checkpoint(self.dirpath / f"{name}.ckpt", weights_only=False)
        with open(self.dirpath / "log.jsonl", "a") as log:
            log.write(json.dumps({"checkpoint": name, "step": trainer.global_step, "seconds": seconds}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        """Save the checkpoints that are due."""
        if self.at_end:
            return
        seconds = time.perf_counter() - self.start
        due = [f"minutes={m:g}" for m in self.budgets if 60 * m <= seconds and f"minutes={m:g}" not in self.saved]
        due += [f"step={s}" for s in self.steps if trainer.global_step >= s and f"step={s}" not in self.saved]
        for name in due:
            self._save(trainer, name, seconds)
        if len(self.saved) == len(self.budgets) + len(self.steps):
            trainer.should_stop = True

    @property
    def saved(self) -> set[str]:
        """The checkpoints written so far."""
        log = self.dirpath / "log.jsonl"
        return {json.loads(line)["checkpoint"] for line in log.read_text().splitlines()} if log.exists() else set()


def train(
    folder: Path, variant: list[str], seed: int, budgets: list[float], steps: list[int], data: list[str], threads: int,
    command: str = "fit", planned: bool = False,
) -> list[dict]:  # fmt: skip
    """One run of the demo recipe (`lit-ddpm COMMAND`: fit, or distill with --teacher among the flags) with
    `variant`'s flags on `threads` CPU threads; returns its checkpoint log. `planned`: a run of its one budget
    (trainer.max_time), so that a schedule planned over the run ends with it; else one run saved at each of
    its budgets and steps, in the demo's recipe before it planned its runs (DEMO_BEFORE) where `variant` is
    silent, so that each checkpoint is a run of that length."""
    folder.mkdir(parents=True, exist_ok=True)
    timed = {"dirpath": str(folder), "budgets": budgets, "steps": steps, "at_end": planned}
    callback = {"class_path": "benchmarks.convergence.TimedCheckpoints", "init_args": timed}
    if planned:  # its one budget, as Lightning's DD:HH:MM:SS
        settings = ["--trainer.max_time", f"00:00:{int(budgets[0]):02d}:{round(60 * (budgets[0] % 1)):02d}"]
    else:
        settings = hyper_flags(DEMO_BEFORE)
    command = [
        sys.executable, "-m", "diffusion_lit.cli", command, "--config", str(ROOT / "configs" / "demo.yaml"), *data,
        "--seed_everything", str(seed), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", json.dumps([callback]), *settings, *variant,
    ]  # fmt: skip
    if not (folder / "log.jsonl").exists():
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}  # benchmarks.convergence
        subprocess.run(command, cwd=folder, check=True, env=env)
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def real_images(
    dataset: str, workdir: Path, per_photo: int = 0
) -> tuple[list[str], tuple[tuple[torch.Tensor, torch.Tensor], ...], torch.Tensor]:  # fmt: skip
    """Flags that point `fit` at the data, ((training images, labels), (held-out images, labels)) for the
    classifier, and the images `fit` trains on (the first `per_photo` of each photo's, if set), all [-1, 1]."""
    if dataset == "digits":
        train, held_out = demo_digits()
        return [], (train, held_out), train[0]
    train_folder, held_out_folder = write_photo_patches(workdir / "photo_patches")
    train = load_folder(train_folder)
    fit_folder, fit_images = train_folder, train[0]
    if per_photo:
        fit_folder = first_of_each(train_folder, workdir / f"photo_patches_{per_photo}", per_photo)
        fit_images = load_folder(fit_folder)[0]
    flags = ["--data.class_path", "diffusion_lit.data.ImageFolderDataModule", "--data.init_args.root",
             str(fit_folder), "--data.init_args.channels", "3", "--data.init_args.num_workers", "0"]  # fmt: skip
    return flags, (train, load_folder(held_out_folder)), fit_images


def first_of_each(folder: Path, subset: Path, count: int) -> Path:
    """A copy of the first `count` images (by name) of each class sub-folder of `folder`, in `subset`."""
    for source in sorted(path for path in folder.iterdir() if path.is_dir()):
        (subset / source.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(source.iterdir())[:count]:
            shutil.copyfile(image, subset / source.name / image.name)
    return subset


def nearest(images: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's Euclidean distance to its nearest training image, and that image's index (images [-1, 1])."""
    return torch.cdist(images.flatten(1).float(), train.flatten(1).float()).min(1)


def quality_measure(dataset: str, workdir: Path, num_samples: int, per_photo: int = 0):
    """(flags for `fit`, a BothFID of uint8 samples against the held-out images (Inception and classifier FID,
    each with its floor: the training images' own), real_images' ((training images, labels), (held-out images,
    labels)), and the images `fit` trains on)."""
    flags, (train, held_out), fit_images = real_images(dataset, workdir, per_photo)
    quality = ClassifierFID(train, held_out, num_samples)
    print(f"{dataset}: classifier accuracy on held-out images {quality.accuracy:.3f}; floor {quality.floor:.2f}")
    return flags, BothFID(quality, train[0], held_out[0]), (train, held_out), fit_images


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
