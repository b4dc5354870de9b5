"""Post-hoc EMA: the power-function profiles against their closed forms, the reconstruction against a brute-force
average of every training step's weights, exact resume, and `lit-ddpm ema`."""

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import ONE_STEP, ROOT, TINY, fill
from diffusion_lit.callbacks import LastCheckpoint
from diffusion_lit.callbacks.posthoc_ema import (
    PostHocEMA,
    at_checkpoint,
    coefficients,
    gamma_of,
    profile,
    reconstruct,
    sigma_rel_of,
    snapshots,
)
from diffusion_lit.cli import main
from diffusion_lit.errors import UserError
from diffusion_lit.loading import load_checkpoint


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    with pytest.raises(UserError, match="sigma_rel must lie in"):
        gamma_of(0.3)


def test_profile_is_the_unrolled_update_and_has_the_stated_width():
    gamma, last = gamma_of(0.1), 2000
    steps = torch.arange(1, last + 1, dtype=torch.float64)
    weights = profile(gamma, last, steps)
    # The update run on one-hot "weights": the average after `last` steps is each step's share.
    average = torch.zeros(last, dtype=torch.float64)
    for t in range(1, last + 1):
        beta = (1 - 1 / t) ** (gamma + 1)
        average *= beta
        average[t - 1] += 1 - beta
    torch.testing.assert_close(weights, average, rtol=1e-9, atol=1e-15)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    mean = (weights * (steps - 0.5)).sum()
    width = ((weights * (steps - 0.5 - mean) ** 2).sum()).sqrt() / last
    assert width.item() == pytest.approx(0.1, rel=1e-3)  # sigma_rel, whatever the length of the run
    assert (profile(gamma, 500, steps)[500:] == 0).all()  # nothing after the average's own step


def test_a_stored_profile_is_reconstructed_as_itself():
    stored = [(gamma_of(s), step) for step in (100, 200, 300) for s in (0.05, 0.10)]
    x = coefficients(stored, stored[3])
    torch.testing.assert_close(x, torch.eye(6, dtype=torch.float64)[3], atol=1e-6, rtol=0)


def test_the_averages_start_on_the_device_training_will_use():
    # Lightning calls the callbacks' setup before it moves the module, with `device` already saying where it
    # will go (a GPU run: cuda, the weights still on the CPU). The averages must be made there.
    module = Wanderer()
    module._device = torch.device("meta")  # what Lightning's _call_setup_hook does, for "cuda:0"
    keeper = PostHocEMA()
    keeper.setup(None, module, "fit")
    assert {t.device.type for average in keeper.averages for t in average} == {"meta"}
    assert module.layer.weight.device.type == "cpu"


