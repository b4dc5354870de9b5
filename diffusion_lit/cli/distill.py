"""`lit-ddpm distill`: `fit` with a consistency loss, the teacher's network and its weights to start from."""

import torch
from jsonargparse import Namespace

from diffusion_lit.checkpoints import check_checkpoint, upgraded
from diffusion_lit.errors import UserError

CONSISTENCY_LOSS = "diffusion_lit.diffusion.consistency.ConsistencyLoss"
FROM_TEACHER = ("unet", "schedule", "timesteps", "prediction")  # what defines the function the student learns


def fit_arguments(argv: list[str]) -> tuple[list[str], str]:
    """`distill [--teacher CKPT] ARGS` as `fit` arguments, with the loss made a ConsistencyLoss and augmentation
    off after the configs (so that ARGS may set the loss's options), and the teacher's path."""
    teacher, rest, skip = None, [], False
    for index, arg in enumerate(argv[1:], start=1):
        if skip:
            skip = False
        elif arg == "--teacher":
            teacher, skip = (argv[index + 1] if index + 1 < len(argv) else None), True
        elif arg.startswith("--teacher="):
            teacher = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not teacher and not {"-h", "--help"} & set(rest):
        raise UserError("distill needs a teacher: lit-ddpm distill --config CONFIG --teacher CHECKPOINT")
    configs = [i + 1 for i, arg in enumerate(rest) if arg == "--config"]
    position = max(configs) + 1 if configs else 0
    student = ["--model.loss", CONSISTENCY_LOSS, "--model.augment", "0"]
    return ["fit", *rest[:position], *student, *rest[position:]], teacher


def apply_teacher(config: Namespace, parser, teacher: str, settings: set[str], allowed: set[str]) -> Namespace:
    """`config` (the whole parsed config) with the model settings that define the teacher's network and
    schedule taken from its checkpoint, as `--ckpt_path` does for a resumed run."""
    check_checkpoint(teacher, settings, allowed)
    hyper_parameters = torch.load(upgraded(teacher), map_location="cpu", weights_only=True)["hyper_parameters"]
    model = {name: hyper_parameters[name] for name in FROM_TEACHER if name in hyper_parameters}
    return parser.parse_object({"fit": {"model": model}}, config)
