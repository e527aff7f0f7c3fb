"""The diffusion side of a training step (specs/training.md 5.2-5.4): the DDPM schedule, timesteps, noise with
offset, the noisy input, the epsilon or v target, and the per-sample loss with masks, loss weights and Min-SNR."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def training_scheduler(v_prediction: bool) -> DDPMScheduler:
    """sd-scripts' training noise scheduler: DDPM, 1000 steps, scaled-linear betas 0.00085..0.012."""
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )


def sample_timesteps(batch_size: int, min_timestep: int | None, max_timestep: int | None, device, generator=None) -> torch.Tensor:
    """Uniform integers in [min_timestep, max_timestep) (defaults 0 and 1000); all max_timestep when min >= max."""
    low = 0 if min_timestep is None else min_timestep
    high = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    if low >= high:
        return torch.full((batch_size,), high, device=device, dtype=torch.long)
    return torch.randint(low, high, (batch_size,), device=device, generator=generator)


def make_noise(latents: torch.Tensor, noise_offset: float | None, generator=None) -> torch.Tensor:
    """Gaussian noise shaped like the latents, plus noise_offset times one N(0, 1) value per sample and channel."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    if noise_offset:
        per_channel = torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device, dtype=latents.dtype, generator=generator)
        noise = noise + noise_offset * per_channel
    return noise


def noisy_latents_and_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the target: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    return noisy, noise


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) for each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_weights: torch.Tensor,
    alpha_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error in float32, masked by the alpha masks (area-resized to the latent size; not renormalised, as
    sd-scripts), averaged over C, H, W and multiplied by each sample's loss weight."""
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if alpha_masks is not None:
        mask = F.interpolate(alpha_masks.unsqueeze(1).float().to(loss.device), size=loss.shape[-2:], mode="area")
        loss = loss * mask
    return loss.mean(dim=(1, 2, 3)) * loss_weights.to(loss.device)


def min_snr_weight(snr_values: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v."""
    clipped = torch.clamp(snr_values, max=gamma)
    return clipped / (snr_values + 1) if v_prediction else clipped / snr_values
