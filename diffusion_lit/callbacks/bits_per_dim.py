"""Bits per dimension of held-out images for `lit-ddpm test`: the likelihood bound of `diffusion.likelihood`
computed over processes, written beside the checkpoint as JSON and shown as a table. SampleQuality calls it."""

import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from diffusion_lit.diffusion import likelihood
from diffusion_lit.diffusion.sampling import Sampling
from diffusion_lit.distributed import gather_rows
from diffusion_lit.errors import UserError
from diffusion_lit.generation import shard, share_sizes

PILOT_IMAGES = 4  # summed in full to measure the importance proposal, on every process


def held_out_bits_per_dim(
    trainer: "pl.Trainer", pl_module: "pl.LightningModule", images: int, timesteps: int | None, settings: Sampling,
    seed: int, batch_size: int,
) -> dict:  # fmt: skip
    """The bits/dim of the first `images` held-out images: each process bounds its share (the pilot images, which
    set the importance proposal, on every process), the per-image results are gathered in the global order, and
    rank 0 writes the JSON. `timesteps` None: all T terms; K: an unbiased K-timestep estimate. Always in float32,
    whatever the run's precision: a bound compared at the 0.01 level needs more than bf16's 3 digits."""
    start = time.perf_counter()
    dataset = trainer.datamodule.reference_set("test")
    count = min(images, len(dataset))
    if count == 0:
        raise UserError("bits/dim need held-out images, and the datamodule's test split has none")
    if count < images:
        rank_zero_info(f"bits/dim: the held-out split has {count} images, fewer than nll_images: using them all")
    network, schedule, device = (lambda x, t: pl_module.unet(x, t, None)), pl_module.schedule, pl_module.device
    options = {"variance": settings.variance, "threshold": settings.threshold, "batch_size": batch_size}
    estimated = timesteps is not None and timesteps < schedule.timesteps - 1  # else summing all costs no more
    what = f"{timesteps} importance-sampled timesteps" if estimated else f"all {schedule.timesteps} terms"
    rank_zero_info(f"bits/dim: {count} held-out images, {what}, on {trainer.world_size} process(es)")

    def batch(first: int, size: int) -> Tensor:
        return likelihood.quantized(torch.stack([dataset[i][0] for i in range(first, first + size)]).to(device))

    def seeds(first: int, size: int) -> list[int]:
        return [seed * 1_000_000 + i for i in range(first, first + size)]

    pilot, proposal, parts = (min(PILOT_IMAGES, count) if estimated else 0), None, []
    with torch.inference_mode():
        if pilot:
            proposal, bound = likelihood.proposal_from(network, schedule, batch(0, pilot), seeds(0, pilot), **options)
            parts.append(torch.stack([bound.prior, bound.diffusion, bound.decoder], 1))
        per_image = (timesteps + 1) if estimated else schedule.timesteps
        group, rest = max(1, batch_size // per_image), count - pilot  # images bounded together
        local = []
        for index, size in shard(rest, group, trainer.global_rank, trainer.world_size):
            first = pilot + index * group
            bound = likelihood.image_bounds(network, schedule, batch(first, size), seeds(first, size), proposal,
                                            timesteps, **options)  # fmt: skip
            local.append(torch.stack([bound.prior, bound.diffusion, bound.decoder], 1))
        mine = torch.cat(local) if local else torch.empty(0, 3, dtype=torch.float64)
        parts.append(gather_rows(mine, share_sizes(rest, group, trainer.world_size), everywhere=True))
    bits = likelihood.bits_per_dim(torch.cat([part.cpu() for part in parts]), math.prod(pl_module.image_shape))
    total = bits.sum(1)
    return {
        "bits_per_dim": total.mean().item(),
        "standard_error": (total.std() / math.sqrt(count)).item() if count > 1 else None,
        "terms": {name: bits[:, i].mean().item() for i, name in enumerate(likelihood.TERMS)},
        "checkpoint": str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else None,
        "images": count,
        "split": "test",
        "timesteps": "all" if not estimated else timesteps,
        "pilot_images": pilot,
        "variance": settings.variance,
        "threshold": settings.threshold,
        "seed": seed,
        "processes": trainer.world_size,
        "seconds": time.perf_counter() - start,
    }
