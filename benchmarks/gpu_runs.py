"""The user's runs that `benchmarks.gpu_check` measures first, on synthetic CIFAR-10 files.

`lit-ddpm fit --config configs/cifar10.yaml` as shipped (EMA, clipping, the non-finite guard, the VGG19 perceptual
and feature-matching terms with random VGG weights, 4 loader workers): images/s after a warm-up, peak memory,
skipped steps, TFLOP/s and MFU. Then `lit-ddpm test` of that run's last.ckpt in its precision (the auto sampler;
a random-weight Inception of the published architecture, since the real weights need the internet; bits/dim of
100 images): images/s and seconds.
"""

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import autocast, synchronize
from diffusion_lit.callbacks import NonFiniteGuard
from diffusion_lit.callbacks.quality import SampleQuality
from diffusion_lit.cli import main as lit_ddpm
from diffusion_lit.diffusion import NoiseSchedule
from diffusion_lit.diffusion.losses import DiffusionLoss
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10.yaml"


class Probe(Callback):
    """From the start of optimizer step `warmup` to the end of training: seconds and peak memory; and the guard's
    count of skipped steps."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.start, self.row = warmup, device, None, {}

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            synchronize(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        self.row = {"seconds": time.perf_counter() - self.start, "peak_mib": peak_mib(self.device),
                    "skipped_steps": guard.skipped_steps if guard else None}  # fmt: skip


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def shared_overrides(args, device: torch.device, data: Path, precision: str) -> list[str]:
    """What both commands change in the config: the device, the synthetic data, random VGG weights, no W&B."""
    vgg = data / "vgg19-random.pth"
    if not vgg.is_file():
        from torchvision.models import vgg19

        torch.manual_seed(0)
        torch.save({f"features.{k}": v for k, v in vgg19().features[:8].state_dict().items()}, vgg)
    return ["--config", str(CONFIG), "--trainer.accelerator", device.type, "--trainer.precision", precision,
            "--trainer.logger", "false", "--data.init_args.data_dir", str(data), "--data.init_args.download", "false",
            "--data.init_args.batch_size", str(args.batch), "--model.loss.init_args.vgg_weights", str(vgg),
            "--model.unet.init_args.base_channels", str(args.base)]  # fmt: skip


@contextmanager
def inside(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def fit_row(args, device: torch.device, data: Path, work: Path, precision: str, peak: float | None) -> dict:
    """`lit-ddpm fit` for warm-up + timed steps, in work/PRECISION (its last.ckpt is the test's); MFU against the
    card's dense `peak` TFLOP/s, if known."""
    folder = work / precision
    probe = Probe(args.warmup, device)
    configured = DiffusionModule.configure_callbacks
    DiffusionModule.configure_callbacks = lambda self: [*configured(self), probe]
    try:
        with inside(folder):
            lit_ddpm(["fit", *shared_overrides(args, device, data, precision), "--trainer.max_steps",
                      str(args.warmup + args.steps), "--trainer.limit_val_batches", "0",
                      "--evaluation.every_n_epochs", "null"])  # fmt: skip
    finally:
        DiffusionModule.configure_callbacks = configured
    flops = config_step_flops(args, device, data / "vgg19-random.pth")
    tflops = flops * args.steps / probe.row["seconds"] / 1e12
    return {"images_per_s": args.batch * args.steps / probe.row["seconds"], "tflops": tflops,
            "mfu": tflops / peak if peak else None, **probe.row}  # fmt: skip


def config_step_flops(args, device: torch.device, vgg: Path) -> int:
    """FLOPs of one training step of the config's model and loss (UNet, v target, perceptual and feature
    matching), forward and backward, eager."""
    torch.manual_seed(0)
    unet = UNet(3, base_channels=args.base, dropout=0.1).to(device)
    loss = DiffusionLoss(perceptual_weight=0.1, feature_matching_weight=0.05, vgg_weights=str(vgg))
    schedule = NoiseSchedule(prediction="v").to(device)
    x0 = torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter, autocast(device, "bf16"):
        loss(unet, schedule, x0)["loss"].backward()
    return counter.get_total_flops()


@contextmanager
def random_inception():
    """torch-fidelity's Inception v3 with random weights: the published architecture, offline."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    saved = inception.load_state_dict_from_url, inception.FeatureExtractorInceptionV3.load_state_dict
    inception.load_state_dict_from_url = lambda *args, **kwargs: {}
    inception.FeatureExtractorInceptionV3.load_state_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        inception.load_state_dict_from_url, inception.FeatureExtractorInceptionV3.load_state_dict = saved


def test_row(args, device: torch.device, data: Path, work: Path, precision: str) -> dict:
    """`lit-ddpm test` of work/PRECISION's last.ckpt in that precision: FID/IS sampling speed, bits/dim seconds,
    peak memory."""
    folder = work / precision
    checkpoint = folder / "checkpoints" / "cifar10" / "last.ckpt"
    timed, evaluate = {}, SampleQuality._evaluate

    def timed_evaluate(self, *a, **k):
        synchronize(device)
        start = time.perf_counter()
        result = evaluate(self, *a, **k)
        synchronize(device)
        timed["fid_seconds"], timed["sampling"] = time.perf_counter() - start, self.sampling.name
        return result

    SampleQuality._evaluate = timed_evaluate
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with inside(folder), random_inception():
            nll = ["null"] if args.tiny else ["100", "--evaluation.nll_timesteps", "20"]
            evaluation = ["--evaluation.num_samples", str(args.test_samples), "--evaluation.save_samples", "none",
                          "--evaluation.cache_dir", str(folder / "cache"), "--evaluation.nll_images", *nll]  # fmt: skip
            lit_ddpm(["test", *shared_overrides(args, device, data, precision), "--ckpt_path", str(checkpoint),
                      *evaluation, "--trainer.limit_test_batches", "1"])  # fmt: skip
    finally:
        SampleQuality._evaluate = evaluate
    bpd = next(checkpoint.parent.glob("last-bpd-*.json"), None)  # none in --tiny: 4 pilot images cost 4,000 steps
    return {"sampling": timed["sampling"], "images_per_s": args.test_samples / timed["fid_seconds"],
            "fid_seconds": timed["fid_seconds"], "bpd_seconds": json.loads(bpd.read_text())["seconds"] if bpd else None,
            "peak_mib": peak_mib(device)}  # fmt: skip
