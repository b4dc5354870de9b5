"""Diffusion mathematics in pure torch: schedules, samplers, losses."""

from diffusion_lit.diffusion.samplers import p_sample, p_sample_loop
from diffusion_lit.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas

__all__ = ["NoiseSchedule", "cosine_betas", "linear_betas", "p_sample", "p_sample_loop"]
