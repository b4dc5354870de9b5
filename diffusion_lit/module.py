"""DiffusionModule: thin Lightning glue around a UNet, a NoiseSchedule and the loss."""

import os
import warnings
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from diffusion_lit.callbacks.ema import EMA
from diffusion_lit.checkpoints import check_checkpoint, check_finite, check_weights_fit, component_config, upgraded
from diffusion_lit.diffusion.augment import augment, check_augment
from diffusion_lit.diffusion.consistency import ConsistencyLoss
from diffusion_lit.diffusion.guidance import drop_labels, guided
from diffusion_lit.diffusion.losses import DiffusionLoss
from diffusion_lit.diffusion.samplers import reverse_process
from diffusion_lit.diffusion.sampling import Sampling
from diffusion_lit.diffusion.schedule import NoiseSchedule, Prediction, ScheduleName
from diffusion_lit.errors import UserError, check_range
from diffusion_lit.nn import UNet
from diffusion_lit.optim import DEFAULT_OPTIMIZER, build, clip_gradients, optimizer_config, scheduled
from diffusion_lit.pixels import to_unit
from diffusion_lit.plan import Decay, RunPlan
from diffusion_lit.runs import run_seed

# The module seeds each training batch in on_before_batch_transfer on purpose (that hook runs before the
# datamodule's on_after_batch_transfer draws the flips); Lightning warns about it once per run regardless.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")

MSE_ONLY = DiffusionLoss()  # validation and test score the MSE term alone, whatever the training loss


