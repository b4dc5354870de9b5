"""The recipes the benchmarks train: configs/demo.yaml plus each variant's flags (VARIANTS), from the demo's
settings as they were before the configs planned their runs (DEMO_BEFORE), and which recipes plan their run
over its length (`planned`)."""

import functools

import yaml

from benchmarks.common import ROOT
from diffusion_lit.plan import depends_on_length

TODAY_STEPS = 2520  # configs/demo.yaml: 18 epochs of 140 steps
TODAY = "eps (today)"  # the demo recipe as it was: noise prediction, plain MSE, random noise pairing


def _variant(
    prediction: str, snr_gamma="null", immiscible="false", lognormal="null", edm="false", **hyper: str
) -> list[str]:  # fmt: skip
    """The flags of one variant: its loss settings in full, and `hyper` (HYPER's names) where it departs from
    the demo's recipe as it was before the configs planned their runs (DEMO_BEFORE, on configs/demo.yaml)."""
    hyper = {**DEMO_BEFORE, **hyper}
    loss = "--model.loss.init_args"
    flags = ["--model.prediction", prediction, f"{loss}.snr_gamma", snr_gamma, f"{loss}.immiscible", immiscible,
             f"{loss}.lognormal_timesteps", lognormal, f"{loss}.edm_weighting", edm]  # fmt: skip
    return flags + hyper_flags(hyper)


def hyper_flags(hyper: dict[str, str]) -> list[str]:
    """The command-line flags of training hyper-parameters named as in HYPER."""
    return [flag for name, value in hyper.items() for flag in (HYPER[name], value)]


# configs/demo.yaml's length-like settings until it shipped the planned recipe: every variant starts from them
DEMO_BEFORE = {"warmup": "100", "ema": "0.995", "sigma_rel": "null"}
HYPER = {  # the training hyper-parameters a variant may change, and their flags
    "lr": "--model.optimizer.init_args.lr",
    "warmup": "--model.warmup_steps",
    "batch": "--data.init_args.batch_size",
    "ema": "--model.ema_decay",
    "augment": "--model.augment",
    "augment_dim": "--model.unet.init_args.augment_dim",
    "dropout": "--model.unet.init_args.dropout",
    "clip": "--trainer.gradient_clip_val",
    "decay": "--model.lr_decay",
    "decay_from": "--model.decay_from",
    "sigma_rel": "--model.ema_sigma_rel",
}
# A recipe relative to the run's length (plan.py): 5% warm-up, constant, linear cool-down over the last 20%;
# the EMA as a share of the run so far (EDM2's sigma_rel); Adam 1e-3, the demo's batch and dropout.
PLANNED = {"lr": "1e-3", "warmup": "0.05", "decay": "wsd", "decay_from": "0.8", "sigma_rel": "0.1"}
# configs/folder.yaml's (and cifar10.yaml's) training hyper-parameters before this sweep, on the demo's UNet
FOLDER_BEFORE = {"lr": "2e-4", "warmup": "5000", "batch": "64", "ema": "0.9999", "dropout": "0.1", "clip": "1.0"}


EDM_LEVELS = "[-1.2,1.2]"  # ln sigma ~ N(-1.2, 1.2^2), Karras et al. 2022
VARIANTS = {  # each says its prediction target, so that the table does not depend on configs/demo.yaml's
    TODAY: _variant("eps"),
    "eps + min-SNR-5": _variant("eps", snr_gamma="5"),
    "eps + immiscible": _variant("eps", immiscible="true"),
    "v": _variant("v"),
    "v + min-SNR-5": _variant("v", snr_gamma="5"),
    "v + EDM noise levels": _variant("v", lognormal=EDM_LEVELS),
    "v + EDM levels and weighting": _variant("v", lognormal=EDM_LEVELS, edm="true"),
    "eps + EDM levels and weighting": _variant("eps", lognormal=EDM_LEVELS, edm="true"),
    "folder.yaml before (eps + min-SNR-5, its hyper-parameters)": _variant("eps", snr_gamma="5", **FOLDER_BEFORE),
    "v, folder.yaml's hyper-parameters": _variant("v", **FOLDER_BEFORE),  # the shipped recipe before this sweep
    "v, folder.yaml's hyper-parameters with Adam 1e-3": _variant("v", **{**FOLDER_BEFORE, "lr": "1e-3"}),
    "v, lr 2e-3": _variant("v", lr="2e-3"),
    "v, lr 5e-4": _variant("v", lr="5e-4"),
    "v, batch 64": _variant("v", batch="64"),
    "v, batch 16": _variant("v", batch="16"),
    "v, dropout 0.1": _variant("v", dropout="0.1"),
    "v, no clipping": _variant("v", clip="0"),
    "v, warm-up 320 (6% of the run, as folder.yaml's)": _variant("v", warmup="320"),  # 5,000 of 78,200 steps
    "v, EMA 0.999": _variant("v", ema="0.999"),
    "v + augmentation": _variant("v", augment="0.12", augment_dim="6"),  # non-leaky, EDM's probability
    "v, planned: 5% warm-up, WSD over the last 20%, EMA sigma_rel 0.1": _variant("v", **PLANNED),
    "v, planned, EMA 0.995": _variant("v", **{**PLANNED, "sigma_rel": "null", "ema": "0.995"}),
    "v, planned, cosine from the warm-up": _variant("v", **{**PLANNED, "decay": "cosine", "decay_from": "0"}),
    "v, planned, WSD over the last 40%": _variant("v", **{**PLANNED, "decay_from": "0.6"}),
    "v, planned, EMA sigma_rel 0.05": _variant("v", **{**PLANNED, "sigma_rel": "0.05"}),
    "v, planned, constant rate (no cool-down)": _variant("v", **{**PLANNED, "decay": "constant"}),
}


@functools.cache
def demo_model() -> dict:
    """configs/demo.yaml's model section, read once."""
    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]


def planned(flags: list[str]) -> bool:
    """Whether a variant's recipe depends on its run's length (plan.py): a warm-up given as a share, a decaying
    rate or the EMA as a share of the run. Else its checkpoint at 10 minutes of a 40-minute run is a 10-minute run."""
    demo = demo_model()  # where a flag is not given
    value = dict(zip(flags[::2], flags[1::2], strict=True))
    warmup = float(value.get(HYPER["warmup"], demo.get("warmup_steps", 0)))
    rate = depends_on_length(warmup, value.get(HYPER["decay"], demo.get("lr_decay", "constant")))
    return rate or value.get(HYPER["sigma_rel"], str(demo.get("ema_sigma_rel"))) not in ("null", "None")