class Wanderer(pl.LightningModule):
    """A toy model whose weights keep moving: SGD on noise, every step's weights recorded."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_index):
        noise = torch.Generator().manual_seed(self.global_step)  # the step's data, whatever the loader's position
        x, y = torch.randn(4, 3, generator=noise), torch.randn(4, 2, generator=noise)
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def on_train_batch_end(self, *args):
        self.seen.append(torch.cat([p.detach().flatten().clone() for p in self.layer.parameters()]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def fit_wanderer(folder, max_steps: int, ckpt_path=None) -> Wanderer:
    torch.manual_seed(0)
    data = TensorDataset(torch.zeros(512))
    model = Wanderer()
    trainer = pl.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=True, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
        callbacks=[PostHocEMA(every_n_train_steps=20), LastCheckpoint(str(folder / "run"), every_n_train_steps=30)],
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return model


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state["layer.weight"].flatten(), state["layer.bias"].flatten()]).double()


def test_reconstruction_matches_a_brute_force_average_of_every_steps_weights(tmp_path):
    model = fit_wanderer(tmp_path, 120)
    found = snapshots(tmp_path / "run")
    assert [s["global_step"] for s in found] == [20, 40, 60, 80, 100, 120]
    history = torch.stack(model.seen).double()  # (120, 8): the weights after steps 1..120
    steps = torch.arange(1, 121, dtype=torch.float64)
    for snapshot in found:  # each stored average is the closed-form profile's average of the history
        for stored in snapshot["profiles"]:
            exact = profile(stored["gamma"], snapshot["global_step"], steps) @ history
            torch.testing.assert_close(flat(stored["state_dict"]), exact, rtol=1e-5, atol=1e-6)
    stored = torch.stack([profile(p["gamma"], s["global_step"], steps) for s in found for p in s["profiles"]])
    for sigma_rel in (0.07, 0.12):  # between and beyond the stored 0.05 and 0.10
        state, x = reconstruct(found, sigma_rel)
        wanted = profile(gamma_of(sigma_rel), 120, steps)
        assert (x @ stored - wanted).norm() < 0.03 * wanted.norm()  # measured: 2.1% for both
        brute = wanted @ history
        error = (flat(state) - brute).norm()
        nearest = min((flat(p["state_dict"]) - brute).norm() for p in found[-1]["profiles"])
        assert error < 0.15 * nearest, (sigma_rel, error, nearest)  # far closer than either stored length


def test_resumed_run_saves_the_same_snapshots(tmp_path):
    fit_wanderer(tmp_path / "whole", 120)
    fit_wanderer(tmp_path / "parts", 60)
    fit_wanderer(tmp_path / "parts", 120, ckpt_path=tmp_path / "parts" / "run" / "last.ckpt")
    for whole, parts in zip(snapshots(tmp_path / "whole" / "run"), snapshots(tmp_path / "parts" / "run"), strict=True):
        assert whole["global_step"] == parts["global_step"]
        for a, b in zip(whole["profiles"], parts["profiles"], strict=True):
            for name in a["state_dict"]:
                assert torch.equal(a["state_dict"][name], b["state_dict"][name]), (whole["global_step"], name)


def test_a_fresh_run_is_refused_where_another_runs_snapshots_are(tmp_path):
    fit_wanderer(tmp_path, 40)
    (tmp_path / "run" / "last.ckpt").unlink()  # only the snapshots are left
    with pytest.raises(UserError, match=r"ema/step=0000020.pt \(step 20\) of another run"):
        fit_wanderer(tmp_path, 40)


@pytest.fixture(scope="module")
def _posthoc_run(tmp_path_factory):
    """The tiny demo trained for 5 steps with PostHocEMA snapshots every 2: its folder."""
    folder = tmp_path_factory.mktemp("posthoc")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("WANDB_MODE", "disabled")
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, *ONE_STEP,
              "--trainer.max_steps", "5", "--trainer.logger", "false",
              "--trainer.callbacks+=diffusion_lit.callbacks.PostHocEMA",
              "--trainer.callbacks.every_n_train_steps=2"])  # fmt: skip
    return folder / "checkpoints" / "demo"


@pytest.fixture
def posthoc_run(_posthoc_run, tmp_path, monkeypatch):
    """A copy of that run's folder, the working directory being tmp_path."""
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(_posthoc_run, tmp_path / "checkpoints" / "demo"))


def test_lit_ddpm_ema_writes_checkpoints_that_sample_and_test_read(posthoc_run, capsys):
    run = posthoc_run
    assert sorted(p.name for p in (run / "ema").iterdir()) == [f"step={s:07d}.pt" for s in (2, 4, 5)]
    main(["ema", "--run", str(run), "--sigma_rel", "[0.1, 0.2]"])
    assert "ema-0.100-step=5.ckpt" in capsys.readouterr().out
    module = load_checkpoint(str(run / "ema-0.100-step=5.ckpt"))
    stored = snapshots(run)[-1]["profiles"][1]  # sigma_rel 0.10 at step 5: reconstructed as itself
    assert stored["sigma_rel"] == 0.1
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, stored["state_dict"][name], rtol=1e-5, atol=1e-6)
    main(["sample", "--ckpt_path", str(run / "ema-0.200-step=5.ckpt"), "--num_samples", "2", "--steps", "2"])
    main(["ema", "--run", str(run), "--sigma_rel", "[0.1]", "--step", "4"])
    assert (run / "ema-0.100-step=4.ckpt").is_file()


