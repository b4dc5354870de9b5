"""GPU check: training and sampling speed of the CIFAR-10 model on synthetic data, no network, a few minutes.

    make gpu-check                                   # python -m benchmarks.gpu_check --device cuda
    python -m benchmarks.gpu_check --device cpu --tiny --no-compile    # what the test suite runs

For each variant (precision x eager/compiled x memory layout) it times --steps training steps of the
CIFAR-10 UNet (40.7 M parameters at base 64) with lit-ddpm's loss and fused Adam on random 3x32x32
images, then reports images/s, peak memory, achieved TFLOP/s (FLOPs of one step counted with
torch.utils.flop_counter) and model-FLOPs utilisation against the card's dense peak, and whether any
loss was non-finite. Then the per-step cost of the training options (Min-SNR-5 weighting, immiscible
noise) and of a distillation step (`lit-ddpm distill`), and sampling speed with the default sampler
and DPM-Solver++ 20 under torch.inference_mode.
Last, `lit-ddpm fit --config configs/cifar10.yaml` itself (Lightning loop, callbacks, perceptual and
feature-matching terms with random VGG19 weights, synthetic CIFAR-10 files) in the config's 16-mixed and
in bf16-mixed with `on_device` data: that it runs, and its steps/s.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import LOSS, ROOT, autocast, synchronize, synthetic_cifar, train_step
from benchmarks.loss_terms import COMBINATIONS, time_terms
from benchmarks.pipeline import fit_rate
from diffusion_lit.diffusion import NoiseSchedule, Sampling, reverse_process
from diffusion_lit.diffusion.consistency import ConsistencyLoss
from diffusion_lit.nn import UNet

# Dense tensor-core peaks in TFLOP/s (bf16 / tf32), from NVIDIA's data sheets (SXM parts).
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.0}, "H200": {"bf16": 989.0, "fp32": 494.0},
               "A100": {"bf16": 312.0, "fp32": 156.0}}  # fmt: skip
OPTIONS = ["mse", "mse, Min-SNR-5 weighting", "mse, immiscible noise"]  # benchmarks.loss_terms' rows
VARIANTS = [  # (precision, compiled, channels_last)
    ("fp32", False, False), ("bf16", False, False), ("bf16", False, True), ("fp32", True, False),
    ("bf16", True, False), ("bf16", True, True),
]  # fmt: skip


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The card's dense peak for this precision, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for card, peaks in PEAK_TFLOPS.items() if card in name), None)


def make_unet(args, compiled: bool, channels_last: bool, device: torch.device) -> UNet:
    torch.manual_seed(0)
    unet = UNet(3, base_channels=args.base, dropout=0.1).to(device)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compiled:
        unet.compile()
    return unet


def train_variant(args, precision: str, compiled: bool, channels_last: bool, device, schedule) -> dict:
    """Time training steps; count one step's FLOPs; note non-finite losses."""
    unet = make_unet(args, compiled, channels_last, device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4, fused=True)  # as the module (CUDA and CPU)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x0 = (torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    all_finite = torch.ones((), dtype=torch.bool, device=device)

    def step() -> None:
        nonlocal all_finite
        loss = train_step(unet, schedule, optimizer, x0, precision)
        all_finite = all_finite & loss.isfinite()  # no host sync inside the loop

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:  # eager FLOPs of one step, forward and backward
        eager = make_unet(args, False, False, device)
        with autocast(device, precision):
            t = schedule.sample_timesteps(args.batch, device)
            LOSS(eager, schedule, x0, torch.randn_like(x0), t)["loss"].backward()
    tflops = counter.get_total_flops() * args.steps / seconds / 1e12
    peak = peak_tflops(device, precision)
    return {
        "images_per_s": args.batch * args.steps / seconds,
        "warmup_s": warmup_seconds,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "all_losses_finite": bool(all_finite.item()),
    }


def sample_variant(args, precision: str, compiled: bool, device, schedule, settings: Sampling) -> dict:
    """One batch with the given sampler, after a warm-up batch."""
    unet = make_unet(args, compiled, False, device).eval()
    shape = (args.sample_batch, 3, 32, 32)
    with torch.inference_mode(), autocast(device, precision):
        reverse_process(unet, schedule, shape, Sampling(settings.sampler, 2), device=device)
        synchronize(device)
        start = time.perf_counter()
        images = reverse_process(unet, schedule, shape, settings, device=device)
        synchronize(device)
    return {"images_per_s": args.sample_batch / (time.perf_counter() - start), "finite": bool(images.isfinite().all())}


