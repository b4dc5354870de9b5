"""One path from a model to images, for `sample`, `test`, FID while fitting and the sample grids.

A seeded run of N images is cut into batches of `batch_size`; batch b draws all its noise from a generator
seeded seed * 1,000,000 + b, and the batches are shared out to processes in contiguous blocks, so the
images depend on the seed, N and the batch size, never on the number of processes. A class-conditional
model gets the classes in turn (image i has class i mod num_classes) unless labels are given.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image

from diffusion_lit.diffusion.sampling import Sampling
from diffusion_lit.errors import UserError
from diffusion_lit.files import written_whole
from diffusion_lit.pixels import to_uint8
from diffusion_lit.signals import StopSignals

BATCH_SIZE = 250  # the default of `sample` and `test`: with the same seed and N, both draw the same images


class ImageModel(Protocol):
    """What generation needs of a model: DiffusionModule satisfies it."""

    device: torch.device
    num_classes: int | None

    def sample(
        self, num_samples: int, settings: Sampling | None = None, generator: torch.Generator | None = None,
        labels: Tensor | None = None,
    ) -> Tensor: ...  # fmt: skip


MAX_SEED = (2**63 - 1) // 1_000_000 - 1  # batch b of seed s draws from seed s * 1,000,000 + b, a 64-bit integer


def batch_generator(seed: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise generator of batch `batch` of a seeded run."""
    return torch.Generator(device).manual_seed(seed * 1_000_000 + batch)


def check_seed(seed: int, name: str = "seed") -> None:
    """One line for a seed that no batch's generator can take."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{name} must be between 0 and {MAX_SEED:,}, got {seed}")


def shard(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """(batch index, size) of the batches one process generates: a contiguous share of the run's batches,
    so that the set of images does not depend on the number of processes and rank order is global order."""
    num_batches = math.ceil(num_samples / batch_size)
    first, last = rank * num_batches // world_size, (rank + 1) * num_batches // world_size
    return [(b, min(batch_size, num_samples - b * batch_size)) for b in range(first, last)]


def share_sizes(num_samples: int, batch_size: int, world_size: int) -> list[int]:
    """How many of `num_samples` items (in batches of `batch_size`) each process generates (`shard`), by rank."""
    return [sum(size for _, size in shard(num_samples, batch_size, rank, world_size)) for rank in range(world_size)]


def run_precision(trainer, setting: str = "run") -> AbstractContextManager:
    """What the network samples under: the run's precision as Lightning applies it in training steps (its
    precision plugin's forward context: an autocast for the mixed precisions), or nothing for "32-true".
    Lightning autocasts only inside `*_step`; sampling runs in epoch-end hooks, so it needs this."""
    return nullcontext() if setting == "32-true" else trainer.precision_plugin.forward_context()


def cycled_labels(num_classes: int | None, first: int, count: int) -> Tensor | None:
    """Labels first, first + 1, ... mod num_classes for a class-conditional model; None otherwise."""
    return None if not num_classes else torch.arange(first, first + count) % num_classes


class Stopped(Exception):  # noqa: N818  (a stop, not an error)
    """Sampling ended early: a signal asked the run to stop (`stop_on_request`)."""


@contextmanager
def stop_on_request(network: torch.nn.Module) -> Iterator[None]:
    """Within the block, the network raises `Stopped` before its next evaluation once a signal has asked the run to
    stop (`signals.StopSignals`): a long sample grid or FID while fitting ends within one network evaluation, and the
    run saves at its next step."""

    def check(*_) -> None:
        if StopSignals.requested:
            raise Stopped

    hook = network.register_forward_pre_hook(check)
    try:
        yield
    finally:
        hook.remove()


def generate(
    model: ImageModel,
    num_samples: int,
    settings: Sampling | None = None,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    labels: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    precision: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """This process's share of a seeded run, batch by batch: uint8 images (B, C, H, W) and their labels (B,).
    The network runs inside `precision()` (an autocast, say), and only the network: what the caller does with
    each batch (Inception features, say) stays outside it."""
    check_seed(seed)
    for batch, size in shard(num_samples, batch_size, rank, world_size):
        first = batch * batch_size
        batch_labels = cycled_labels(model.num_classes, first, size) if labels is None else labels[first : first + size]
        generator = batch_generator(seed, batch, model.device)
        with precision():
            images = model.sample(
                size, settings, generator, None if batch_labels is None else batch_labels.to(model.device)
            )
        yield to_uint8(images), batch_labels


def generate_all(model: ImageModel, num_samples: int, **options) -> tuple[Tensor, Tensor | None]:
    """Every image of a run on this process, (N, C, H, W) uint8, and the labels (N,) or None."""
    batches = list(generate(model, num_samples, **options))
    images = torch.cat([images for images, _ in batches])
    labels = None if batches[0][1] is None else torch.cat([labels for _, labels in batches])
    return images, labels


def save_grid(images: Tensor, path: Path, per_row: int | None = None) -> Tensor:
    """uint8 images (N, C, H, W) as one PNG grid, `per_row` to a row (default: a square), 2 px white padding;
    returns the grid (C, H', W') in [0, 1]."""
    grid = make_grid(images.float() / 255, nrow=per_row or math.ceil(math.sqrt(len(images))), padding=2, pad_value=1)
    with written_whole(path) as partial:
        save_image(grid, partial)
    return grid


def write_samples(images: Tensor, labels: Tensor | None, npz: Path | None = None, png_dir: Path | None = None) -> None:
    """uint8 images (N, C, H, W) as an .npz (arr_0: (N, H, W, C), the layout of OpenAI's evaluator, with the
    images' own channels; `labels` beside it) and/or PNGs png_dir/000000.png, ...; each file whole or absent."""
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if npz is not None:
        with written_whole(npz) as partial:
            np.savez(partial, arr_0=array, **({} if labels is None else {"labels": labels.cpu().numpy()}))
    if png_dir is not None:
        for index, image in enumerate(array):
            with written_whole(png_dir / f"{index:06d}.png") as partial:
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(partial)
