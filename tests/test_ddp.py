"""fit on 2 CPU processes (gloo): both ranks end with the same weights and the same EMA."""

import functools
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from conftest import randomise
from diffusion_lit.callbacks.ema import EMA
from diffusion_lit.module import DiffusionModule
from diffusion_lit.nn import UNet


class SaveRankState(Callback):
    """After the last training epoch, each rank saves its weights, its EMA weights and the data it saw."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[1].cpu())

    def on_train_epoch_end(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        state = {
            "weights": {k: v.cpu() for k, v in pl_module.state_dict().items()},
            "ema": {k: ema.average[k].cpu() for k in pl_module.state_dict()},
            "seen": torch.cat(self.seen),
            "step": trainer.global_step,
        }
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow  # two spawned processes
def test_two_process_ddp_fit_keeps_weights_and_ema_identical(tmp_path):
    torch.manual_seed(0)
    unet = randomise(UNet(1, base_channels=8, num_heads=2, dropout=0.0))
    adam = functools.partial(torch.optim.Adam, lr=1e-3, fused=True)
    module = DiffusionModule(unet, optimizer=adam, image_shape=(1, 16, 16), timesteps=20, ema_decay=0.9)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    images = torch.rand(32, 1, 16, 16) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.arange(32)), batch_size=4, shuffle=True)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[SaveRankState(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(module, loader)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 4  # 32 images, 2 processes, batch 4 per process
    # The sampler shards the data: the ranks saw disjoint halves, together all of it.
    assert sorted(torch.cat([rank0["seen"], rank1["seen"]]).tolist()) == list(range(32))
    for name in rank0["weights"]:
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
        assert torch.equal(rank0["ema"][name], rank1["ema"][name]), name
    assert any(not torch.equal(rank0["weights"][k], initial[k]) for k in initial)  # it did train
    assert any(not torch.equal(rank0["ema"][k], rank0["weights"][k]) for k in initial)  # the EMA lags
