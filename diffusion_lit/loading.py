"""A trained model from a checkpoint file, safely: for `sample`, `ema`, the benchmarks and Python users."""

from collections.abc import Iterable

from diffusion_lit.checkpoints import check_checkpoint, check_finite
from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule


def load_checkpoint(ckpt_path: str, device: str = "cpu", allowed_classes: Iterable[str] = ()) -> DiffusionModule:
    """A DiffusionModule with the checkpoint's EMA weights, loaded safely (weights_only=True); the network is
    built only if it is one of lit-ddpm's or its class is in `allowed_classes` (nothing else is imported)."""
    check_checkpoint(ckpt_path, allowed_classes=allowed_classes)
    try:
        module = DiffusionModule.load_from_checkpoint(
            ckpt_path, map_location=device, weights_only=True, allowed_classes=allowed_classes
        )
    except Exception as error:  # noqa: BLE001  (truncated, foreign or not a checkpoint: the same advice)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"{ckpt_path!r} is not a readable lit-ddpm checkpoint ({reason})") from None
    check_finite(module.state_dict(), f"{ckpt_path!r} cannot make images (use an earlier checkpoint of the run)")
    return module.eval()
