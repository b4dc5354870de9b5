"""Where a run's files are: its name filled into the trainer's settings, the checkpoint `--ckpt_path last` means,
the command that resumes it, and the cluster environment it runs in."""

import shlex
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lit.errors import UserError


def run_name(config: Namespace, distilling: bool) -> str:
    """NAME, NAME_VARIANT with an overlay's variant, and `_distill` after it for `lit-ddpm distill`."""
    if not str(config.name).strip() or config.name in (".", ".."):
        raise UserError(f"--name {config.name!r} names no folder of its own; give the run a name (--name NAME)")
    run = config.name if not config.variant else f"{config.name}_{config.variant}"
    return run + ("_distill" if distilling else "")


def fill(value, run: str):
    """`value` with every "{run}" in its strings replaced, through nested namespaces, dicts and lists."""
    if isinstance(value, str):
        return value.replace("{run}", run)
    if isinstance(value, list):
        return [fill(item, run) for item in value]
    if isinstance(value, dict | Namespace):
        for key in list(value.keys()) if isinstance(value, dict) else list(vars(value)):
            value[key] = fill(value[key], run)
    return value


def resolve_keyword(config: Namespace, subcommand: str, distilling: bool, keyword: str) -> str | None:
    """What a `--ckpt_path` of Lightning's keywords means here.

    `last`: the run's own last.ckpt (LastCheckpoint's folder, the run's name filled in) when it exists. Then
    `fit` resumes from it, and without it starts afresh, so that one command line serves a job's first start
    and every requeued start (scripts/slurm.sh); `validate` and `test` need it. `best`: the run's best-FID
    checkpoint (`evaluation.keep_best`), for `validate` and `test`. `hpc` and `registry` name checkpoints
    lit-ddpm never writes: refused in one line."""
    if keyword == "hpc":
        raise UserError("--ckpt_path hpc: lit-ddpm writes no hpc_ckpt files (under SLURM a run saves last.ckpt "
                        "and requeues itself); use --ckpt_path last")  # fmt: skip
    if keyword == "registry":
        raise UserError("--ckpt_path registry: lit-ddpm does not read Lightning's model registry; name a "
                        "checkpoint file, or last or best")  # fmt: skip
    folder = run_folder(config, distilling, keyword)
    if keyword == "best":
        if subcommand == "fit":
            raise UserError("--ckpt_path best: a run resumes from its newest state (--ckpt_path last); best is for "
                            "validate and test")  # fmt: skip
        kept = sorted(folder.glob("best-fid-epoch=*.ckpt"), key=lambda p: int(p.stem.rsplit("=", 1)[1]))
        if not kept:
            raise UserError(f"--ckpt_path best: {folder} holds no best-fid-epoch=N.ckpt (FID while fitting keeps "
                            "one: evaluation.every_n_epochs); use last or a checkpoint's path")  # fmt: skip
        _say(f"lit-ddpm: --ckpt_path best: {kept[-1]}")
        return str(kept[-1])
    path = folder / "last.ckpt"
    if path.is_file():
        _say(f"lit-ddpm: --ckpt_path last: {path}")
        return str(path)
    if subcommand != "fit":
        raise UserError(f"--ckpt_path last: the run has no {path} yet; train it first, or name a checkpoint")
    _say(f"lit-ddpm: --ckpt_path last: no {path} yet, so a fresh run")
    return None


def run_folder(config: Namespace, distilling: bool, keyword: str) -> Path:
    """The run's checkpoint folder: LastCheckpoint's `dirpath`, the run's name filled in."""
    callbacks = [c for c in config.trainer.callbacks or [] if c.class_path.rsplit(".", 1)[-1] == "LastCheckpoint"]
    if not callbacks:
        raise UserError(f"--ckpt_path {keyword} names a file of the run's folder: list LastCheckpoint in "
                        "trainer.callbacks")  # fmt: skip
    return Path(
        fill((callbacks[0].init_args or Namespace()).get("dirpath") or "checkpoints", run_name(config, distilling))
    )


@rank_zero_only
def _say(line: str) -> None:
    """One line on stderr, from the main process of global rank 0 only (every process parses the command)."""
    print(line, file=sys.stderr)


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """`lit-ddpm` and the run's arguments with any --ckpt_path replaced by `checkpoint`, quoted for a shell."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        skip = arg == "--ckpt_path"
        if not skip:
            kept.append(arg)
    return shlex.join(["lit-ddpm", *kept, "--ckpt_path", str(checkpoint)])


def cluster_plugins(plugins) -> list | None:
    """The trainer's plugins, with SLURM's environment told not to requeue by itself when the run is under SLURM
    and names no environment of its own: Lightning's requeue saves from inside its signal handler, mid-step,
    runs in every data-loading worker that inherits the handler, and would resume from its own hpc_ckpt_N.ckpt
    rather than the newest last.ckpt. LastCheckpoint stops on SIGUSR1 at a step boundary and requeues once.
    None where nothing changes."""
    listed = plugins if isinstance(plugins, list) else [] if plugins is None else [plugins]
    if not SLURMEnvironment.detect() or any(isinstance(plugin, ClusterEnvironment) for plugin in listed):
        return None
    return [*listed, SLURMEnvironment(auto_requeue=False)]
