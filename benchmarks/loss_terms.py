"""Cost of one training step with each combination of loss terms and training options, as ratios to MSE alone.

    python -m benchmarks.loss_terms                      # CPU, the CIFAR-10 UNet at base 32, batch 16
    python -m benchmarks.loss_terms --device cuda --base-channels 64 --batch-size 64 --precision bf16

The VGG19 is randomly initialised (the cost does not depend on its weights). Combinations are run
round-robin, `--repeats` times each, and the median step time is reported, so that drifts in machine
load hit every combination alike. `make gpu-check` runs the same measurement on a GPU. Writes the table as
JSON with --json.
"""

import argparse
import copy
import itertools
import json
import statistics
import time

import torch

from benchmarks.common import synchronize, train_step
from diffusion_lit.diffusion.losses import DiffusionLoss
from diffusion_lit.diffusion.perceptual import vgg19_cut
from diffusion_lit.diffusion.schedule import NoiseSchedule
from diffusion_lit.nn import UNet

COMBINATIONS = {  # name: DiffusionLoss settings
    "mse": {},
    "mse + perceptual": {"perceptual_weight": 0.1},
    "mse + feature matching": {"feature_matching_weight": 0.05},
    "mse + perceptual + feature matching": {"perceptual_weight": 0.1, "feature_matching_weight": 0.05},
    "mse, Min-SNR-5 weighting": {"snr_gamma": 5.0},
    "mse, immiscible noise": {"immiscible": True},
}


def time_terms(
    device: torch.device, combinations: dict[str, dict], base_channels: int = 32, batch_size: int = 16,
    precision: str = "fp32", repeats: int = 5, image: tuple[int, int, int] = (3, 32, 32),
) -> list[dict]:  # fmt: skip
    """ms per training step (the median of `repeats`, round-robin after a warm-up) of each loss combination
    (DiffusionLoss settings, or a ready loss such as ConsistencyLoss), and its ratio to the first."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    unet = UNet(image[0], base_channels=base_channels).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4, fused=True)
    schedule = NoiseSchedule().to(device)
    vgg = make_layers(cfgs["E"][:4])[: vgg19_cut("conv_4")].to(device).eval().requires_grad_(False)
    losses = {name: settings if callable(settings) else DiffusionLoss(**settings)
              for name, settings in combinations.items()}  # fmt: skip
    for loss in losses.values():
        if isinstance(loss, DiffusionLoss):
            loss.perceptual.features = vgg  # random weights: the cost does not depend on them
        if getattr(loss, "teacher", False) is None:  # a distillation loss: its frozen teacher, as distill gives it
            loss.teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    x0 = torch.rand(batch_size, *image, device=device) * 2 - 1

    def step(loss: DiffusionLoss) -> float:
        synchronize(device)
        start = time.perf_counter()
        train_step(unet, schedule, optimizer, x0, precision, loss)
        synchronize(device)
        return time.perf_counter() - start

    for loss in losses.values():  # warm-up
        step(loss)
    times = {name: [] for name in losses}
    for _, (name, loss) in itertools.product(range(repeats), losses.items()):
        times[name].append(step(loss))
    baseline = statistics.median(next(iter(times.values())))
    return [{"terms": name, "ms_per_step": 1000 * statistics.median(t), "ratio": statistics.median(t) / baseline}
            for name, t in times.items()]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Time the combinations and print a table of ms/step and ratios to MSE alone."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    image = (args.channels, args.image_size, args.image_size)
    rows = time_terms(torch.device(args.device), COMBINATIONS, args.base_channels, args.batch_size, args.precision,
                      args.repeats, image)  # fmt: skip
    print(
        f"device={args.device} UNet base={args.base_channels} batch={args.batch_size} precision={args.precision} "
        f"image={'x'.join(map(str, image))} repeats={args.repeats} (median)"
    )
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)


def print_table(rows: list[dict]) -> None:
    """The rows as a markdown table."""
    print(f"| {'loss terms':<36} | {'ms / step':>9} | {'vs MSE':>6} |")
    print(f"| {'-' * 36} | {'-' * 8}: | {'-' * 5}: |")
    for row in rows:
        print(f"| {row['terms']:<36} | {row['ms_per_step']:9.1f} | {row['ratio']:5.2f}x |")


if __name__ == "__main__":
    main()