class DiffusionModule(LightningModule):
    """Trains a UNet to denoise under a fixed noise schedule (Ho et al. 2020) and samples from it.

    Components are injected (LightningCLI's `class_path` / `init_args`), settings said once each:

    Args:
        unet: the denoising network.
        loss: the training loss and its settings (its terms, their weights, the noise pairing); None: the plain
            MSE on the prediction target (`DiffusionLoss()`). Validation and test score the MSE alone.
        optimizer: a torch optimizer class or a `functools.partial` of one (in a config, `class_path` and
            `init_args`), called with the parameters; None: Adam at 2e-4 with its fused kernel.
        image_shape: (channels, height, width) of the images; the CLI links it from the datamodule.
        schedule: beta schedule, "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020).
        timesteps: number of diffusion steps T.
        prediction: what the network predicts: "eps" (noise), "v" or "x0".
        warmup_steps, lr_decay, decay_from: the learning rate over the run's planned length (`plan.RunPlan`):
            a linear warm-up over this many steps, or below 1 this share of the run; then "constant", "cosine",
            "wsd" or "inv_sqrt" from `decay_from` of the run to its end (`plan.lr_factor`).
        ema_decay: decay of the EMA of the weights used for sampling, validation and test; None: no EMA.
        ema_sigma_rel: instead, EDM2's power-function EMA of this width relative to the run so far (0.05-0.2).
        label_dropout: for a class-conditional UNet (`num_classes` set), the share of training labels
            replaced by "no class", so that one model also learns the unconditional distribution that
            classifier-free guidance needs (Ho & Salimans 2022, algorithm 1).
        augment: non-leaky augmentation (Karras et al. 2022): the probability with which each training image
            gets each of `diffusion.augment`'s mirrorings, rotation and shift, the UNet told which (it needs
            `augment_dim: 6`); sampling asks for none. 0: no augmentation.
        compile: compile the UNet with torch.compile (in place: checkpoints keep their keys).
        channels_last: keep the UNet's weights and the images in channels-last memory layout (faster
            convolutions on tensor-core GPUs).
    """

    def __init__(
        self,
        unet: UNet,
        loss: DiffusionLoss | ConsistencyLoss | None = None,
        optimizer: OptimizerCallable | None = None,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        schedule: ScheduleName = "cosine",
        timesteps: int = 1000,
        prediction: Prediction = "eps",
        warmup_steps: int | float = 0,
        lr_decay: Decay = "constant",
        decay_from: float = 0.8,
        ema_decay: float | None = 0.9999,
        ema_sigma_rel: float | None = None,
        label_dropout: float = 0.1,
        augment: float = 0.0,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_range("DiffusionModule", 1, timesteps=timesteps)
        check_range("DiffusionModule", 0, 1, label_dropout=label_dropout, ema_decay=ema_decay)
        self.save_hyperparameters(ignore=["unet", "loss"])
        # Checkpoints keep the components as their configs, not as pickled objects, and name Lightning's
        # (allow-listed) CLI instantiator so that load_from_checkpoint rebuilds them however they were built.
        self.criterion = loss if loss is not None else DiffusionLoss()
        self.make_optimizer = optimizer if optimizer is not None else DEFAULT_OPTIMIZER
        self.hparams["unet"] = component_config(unet, unet.config)
        self.hparams["loss"] = component_config(self.criterion, self.criterion.config)
        if not isinstance(self.hparams.get("optimizer"), dict):  # a config's (LightningCLI) is kept as it is
            self.hparams["optimizer"] = optimizer_config(self.make_optimizer)
        self.hparams.setdefault("_instantiator", "lightning.pytorch.cli.instantiate_module")
        unet.check_image_shape(image_shape)
        check_augment(augment, unet.augment_dim, distilling=isinstance(self.criterion, ConsistencyLoss))
        # Here, not in `setup`: the callbacks' `setup` (the EMA's copies) runs first and must see the final strides.
        self.unet = unet.to(memory_format=torch.channels_last) if channels_last else unet
        self.schedule = NoiseSchedule(schedule, timesteps, prediction)
        self.image_shape = tuple(image_shape)
        self.plan = RunPlan(warmup_steps, lr_decay, decay_from)  # the learning rate over the run's planned length

    @property
    def consistency_model(self) -> int:
        """For a few-step consistency model (`lit-ddpm distill`: its loss says so), its number of segments (1 or
        more; "auto" sampling then uses the consistency sampler); 0 for a diffusion model."""
        return self.criterion.segments if isinstance(self.criterion, ConsistencyLoss) else 0

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional model; None for an unconditional one."""
        return self.unet.num_classes

    def on_fit_start(self) -> None:
        """A conditional model needs labels with as many classes as it has."""
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if self.num_classes is not None and data_classes != self.num_classes:
            raise UserError(
                f"the model is conditional on {self.num_classes} classes but the data has "
                f"{data_classes or 'no'} classes; set UNet.num_classes to {data_classes}"
                + (" (or give the image folder class sub-folders: ImageFolderDataModule.class_folders true)"
                   if not data_classes else "")
            )  # fmt: skip

    def setup(self, stage: str) -> None:
        """Compilation; VGG19 before fitting when the perceptual term is on."""
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.unet.compile()
            self._compiled = True
        if stage == "fit" and self.criterion.perceptual_weight:
            self.criterion.perceptual.load()  # missing weights stop the run here, before any training

    def losses(
        self,
        x0: Tensor,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        labels: Tensor | None = None,
        augment: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Every configured loss term and their weighted total ("loss"), for clean images x0 in [-1, 1] (and the
        augmentation labels of x0, if augmented)."""
        if self.hparams.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        conditions = {} if augment is None else {"augment": augment}  # a ConsistencyLoss takes none
        return self.criterion(self.unet, self.schedule, x0, noise, t, labels, step=self.global_step, **conditions)

    def _labels(self, batch: tuple[Tensor, ...], dropout: float = 0.0) -> Tensor | None:
        """The batch's labels for a conditional model (a `dropout` share replaced by "no class"), else None."""
        return None if self.num_classes is None else drop_labels(batch[1], dropout, self.num_classes)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Seed each training batch's random stream by the run's seed, the batch's index over the run and the
        process. Everything random in a training step draws from it (the datamodule's flips, then the noise,
        timesteps, dropout and label dropout), so a resumed run draws what the uninterrupted one would have,
        with no random state to save, and processes draw differently. Here, before the batch is moved to its
        device, so that the flips drawn after the move come from this stream too."""
        if self.trainer.training:
            batch_index = self.trainer.fit_loop.total_batch_idx + 1  # this batch's
            torch.manual_seed((run_seed() * 1_000_003 + batch_index) * 1_009 + self.trainer.global_rank)
        return batch

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """One denoising loss on a batch of images in [-1, 1]; every term is logged as train/loss_<term>."""
        x0, augmentation = batch[0], None
        if self.hparams.augment:
            x0, augmentation = augment(x0, self.hparams.augment)
        terms = self.losses(x0, labels=self._labels(batch, self.hparams.label_dropout), augment=augmentation)
        self.log("train/loss", terms["loss"])  # not prog_bar: see progress.ProgressBar
        self.log_dict({f"train/loss_{name}": value for name, value in terms.items() if name != "loss"})
        return terms["loss"]

    def _fixed_noise_loss(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """The MSE term with noise and timesteps seeded by the batch index, comparable across runs and losses."""
        x0 = batch[0]
        generator = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        return MSE_ONLY(self.unet, self.schedule, x0, noise, t, self._labels(batch))["mse"]

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """Loss on held-out images with fixed noise, on the EMA weights."""
        self.log("val/loss", self._fixed_noise_loss(batch, batch_idx), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """Loss on the test images with fixed noise."""
        self.log("test/loss", self._fixed_noise_loss(batch, batch_idx), sync_dist=True)

    @torch.inference_mode()
    def sample(
        self,
        num_samples: int,
        settings: Sampling | None = None,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Draw images (N, C, H, W) in [0, 1] with the current weights (the EMA ones during validation).

        settings: the sampler and its options (default: `Sampling()`); labels (N,): classes for a
        class-conditional model, guided by `settings.guidance`; without labels it samples unconditionally.
        """
        settings = settings or Sampling()
        if labels is not None and self.num_classes is None:
            raise UserError("this model is unconditional: it takes no class labels (or guidance)")
        labels = None if labels is None else labels.to(self.device)
        denoiser = guided(self.unet, labels, settings.guidance, self.num_classes)
        was_training = self.training
        self.eval()
        try:
            x = reverse_process(
                denoiser,
                self.schedule,
                (num_samples, *self.image_shape),
                settings,
                generator,
                self.device,
                self.consistency_model,
            )
        finally:
            self.train(was_training)
        return to_unit(x).clamp(0, 1)

    def configure_optimizers(self) -> dict:
        """The optimizer, with an optional linear learning-rate warm-up stepped every optimizer step."""
        return scheduled(build(self.make_optimizer, self.parameters()), self.plan.factor)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """trainer.gradient_clip_val / _algorithm, also for fused Adam under mixed precision (optim.clip_gradients)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        clip_gradients(list(self.parameters()), optimizer, scaler, gradient_clip_val, gradient_clip_algorithm)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, allowed_classes: Iterable[str] = (), **kwargs):
        """Lightning's, after checking that a local checkpoint file names no class to build other than lit-ddpm's
        networks and `allowed_classes` (`checkpoints.check_checkpoint`: building a class imports its module)."""
        if isinstance(checkpoint_path, str | os.PathLike) and os.path.isfile(checkpoint_path):
            check_checkpoint(str(checkpoint_path), allowed_classes=allowed_classes)
            checkpoint_path = upgraded(str(checkpoint_path))  # an earlier lit-ddpm's settings, in today's layout
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another model configuration is one clear line, not a page of size mismatches."""
        check_weights_fit(self.state_dict(), checkpoint.get("state_dict", {}))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Never write non-finite weights over a good checkpoint."""
        check_finite(checkpoint["state_dict"])

    def configure_callbacks(self) -> list[Callback]:
        """The run's plan, and the EMA (it averages only while fitting: checkpoints hold the EMA weights)."""
        decay, sigma_rel = self.hparams.ema_decay, self.hparams.get("ema_sigma_rel")
        return [self.plan, *([] if decay is None and sigma_rel is None else [EMA(decay or 0.0, sigma_rel)])]
