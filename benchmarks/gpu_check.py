"""GPU check: what a user's CIFAR-10 run does on this card, then the bare network's speed; no network, minutes.

    make gpu-check                     # on the GPU machine: scripts/gpu_check.sh (its own torch, wheels from .whl/)
    python -m benchmarks.gpu_check --device cpu --tiny --no-compile    # what the test suite runs

First `lit-ddpm fit` and `lit-ddpm test` with configs/cifar10.yaml as shipped, in 16-mixed and bf16-mixed
(`benchmarks.gpu_runs` says what they measure); then the bare UNet's training step (precision x compiled x
channels-last), each training option's cost, and the samplers. Global switches (TF32, cudnn.benchmark) are left
as a user's run has them. Every row is guarded: a failure is written as that row's error and the check goes on;
the JSON is rewritten after every row, so a run cut short keeps what it measured. MFU is against the card's
dense peak: from the table below when the card is in it, or `--peak-tflops`.
"""

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import LOSS, autocast, synchronize, synthetic_cifar, train_step
from benchmarks.gpu_runs import fit_row, test_row
from benchmarks.loss_terms import COMBINATIONS, time_terms
from diffusion_lit.diffusion import NoiseSchedule, Sampling, reverse_process
from diffusion_lit.diffusion.consistency import ConsistencyLoss
from diffusion_lit.diffusion.sampling import AUTO
from diffusion_lit.files import written_whole
from diffusion_lit.nn import UNet

