"""`lit-ddpm sample`: images from a checkpoint's EMA weights, without the dataset or the training config."""

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from rich.progress import Progress
from torch import Tensor
from torchvision.utils import make_grid, save_image

from diffusion_lit.checkpoints import check_checkpoint
from diffusion_lit.diffusion.samplers import SAMPLERS, batch_generator
from diffusion_lit.errors import UserError
from diffusion_lit.metrics import to_uint8
from diffusion_lit.module import DiffusionModule


def load_checkpoint(ckpt_path: str, device: str = "cpu") -> DiffusionModule:
    """A DiffusionModule with the checkpoint's EMA weights, loaded safely (weights_only=True)."""
    check_checkpoint(ckpt_path)
    try:
        module = DiffusionModule.load_from_checkpoint(ckpt_path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001  (truncated, foreign or not a checkpoint: the same advice)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"{ckpt_path!r} is not a readable lit-ddpm checkpoint ({reason})") from None
    return module.eval()


def class_labels(module: DiffusionModule, label: str | None, num_samples: int) -> tuple[Tensor | None, int]:
    """Labels for `--class` (None, one class, or "all": one row per class) and the images per grid row."""
    per_row = math.ceil(math.sqrt(num_samples))
    if label is None:
        return None, per_row
    if module.num_classes is None:
        raise UserError("--class needs a class-conditional checkpoint; this model is unconditional")
    if label == "all":
        per_row = math.ceil(num_samples / module.num_classes)
        return torch.arange(module.num_classes).repeat_interleave(per_row)[:num_samples], per_row
    if not label.isdigit() or int(label) >= module.num_classes:
        raise UserError(f"--class must be 'all' or a class index from 0 to {module.num_classes - 1}, got {label!r}")
    return torch.full((num_samples,), int(label)), per_row


def generate(
    module: DiffusionModule,
    num_samples: int,
    sampler: str,
    steps: int,
    eta: float,
    guidance: float,
    labels: Tensor | None,
    seed: int,
    batch_size: int,
) -> Tensor:
    """Images (N, C, H, W) in [0, 1]; batch b draws from seed * 1,000,000 + b, as `lit-ddpm test` does."""
    images = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{sampler}, {steps} steps", total=math.ceil(num_samples / batch_size) * steps)
        hook = module.unet.register_forward_pre_hook(lambda *_: progress.advance(task))  # one call per step
        try:
            for batch, first in enumerate(range(0, num_samples, batch_size)):
                size = min(batch_size, num_samples - first)
                generator = batch_generator(seed, batch, module.device)
                batch_labels = None if labels is None else labels[first : first + size].to(module.device)
                options = {"generator": generator, "labels": batch_labels, "guidance": guidance}
                images.append(module.sample(size, sampler, steps, eta, **options))
        finally:
            hook.remove()
    return torch.cat(images)


def write(images: Tensor, labels: Tensor | None, output: Path, per_row: int, grid: bool, png: bool, npz: bool) -> None:
    """grid.png, images/NNNNNN.png and samples.npz (uint8 (N, H, W, C) under arr_0, labels under labels)."""
    output.mkdir(parents=True, exist_ok=True)
    if grid:
        save_image(make_grid(images, nrow=per_row, padding=2, pad_value=1.0), output / "grid.png")
    uint8 = to_uint8(images)[:, : images.shape[1]].permute(0, 2, 3, 1).cpu().numpy()  # native channels
    if png:
        (output / "images").mkdir(exist_ok=True)
        for index, image in enumerate(uint8):
            image = image.squeeze(-1) if image.shape[-1] == 1 else image  # PIL wants (H, W) for gray
            Image.fromarray(image).save(output / f"images/{index:06d}.png")
    if npz:
        extra = {} if labels is None else {"labels": labels.numpy()}
        np.savez(output / "samples.npz", arr_0=uint8, **extra)


def parser() -> ArgumentParser:
    """The `lit-ddpm sample` options."""
    p = ArgumentParser(prog="lit-ddpm sample", description="Sample images from a lit-ddpm checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="the checkpoint (its EMA weights are used)")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--sampler", default="dpmpp", choices=list(SAMPLERS))
    p.add_argument("--steps", type=int, default=20, help="sampler steps (1000 with ddpm: the original DDPM)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (0: unconditional)")
    p.add_argument("--class", dest="label", default=None, help="a class index, or 'all' for one row per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--output", default=None, help="folder; default samples/<checkpoint stem>-<sampler><steps>")
    p.add_argument("--grid", type=bool, default=True, help="write grid.png")
    p.add_argument("--png", type=bool, default=False, help="write images/000000.png, ...")
    p.add_argument("--npz", type=bool, default=True, help="write samples.npz")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast for the network")
    p.add_argument("--compile", type=bool, default=False, help="torch.compile the network's forward (GPUs)")
    return p


def main(args: list[str]) -> None:
    """Parse `lit-ddpm sample` arguments, sample, write the files and say where they are."""
    options = parser().parse_args(args)
    if options.num_samples < 1 or options.batch_size < 1:
        raise UserError("--num_samples and --batch_size must be at least 1")
    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = load_checkpoint(options.ckpt_path, device)
    if not 1 <= options.steps <= module.schedule.timesteps:
        raise UserError(f"--steps must be between 1 and the model's {module.schedule.timesteps} timesteps")
    labels, per_row = class_labels(module, options.label, options.num_samples)
    if options.compile:  # the forward only: the progress hook around it stays eager
        module.unet.forward = torch.compile(module.unet.forward)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision)
    with torch.autocast(module.device.type, dtype) if dtype else nullcontext():
        images = generate(
            module, len(labels) if labels is not None else options.num_samples, options.sampler, options.steps,
            options.eta, options.guidance, labels, options.seed, options.batch_size,
        )  # fmt: skip
    images = images.float()
    stem = Path(options.ckpt_path).stem
    output = Path(options.output or f"samples/{stem}-{options.sampler}{options.steps}")
    try:
        write(images, labels, output, per_row, options.grid, options.png, options.npz)
    except OSError as error:
        reason = error.strerror or error
        raise UserError(f"could not write the samples to {output}/ ({reason}); free space or set --output") from None
    print(f"lit-ddpm: {len(images)} samples written to {output}/")
