"""The benchmark scripts run end to end on tiny settings (their numbers are not checked: timing is noisy)."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ONE_STEP, ROOT, StandInExtractor
from diffusion_lit.diffusion.sampling import AUTO


@pytest.fixture(autouse=True)
def stand_in_inception(monkeypatch):
    """The benchmarks' Inception FID, wired to a stand-in: the real network's 500-image reference takes minutes
    on a CPU (tests/test_inception.py checks the network itself)."""
    monkeypatch.setattr("diffusion_lit.inception.load_inception", StandInExtractor)


@pytest.mark.slow  # a benchmark end to end, as `make gpu-check` starts it
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gpu_check_runs_end_to_end_with_tiny_settings(tmp_path, device):
    import os
    import subprocess

    environment = {**os.environ, "DEVICE": device, "JSON": str(tmp_path / "check.json"), "ARGS": "--tiny --no-compile",
                   "PYTHON": sys.executable}  # fmt: skip
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], env=environment, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert not [row for section in rows.values() for row in section if "error" in row], done.stdout[-3000:]
    # the shipped CIFAR-10 recipe's fit and test (a CPU has bf16 AMP only), then the bare UNet
    (fit,), (test,) = rows["fit"], rows["test"]
    assert fit["precision"] == "bf16-mixed" and fit["images_per_s"] > 0 and fit["tflops"] > 0
    assert fit["skipped_steps"] == 0
    assert test["sampling"] == "ddpm50" and test["images_per_s"] > 0  # the auto sampler of the v config
    assert [(r["precision"], r["channels_last"]) for r in rows["train"]] == [
        ("fp32", False), ("bf16", False), ("bf16", True)
    ]  # fmt: skip
    assert all(r["all_losses_finite"] and r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows["train"])
    assert [r["terms"] for r in rows["options"][0]["rows"]] == [
        "mse", "mse, Min-SNR-5 weighting", "mse, immiscible noise",
        "lit-ddpm distill's step (ConsistencyLoss, the teacher's DDIM step)",
    ]  # fmt: skip
    # every target's auto sampler (today DDPM-50 for eps and v, DPM-Solver++ SDE-50 for x0) and DPM-Solver++ 20, once
    # each, in fp32 and bf16: read from AUTO, so that a new default is timed without this test changing
    expected = dict.fromkeys([f"{sampler}{steps}" for sampler, steps in AUTO.values()] + ["dpmpp20"])
    assert [r["sampling"] for r in rows["sample"]] == [name for name in expected for _ in ("fp32", "bf16")]
    assert all(r["finite"] for r in rows["sample"])
    assert "| lit-ddpm fit, configs/cifar10.yaml |" in done.stdout


def test_a_failing_gpu_check_row_is_written_down_and_the_rest_goes_on(tmp_path):
    from benchmarks.gpu_check import Report

    report = Report(str(tmp_path / "check.json"), {"device": "cpu"})
    report.row("train", {"variant": 1}, lambda: {"images_per_s": 5.0})
    report.row("train", {"variant": 2}, lambda: 1 / 0)
    written = json.loads((tmp_path / "check.json").read_text())  # rewritten after every row
    assert written["rows"]["train"] == [{"variant": 1, "images_per_s": 5.0},
                                        {"variant": 2, "error": "ZeroDivisionError: division by zero"}]  # fmt: skip


@pytest.mark.slow  # a benchmark end to end
def test_throughput_runs_for_lit_ddpm_alone(monkeypatch, capsys):
    from benchmarks import throughput

    argv = ["throughput.py", "--models", "lit-ddpm", "--batch", "2", "--train-steps", "1", "--sample-steps", "2",
            "--repeats", "1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    throughput.main()
    assert "| lit-ddpm | 10.2 | " in capsys.readouterr().out


@pytest.mark.slow
def test_throughput_against_the_peers(monkeypatch, capsys):
    pytest.importorskip("denoising_diffusion_pytorch")
    from benchmarks import throughput

    argv = ["throughput.py", "--batch", "2", "--train-steps", "1", "--sample-steps", "2", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    throughput.main()
    assert "lit-ddpm / diffusers" in capsys.readouterr().out


@pytest.mark.slow  # a benchmark end to end
def test_pipeline_runs_on_cpu_with_tiny_settings(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from benchmarks import pipeline

    results = pipeline.main(["--warmup", "1", "--steps", "2", "--base-channels", "8", "--images", "40",
                             "--batch", "8", "--json", str(tmp_path / "pipeline.json")])  # fmt: skip
    assert results["loop"]["fit_steps_per_s"] > 0 and results["loop"]["bare_steps_per_s"] > 0
    assert results["data"]["on_device_images_per_s"] > 0 and results["data"]["torchvision_images_per_s"] > 0
    assert "on_device / torchvision" in capsys.readouterr().out and (tmp_path / "pipeline.json").exists()


@pytest.mark.slow  # a benchmark end to end
def test_convergence_runs_end_to_end_with_tiny_budgets(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    from benchmarks import convergence

    # both ways of drawing checked whatever the defaults are: eps's auto apart from DDPM-50, v's equal to it
    monkeypatch.setitem(AUTO, "eps", ("dpmpp_sde", 50))
    monkeypatch.setitem(AUTO, "v", ("ddpm", 50))
    drawn, generate_all = [], convergence.generate_all
    monkeypatch.setattr(convergence, "generate_all", lambda *args, settings, **kwargs: drawn.append(
        (settings.sampler, settings.steps)) or generate_all(*args, settings=settings, **kwargs))  # fmt: skip

    argv = ["--variants", "eps (today)", "v + EDM levels and weighting", "--seeds", "0", "--budgets", "0.001",
            "--today-steps", "2", "--jobs", "2", "--num-samples", "8", "--workdir", str(tmp_path / "runs"),
            "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png"),
            "--neighbours", str(tmp_path / "n.png")]  # fmt: skip
    convergence.main(argv)
    report = json.loads((tmp_path / "c.json").read_text())
    assert [(r["variant"], r["checkpoint"]) for r in report["rows"]] == [
        ("eps (today)", "minutes=0.001"), ("eps (today)", "step=2"), ("v + EDM levels and weighting", "minutes=0.001")
    ]  # fmt: skip
    assert all(r["fid_default"] > 0 and r["fid_ddpm50"] > 0 and r["nearest_ratio"] > 0 for r in report["rows"])
    assert all(r["inception_fid_default"] > 0 for r in report["rows"]) and report["inception_floor"] > 0
    # eps draws with its (patched) auto sampler and DDPM-50 at each checkpoint; v's auto is DDPM-50: drawn once
    assert drawn == [("dpmpp_sde", 50), ("ddpm", 50)] * 2 + [("ddpm", 50)]
    assert report["rows"][2]["fid_default"] == report["rows"][2]["fid_ddpm50"]
    output = capsys.readouterr().out
    assert "| variant | checkpoint | minutes | steps | Inception FID (8), auto | classifier FID, auto |" in output
    assert "| eps (today) | step=2 |" in output and (tmp_path / "c.png").stat().st_size > 0
    # two variants, each a sample row and 3 neighbour rows of 8 digits of 28 pixels (and 1 pixel of padding)
    assert Image.open(tmp_path / "n.png").size == (8 * 29 + 1, 2 * 4 * 29 + 1)


def test_convergence_replot_draws_one_panel_per_report_without_training(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    from benchmarks import convergence

    def report(dataset: str, fids: list[float]) -> dict:
        points = [(variant, seed, minutes, fid) for variant in ("v", "eps") for seed in (0, 1)
                  for minutes, fid in zip((10, 20), fids, strict=True)]  # fmt: skip
        rows = [{"variant": name, "seed": seed, "checkpoint": f"minutes={minutes}", "seconds": 60 * minutes,
                 "step": 100 * minutes, "fid_default": fid + seed} for name, seed, minutes, fid in points]  # fmt: skip
        return {"settings": {"dataset": dataset, "today_steps": 0, "default_sampler": "auto"}, "floor": 12.0,
                "rows": rows}  # fmt: skip

    names = []
    for dataset, fids in (("digits", [40.0, 30.0]), ("photos", [400.0, 200.0])):
        names.append(str(tmp_path / f"{dataset}.json"))
        Path(names[-1]).write_text(json.dumps(report(dataset, fids)))
    convergence.main(["--replot", names[0], "--plot", str(tmp_path / "one.png")])
    convergence.main(["--replot", *names, "--plot", str(tmp_path / "two.png")])
    one, two = Image.open(tmp_path / "one.png").size, Image.open(tmp_path / "two.png").size
    assert two[0] > 1.5 * one[0] and two[1] == one[1]  # a second panel beside the first (one legend)
    assert not Path("convergence_runs").exists()  # nothing trained (the default --workdir)
    with pytest.raises(SystemExit):
        convergence.main(["--replot", names[0]])  # no --plot: an argparse error
    (tmp_path / "bad.json").write_text("not json")
    for bad in ("missing.json", "bad.json"):
        with pytest.raises(SystemExit):
            convergence.main(["--replot", str(tmp_path / bad), "--plot", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow  # a benchmark end to end
def test_sampler_quality_runs_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlxtend")
    from benchmarks import sampler_quality
    from diffusion_lit.cli import main as cli

    monkeypatch.chdir(tmp_path)
    cli(["fit", "--config", f"{ROOT}/configs/demo.yaml", "--config", f"{ROOT}/tests/tiny.yaml", *ONE_STEP,
         "--trainer.logger", "false"])  # fmt: skip
    checkpoint = next((tmp_path / "checkpoints").rglob("*.ckpt"))
    argv = ["--model", f"tiny={checkpoint}", "--num-samples", "4", "--seeds", "0", "1", "--rows",
            "dpmpp_sde:3,unipc:2:dynamic", "--json", str(tmp_path / "q.json")]  # fmt: skip
    sampler_quality.main(argv)
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert [(r["sampling"], r["seed"]) for r in rows] == [
        ("dpmpp_sde3", 0), ("dpmpp_sde3", 1), ("unipc2-dynamic", 0), ("unipc2-dynamic", 1)
    ]  # fmt: skip
    assert all(row["inception_fid"] > 0 and row["classifier_fid"] > 0 for row in rows)
    output = capsys.readouterr().out
    assert output.index("inception fid (4 samples)") < output.index("classifier fid (4 samples)")
    assert output.count("| dpmpp_sde3 | 3 |") == 2


@pytest.mark.slow  # a benchmark end to end
def test_sampler_quality_scores_a_model_of_the_rgb_patches_against_their_held_out_set(tmp_path, monkeypatch, capsys):
    pytest.importorskip("skimage")
    from benchmarks import sampler_quality
    from benchmarks.common import write_photo_patches
    from diffusion_lit.cli import main as cli

    monkeypatch.chdir(tmp_path)
    train, _ = write_photo_patches(tmp_path / "work" / "photo_patches")
    folder = ["--data.class_path", "diffusion_lit.data.ImageFolderDataModule", "--data.init_args.root", str(train),
              "--data.init_args.channels", "3", "--data.init_args.num_workers", "0"]  # fmt: skip
    cli(["fit", "--config", f"{ROOT}/configs/demo.yaml", "--config", f"{ROOT}/tests/tiny.yaml", *ONE_STEP, *folder,
         "--trainer.logger", "false"])  # fmt: skip
    checkpoint = next((tmp_path / "checkpoints").rglob("*.ckpt"))
    argv = ["--dataset", "photos", "--workdir", str(tmp_path / "work"), "--model", f"rgb={checkpoint}",
            "--num-samples", "4", "--rows", "unipc:2", "--json", str(tmp_path / "q.json")]  # fmt: skip
    sampler_quality.main(argv)
    # (scored against the digits, the RGB samples would not even fit the digits' 1-channel classifier)
    report = json.loads((tmp_path / "q.json").read_text())
    assert [row["sampling"] for row in report["rows"]] == ["unipc2"] and report["settings"]["dataset"] == "photos"
    assert all(row["inception_fid"] > 0 and row["classifier_fid"] > 0 for row in report["rows"])
    assert "real training images (the floor at 4)" in capsys.readouterr().out


def test_the_auto_rule_is_the_cheapest_setting_within_ten_percent_of_the_best_in_every_cell():
    from benchmarks import sampler_quality

    def choose_auto(rows: list[dict], floors: dict[str, float] | None = None) -> dict:
        return sampler_quality.choose_auto(rows, floors or {"digits": 0.0, "photos": 0.0})

    def rows(model: str, prediction: str, scores: dict[str, float], dataset: str = "digits") -> list[dict]:
        split = [(name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")) :])) for name in scores]
        return [{"dataset": dataset, "model": model, "prediction": prediction, "seed": 0, "sampling": name,
                 "sampler": sampler, "nfe": nfe, "inception_fid": score}
                for (name, score), (sampler, nfe) in zip(scores.items(), split, strict=True)]  # fmt: skip

    young = rows("v young", "v", {"unipc20": 10.5, "dpmpp20": 10.9, "ddpm50": 10.0, "ddpm1000": 5.0})
    # ddpm1000 is past the 50-NFE limit; unipc20 within 10% here (1.05x), dpmpp20 too (1.09x)
    assert choose_auto(young) == {"v": ("unipc", 20)}
    patches = rows("v old", "v", {"unipc20": 12.0, "dpmpp20": 10.5, "ddpm50": 10.0}, dataset="photos")
    assert choose_auto(young + patches) == {"v": ("dpmpp", 20)}  # unipc20 is 1.2x on the patches
    worse = rows("v worse", "v", {"unipc20": 13.0, "dpmpp20": 12.0, "ddpm50": 10.0})
    assert choose_auto(young + patches + worse) == {"v": ("ddpm", 50)}
    eps = rows("eps", "eps", {"unipc20": 20.0, "ddpm50": 10.0})
    assert choose_auto(young + eps) == {"eps": ("ddpm", 50), "v": ("unipc", 20)}
    first = rows("v a", "v", {"unipc20": 1.0, "dpmpp20": 2.0, "ddpm50": 2.0})
    assert choose_auto(first + rows("v b", "v", {"unipc20": 2.0, "dpmpp20": 2.0, "ddpm50": 1.0})) == {"v": None}
    dynamic = [{**row, "sampling": "dpmpp20-dynamic", "inception_fid": 1.0} for row in young[1:2]]
    assert choose_auto(young + dynamic) == {"v": ("unipc", 20)}  # a thresholded row is not a candidate
    # above the floor: unipc20 is 1.05x in raw FID but (10.5 - 8) / (10 - 8) = 1.25x above a floor of 8
    assert choose_auto(young, {"digits": 8.0}) == {"v": ("ddpm", 50)}


# The cells `sampler: auto` for v prediction was decided on (docs/sampling.md "In Inception FID"): the demo's
# recipe at two maturities on both data sets, and the shipped recipe's 10-minute digits, two training seeds each.
AUTO_V_TABLE = ["digits-v10", "digits-v40", "photos-v10", "photos-v40", "digits-shipped10"]


# The cells `sampler: auto` for noise prediction (eps) was decided on: the demo's recipe before v ("eps (today)")
# on the digits (1,848 and 7,084 steps) and the RGB patches (1,802 and 7,306), 10 and 40 minutes, two seeds each.
AUTO_EPS_TABLE = ["digits-eps10", "digits-eps40", "photos-eps10", "photos-eps40"]


@pytest.mark.parametrize("target,cells", [("v", AUTO_V_TABLE), ("eps", AUTO_EPS_TABLE)])
def test_the_auto_sampler_of_each_target_is_the_rule_of_its_table(target, cells):
    from benchmarks.sampler_quality import rule_of

    files = [ROOT / "benchmarks" / "results" / f"sampler_quality-{cell}.json" for cell in cells]
    reports = [json.loads(path.read_text()) for path in files]
    assert all(len({row["model"] for row in report["rows"]}) == 2 for report in reports)  # two training seeds
    assert all(row["prediction"] == target for report in reports for row in report["rows"])
    assert rule_of([str(path) for path in files]) == {target: AUTO[target]}


@pytest.mark.slow  # a benchmark end to end
def test_loss_terms_times_every_combination(capsys):
    from benchmarks import loss_terms

    loss_terms.main(["--base-channels", "8", "--batch-size", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert all(f"| {name:<36} |" in out for name in loss_terms.COMBINATIONS)


@pytest.mark.slow  # a benchmark end to end: one epoch of the demo recipe per variant
def test_ablation_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from benchmarks import ablation

    ablation.main(
        ["--epochs", "1", "--num-samples", "8", "--workdir", str(tmp_path), "--json", str(tmp_path / "a.json")]
    )
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [(row["terms"], row["seed"], row["steps"]) for row in rows] == [
        ("mse", 0, 140),
        ("mse + feature matching", 0, 140),
    ]
    assert rows[0]["sampling"] == "ddpm50" and "| mse | 140 | ddpm50 |" in capsys.readouterr().out


@pytest.mark.slow  # a benchmark end to end
def test_distillation_runs_end_to_end_with_tiny_budgets(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from PIL import Image

    from benchmarks import distillation

    argv = ["--teacher-steps", "4", "--fractions", "0.5", "--seeds", "0", "--num-samples", "8",
            "--workdir", str(tmp_path / "runs"), "--json", str(tmp_path / "d.json"),
            "--picture", str(tmp_path / "d.png")]  # fmt: skip
    distillation.main(argv)
    report = json.loads((tmp_path / "d.json").read_text())
    models = {row["model"] for row in report["rows"]}
    assert models == {"teacher 4", "student (teacher) of 4, 50% of its time", "student (data) of 4, 50% of its time"}
    teacher_rows = [row["sampling"] for row in report["rows"] if row["model"] == "teacher 4"]
    assert len(teacher_rows) == 1 + 12 + 3 and "unipc4" in teacher_rows
    assert all(row["classifier_fid"] > 0 and row["inception_fid"] > 0 for row in report["rows"])
    assert report["inception_floor"] > 0
    students = {row["sampling"] for row in report["rows"] if row["model"] != "teacher 4"}
    assert students == {"consistency4"}  # a 4-segment student (the default) draws with 4 steps only
    output = capsys.readouterr().out
    assert "| model | sampling | NFE | Inception FID (8 samples) | classifier FID |" in output
    assert "| student (teacher) of 4, 50% of its time | consistency4 | 4 |" in output
    kept = tmp_path / "runs" / "teacher" / "step=4-scores-8-both-fids.json"  # the teacher's scores, beside it
    scores = json.loads(kept.read_text())
    assert [row["classifier_fid"] for row in scores] == [
        row["classifier_fid"] for row in report["rows"] if row["model"] == "teacher 4"
    ]
    kept.write_text(json.dumps([{**scores[0], "classifier_fid": -1.0}, *scores[1:]]))  # to see it read back
    # a second variant in the same --workdir: its own folders, the teacher and its scores reused, both pictured
    distillation.main([*argv[:-4], "--targets", "teacher", "--distill-args", "--model.loss.segments 1",
                       "--gammas", "0", "0.9", "--json", str(tmp_path / "d1.json"),
                       "--picture", str(tmp_path / "d1.png")])  # fmt: skip
    rows = json.loads((tmp_path / "d1.json").read_text())["rows"]
    assert rows[0]["model"] == "teacher 4" and rows[0]["classifier_fid"] == -1.0  # not scored again
    students = [row["sampling"] for row in rows if row["seed"] is not None]  # each gamma where the sampler re-noises
    assert students == ["consistency1", "consistency2-gamma0", "consistency2", "consistency4-gamma0", "consistency4"]
    assert (tmp_path / "runs" / "student-4-teacher-seed0_model.loss.segments-1").is_dir()
    heights = [Image.open(tmp_path / name).size[1] for name in ("d.png", "d1.png")]
    assert heights[1] > heights[0]  # the teacher, the default student at 4 steps, then the new one at 1, 2, 4


@pytest.mark.slow  # a benchmark end to end
def test_likelihood_runs_end_to_end_with_tiny_settings(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from benchmarks import likelihood

    argv = ["--steps", "2", "--predictions", "v", "--images", "6", "--full-images", "1", "--timesteps", "3",
            "--num-samples", "8", "--workdir", str(tmp_path / "runs"), "--json", str(tmp_path / "l.json")]  # fmt: skip
    likelihood.main(argv)
    report = json.loads((tmp_path / "l.json").read_text())
    rows = report["rows"]
    assert [(row["prediction"], row["step"]) for row in rows] == [("v", 2)]
    assert rows[0]["inception_fid"] > 0 and rows[0]["classifier_fid"] > 0 and report["inception_floor"] > 0
    bounds = rows[0]["bounds"]
    assert [(b["split"], b["timesteps"], b["variance"]) for b in bounds] == [
        ("held-out", 3, "small"), ("held-out", 3, "large"), ("train", 3, "small"), ("held-out", "all", "small"),
        ("held-out", 3, "small"),
    ]  # fmt: skip
    assert all(b["bits_per_dim"] > 0 and b["seconds_per_1000_images"] > 0 for b in bounds)
    assert "| v, step 2 |" in capsys.readouterr().out


@pytest.mark.slow  # a benchmark end to end
def test_posthoc_ema_runs_end_to_end_with_tiny_settings(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from benchmarks import posthoc_ema

    argv = ["--steps", "4", "--every", "2", "--seeds", "0", "--sigma-rels", "0.05", "0.15", "--num-samples", "8",
            "--jobs", "2", "--workdir", str(tmp_path / "runs"), "--json", str(tmp_path / "p.json")]  # fmt: skip
    posthoc_ema.main(argv)
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [row["seed"] for row in rows] == [0] and set(rows[0]["posthoc"]) == {"0.05", "0.15"}
    assert sorted(p.name for p in (tmp_path / "runs/seed0/run/ema").iterdir()) == ["step=0000002.pt", "step=0000004.pt"]
    assert rows[0]["posthoc"]["0.15"]["inception_fid"] > 0 and rows[0]["fixed_ema"]["classifier_fid"] > 0
    output = capsys.readouterr().out
    inception, classifier = "| step=4, EMA: inception fid | seed 0 | mean |", "| step=4, EMA: classifier fid |"
    assert output.index(inception) < output.index(classifier)
    assert output.count("| post-hoc, sigma_rel 0.15 |") == 2


@pytest.mark.slow  # a benchmark end to end
def test_posthoc_ema_at_training_times_rebuilds_each_checkpoints_own_average_exactly(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    import torch

    from benchmarks import posthoc_ema
    from diffusion_lit.callbacks.posthoc_ema import at_checkpoint, reconstruct, snapshots

    argv = ["--minutes", "0.2", "0.4", "--every", "3", "--seeds", "0", "--sigma-rels", "0.05", "--num-samples", "8",
            "--workdir", str(tmp_path / "runs"), "--json", str(tmp_path / "p.json")]  # fmt: skip
    posthoc_ema.main(argv)
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [row["checkpoint"] for row in rows] == ["minutes=0.2", "minutes=0.4"] and rows[0]["step"] < rows[1]["step"]
    assert "| minutes=0.4, EMA: inception fid | seed 0 | mean |" in capsys.readouterr().out
    run, found = tmp_path / "runs/seed0", snapshots(tmp_path / "runs/seed0/run")
    for row in rows:  # a stored width, rebuilt at the checkpoint's step, is the checkpoint's own average
        used, step = at_checkpoint(found, run / f"{row['checkpoint']}.ckpt")
        assert row["step"] - 1 <= step <= row["step"] and step >= 1
        state, _ = reconstruct(used, 0.05, step)
        own = used[-1]["profiles"][0]
        assert own["sigma_rel"] == 0.05 and state.keys() == own["state_dict"].keys()
        assert all(torch.allclose(state[name], own["state_dict"][name], atol=1e-6) for name in state)
    assert len(used) > 1  # the last checkpoint's: snapshots before it, and its own averages


@pytest.mark.slow  # a benchmark end to end
def test_convergence_planned_gives_each_budget_its_own_run_whose_schedule_ends_with_it(tmp_path):
    pytest.importorskip("mlxtend")
    from torch import load as torch_load

    from benchmarks import convergence

    variant = "v, planned: 5% warm-up, WSD over the last 20%, EMA sigma_rel 0.1"
    convergence.main(["--variants", variant, "v", "--seeds", "0", "--budgets", "0.1", "0.2", "--planned",
                      "--jobs", "2", "--num-samples", "8", "--workdir", str(tmp_path / "runs"),
                      "--json", str(tmp_path / "c.json")])  # fmt: skip
    every = json.loads((tmp_path / "c.json").read_text())["rows"]
    rows = [row for row in every if row["variant"] == variant]
    assert [r["checkpoint"] for r in rows] == ["minutes=0.1", "minutes=0.2"]
    # the demo's recipe plans nothing: one run, saved at each budget
    assert (tmp_path / "runs" / "digits" / "v" / "seed0" / "minutes=0.1.ckpt").is_file()
    assert [r["checkpoint"] for r in every if r["variant"] == "v"] == ["minutes=0.1", "minutes=0.2"]
    assert rows[0]["step"] < rows[1]["step"]  # two runs, each of its own length
    for row, budget in zip(rows, ("0.1", "0.2"), strict=True):
        folder = tmp_path / "runs" / "digits" / "v-planned-5-warm-up-wsd-over-the-last-20-ema-sigma-rel-0-1" / "seed0"
        checkpoint = torch_load(folder / f"planned-{budget}min" / f"{row['checkpoint']}.ckpt", weights_only=True)
        assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] < 1e-3  # cooled down as its time ran out


def test_convergence_knows_which_recipes_are_planned_over_the_run():
    """Under --planned only these get a run per budget; the others' checkpoints at each budget are the same."""
    from benchmarks.recipes import VARIANTS, planned

    assert [name for name in VARIANTS if planned(VARIANTS[name])] == [name for name in VARIANTS if "planned" in name]
    assert not planned(["--model.warmup_steps", "320", "--model.lr_decay", "constant", "--model.ema_sigma_rel", "null"])
    assert planned(["--model.warmup_steps", "0.05"]) and planned(["--model.ema_sigma_rel", "0.1"])
    assert planned([]) and not planned(VARIANTS["v"])  # configs/demo.yaml plans its run; "v" is the demo's before
