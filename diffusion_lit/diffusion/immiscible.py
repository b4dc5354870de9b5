"""Immiscible diffusion (Li et al. 2024): pair each image of a batch with a nearby noise sample."""

import torch
from torch import Tensor


def assign_noise(x0: Tensor, noise: Tensor) -> Tensor:
    """The batch's noise (B, ...) permuted so that the total distance between each image and its noise is minimal.

    Li et al. 2024, algorithm 1: a linear assignment (scipy's Hungarian solver) on the (B, B) matrix of L2
    distances. Every noise sample is still used exactly once, so the batch's noise keeps its N(0, I)
    values; only which image gets which changes. The assignment runs on the host: one device-to-host copy
    of the B x B distances per step.
    """
    from scipy.optimize import linear_sum_assignment  # a training-time option: import only when used

    distances = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float())
    _, columns = linear_sum_assignment(distances.cpu().numpy())
    return noise[torch.as_tensor(columns, device=noise.device)]