def test_a_checkpoint_adds_its_own_averages_to_the_snapshots_before_it(posthoc_run):
    found = snapshots(posthoc_run)  # steps 2, 4 and 5; last.ckpt at step 5
    used, step = at_checkpoint(found, posthoc_run / "last.ckpt")
    assert step == 5 and [s["global_step"] for s in used] == [2, 4, 5]
    for own, saved in zip(used[-1]["profiles"], found[-1]["profiles"], strict=True):  # the same averages, both ways
        assert own["sigma_rel"] == saved["sigma_rel"] and own["gamma"] == saved["gamma"]
        for name, tensor in saved["state_dict"].items():
            torch.testing.assert_close(own["state_dict"][name], tensor, rtol=0, atol=0)
    state, _ = reconstruct(used, 0.05, step)  # a stored width at the checkpoint's step: that average itself
    assert state.keys() == used[-1]["profiles"][0]["state_dict"].keys()
    for name, tensor in used[-1]["profiles"][0]["state_dict"].items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6)
    plain = torch.load(posthoc_run / "last.ckpt", weights_only=True)
    plain["callbacks"] = {key: value for key, value in plain["callbacks"].items() if "PostHocEMA" not in key}
    torch.save(plain, posthoc_run / "plain.ckpt")  # as a run trained without the callback leaves it
    with pytest.raises(UserError, match="plain.ckpt holds no post-hoc EMA averages"):
        at_checkpoint(found, posthoc_run / "plain.ckpt")


def test_lit_ddpm_ema_keeps_the_best_by_fid(posthoc_run, monkeypatch, capsys):
    scores = {"0.050": 3.0, "0.100": 2.0, "0.200": 5.0}
    monkeypatch.setattr("diffusion_lit.cli.ema.fid_of", lambda path, config: scores[path.name.split("-")[1]])
    main(["ema", "--run", str(posthoc_run), "--sigma_rel", "[0.05, 0.1, 0.2]", "--config", "unused.yaml"])
    assert "kept sigma_rel 0.1" in capsys.readouterr().out
    assert sorted(p.name for p in posthoc_run.glob("ema-*.ckpt")) == ["ema-best.ckpt"]
    assert torch.load(posthoc_run / "ema-best.ckpt", weights_only=True)["posthoc_ema"]["sigma_rel"] == 0.1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--run", "nowhere"], "--run nowhere has no last.ckpt"),
        (["--run", "{run}", "--sigma_rel", "[0.5]"], "sigma_rel must lie in"),
        (["--run", "{run}", "--step", "3"], "no snapshot at step 3: the run's snapshots are at steps 2, 4, 5"),
        (["--run", "{bare}"], "holds no post-hoc EMA snapshots"),
    ],
)
def test_lit_ddpm_ema_bad_input_is_one_line(posthoc_run, arguments, message, capsys):
    bare = posthoc_run.parent / "bare"
    bare.mkdir()
    shutil.copy(posthoc_run / "last.ckpt", bare)
    with pytest.raises(SystemExit) as exit_info:
        main(["ema", *[a.format(run=posthoc_run, bare=bare) for a in arguments]])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0 and message in error, error


def test_a_full_disk_is_one_line_for_a_snapshot_while_training_and_for_lit_ddpm_ema(
    tmp_path, monkeypatch, capsys, small_disk, posthoc_run
):
    import errno

    from diffusion_lit import files

    real = files.save

    def full_for_snapshots(obj, path):
        if "ema" in Path(path).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(files, "save", full_for_snapshots)
    (tmp_path / "fresh").mkdir()
    monkeypatch.chdir(tmp_path / "fresh")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", TINY, *ONE_STEP,
              "--trainer.max_steps", "5", "--trainer.logger", "false", "--name", "full",
              "--trainer.callbacks+=diffusion_lit.callbacks.PostHocEMA",
              "--trainer.callbacks.every_n_train_steps=2"])  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "could not write checkpoints/full/ema/step=0000002.pt (no space" in error
    assert torch.load("checkpoints/full/last.ckpt", weights_only=True)["global_step"] == 2  # the run is saved there
    monkeypatch.setattr(files, "save", real)

    run = Path(shutil.copytree(posthoc_run, small_disk / "demo"))  # `lit-ddpm ema` onto a disk that is full
    fill(small_disk, leave=4096)
    with pytest.raises(SystemExit):
        main(["ema", "--run", str(run), "--sigma_rel", "[0.1]"])
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"(no space left on device: {small_disk}, the filesystem of {run})" in error
    assert not list(run.glob("*ema-*")) and not list(run.glob(".*"))
