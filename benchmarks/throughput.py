"""Training and sampling throughput of lit-ddpm's UNet against two peers, same loss, optimizer and batch.

    python -m benchmarks.throughput                    # CPU, small models (about 10 M parameters each)
    python -m benchmarks.throughput --size full --device cuda --precision bf16 --batch 128
    (make bench runs the first line; the peers come from the `bench` extra)

Peers: diffusers' UNet2DModel in the google/ddpm-cifar10-32 layout, and denoising-diffusion-pytorch's
Unet, each scaled to about lit-ddpm's parameter count ("full": the CIFAR-10 sizes, 35-41 M; "small":
about a quarter of the channels squared, 9-10 M). Every model is trained by the same code: lit-ddpm's
DiffusionLoss (eps-MSE) on the cosine schedule, Adam 2e-4, 3x32x32 inputs; sampling is lit-ddpm's
DPM-Solver++ for --sample-steps steps under torch.inference_mode. The models take turns, --repeats
times, and the median is reported, with lit-ddpm / peer ratios (higher is better for images/s, lower
for memory). Peak memory is CUDA's allocator peak; it is not measured on CPU.
"""

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import autocast, synchronize, train_step
from diffusion_lit.diffusion import NoiseSchedule, Sampling, reverse_process
from diffusion_lit.nn import UNet

SIZES = {  # lit-ddpm base channels, diffusers block_out_channels, denoising-diffusion-pytorch dim
    "small": (32, (64, 128, 128, 128), 32),
    "full": (64, (128, 256, 256, 256), 64),
}


def build(name: str, size: str) -> tuple[nn.Module, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    """A model and how to call it as (x_t, t) -> eps."""
    base, blocks, dim = SIZES[size]
    if name == "lit-ddpm":
        return UNet(3, base_channels=base, dropout=0.0), lambda m, x, t: m(x, t)
    if name == "diffusers":
        from diffusers import UNet2DModel

        model = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=blocks,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )  # fmt: skip
        return model, lambda m, x, t: m(x, t).sample
    from denoising_diffusion_pytorch import Unet

    return Unet(dim=dim, dim_mults=(1, 2, 4, 8)), lambda m, x, t: m(x, t)


def measure(name: str, args, schedule: NoiseSchedule, device: torch.device) -> dict[str, float]:
    """Images/s of --train-steps training steps and of one sampling batch, and the CUDA memory peak."""
    torch.manual_seed(0)
    model, call = build(name, args.size)
    model = model.to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    network = lambda x, t: call(model, x, t)  # noqa: E731
    x0 = torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        train_step(network, schedule, optimizer, x0, args.precision)

    step()  # warm-up: allocator, kernels, Adam state
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    synchronize(device)
    train_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")

    model.eval()
    with torch.inference_mode(), autocast(device, args.precision):
        reverse_process(network, schedule, (args.batch, 3, 32, 32), Sampling("dpmpp", 2), device=device)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        reverse_process(network, schedule, (args.batch, 3, 32, 32), Sampling("dpmpp", args.sample_steps), device=device)
        synchronize(device)
        sample_seconds = time.perf_counter() - start
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(model, x0[:1], torch.zeros(1, dtype=torch.long, device=device))
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_gflop": counter.get_total_flops() / 1e9,
        "train_images_per_s": args.batch * args.train_steps / train_seconds,
        "sample_images_per_s": args.batch / sample_seconds,
        "peak_train_mib": peak,
    }


def main() -> None:
    """Alternate the models --repeats times; print medians and ratios; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["lit-ddpm", "diffusers", "denoising-diffusion-pytorch"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    schedule = NoiseSchedule().to(device)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.models}
    for repeat in range(args.repeats):
        for name in args.models:
            runs[name].append(measure(name, args, schedule, device))
            print(f"repeat {repeat}: {name} {runs[name][-1]}", flush=True)
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}

    print(f"\n{args.size} models, batch {args.batch}, {args.precision}, {device.type}, median of {args.repeats}:\n")
    print("| model | params (M) | forward GFLOP / image | train img/s | sample img/s | peak train MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in medians.items():
        memory = "n/a" if math.isnan(m["peak_train_mib"]) else f"{m['peak_train_mib']:.0f}"
        print(f"| {name} | {m['params_m']:.1f} | {m['forward_gflop']:.2f} | {m['train_images_per_s']:.1f} "
              f"| {m['sample_images_per_s']:.2f} | {memory} |")  # fmt: skip
    ours = medians.get("lit-ddpm")
    if ours:
        for name, m in medians.items():
            if name != "lit-ddpm":
                ratio = {key: ours[key] / m[key] for key in m}
                memory = "n/a" if math.isnan(ratio["peak_train_mib"]) else f"{ratio['peak_train_mib']:.2f}x"
                speeds = f"{ratio['train_images_per_s']:.2f}x | {ratio['sample_images_per_s']:.2f}x"
                print(f"| lit-ddpm / {name} | {ratio['params_m']:.2f}x | {ratio['forward_gflop']:.2f}x "
                      f"| {speeds} | {memory} |")  # fmt: skip
    if args.json:
        report = {"settings": vars(args), "machine": platform.machine(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({**report, "runs": runs, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
