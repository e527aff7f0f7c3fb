"""The forward pass of one batch, shared by training and validation (specs/training.md 5.3-5.4): the latents (cached,
or encoded now), the text encoders' outputs, the noise and timesteps, the U-Net's prediction and the weighted loss.
Every random draw takes the batch's generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from library.text_encoding import stitch_windows
from library.training import diffusion

if TYPE_CHECKING:  # a run is prepared before any batch runs
    from library.training.preparation import Run


@dataclass
class BatchLoss:
    loss: torch.Tensor  # the batch's mean loss, a scalar
    latents: torch.Tensor  # kept to tell NaN latents from a NaN loss


def batch_loss(
    run: Run, batch: dict, generator: torch.Generator, timesteps: torch.Tensor | None = None, training: bool = True
) -> BatchLoss:
    """The loss of one batch at sampled timesteps (or the given ones). With `training` the text encoders' outputs
    keep their gradients when they train, and checkpointed U-Net segments get an input that asks for gradients."""
    options, device, family = run.options, run.accelerator.device, run.family
    with torch.no_grad():
        latents = batch_latents(run, batch, generator)
    with run.accelerator.autocast(), torch.set_grad_enabled(training and options.network.train_text_encoder):
        token_ids = [ids.to(device) for ids in family.token_ids(batch)]
        if run.batches.caption_states:
            text = run.batches.caption_states.encode(family.encode_text, token_ids)
        else:
            text = family.encode_text(token_ids)
        if batch.get("input_weights") is not None:  # --weighted_captions: the context's token states, weighted
            weights = stitch_windows(batch["input_weights"]).to(device, text[0].dtype)
            text = (text[0] * weights[..., None], *text[1:])
    settings = options.diffusion
    noise = diffusion.make_noise(latents, settings.noise, generator)
    if timesteps is None:
        timesteps = diffusion.sample_timesteps(
            latents.shape[0], settings.min_timestep, settings.max_timestep, device, generator
        )
    perturbation = diffusion.input_perturbation(noise, settings.noise, generator)
    noisy, target = diffusion.noisy_latents_and_target(run.noise_scheduler, latents, noise, timesteps, perturbation)
    if training and options.model.gradient_checkpointing:
        noisy.requires_grad_(True)  # checkpointed segments need an input that asks for gradients
    with run.accelerator.autocast():
        prediction = family.predict(noisy, timesteps, text, batch)
    threshold = settings.loss.threshold(timesteps, run.noise_scheduler)
    loss = diffusion.per_sample_loss(
        prediction, target, batch["loss_weights"], batch["alpha_masks"], settings.loss.loss_type, threshold
    )
    snr = diffusion.snr(run.noise_scheduler, timesteps)
    return BatchLoss(diffusion.snr_weighted_loss(loss, snr, settings.loss, family.model.v_prediction).mean(), latents)


def batch_latents(run: Run, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """The batch's latents, scaled and in the run's dtype: cached, or encoded now from the images."""
    device, vae = run.accelerator.device, run.family.model.vae
    if batch["latents"] is not None:
        latents = batch["latents"].to(device, non_blocking=True)
    else:
        latents = vae.encode(batch["images"].to(device, vae.dtype)).latent_dist.sample(generator).float()
    return (latents * vae.config.scaling_factor).to(run.options.model.weight_dtype)
