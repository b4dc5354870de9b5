"""What every lit-ddpm datamodule shares: (image, label) batches in [-1, 1], loaders that resume exactly,
flips drawn on the training device, and what FID needs (`metrics.ReferenceData`)."""

import warnings
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchvision import transforms

from diffusion_lit.errors import UserError, check_range
from diffusion_lit.runs import run_seed
from diffusion_lit.signals import ShieldedLoader, WorkersBornShielded, shield_worker

# torchdata 0.11 calls a torch function that newer torch marks deprecated, once per loader: not ours to fix.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

TO_SIGNED = transforms.Normalize(0.5, 0.5)  # [0, 1] -> [-1, 1]
PLAIN = transforms.Compose([transforms.ToTensor(), TO_SIGNED])  # an image as a tensor in [-1, 1]
Split = Literal["train", "test"]


class EpochSampler(StatefulDistributedSampler):
    """torchdata's resumable sampler, whose state also holds its epoch, and whose state saved after an epoch's
    last batch resumes with the next epoch: Lightning starts that epoch itself, and a sampler with less than a
    batch left to yield would make it an empty one (and the run an epoch ahead of the uninterrupted one).

    The epoch is in the state because a loader with workers draws its first batches' indices as soon as its
    iterator is made, and a resumed Lightning run makes it before it tells the sampler the epoch: without it, a
    run resumed in epoch 3 went on with epoch 0's order.

    Args:
        batch_size: the loader's batch size (incomplete batches are dropped).
        **kwargs: those of torch's DistributedSampler.
    """

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size

    def state_dict(self) -> dict:
        """The position in the epoch, and the epoch."""
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position in the epoch and the epoch (a state of an earlier lit-ddpm has none: the loop sets
        it); a finished epoch is the start of the next."""
        finished = self.num_samples - state_dict.get("yielded", 0) < self.batch_size
        if "epoch" in state_dict:
            self.set_epoch(state_dict["epoch"] + finished)
        super().load_state_dict({"yielded": 0 if finished else state_dict["yielded"]})


class ResumableLoader(WorkersBornShielded, StatefulDataLoader):
    """torchdata's StatefulDataLoader, resumed through its sampler alone.

    Its state is saved in torchdata's layout, which differs with and without workers (and torchdata refuses a
    state of another worker count with a bare assertion). The images are a map-style dataset and the workers
    hold no state, so where the next batch comes from is the sampler's state: it is read out of either layout
    and given to the sampler, and the loader starts a fresh iterator from there. A run can so resume with
    another `num_workers` than it was saved with.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        """The sampler's position and epoch from a saved loader state; the loader itself starts afresh."""
        main = state_dict.get("_snapshot", {}).get("_main_snapshot", state_dict)  # with workers, or without
        sampler_state = (main.get("_sampler_iter_state") or {}).get("sampler_state")
        if sampler_state is not None:
            self.sampler.load_state_dict(sampler_state)
        super().load_state_dict({})


class ImageDataModule(LightningDataModule):
    """Shared loaders; subclasses set `image_shape` and fill `train_set` / `val_set` in `setup`.

    The training loader is a torchdata StatefulDataLoader whose sampler shuffles by (seed_everything's seed,
    epoch) and shares the images out to the processes: Lightning saves its position in every checkpoint, so
    a resumed run continues the interrupted epoch, and the ones after it, with the very batches the
    uninterrupted run would have had, on one process or many. Nothing random runs in the loader: horizontal
    flips (`hflip`) are drawn in `on_after_batch_transfer`, on the training device, from the training step's
    random stream (which DiffusionModule seeds for each batch), so data-loading workers hold no random state.
    """

    image_shape: tuple[int, int, int]
    num_classes: int | None = 10  # the labels' range, for class-conditional models
    hflip = False

    def __init__(self, batch_size: int = 64, num_workers: int = 4) -> None:
        super().__init__()
        check_range(type(self).__name__, 1, batch_size=batch_size)
        check_range(type(self).__name__, 0, num_workers=num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _options(self) -> dict:
        """What every loader of this datamodule shares."""
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                   "worker_init_fn": shield_worker if self.num_workers > 0 else None}  # fmt: skip
        return {"batch_size": self.batch_size, "pin_memory": torch.cuda.is_available(), **workers}

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, this process's share; the last incomplete batch is dropped, so a set
        smaller than one batch per process is refused."""
        processes, rank = getattr(self.trainer, "world_size", 1), getattr(self.trainer, "global_rank", 0)
        if len(self.train_set) < self.batch_size * processes:
            raise UserError(
                f"the training set has {len(self.train_set)} images, fewer than one batch of {self.batch_size}"
                + (f" on each of {processes} processes" if processes > 1 else "")
                + f"; lower {type(self).__name__}.batch_size to at most {len(self.train_set) // processes}"
            )
        # Shuffled by (seed, epoch) as Lightning's own DistributedSampler is, which it therefore keeps.
        sampler = EpochSampler(
            self.train_set,
            self.batch_size,
            num_replicas=processes,
            rank=rank,
            shuffle=True,
            seed=run_seed(),
            drop_last=True,
        )
        return ResumableLoader(self.train_set, sampler=sampler, drop_last=True, **self._options())

    def val_dataloader(self) -> DataLoader:
        """Held-out batches in a fixed order."""
        return ShieldedLoader(self.val_set, **self._options())

    def test_dataloader(self) -> DataLoader:
        """The held-out batches again."""
        return self.val_dataloader()

    def images(self, batch, training: bool) -> list[Tensor]:
        """The batch as [images in [-1, 1], labels] on its device; datamodules that load indices override it."""
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> list[Tensor]:
        """Images and labels on the device; while training with `hflip`, each image flipped with probability 1/2."""
        training = self.trainer is not None and self.trainer.training
        images, labels = self.images(batch, training)
        if self.hflip and training:
            flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
            images = torch.where(flip, images.flip(-1), images)
        return [images, labels]

    def reference_set(self, split: Split) -> Dataset:
        """FID's real images: the training images without augmentation, or the held-out ones ("test")."""
        raise NotImplementedError

    def reference_name(self, split: Split) -> str:
        """A name for `reference_set(split)` that changes whenever its images do."""
        raise NotImplementedError
