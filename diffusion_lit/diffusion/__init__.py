"""Diffusion mathematics in pure torch: schedules, samplers, losses."""

from diffusion_lit.diffusion.samplers import sample, timestep_spacing
from diffusion_lit.diffusion.sampling import SAMPLERS, Sampling
from diffusion_lit.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas

__all__ = ["SAMPLERS", "NoiseSchedule", "Sampling", "cosine_betas", "linear_betas", "sample", "timestep_spacing"]
