import functools

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lit.callbacks import LastCheckpoint, NonFiniteGuard
from diffusion_lit.callbacks.ema import EMA, warmup_decay
from diffusion_lit.errors import UserError
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet


def tiny_module(lr: float = 2e-4, fused: bool = True, **kwargs) -> DiffusionModule:
    unet = UNet(1, base_channels=8, num_heads=2, dropout=0.0)
    optimizer = functools.partial(torch.optim.Adam, lr=lr, fused=fused)
    return DiffusionModule(unet, optimizer=optimizer, image_shape=(1, 28, 28), timesteps=20, **kwargs)


def test_loss_is_mse_on_eps_target():
    module = tiny_module()
    x0 = torch.randn(2, 1, 28, 28)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 15])
    # The zero-initialised UNet outputs 0, so the eps-MSE is the mean square of the noise.
    terms = module.losses(x0, noise, t)
    assert set(terms) == {"mse", "loss"}  # the extra terms are off by default
    assert terms["loss"].item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(UserError, match="in_channels to 3"):
        DiffusionModule(UNet(1, base_channels=8, num_heads=2), image_shape=(3, 32, 32))


def test_sample_range_shape_and_mode():
    module = tiny_module()
    module.train()
    images = module.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert module.training  # restored after sampling in eval mode


def test_warmup_schedule():
    module = tiny_module(warmup_steps=4, lr=1.0)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_ema_warmup_formula():
    # After n updates the decay is min(decay, (1 + n) / (10 + n)): n = 1 -> 2/11, n = 100 -> 0.9.
    assert warmup_decay(0.9, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9, 100) == 0.9
    assert warmup_decay(0.999, 0) == pytest.approx(0.1)


def test_ema_matches_torch_averaged_model(tmp_path):
    """Our host-counted foreach update gives what torch's AveragedModel gives for the same formula."""
    from copy import deepcopy

    from torch.optim.swa_utils import AveragedModel

    module = tiny_module(lr=1e-2, ema_decay=0.5)
    weights = WeightsAfterEachStep()
    trainer = quiet_trainer(tmp_path, max_steps=6, num_sanity_val_steps=0, callbacks=[weights])
    trainer.fit(module, random_digits())
    assert len(weights.snapshots) == 6

    def ema(average, current, n):
        return torch.lerp(average, current, 1 - min(0.5, (1 + n.item()) / (10 + n.item())))

    replay = deepcopy(module)
    reference = AveragedModel(replay, avg_fn=ema, use_buffers=True)
    for snapshot in weights.snapshots:
        with torch.no_grad():
            for parameter, value in zip(replay.parameters(), snapshot, strict=True):
                parameter.copy_(value)
        reference.update_parameters(replay)
    # After fitting, the module holds the average (EMA.teardown).
    for ours, theirs in zip(module.parameters(), reference.module.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(module.parameters()), weights.snapshots[-1][0])  # an average, not the last step


def test_the_ema_averages_the_weights_alone_in_their_dtype_and_strides(tmp_path):
    """torch's foreach ops take their fast path (a few kernels for all tensors, not one per tensor) only when
    every tensor of the lists has one dtype and the average has its weight's strides: the schedule's float64
    tables stay out, and channels-last weights get channels-last averages."""
    seen = {}

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
            weights = dict(pl_module.named_parameters())
            seen["names"] = set(ema.average)
            seen["mismatched"] = [n for n, a in ema.average.items() if a.stride() != weights[n].stride()]
            seen["dtypes"] = {a.dtype for a in ema.average.values()}

    module = tiny_module(channels_last=True)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[Probe()])
    trainer.fit(module, random_digits())
    assert seen["names"] == {name for name, _ in module.named_parameters()}  # no schedule table
    assert seen["dtypes"] == {torch.float32} and not seen["mismatched"]
    assert module.unet.stem.weight.is_contiguous(memory_format=torch.channels_last)


def quiet_trainer(tmp_path, **kwargs) -> Trainer:
    """A Trainer with no logger, checkpointing, progress bar or summary."""
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def random_digits() -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(8, 1, 28, 28) * 2 - 1), batch_size=4)


def test_module_built_in_python_loads_from_its_checkpoint(tmp_path):
    module = tiny_module(lr=1e-3)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, random_digits())
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    loaded = DiffusionModule.load_from_checkpoint(tmp_path / "python.ckpt", weights_only=True)
    assert loaded.unet.config == module.unet.config and loaded.hparams.optimizer["init_args"]["lr"] == 1e-3
    built = loaded.configure_optimizers()["optimizer"]  # the optimizer is rebuilt as it was given
    assert isinstance(built, torch.optim.Adam) and built.defaults["lr"] == 1e-3 and built.defaults["fused"]
    assert torch.equal(loaded.unet.stem.weight, module.unet.stem.weight)  # after fit, the module holds the EMA


