"""Diffusion mathematics in pure torch: schedules, samplers, losses."""

from diffusion_lit.diffusion.samplers import reverse_process
from diffusion_lit.diffusion.sampling import SAMPLERS, Sampling
from diffusion_lit.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas
from diffusion_lit.diffusion.steps import timestep_spacing

__all__ = [
    "SAMPLERS",
    "NoiseSchedule",
    "Sampling",
    "cosine_betas",
    "linear_betas",
    "reverse_process",
    "timestep_spacing",
]
