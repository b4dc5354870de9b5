"""`lit-ddpm test`: FID/IS of a tiny checkpoint with a stand-in feature extractor, on CPU."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from conftest import ROOT, TINY, StandInExtractor, one_line_error
from diffusion_lit.callbacks import SampleQuality
from diffusion_lit.cli import main
from diffusion_lit.data import DemoMNISTDataModule
from diffusion_lit.diffusion import Sampling
from diffusion_lit.errors import UserError
from diffusion_lit.generation import shard
from diffusion_lit.module import DiffusionModule

DEMO = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY]
DPMPP5 = ["--evaluation.sampling.sampler", "dpmpp", "--evaluation.sampling.steps", "5"]


@pytest.fixture
def extractors(monkeypatch) -> list[StandInExtractor]:
    """Every extractor the runs load, in order; the real Inception is never loaded."""
    made = []

    def load(*args, **kwargs):
        made.append(StandInExtractor())
        return made[-1]

    monkeypatch.setattr("diffusion_lit.callbacks.quality.load_inception", load)
    return made


def run_test(checkpoint: Path, cache: Path, *extra: str) -> None:
    main(["test", *DEMO, "--ckpt_path", str(checkpoint), "--evaluation.num_samples", "10",
          "--evaluation.batch_size", "4", "--evaluation.cache_dir", str(cache), *extra])  # fmt: skip


def test_test_writes_scores_json_and_samples_and_reuses_reference(demo_checkpoint, extractors, tmp_path, capsys):
    cache = tmp_path / "cache"
    run_test(demo_checkpoint, cache, "--evaluation.save_samples", "both", *DPMPP5)
    stem = demo_checkpoint.with_name("last-fid-dpmpp5-n10-seed0")
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["fid"] > 0 and report["is"] >= 1.0
    assert report["num_samples"] == 10 and report["sampling"]["sampler"] == "dpmpp" and report["sampling"]["steps"] == 5
    assert report["reference"] == {
        "split": "train",
        "images": 4500,
        "statistics": str(cache / "demo-mnist-val500-seed0-train-1x28x28-stand-in.pt"),
    }
    assert report["checkpoint"] == str(demo_checkpoint.resolve()) and report["extractor"] == "stand-in"
    assert "TensorFlow" in report["resize"]
    images = np.load(stem.with_suffix(".npz"))["arr_0"]
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.uint8  # native channels, as `sample` writes
    assert (
        sorted(p.name for p in stem.iterdir())[:2] == ["000000.png", "000001.png"] and len(list(stem.iterdir())) == 10
    )
    out = capsys.readouterr().out
    assert "Sample quality" in out and "Likelihood (variational bound)" in out  # FID, IS and bits/dim (tiny.yaml)
    assert json.loads(demo_checkpoint.with_name("last-bpd-small-n8-all-seed0.json").read_text())["images"] == 8
    reference_calls = extractors[0].calls - 3  # 3 batches of samples, the rest was the 4,500 reference digits
    assert reference_calls > 0

    run_test(demo_checkpoint, cache, "--evaluation.save_samples", "npz", *DPMPP5)
    assert extractors[1].calls == 3  # the reference statistics came from the cache
    again = json.loads(stem.with_suffix(".json").read_text())
    assert again["fid"] == pytest.approx(report["fid"], rel=1e-9)  # same seed, same samples, same score
    assert np.array_equal(np.load(stem.with_suffix(".npz"))["arr_0"], images)


def test_test_reports_bits_per_dim_without_inception_when_fid_is_off(demo_checkpoint, extractors, tmp_path, capsys):
    run_test(demo_checkpoint, tmp_path / "cache", "--evaluation.fid", "false", "--evaluation.nll_images", "7",
             "--evaluation.nll_timesteps", "3")  # fmt: skip
    assert extractors == []  # no Inception: neither loaded nor asked for
    report = json.loads(demo_checkpoint.with_name("last-bpd-small-n7-k3-seed0.json").read_text())
    terms = report["terms"]
    assert set(terms) == {"prior", "diffusion", "decoder"} and terms["prior"] >= 0 and terms["decoder"] > 0
    assert report["bits_per_dim"] == pytest.approx(sum(terms.values()), rel=1e-9)
    assert 1 < report["bits_per_dim"] < 100 and report["standard_error"] > 0
    assert report["images"] == 7 and report["timesteps"] == 3 and report["pilot_images"] == 4
    assert report["split"] == "test" and report["checkpoint"] == str(demo_checkpoint.resolve())
    out = capsys.readouterr().out
    assert "bits/dim" in out and "Sample quality" not in out
    # all T = 20 terms: the same kind of number, without an estimate's noise (and no pilot)
    run_test(demo_checkpoint, tmp_path / "cache", "--evaluation.fid", "false", "--evaluation.nll_images", "7")
    full = json.loads(demo_checkpoint.with_name("last-bpd-small-n7-all-seed0.json").read_text())
    assert full["timesteps"] == "all" and full["pilot_images"] == 0
    assert full["bits_per_dim"] == pytest.approx(report["bits_per_dim"], rel=0.5)


def test_without_inception_weights_test_writes_bits_per_dim_then_says_fid_was_skipped(
    demo_checkpoint, tmp_path, capsys, monkeypatch
):  # fmt: skip
    def missing(*args, **kwargs):
        raise UserError("the Inception weights file was not found: pass SampleQuality.inception_weights")

    monkeypatch.setattr("diffusion_lit.callbacks.quality.load_inception", missing)
    line = one_line_error(capsys, "test", *DEMO, "--ckpt_path", str(demo_checkpoint), "--evaluation.nll_images",
                          "4", "--evaluation.nll_timesteps", "2")  # fmt: skip
    assert "FID and IS skipped: the Inception weights file was not found" in line and "bits/dim were written" in line
    assert demo_checkpoint.with_name("last-bpd-small-n4-k2-seed0.json").is_file()


@pytest.mark.parametrize("setting", ["run", "32-true"])
def test_evaluation_samples_in_the_runs_precision_and_scores_in_float32(demo_checkpoint, extractors, tmp_path,
                                                                        monkeypatch, setting):  # fmt: skip
    # Lightning autocasts only inside *_step; FID, IS and the bound run in epoch-end hooks. Under bf16-mixed the
    # network must sample in bf16 (as it trained), unless told 32-true; Inception and bits/dim stay float32.
    seen = {"network": set(), "extractor": set()}
    forward = StandInExtractor.forward

    def extract(self, images):
        seen["extractor"].add(torch.is_autocast_enabled("cpu"))
        return forward(self, images)

    monkeypatch.setattr(StandInExtractor, "forward", extract)
    sample = DiffusionModule.sample

    def draw(module, *args, **kwargs):  # the test steps' loss is autocast by Lightning itself: not counted here
        seen["network"].add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return sample(module, *args, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample", draw)
    run_test(demo_checkpoint, tmp_path / "cache", "--trainer.precision", "bf16-mixed", "--evaluation.precision",
             setting, "--evaluation.nll_images", "null", *DPMPP5)  # fmt: skip
    assert seen["network"] == ({(True, torch.bfloat16)} if setting == "run" else {(False, torch.bfloat16)})
    assert seen["extractor"] == {False}
    report = json.loads(demo_checkpoint.with_name("last-fid-dpmpp5-n10-seed0.json").read_text())
    assert report["precision"] == ("bf16-mixed" if setting == "run" else "32-true")


def test_the_set_of_samples_does_not_depend_on_the_number_of_processes():
    for num_samples, batch_size in [(10, 4), (10_000, 250), (7, 7), (3, 5)]:
        single = shard(num_samples, batch_size, 0, 1)
        for world in (2, 3, 8):
            shards = [shard(num_samples, batch_size, rank, world) for rank in range(world)]
            assert [batch for shard in shards for batch in shard] == single
        assert sum(size for _, size in single) == num_samples


def test_too_few_samples_is_refused():
    with pytest.raises(Exception, match="at least 2 samples"):
        SampleQuality(num_samples=1)


def _evaluate(world_size: int, cache: str, out: str, num_samples: int = 12, batch_size: int = 5) -> None:
    """`trainer.test` of a fixed random tiny model on `world_size` CPU processes (gloo)."""
    torch.manual_seed(0)
    module = tiny_demo_module()
    # 12 samples in batches of 5: the two processes get uneven shares (5 and 7 images).
    callback = SampleQuality(
        num_samples, Sampling(steps=3), batch_size=batch_size, cache_dir=cache, save_samples="npz", nll_images=11,
        nll_timesteps=4,
    )  # 4 pilot images on both, then 7 in groups of 1: shares of 3 and 4  # fmt: skip
    callback.extractor = StandInExtractor()
    trainer = Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp_spawn" if world_size > 1 else "auto",
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=1,
    )
    datamodule = DemoMNISTDataModule(batch_size=8)
    trainer.test(module, datamodule=datamodule, ckpt_path=None, verbose=False)


def tiny_demo_module() -> DiffusionModule:
    from conftest import randomise
    from diffusion_lit.nn import UNet

    unet = randomise(UNet(1, base_channels=8, num_heads=2, dropout=0.0))
    return DiffusionModule(unet, image_shape=(1, 28, 28), timesteps=20, ema_decay=None)


def scores_on_one_and_two_processes(tmp_path, monkeypatch, **evaluation) -> dict[int, dict]:
    """`_evaluate` on 1, then 2 processes (the second with the first's cached reference): each report, its images."""
    # One thread per process: otherwise the thread count changes the float summation order, and a few
    # pixels (3 of 28,224 when measured) round to the neighbouring uint8 value.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scores = {}
    try:
        for world_size in (1, 2):
            folder = tmp_path / f"world{world_size}"
            folder.mkdir()
            monkeypatch.chdir(folder)
            _evaluate(world_size, str(tmp_path / "cache"), str(folder), **evaluation)
            report = next((folder / "checkpoints").glob("*-fid-*.json"))
            scores[world_size] = json.loads(report.read_text())
            scores[world_size]["images"] = np.load(report.with_suffix(".npz"))["arr_0"]
    finally:
        torch.set_num_threads(threads)
    return scores


@pytest.mark.slow  # two spawned processes
def test_two_processes_give_the_same_fid_as_one(tmp_path, monkeypatch):
    scores = scores_on_one_and_two_processes(tmp_path, monkeypatch)
    assert scores[2]["processes"] == 2
    assert np.array_equal(scores[1]["images"], scores[2]["images"])
    assert scores[2]["fid"] == pytest.approx(scores[1]["fid"], rel=1e-6)
    assert scores[2]["is"] == pytest.approx(scores[1]["is"], rel=1e-6) and scores[1]["is"] > 1.0
    bounds = {w: json.loads(next((tmp_path / f"world{w}" / "checkpoints").glob("*-bpd-*.json")).read_text())
              for w in (1, 2)}  # fmt: skip
    assert bounds[2]["processes"] == 2 and bounds[2]["images"] == 11
    for key in ("bits_per_dim", "standard_error"):
        assert bounds[2][key] == bounds[1][key]  # the same per-image numbers, summed in the same order
    assert bounds[2]["terms"] == bounds[1]["terms"]


@pytest.mark.slow  # two spawned processes
def test_a_process_that_draws_no_batch_changes_nothing(tmp_path, monkeypatch):
    # 4 samples in one batch of 5: rank 1 draws nothing (as FID while fitting on more than 8 GPUs, `test` on more
    # than 40). It must neither fail nor hang, and the score and the images are the one process's.
    scores = scores_on_one_and_two_processes(tmp_path, monkeypatch, num_samples=4, batch_size=5)
    assert scores[2]["processes"] == 2 and scores[2]["images"].shape == (4, 28, 28, 1)
    assert np.array_equal(scores[1]["images"], scores[2]["images"])
    assert scores[2]["fid"] == pytest.approx(scores[1]["fid"], rel=1e-6)


def test_fit_logs_val_fid_and_keeps_the_best_checkpoint(image_folder, extractors, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", f"{ROOT}/configs/folder.yaml", "--config", TINY, "--config",
          f"{ROOT}/configs/ablation/mse_only.yaml", "--trainer.fast_dev_run", "false", "--trainer.max_epochs", "5",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
          "--data.init_args.root", str(image_folder), "--data.init_args.image_size", "16",
          "--evaluation.every_n_epochs", "5", "--evaluation.fit_num_samples", "4", "--evaluation.batch_size", "4",
          "--evaluation.cache_dir", str(tmp_path / "cache")])  # fmt: skip
    assert [p.name for p in (tmp_path / "checkpoints" / "folder").glob("best-fid-*")] == ["best-fid-epoch=4.ckpt"]
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "val/fid" in metrics.splitlines()[0] and "val/is" in metrics.splitlines()[0]
    assert len(extractors) == 1 and extractors[0].calls == 1 + 3  # one sample batch, 3 batches of 9 real images
    # the curve against training images seen: 9 images, batches of 4 (the last dropped), 2 steps x 5 epochs
    (record,) = [json.loads(line) for line in (tmp_path / "checkpoints" / "folder" / "fid.jsonl").open()]
    assert record["step"] == 10 and record["mimg"] == 10 * 4 / 1e6 and record["epoch"] == 4
    logged = [row for row in csv.DictReader(metrics.splitlines()) if row["val/fid"]]
    assert float(logged[0]["val/fid"]) == pytest.approx(record["fid"])
    assert float(logged[0]["val/mimg"]) == pytest.approx(4e-5)
