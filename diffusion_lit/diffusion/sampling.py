"""`Sampling`: every setting of a draw from a model, defined once and used by the module, `lit-ddpm sample`
(its flags are generated from it), `lit-ddpm test` / FID while fitting (`evaluation.sampling`) and the
sample grids."""

from dataclasses import dataclass, replace
from typing import Literal, get_args

from diffusion_lit.errors import UserError

SamplerName = Literal["ddpm", "ddim", "dpmpp", "dpmpp_sde", "unipc", "consistency"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
Variance = Literal["small", "large"]
Spacing = Literal["uniform", "trailing", "quadratic"]
Threshold = Literal["clip", "dynamic", "none"]
# The default for each prediction target: the cheapest sampler and step count within 10% of the best at 50 NFE or
# fewer in every measured cell (docs/sampling.md "Which sampler"). v: Inception FID above its floor, the digits and
# the RGB patches at two maturities, two seeds each; eps: the same, at 10 and 40 minutes (about 4x the steps)
# (tests/test_benchmarks.py pins both to their tables). x0 was not measured: the stochastic solver, the safe choice.
AUTO = {"eps": ("ddpm", 50), "v": ("ddpm", 50), "x0": ("dpmpp_sde", 50)}
AUTO_CONSISTENCY = ("consistency", 2)  # a `lit-ddpm distill` student of 1 segment (K segments: K steps), any target
# The consistency sampler's share of fresh noise when it re-noises a clean image: within 13% of the best of 0 ... 1 for
# one-segment students of two teachers on the digits and one on the photo patches at 2 and 4 steps, where 1 (Song et
# al.'s algorithm 1) was up to 1.5x worse (docs/distillation.md "Re-noising between steps").
CONSISTENCY_GAMMA = 0.9
STEPS = 50  # a named sampler without a step count


@dataclass(frozen=True)
class Sampling:
    """How images are drawn from a model: the one place these settings are defined.

    Args:
        sampler: "auto" (the measured best for the model: DPM-Solver++(2M) SDE, 50 steps, for noise (eps)
            prediction; ancestral DDPM, 50 steps, for v prediction; the consistency sampler, as many steps as it has
            segments (4; 2 for one), for a model distilled by `lit-ddpm distill`), "ddpm" (ancestral), "ddim",
            "dpmpp" (DPM-Solver++(2M)), "dpmpp_sde" (DPM-Solver++(2M) SDE), "unipc" (UniPC-2, B(h) = e^h - 1) or
            "consistency" (multistep consistency sampling, Song et al. 2023; Heek et al. 2024).
        steps: network evaluations (NFE); None: the auto sampler's, or 50 for a named one (the student's for
            consistency); never more than the model's T (the original DDPM: sampler ddpm, steps 1000).
        eta: DDIM's eta (0: deterministic; 1: ancestral DDPM); other samplers take none.
        gamma: the consistency sampler's share of fresh noise when it re-noises its clean image to the next
            timestep (the gamma of Kim et al. 2023: 1 is Song et al.'s algorithm 1, fresh noise; 0 goes on with
            the noise the step implies, as DDIM does); None: 0.9 (measured, `CONSISTENCY_GAMMA`).
        spacing: which timesteps the steps visit: "trailing" (starts at t = T - 1), "uniform" or "quadratic".
        variance: DDPM's reverse variance, "small" (the posterior's beta~) or "large" (beta).
        threshold: what happens to each predicted x0: "clip" to [-1, 1], "dynamic" (percentile) thresholding
            (Saharia et al. 2022), or "none".
        guidance: classifier-free guidance scale for class-conditional models (0: unconditional, 1: conditional).
    """

    sampler: SamplerName | Literal["auto"] = "auto"
    steps: int | None = None
    eta: float = 0.0
    gamma: float | None = None
    spacing: Spacing = "trailing"
    variance: Variance = "small"
    threshold: Threshold = "clip"
    guidance: float = 1.0

    def resolve(self, prediction: str, timesteps: int, consistency_model: int = 0) -> "Sampling":
        """These settings with "auto" and a missing step count made concrete for a model's prediction target
        and T, or for a consistency model of `consistency_model` segments (a K-segment student's steps: K, at
        least 2), and the consistency sampler's gamma; an explicit step count is kept: `check` refuses one above
        T."""
        consistency_steps = max(AUTO_CONSISTENCY[1], consistency_model)
        if self.sampler == "auto":
            sampler, steps = ("consistency", consistency_steps) if consistency_model else AUTO[prediction]
        else:
            sampler, steps = self.sampler, consistency_steps if self.sampler == "consistency" else STEPS
        if self.gamma is not None and sampler != "consistency":
            raise UserError(f"gamma is the consistency sampler's setting; this model draws with {sampler}: drop gamma")
        gamma = CONSISTENCY_GAMMA if sampler == "consistency" and self.gamma is None else self.gamma
        return replace(self, sampler=sampler, steps=self.steps or min(steps, timesteps), gamma=gamma)

    @property
    def name(self) -> str:
        """A short name for files and tables, e.g. dpmpp_sde50 (and -dynamic / -eta0.5 where not default)."""
        name = f"{self.sampler}{self.steps or ''}"
        if self.eta:
            name += f"-eta{self.eta:g}"
        if self.gamma is not None and self.gamma != CONSISTENCY_GAMMA:
            name += f"-gamma{self.gamma:g}"
        if self.threshold != "clip":
            name += f"-{self.threshold}"
        return name

    def check(self, timesteps: int, prefix: str = "", conditional: bool = True) -> None:
        """One clear line for settings that cannot run on a model with `timesteps` training steps (and, unless
        `conditional`, no class labels); `prefix` is how the user spells the settings (e.g. "--" or
        "evaluation.sampling.")."""
        if self.sampler not in ("auto", *SAMPLERS):
            raise UserError(f"unknown {prefix}sampler {self.sampler!r}; choose auto or one of {', '.join(SAMPLERS)}")
        if self.steps is not None and not 1 <= self.steps <= timesteps:
            raise UserError(f"{prefix}steps must be between 1 and the model's {timesteps} timesteps, got {self.steps}")
        if self.eta and self.sampler != "ddim":
            raise UserError(f"{prefix}eta is a DDIM setting; the {self.sampler} sampler does not take it")
        if self.gamma is not None and not (self.sampler in ("auto", "consistency") and 0 <= self.gamma <= 1):
            raise UserError(f"{prefix}gamma is the consistency sampler's share of fresh noise, between 0 and 1; "
                            f"got {self.gamma} for the {self.sampler} sampler")  # fmt: skip
        if self.variance not in ("small", "large"):
            raise UserError(f"unknown {prefix}variance {self.variance!r}; choose small or large")
        if self.threshold not in ("clip", "dynamic", "none"):
            raise UserError(f"unknown {prefix}threshold {self.threshold!r}; choose clip, dynamic or none")
        if self.guidance < 0:
            raise UserError(f"{prefix}guidance must be 0 or more (0: unconditional, 1: conditional), got "
                            f"{self.guidance}")  # fmt: skip
        if self.guidance != 1.0 and not conditional:
            raise UserError(
                f"{prefix}guidance needs a class-conditional model; this one is unconditional (leave it at 1)"
            )