def test_validation_epoch_hooks_see_the_ema_weights(tmp_path):
    # A callback listed after the EMA one must still see the EMA weights in its validation-epoch hooks.
    seen = {}

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # runs after the EMA update
            ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
            seen["training"] = pl_module.unet.stem.weight.clone()
            seen["ema"] = ema.average["unet.stem.weight"].clone()

        def on_validation_epoch_end(self, trainer, pl_module):
            seen["during"] = pl_module.unet.stem.weight.clone()

        def on_train_epoch_end(self, trainer, pl_module):
            seen["after"] = pl_module.unet.stem.weight.clone()

    module = tiny_module(lr=1e-2, ema_decay=None)
    trainer = quiet_trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0, callbacks=[EMA(0.9), Probe()])
    trainer.fit(module, random_digits(), random_digits())
    assert not torch.equal(seen["training"], seen["ema"])
    assert torch.equal(seen["during"], seen["ema"])
    assert torch.equal(seen["after"], seen["training"])


class WeightsAfterEachStep(Callback):
    """Copies of the weights and of Adam's state after every training batch."""

    def __init__(self):
        self.snapshots, self.adam = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append([p.detach().clone() for p in pl_module.parameters()])
        state = trainer.optimizers[0].state
        self.adam.append([{k: v.clone() for k, v in state[p].items()} for p in pl_module.parameters()])


def run_with_bad_batches(
    tmp_path, bad: set[int], max_steps: int, max_nonfinite_steps: int = 50, **module_kwargs
) -> tuple[DiffusionModule, NonFiniteGuard, Callback]:
    """Fit a tiny model on 1x28x28 batches of 2 where the batches in `bad` contain a NaN pixel."""
    images = torch.rand(32, 1, 28, 28) * 2 - 1
    for index in bad:
        images[2 * index, 0, 0, 0] = float("nan")
    loader = DataLoader(TensorDataset(images, torch.zeros(32, dtype=torch.long)), batch_size=2)
    module = tiny_module(ema_decay=None, **module_kwargs)
    weights, guard = WeightsAfterEachStep(), NonFiniteGuard(max_nonfinite_steps)
    trainer = Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
        callbacks=[LastCheckpoint(tmp_path / "ckpt"), guard, weights], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loader)
    return module, guard, weights


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_step_is_skipped_and_leaves_the_weights_alone(tmp_path, fused):
    _, guard, after = run_with_bad_batches(tmp_path, {2}, max_steps=4, fused=fused)
    assert guard.skipped_steps == 1

    def changed(snapshots):
        return [
            any(not torch.equal(a, b) for a, b in zip(before, later, strict=True))
            for before, later in zip(snapshots, snapshots[1:], strict=False)
        ]

    assert changed(after.snapshots) == [True, False, True]  # step 3 (the NaN batch) changed nothing
    moments = [[t for state in step for t in state.values()] for step in after.adam]
    assert changed(moments) == [True, False, True]  # nor Adam's moments and step count
    assert int(after.adam[-1][0]["step"]) == 3


@pytest.mark.parametrize("fused", [True, False])
def test_too_many_nonfinite_steps_stop_with_a_good_checkpoint(tmp_path, fused):
    # Checked every 3 steps: after step 3 the streak is 2 (steps 2-3), after step 6 it is 5.
    with pytest.raises(UserError, match="the last 5 optimizer steps had non-finite gradients"):
        run_with_bad_batches(tmp_path, {1, 2, 3, 4, 5}, max_steps=12, max_nonfinite_steps=3, fused=fused)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5  # Lightning counts the skipped steps too
    assert all(value.isfinite().all() for value in checkpoint["state_dict"].values() if value.is_floating_point())


def test_a_streak_that_ends_before_the_check_does_not_stop_training(tmp_path):
    module, guard, _ = run_with_bad_batches(tmp_path, {1, 2, 3}, max_steps=9, max_nonfinite_steps=3)
    assert guard.skipped_steps == 3 and module.global_step == 9


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clipping_with_fused_adam_under_mixed_precision(tmp_path, precision):
    """Lightning's mixed-precision plugin refuses to clip for fused Adam; the module clips itself, after
    the fp16 loss scaler has unscaled, and the fused step must not unscale a second time."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "16-mixed" else None
    plugin = MixedPrecision(precision, "cpu", scaler)  # a Trainer refuses precision="16-mixed" on a CPU
    module = tiny_module(ema_decay=None, lr=1e-3)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=1, plugins=[plugin], gradient_clip_val=1e-3)
    trainer.fit(module, random_digits())
    grads = [p.grad for p in module.parameters()]
    assert torch.nn.utils.get_total_norm(grads) == pytest.approx(1e-3, rel=1e-3)  # unscaled, then clipped
    for parameter, start, grad in zip(module.parameters(), before, grads, strict=True):
        # Adam's first step: m^ = g, v^ = g^2, so each weight moves by lr * g / (|g| + eps).
        torch.testing.assert_close(parameter.detach() - start, -1e-3 * grad / (grad.abs() + 1e-8), rtol=1e-4, atol=1e-8)
