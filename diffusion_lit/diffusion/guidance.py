"""Classifier-free guidance (Ho & Salimans 2022) around a class-conditional network."""

from collections.abc import Callable

import torch
from torch import Tensor

ConditionalNetwork = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x_t, t, labels or None) -> output


def guided(network: ConditionalNetwork, labels: Tensor | None, scale: float, no_class: int) -> Callable:
    """The (x_t, t) -> output denoiser the samplers take: uncond + scale * (cond - uncond).

    Ho & Salimans 2022, eq. 6 with w = scale - 1: 0 is the unconditional model, 1 the conditional one, larger
    values trade diversity for fidelity. Both halves come from one batched forward; label `no_class` is the
    "no class" the network was trained with (label dropout). Without labels the network runs unconditionally.
    """
    if labels is None or scale == 0:
        return lambda x, t: network(x, t, None)
    if scale == 1:
        return lambda x, t: network(x, t, labels)
    unconditional = torch.full_like(labels, no_class)

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        both = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, unconditional]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return denoiser


def drop_labels(labels: Tensor, share: float, no_class: int) -> Tensor:
    """Labels with a random `share` of them replaced by `no_class` (Ho & Salimans 2022, algorithm 1), so that
    one network also learns the unconditional model that guidance needs."""
    if not share:
        return labels
    dropped = torch.rand(labels.shape, device=labels.device) < share
    return torch.where(dropped, torch.full_like(labels, no_class), labels)