# Dense (not sparse) peaks in TFLOP/s from NVIDIA's data sheets: bf16 and fp16 tensor cores, and plain fp32.
PEAK_TFLOPS = {"H100 PCIe": {"bf16": 756.0, "fp32": 51.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
               "H200": {"bf16": 989.0, "fp32": 67.0}, "A100": {"bf16": 312.0, "fp32": 19.5},
               "L40S": {"bf16": 362.0, "fp32": 91.6}, "RTX 4090": {"bf16": 165.2, "fp32": 82.6},
               "RTX 3090": {"bf16": 71.0, "fp32": 35.6}}  # fmt: skip
OPTIONS = ["mse", "mse, Min-SNR-5 weighting", "mse, immiscible noise"]  # benchmarks.loss_terms' rows
VARIANTS = [  # (precision, compiled, channels_last)
    ("fp32", False, False), ("bf16", False, False), ("bf16", False, True), ("fp32", True, False),
    ("bf16", True, False), ("bf16", True, True),
]  # fmt: skip


def peak_tflops(device: torch.device, precision: str, told: float | None) -> float | None:
    """The card's dense peak for this precision: told, or from PEAK_TFLOPS by the card's name (first match)."""
    if told or device.type != "cuda":
        return told
    name, kind = torch.cuda.get_device_name(device), "fp32" if precision in ("fp32", "32-true") else "bf16"
    return next((peaks[kind] for card, peaks in PEAK_TFLOPS.items() if card in name), None)


class Report:
    """The results, rewritten whole after every row; each row measured under a guard."""

    def __init__(self, path: str | None, header: dict) -> None:
        self.path, self.results = (Path(path) if path else None), {**header, "rows": {}}

    def row(self, section: str, label: dict, measure, *arguments) -> dict:
        """`measure(*arguments)`'s row under `label` in `section`, or the error it raised; then the file."""
        try:
            row = {**label, **measure(*arguments)}
        except (Exception, SystemExit) as error:  # noqa: BLE001  (one variant failing must not lose the others)
            row = {**label, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            traceback.print_exc()
        self.results["rows"].setdefault(section, []).append(row)
        if self.path is not None:
            with written_whole(self.path) as partial:
                partial.write_text(json.dumps(self.results, indent=2))
        return row


def make_unet(args, compiled: bool, channels_last: bool, device: torch.device) -> UNet:
    torch.manual_seed(0)
    unet = UNet(3, base_channels=args.base, dropout=0.1).to(device)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compiled:
        unet.compile()
    return unet


def step_flops(unet, schedule: NoiseSchedule, x0: torch.Tensor, precision: str, criterion=LOSS) -> int:
    """FLOPs of one training step's forward and backward (eager)."""
    with FlopCounterMode(display=False) as counter, autocast(x0.device, precision):
        t = schedule.sample_timesteps(x0.shape[0], x0.device)
        criterion(unet, schedule, x0, torch.randn_like(x0), t)["loss"].backward()
    return counter.get_total_flops()


def train_variant(args, precision: str, compiled: bool, channels_last: bool, device, schedule) -> dict:
    """The bare network's training step: images/s, compile warm-up, peak memory, TFLOP/s, MFU, finite losses."""
    unet = make_unet(args, compiled, channels_last, device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4, fused=True)  # as the module (CUDA and CPU)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x0 = (torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    all_finite = torch.ones((), dtype=torch.bool, device=device)

    def step() -> None:
        nonlocal all_finite
        all_finite = all_finite & train_step(unet, schedule, optimizer, x0, precision).isfinite()  # no host sync

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    tflops = step_flops(make_unet(args, False, False, device), schedule, x0, precision) * args.steps / seconds / 1e12
    peak = peak_tflops(device, precision, args.peak_tflops)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "images_per_s": args.batch * args.steps / seconds,
        "warmup_s": warmup_seconds,
        "peak_mib": memory,
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


def user_runs(args, device: torch.device, report: Report) -> None:
    """`lit-ddpm fit` and `lit-ddpm test` with configs/cifar10.yaml, in each mixed precision the device has."""
    precisions = ["16-mixed", "bf16-mixed"] if device.type == "cuda" else ["bf16-mixed"]  # no fp16 AMP on a CPU
    print("| lit-ddpm fit, configs/cifar10.yaml | train img/s | peak MiB | skipped steps | TFLOP/s | MFU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with synthetic_cifar(images=5 * args.batch * (args.warmup + args.steps + 1)) as data:
        with tempfile.TemporaryDirectory() as work:
            for precision in precisions:
                peak = peak_tflops(device, "bf16", args.peak_tflops)
                row = report.row(
                    "fit", {"precision": precision}, fit_row, args, device, data, Path(work), precision, peak
                )
                line(precision, cell(row, "images_per_s"), cell(row, "peak_mib"), cell(row, "skipped_steps"),
                     cell(row, "tflops", ".1f"), cell(row, "mfu", ".1%"))  # fmt: skip
            print("\n| lit-ddpm test (run's precision) | sampler | sample img/s | FID+IS s | bits/dim s | peak MiB |")
            print("| --- | --- | ---: | ---: | ---: | ---: |")
            for precision in precisions:
                row = report.row("test", {"precision": precision}, test_row, args, device, data, Path(work), precision)
                line(precision, row.get("sampling", ""), cell(row, "images_per_s"), cell(row, "fid_seconds", ".1f"),
                     cell(row, "bpd_seconds", ".1f"), cell(row, "peak_mib"))  # fmt: skip


def line(*cells) -> None:
    """A markdown table row, printed at once."""
    print(f"| {' | '.join(str(c) for c in cells)} |", flush=True)


def cell(row: dict, key: str, spec: str = ".0f") -> str:
    if "error" in row:
        return "error"
    return "n/a" if row.get(key) is None else format(row[key], spec)


def main(argv: list[str] | None = None) -> dict:
    """Every section, printed as tables and written row by row; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--base", type=int, default=64, help="UNet base channels (64: the CIFAR-10 config)")
    parser.add_argument("--batch", type=int, default=64, help="the CIFAR-10 config's batch size")
    parser.add_argument("--sample-batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--test-samples", type=int, default=2000, help="images `lit-ddpm test` samples")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if it is not in the table")
    parser.add_argument("--tiny", action="store_true", help="base 8, batch 4, 2 steps: a CPU smoke test")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--json", help="the results, rewritten after every row")
    args = parser.parse_args(argv)
    if args.tiny:
        args.base, args.batch, args.sample_batch, args.steps, args.warmup, args.test_samples = 8, 4, 4, 2, 1, 8
    device = torch.device(args.device)
    schedule = NoiseSchedule().to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = {"device": name, "torch": torch.__version__, "settings": vars(args), "cpus": os.cpu_count()}
    report = Report(args.json, header)
    print(f"{name}, torch {torch.__version__}, UNet base {args.base}, batch {args.batch}\n", flush=True)
    user_runs(args, device, report)

    print("\n| bare UNet step | compiled | channels_last | train img/s | warm-up s | peak MiB | TFLOP/s | MFU |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    variants = [v for v in VARIANTS if not (args.no_compile and v[1])]
    for precision, compiled, channels_last in variants:
        label = {"precision": precision, "compiled": compiled, "channels_last": channels_last}
        row = report.row("train", label, train_variant, args, precision, compiled, channels_last, device, schedule)
        line(precision, compiled, channels_last, cell(row, "images_per_s"), cell(row, "warmup_s", ".1f"),
             cell(row, "peak_mib"), cell(row, "tflops", ".1f"), cell(row, "mfu", ".1%"))  # fmt: skip
    print("\n| training option (bf16, eager) | ms / step | vs plain |\n| --- | ---: | ---: |")
    options = {name: COMBINATIONS[name] for name in OPTIONS}
    options["lit-ddpm distill's step (ConsistencyLoss, the teacher's DDIM step)"] = ConsistencyLoss()
    row = report.row("options", {}, lambda: {"rows": time_terms(device, options, args.base, args.batch, "bf16",
                                                                 args.steps)})  # fmt: skip
    for option in row.get("rows", []):
        print(f"| {option['terms']} | {option['ms_per_step']:.1f} | {option['ratio']:.2f}x |", flush=True)
    print("\n| sampler | precision | compiled | img/s | finite |\n| --- | --- | --- | ---: | --- |")
    auto = [Sampling().resolve(prediction, 1000) for prediction in AUTO]  # every prediction target's default
    for settings in dict.fromkeys([*auto, Sampling("dpmpp", 20)]):
        for precision, compiled in [(p, c) for p, c, layout in variants if not layout]:
            label = {"sampling": settings.name, "precision": precision, "compiled": compiled}
            row = report.row("sample", label, sample_variant, args, precision, compiled, device, schedule, settings)
            line(settings.name, precision, compiled, cell(row, "images_per_s"), row.get("finite"))
    return report.results


if __name__ == "__main__":
    main()
