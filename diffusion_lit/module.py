"""DiffusionModule: thin Lightning glue around a UNet, a NoiseSchedule and the loss."""

import os
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor

from diffusion_lit.callbacks.ema import EMA
from diffusion_lit.checkpoints import check_checkpoint, check_finite, check_weights_fit
from diffusion_lit.diffusion.guidance import drop_labels, guided
from diffusion_lit.diffusion.immiscible import assign_noise
from diffusion_lit.diffusion.losses import DiffusionLoss
from diffusion_lit.diffusion.samplers import reverse_process
from diffusion_lit.diffusion.sampling import Sampling
from diffusion_lit.diffusion.schedule import NoiseSchedule, Prediction, ScheduleName
from diffusion_lit.errors import UserError
from diffusion_lit.nn import UNet
from diffusion_lit.optim import adam_with_warmup, clip_gradients
from diffusion_lit.pixels import to_unit
from diffusion_lit.runs import run_seed

MSE_ONLY = DiffusionLoss()  # validation and test score the MSE term alone, whatever the training loss


class DiffusionModule(LightningModule):
    """Trains a UNet to denoise under a fixed noise schedule (Ho et al. 2020) and samples from it.

    Args:
        unet: the denoising network.
        image_shape: (channels, height, width) of the images; the CLI links it from the datamodule.
        schedule: beta schedule, "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020).
        timesteps: number of diffusion steps T.
        prediction: what the network predicts: "eps" (noise), "v" or "x0".
        lr: Adam learning rate.
        adam_betas: Adam's (beta1, beta2).
        weight_decay: Adam's L2 weight decay.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).
        ema_decay: decay of the EMA of the weights used for sampling, validation and test; None: no EMA.
        perceptual_weight: weight of the VGG19 perceptual term (0: not computed, VGG never loaded).
        feature_matching_weight: weight of the term on the UNet's own features (0: not computed).
        perceptual_layer: the VGG19 layer compared, "conv_N" = the N-th conv (conv_4 is conv2_2).
        vgg_weights: a local torchvision VGG19 state-dict file, for machines without internet access;
            None: torchvision's cache, downloading into it when missing.
        snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper): each sample's MSE is
            weighted as if its x0 error were weighted by min(SNR, gamma). None: the plain mean (Ho et al.).
        immiscible: pair the images of each batch with the noise samples nearest to them (a linear assignment,
            Li et al. 2024) instead of at random; costs one host round trip per step.
        label_dropout: for a class-conditional UNet (`num_classes` set), the share of training labels
            replaced by "no class", so that one model also learns the unconditional distribution that
            classifier-free guidance needs (Ho & Salimans 2022, algorithm 1).
        compile: compile the UNet with torch.compile (in place: checkpoints keep their keys).
        channels_last: keep the UNet's weights and the images in channels-last memory layout (faster
            convolutions on tensor-core GPUs).
        fused_adam: use Adam's fused kernel (CUDA and CPU): fewer kernel launches, and a non-finite step is
            skipped on the device (callbacks.NonFiniteGuard), without the host waiting for the GPU.
    """

    def __init__(
        self,
        unet: UNet,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        schedule: ScheduleName = "cosine",
        timesteps: int = 1000,
        prediction: Prediction = "eps",
        lr: float = 2e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.9999,
        perceptual_weight: float = 0.0,
        feature_matching_weight: float = 0.0,
        perceptual_layer: str = "conv_4",
        vgg_weights: str | None = None,
        snr_gamma: float | None = None,
        immiscible: bool = False,
        label_dropout: float = 0.1,
        compile: bool = False,
        channels_last: bool = False,
        fused_adam: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["unet"])
        # Checkpoints store the network as its config, not as a pickled module, and name Lightning's
        # (allow-listed) CLI instantiator so that load_from_checkpoint rebuilds it however it was built.
        network = type(unet)
        self.hparams["unet"] = {"class_path": f"{network.__module__}.{network.__qualname__}", "init_args": unet.config}
        self.hparams.setdefault("_instantiator", "lightning.pytorch.cli.instantiate_module")
        if problem := unet.cannot_take(image_shape):
            raise UserError(problem)
        self.unet = unet
        self.schedule = NoiseSchedule(schedule, timesteps, prediction)
        self.image_shape = tuple(image_shape)
        self.criterion = DiffusionLoss(
            perceptual_weight, feature_matching_weight, perceptual_layer, vgg_weights, snr_gamma
        )

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
                f"{data_classes or 'no'} classes; set model.unet.init_args.num_classes to {data_classes}"
                + (" (or give the image folder class sub-folders: data.init_args.class_folders: true)"
                   if not data_classes else "")
            )  # fmt: skip

    def setup(self, stage: str) -> None:
        """Memory layout and compilation; VGG19 before fitting when the perceptual term is on."""
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.unet.compile()
            self._compiled = True
        if stage == "fit" and self.hparams.perceptual_weight:
            self.criterion.perceptual.load()  # missing weights stop the run here, before any training

    def losses(
        self, x0: Tensor, noise: Tensor | None = None, t: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Every configured loss term and their weighted total ("loss"), for clean images x0 in [-1, 1]."""
        if self.hparams.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if noise is None:
            noise = torch.randn_like(x0)
            noise = assign_noise(x0, noise) if self.hparams.immiscible else noise
        t = self.schedule.sample_timesteps(x0.shape[0], x0.device) if t is None else t
        return self.criterion(self.unet, self.schedule, x0, noise, t, labels)

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
        terms = self.losses(batch[0], labels=self._labels(batch, self.hparams.label_dropout))
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
                denoiser, self.schedule, (num_samples, *self.image_shape), settings, generator, self.device
            )
        finally:
            self.train(was_training)
        return to_unit(x).clamp(0, 1)

    def configure_optimizers(self) -> dict:
        """Adam with an optional linear learning-rate warm-up, stepped every optimizer step."""
        hp = self.hparams
        return adam_with_warmup(
            self.parameters(), hp.lr, hp.adam_betas, hp.weight_decay, hp.warmup_steps, hp.fused_adam
        )

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
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another model configuration is one clear line, not a page of size mismatches."""
        check_weights_fit(self.state_dict(), checkpoint.get("state_dict", {}))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Never write non-finite weights over a good checkpoint."""
        check_finite(checkpoint["state_dict"])

    def configure_callbacks(self) -> list[Callback]:
        """The EMA callback (it averages only while fitting: checkpoints hold the EMA weights)."""
        return [] if self.hparams.ema_decay is None else [EMA(self.hparams.ema_decay)]


def load_checkpoint(ckpt_path: str, device: str = "cpu", allowed_classes: Iterable[str] = ()) -> DiffusionModule:
    """A DiffusionModule with the checkpoint's EMA weights, loaded safely (weights_only=True); the network is
    built only if it is one of lit-ddpm's or its class is in `allowed_classes` (nothing else is imported)."""
    check_checkpoint(ckpt_path, allowed_classes=allowed_classes)
    try:
        module = DiffusionModule.load_from_checkpoint(
            ckpt_path, map_location=device, weights_only=True, allowed_classes=allowed_classes
        )
    except Exception as error:  # noqa: BLE001  (truncated, foreign or not a checkpoint: the same advice)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"{ckpt_path!r} is not a readable lit-ddpm checkpoint ({reason})") from None
    return module.eval()
