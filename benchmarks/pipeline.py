"""What surrounds the network: the Lightning training loop's cost over a bare loop, and the data path.

    python -m benchmarks.pipeline                  # CPU, about a minute
    python -m benchmarks.pipeline --device cuda

Loop: the demo config's UNet, loss, Adam, gradient clipping and EMA, trained on the demo digits by
(a) a bare PyTorch loop and (b) `lit-ddpm fit --config configs/demo.yaml` with its callbacks (progress
bar, checkpointing, EMA, non-finite guard), logging to CSV. Steps/second after --warmup steps; the ratio
bare / fit is the share of the bare loop's speed that the Lightning loop keeps (1.0: no overhead).

Data: --images CIFAR-10-shaped images written to a temporary folder as CIFAR-10's files, read by
CIFAR10DataModule through torchvision's pipeline (PIL, ToTensor, flips; num_workers 0, so one
process's rate) and with `on_device` (indices from the loader, gather + convert + flip on the device).
Images/second handed to the training step, and their ratio.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from lightning.pytorch import Callback

from benchmarks.common import ROOT, synchronize, synthetic_cifar
from diffusion_lit.callbacks.ema import update_weight
from diffusion_lit.callbacks.posthoc_ema import gamma_of
from diffusion_lit.cli import main as lit_ddpm
from diffusion_lit.data import CIFAR10DataModule, DemoMNISTDataModule
from diffusion_lit.diffusion import NoiseSchedule
from diffusion_lit.diffusion.losses import DiffusionLoss
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet

DEMO = ROOT / "configs" / "demo.yaml"


def bare_loop(device: torch.device, warmup: int, steps: int, base_channels: int) -> float:
    """Steps/second of a plain loop doing the demo config's work: loss, backward, clip, fused Adam, EMA."""
    config = yaml.safe_load(DEMO.read_text())
    torch.manual_seed(0)
    unet_args = {**config["model"]["unet"]["init_args"], "base_channels": base_channels}
    unet = UNet(in_channels=1, **unet_args).to(device)
    ema = [p.detach().clone() for p in unet.parameters()]
    schedule = NoiseSchedule("cosine", 1000).to(device)
    lr = float(config["model"]["optimizer"]["init_args"]["lr"])
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr, fused=True)
    data = DemoMNISTDataModule(batch_size=config["data"]["init_args"]["batch_size"])
    data.setup("fit")
    loss_fn, done, start = DiffusionLoss(), 0, 0.0
    sigma_rel, decay = config["model"].get("ema_sigma_rel"), config["model"].get("ema_decay") or 0.0
    gamma = gamma_of(sigma_rel) if sigma_rel else None  # the EMA callback's update, as the config asks for it
    while done < warmup + steps:
        for x0, _ in data.train_dataloader():
            if done == warmup:
                synchronize(device)
                start = time.perf_counter()
            x0 = x0.to(device, non_blocking=True)
            t = schedule.sample_timesteps(x0.shape[0], device)
            loss = loss_fn(unet, schedule, x0, torch.randn_like(x0), t)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config["trainer"]["gradient_clip_val"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], update_weight(done, decay, gamma))
            done += 1
            if done == warmup + steps:
                break
    synchronize(device)
    return steps / (time.perf_counter() - start)


class StepTimer(Callback):
    """Wall time from the start of optimizer step `warmup` to the end of training."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.start, self.seconds = warmup, device, None, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, *args) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def fit_rate(config: Path, overrides: list[str], device: torch.device, warmup: int, steps: int) -> float:
    """Steps/second of `lit-ddpm fit --config CONFIG OVERRIDES` after `warmup` steps, in a temp dir, CSV logger."""
    timer = StepTimer(warmup, device)
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs"]
    args = ["fit", "--config", str(config), "--trainer.accelerator", device.type, *logger, "--trainer.max_steps",
            str(warmup + steps), "--trainer.limit_val_batches", "0", *overrides]  # fmt: skip
    configured = DiffusionModule.configure_callbacks
    DiffusionModule.configure_callbacks = lambda self: [*configured(self), timer]
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)
            lit_ddpm(args)
    finally:
        os.chdir(cwd)
        DiffusionModule.configure_callbacks = configured
    return steps / timer.seconds


def data_rate(device: torch.device, images: int, batch: int, on_device: bool) -> float:
    """Training images/second handed to the step (after the device transfer and the datamodule's hook)."""
    with synthetic_cifar(images) as folder:
        data = CIFAR10DataModule(str(folder), download=False, batch_size=batch, num_workers=0, on_device=on_device)
        data.setup("fit")
        data.trainer = SimpleNamespace(training=True)
        for _ in range(2):  # the first epoch warms up (and moves on_device's tensors to the device)
            synchronize(device)
            start, seen = time.perf_counter(), 0
            for loaded in data.train_dataloader():
                loaded = loaded.to(device) if on_device else [t.to(device) for t in loaded]
                images_on_device, _ = data.on_after_batch_transfer(loaded, 0)
                seen += images_on_device.shape[0]
            synchronize(device)
    return seen / (time.perf_counter() - start)


def print_table(header: str, rows: dict[str, float], ratio: str) -> None:
    """A two-column markdown table and its ratio line."""
    print(f"| {header} |\n| --- | ---: |")
    for name, value in rows.items():
        print(f"| {name} | {value:,.1f} |")
    print(f"{ratio}\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=10, help="optimizer steps before the clock starts")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps timed")
    parser.add_argument(
        "--base-channels", type=int, default=16, help="UNet width (the demo's: 16; smaller shows overhead)"
    )
    parser.add_argument("--images", type=int, default=10000, help="synthetic CIFAR-10 images for the data path")
    parser.add_argument("--batch", type=int, default=64, help="data-path batch size")
    parser.add_argument("--only", choices=["loop", "data"], help="measure one of the two")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args),
    }
    if args.only in (None, "loop"):
        bare = bare_loop(device, args.warmup, args.steps, args.base_channels)
        width = ["--model.unet.init_args.base_channels", str(args.base_channels)]
        fit = fit_rate(DEMO, width, device, args.warmup, args.steps)
        results["loop"] = {"bare_steps_per_s": bare, "fit_steps_per_s": fit, "fit_over_bare": fit / bare}
    if args.only in (None, "data"):
        plain = data_rate(device, args.images, args.batch, on_device=False)
        fast = data_rate(device, args.images, args.batch, on_device=True)
        results["data"] = {"torchvision_images_per_s": plain, "on_device_images_per_s": fast, "ratio": fast / plain}
    print(f"\n{results['device']}")
    if "loop" in results:
        r = results["loop"]
        rows = {"bare PyTorch": r["bare_steps_per_s"], "lit-ddpm fit (demo config)": r["fit_steps_per_s"]}
        print_table("training loop | steps/s", rows, f"fit / bare: {r['fit_over_bare']:.2f}")
    if "data" in results:
        r = results["data"]
        rows = {"torchvision (1 process)": r["torchvision_images_per_s"], "on_device": r["on_device_images_per_s"]}
        print_table("CIFAR-10 data path | images/s", rows, f"on_device / torchvision: {r['ratio']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
