"""Cost of one training step with each combination of loss terms and training options, as ratios to MSE alone.

    python benchmarks/loss_terms.py                      # CPU, the CIFAR-10 UNet at base 32, batch 16
    python benchmarks/loss_terms.py --device cuda --base-channels 64 --batch-size 64

The VGG19 is randomly initialised (the cost does not depend on its weights). Combinations are run
round-robin, `--repeats` times each, and the median step time is reported, so that drifts in machine
load hit every combination alike. Writes the table as JSON with --json.
"""

import argparse
import itertools
import json
import statistics
import time

import torch

from diffusion_lit.diffusion.immiscible import assign_noise
from diffusion_lit.diffusion.losses import DiffusionLoss
from diffusion_lit.diffusion.perceptual import vgg19_cut
from diffusion_lit.diffusion.schedule import NoiseSchedule
from diffusion_lit.nn import UNet

COMBINATIONS = {  # name: (perceptual weight, feature-matching weight, snr_gamma, immiscible)
    "mse": (0.0, 0.0, None, False),
    "mse + perceptual": (0.1, 0.0, None, False),
    "mse + feature matching": (0.0, 0.05, None, False),
    "mse + perceptual + feature matching": (0.1, 0.05, None, False),
    "mse, Min-SNR-5 weighting": (0.0, 0.0, 5.0, False),
    "mse, immiscible noise": (0.0, 0.0, None, True),
}


def main() -> None:
    """Time the combinations and print a table of ms/step and ratios to MSE alone."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    device = torch.device(args.device)
    unet = UNet(args.channels, base_channels=args.base_channels).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    schedule = NoiseSchedule().to(device)
    vgg = make_layers(cfgs["E"][:4])[: vgg19_cut("conv_4")].to(device).eval().requires_grad_(False)
    losses = {}
    for name, (perceptual, matching, gamma, immiscible) in COMBINATIONS.items():
        losses[name] = (DiffusionLoss(perceptual, matching, snr_gamma=gamma), immiscible)
        losses[name][0].perceptual.features = vgg  # random weights: the cost does not depend on them
    x0 = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, device=device) * 2 - 1

    def step(loss: DiffusionLoss, immiscible: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        t = schedule.sample_timesteps(x0.shape[0], device)
        noise = assign_noise(x0, torch.randn_like(x0)) if immiscible else torch.randn_like(x0)
        loss(unet, schedule, x0, noise, t)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for loss in losses.values():  # warm-up
        step(*loss)
    times = {name: [] for name in losses}
    for _, (name, loss) in itertools.product(range(args.repeats), losses.items()):
        times[name].append(step(*loss))

    baseline = statistics.median(times["mse"])
    rows = [
        {"terms": name, "ms_per_step": 1000 * statistics.median(t), "ratio": statistics.median(t) / baseline}
        for name, t in times.items()
    ]
    print(
        f"device={args.device} UNet base={args.base_channels} batch={args.batch_size} "
        f"image={args.channels}x{args.image_size}x{args.image_size} repeats={args.repeats} (median)"
    )
    print(f"| {'loss terms':<36} | {'ms / step':>9} | {'vs MSE':>6} |")
    print(f"| {'-' * 36} | {'-' * 8}: | {'-' * 5}: |")
    for row in rows:
        print(f"| {row['terms']:<36} | {row['ms_per_step']:9.0f} | {row['ratio']:5.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
