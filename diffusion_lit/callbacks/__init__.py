"""The training callbacks. They reach the model only through DiffusionModule.sample() (and its weights, for
the EMA and the checkpoints); configs name them as diffusion_lit.callbacks.NAME."""

from diffusion_lit.callbacks.ema import EMA
from diffusion_lit.callbacks.grids import SampleGrid
from diffusion_lit.callbacks.guard import NonFiniteGuard
from diffusion_lit.callbacks.last_checkpoint import LastCheckpoint
from diffusion_lit.callbacks.posthoc_ema import PostHocEMA
from diffusion_lit.callbacks.progress import ProgressBar
from diffusion_lit.callbacks.quality import SampleQuality
from diffusion_lit.callbacks.teacher import InitFromTeacher

__all__ = [
    "EMA",
    "InitFromTeacher",
    "LastCheckpoint",
    "NonFiniteGuard",
    "PostHocEMA",
    "ProgressBar",
    "SampleGrid",
    "SampleQuality",
]
