"""`lit-ddpm sample`: images from a checkpoint's EMA weights, without the dataset or the training config."""

import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from rich.progress import Progress
from torch import Tensor

from diffusion_lit.diffusion.sampling import Sampling
from diffusion_lit.errors import OneLineErrors, UserError
from diffusion_lit.files import mount_point
from diffusion_lit.generation import BATCH_SIZE, check_seed, generate_all, save_grid, write_samples
from diffusion_lit.loading import load_checkpoint
from diffusion_lit.module import DiffusionModule


class OneLineParser(OneLineErrors, ArgumentParser):
    """jsonargparse, with one-line errors."""


def class_labels(module: DiffusionModule, label: str | None, num_samples: int) -> tuple[Tensor | None, int | None]:
    """Labels for `--class` and the images per grid row (None: a square grid).

    No --class: a conditional model gets the classes in turn, as `lit-ddpm test` does; "all": one row per
    class; N: every image of class N.
    """
    if label is None:
        return None, None
    if module.num_classes is None:
        raise UserError("--class needs a class-conditional checkpoint; this model is unconditional")
    if label == "all":
        per_row = math.ceil(num_samples / module.num_classes)
        return torch.arange(module.num_classes).repeat_interleave(per_row)[:num_samples], per_row
    if not label.isdigit() or int(label) >= module.num_classes:
        raise UserError(f"--class must be 'all' or a class index from 0 to {module.num_classes - 1}, got {label!r}")
    return torch.full((num_samples,), int(label)), None


def parser() -> ArgumentParser:
    """The `lit-ddpm sample` options: the sampler's are those of `Sampling`, the one definition of them."""
    p = OneLineParser(prog="lit-ddpm sample", description="Sample images from a lit-ddpm checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="the checkpoint (its EMA weights are used)")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_class_arguments(Sampling, None)
    p.add_argument("--class", dest="label", default=None, help="a class index, or 'all' for one row per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="images at once (the same as `test`'s)")
    p.add_argument("--output", default=None, help="folder; default samples/<checkpoint stem>-<sampling name>")
    p.add_argument("--grid", type=bool, default=True, help="write grid.png")
    p.add_argument("--png", type=bool, default=False, help="write images/000000.png, ...")
    p.add_argument("--npz", type=bool, default=True, help="write samples.npz")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast for the network")
    p.add_argument("--compile", type=bool, default=False, help="torch.compile the network's forward (GPUs)")
    p.add_argument("--allow_class", default=None, help="a network class of your own that the checkpoint may name")
    return p


def check_room(size: int, output: Path | None) -> None:
    """One line, before sampling, when the images (`size` bytes as uint8) will not fit in the free memory, or in
    the free space of `output`'s filesystem (None: nothing written but the grid)."""
    gigabytes = size / 1e9
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if free is not None and size > free:
        raise UserError(f"the samples take {gigabytes:.1f} GB of memory, and {free / 1e9:.1f} GB is free; sample "
                        "fewer (--num_samples), in several runs with different --seed values")  # fmt: skip
    if output is not None:
        disk = shutil.disk_usage(mount_point(output)).free
        if size > disk:
            raise UserError(f"the samples take {gigabytes:.1f} GB, and {mount_point(output)} has {disk / 1e9:.1f} "
                            f"GB free; free space, sample fewer (--num_samples) or set --output")  # fmt: skip


def main(args: list[str]) -> None:
    """Parse `lit-ddpm sample` arguments, sample, write the files and say where they are."""
    options = parser().parse_args(args)
    if options.num_samples < 1 or options.batch_size < 1:
        raise UserError("--num_samples and --batch_size must be at least 1")
    check_seed(options.seed, "--seed")
    settings = Sampling(**{name: options[name] for name in Sampling.__dataclass_fields__})
    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu or auto")
    if options.output and Path(options.output).exists() and not Path(options.output).is_dir():
        raise UserError(f"--output {options.output} is a file; name a folder for the samples")
    module = load_checkpoint(options.ckpt_path, device, [options.allow_class] if options.allow_class else [])
    settings.check(module.schedule.timesteps, prefix="--", conditional=module.num_classes is not None)
    settings = settings.resolve(module.hparams.prediction, module.schedule.timesteps, module.consistency_model)
    labels, per_row = class_labels(module, options.label, options.num_samples)
    num_samples = options.num_samples if labels is None else len(labels)
    output = Path(options.output or f"samples/{Path(options.ckpt_path).stem}-{settings.name}")
    check_room(num_samples * math.prod(module.image_shape), output if options.npz or options.png else None)
    if options.compile:  # the forward only: the progress hook around it stays eager
        module.unet.forward = torch.compile(module.unet.forward)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision)
    device_type = module.device.type
    with Progress(transient=True) as progress:
        task = progress.add_task(settings.name, total=math.ceil(num_samples / options.batch_size) * settings.steps)
        hook = module.unet.register_forward_pre_hook(lambda *_: progress.advance(task))  # one call per step
        try:
            run = {"settings": settings, "seed": options.seed, "batch_size": options.batch_size, "labels": labels,
                   "precision": lambda: torch.autocast(device_type, dtype) if dtype else nullcontext()}  # fmt: skip
            images, labels = generate_all(module, num_samples, **run)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not isinstance(error, torch.OutOfMemoryError) and "allocate" not in str(error):
                raise
            raise UserError(f"out of memory sampling batches of {options.batch_size}; lower --batch_size") from None
        finally:
            hook.remove()
    try:
        if options.grid:
            save_grid(images, output / "grid.png", per_row)
        write_samples(images, labels, output / "samples.npz" if options.npz else None,
                      output / "images" if options.png else None)  # fmt: skip
    except OSError as error:
        reason = error.strerror or error
        raise UserError(f"could not write the samples to {output}/ ({reason}); free space or set --output") from None
    print(f"lit-ddpm: {len(images)} samples written to {output}/")