def fit_variants(args, device: torch.device) -> list[dict]:
    """`lit-ddpm fit` with the CIFAR-10 config as shipped (16-mixed; bf16-mixed on a CPU) and with bf16 + on_device."""
    from torchvision.models import vgg19

    variants = [("16-mixed", False), ("bf16-mixed", True)] if device.type == "cuda" else [("bf16-mixed", True)]
    rows = []
    with synthetic_cifar(images=5 * args.batch * (args.warmup + args.steps + 1)) as data:
        torch.manual_seed(0)
        vgg = data / "vgg19-random.pth"
        torch.save({f"features.{k}": v for k, v in vgg19().features[:8].state_dict().items()}, vgg)
        for precision, on_device in variants:
            overrides = ["--trainer.precision", precision, "--data.init_args.data_dir", str(data),
                         "--data.init_args.download", "false", "--data.init_args.on_device", str(on_device).lower(),
                         "--data.init_args.batch_size", str(args.batch), "--model.loss.init_args.vgg_weights", str(vgg),
                         "--model.unet.init_args.base_channels", str(args.base),
                         "--evaluation.every_n_epochs", "null"]  # no Inception weights here  # fmt: skip
            rate = fit_rate(ROOT / "configs" / "cifar10.yaml", overrides, device, args.warmup, args.steps)
            rows.append({"precision": precision, "on_device": on_device, "images_per_s": rate * args.batch})
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run every variant, print two tables, optionally write JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--base", type=int, default=64, help="UNet base channels (64: the CIFAR-10 config)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sample-batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="base 8, batch 4, 2 steps: a CPU smoke test")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.base, args.batch, args.sample_batch, args.steps, args.warmup = 8, 4, 4, 2, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    schedule = NoiseSchedule().to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    variants = [v for v in VARIANTS if not (args.no_compile and v[1])]
    results = {"device": name, "torch": torch.__version__, "settings": vars(args), "train": [], "sample": []}

    print(f"{name}, torch {torch.__version__}, UNet base {args.base}, batch {args.batch}\n")
    print("| precision | compiled | channels_last | train img/s | warm-up s | peak MiB | TFLOP/s | MFU | finite |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for precision, compiled, channels_last in variants:
        row = train_variant(args, precision, compiled, channels_last, device, schedule)
        results["train"].append({"precision": precision, "compiled": compiled, "channels_last": channels_last, **row})
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "n/a"
        print(f"| {precision} | {compiled} | {channels_last} | {row['images_per_s']:.0f} | {row['warmup_s']:.1f} "
              f"| {peak} | {row['tflops']:.1f} | {mfu} | {row['all_losses_finite']} |", flush=True)  # fmt: skip
    print("\n| training option (bf16, eager) | ms / step | vs plain |")
    print("| --- | ---: | ---: |")
    options = {name: COMBINATIONS[name] for name in OPTIONS}
    options["lit-ddpm distill's step (ConsistencyLoss, the teacher's DDIM step)"] = ConsistencyLoss()
    results["options"] = time_terms(device, options, args.base, args.batch, "bf16", args.steps)
    for row in results["options"]:
        print(f"| {row['terms']} | {row['ms_per_step']:.1f} | {row['ratio']:.2f}x |", flush=True)
    print("\n| sampler | precision | compiled | img/s | finite |")
    print("| --- | --- | --- | ---: | --- |")
    auto = [Sampling().resolve(prediction, 1000) for prediction in ("eps", "v")]
    for settings in dict.fromkeys([*auto, Sampling("dpmpp", 20)]):
        for precision, compiled in [(p, c) for p, c, _ in variants if not _]:
            row = sample_variant(args, precision, compiled, device, schedule, settings)
            results["sample"].append({"sampling": settings.name, "precision": precision, "compiled": compiled, **row})
            print(f"| {settings.name} | {precision} | {compiled} | {row['images_per_s']:.0f} | {row['finite']} |",
                  flush=True)  # fmt: skip
    print("\n| lit-ddpm fit, configs/cifar10.yaml | on_device | train img/s |")
    print("| --- | --- | ---: |")
    results["fit"] = fit_variants(args, device)
    for row in results["fit"]:
        print(f"| {row['precision']} | {row['on_device']} | {row['images_per_s']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
