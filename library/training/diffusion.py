"""The diffusion side of a training step (specs/training.md 5.2-5.4): the DDPM schedule (optionally rescaled to zero
terminal SNR), timesteps, the noise (offset, adaptive offset, pyramid noise), the noisy input (with input
perturbation), the epsilon or v target, the element-wise loss (l2, l1, Huber, smooth L1), masks and loss weights, and
the SNR-based weights (Min-SNR, v-prediction scaling, v-prediction-like loss, debiased estimation).

Every random draw takes the batch's generator, never the global RNG, so that processes agree and a resumed run repeats
exactly. An option that is off draws nothing, so the other draws stay where they were."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
THRESHOLD_LOSS_TYPES = ("huber", "smooth_l1")
# The SNR the weights that divide by it see. sd-scripts clamps at 1000 (t = 0 has SNR about 1175). The floor is ours:
# the plain schedule's lowest SNR is about 0.0047, so it only acts with zero terminal SNR, where SNR reaches 0.
SNR_CLAMP = (1e-3, 1000.0)


@dataclass(frozen=True)
class NoiseSettings:
    """The noise options (spec 5.3 steps 3-5); the fields are named as the command-line options, and their defaults
    are the options' defaults."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False


@dataclass(frozen=True)
class LossSettings:
    """The loss options (spec 5.4); the fields are named as the command-line options, and their defaults are the
    options' defaults."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    def threshold(self, timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor | None:
        """Each sample's Huber threshold for huber and smooth_l1; None for the other losses."""
        if self.loss_type not in THRESHOLD_LOSS_TYPES:
            return None
        return huber_threshold(self.huber_schedule, self.huber_c, self.huber_scale, timesteps, scheduler)


def training_scheduler(v_prediction: bool, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """sd-scripts' training noise scheduler: DDPM, 1000 steps, scaled-linear betas 0.00085..0.012. With
    zero_terminal_snr the betas are rescaled so that sqrt(abar) keeps its first value and reaches 0 at the last step
    ("Common Diffusion Noise Schedules are Flawed", Algorithm 1, which diffusers implements as sd-scripts does)."""
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def sample_timesteps(
    batch_size: int, min_timestep: int | None, max_timestep: int | None, device, generator=None
) -> torch.Tensor:
    """Uniform integers in [min_timestep, max_timestep) (defaults 0 and 1000); all max_timestep when min >= max."""
    low = 0 if min_timestep is None else min_timestep
    high = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    if low >= high:
        return torch.full((batch_size,), high, device=device, dtype=torch.long)
    return torch.randint(low, high, (batch_size,), device=device, generator=generator)


def make_noise(latents: torch.Tensor, settings: NoiseSettings = NoiseSettings(), generator=None) -> torch.Tensor:
    """Spec 5.3 steps 2-4: N(0, I) shaped like the latents, plus the offset noise (one N(0, 1) value per sample and
    channel times the offset strength), then the pyramid noise."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    if settings.noise_offset:
        strength = offset_strength(
            latents,
            settings.noise_offset,
            settings.noise_offset_random_strength,
            settings.adaptive_noise_scale,
            generator,
        )
        per_channel = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), device=latents.device, dtype=latents.dtype, generator=generator
        )
        noise = noise + strength * per_channel
    if settings.multires_noise_iterations:
        noise = multires_noise(noise, settings.multires_noise_iterations, settings.multires_noise_discount, generator)
    return noise


def offset_strength(
    latents: torch.Tensor,
    noise_offset: float,
    random_strength: bool = False,
    adaptive_scale: float | None = None,
    generator=None,
) -> float | torch.Tensor:
    """The offset noise's strength: noise_offset, times U(0, 1) drawn once per batch with random strength; with an
    adaptive scale a, per sample and channel that plus a * |mean of the latent channel over H, W|, clamped at 0."""
    strength = noise_offset
    if random_strength:
        strength = torch.rand(1, device=latents.device, dtype=latents.dtype, generator=generator) * noise_offset
    if adaptive_scale is not None:
        strength = torch.clamp(strength + adaptive_scale * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
    return strength


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, generator=None) -> torch.Tensor:
    """Pyramid noise (spec 5.3 step 4): for i = 0..iterations-1, with r ~ U(2, 4), add N(0, 1) noise of size
    (max(1, floor(h / r^i)), max(1, floor(w / r^i))), bilinearly upsampled to h x w, times discount^i; stop once a
    side reaches 1; then divide by the result's standard deviation."""
    batch, channels, height, width = noise.shape
    # drawn together, so that the sizes (Python integers) cost one host sync per batch, not one per level
    ratios = (2 + 2 * torch.rand(iterations, device=noise.device, generator=generator)).tolist()
    for level, ratio in enumerate(ratios):
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = torch.randn((batch, channels, *size), device=noise.device, dtype=noise.dtype, generator=generator)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if 1 in size:
            break
    return noise / noise.std()


def input_perturbation(noise: torch.Tensor, settings: NoiseSettings, generator=None) -> torch.Tensor | None:
    """--ip_noise_gamma: gamma' * N(0, I), added to the noise of the noisy input only (gamma' = gamma * U(0, 1) drawn
    once per batch with --ip_noise_gamma_random_strength); None when the option is off."""
    if not settings.ip_noise_gamma:
        return None
    strength = settings.ip_noise_gamma
    if settings.ip_noise_gamma_random_strength:
        strength = torch.rand(1, device=noise.device, dtype=noise.dtype, generator=generator) * settings.ip_noise_gamma
    return strength * torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)


def noisy_latents_and_target(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    perturbation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) (eps + perturbation), and the target, which never sees the
    perturbation: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    noisy = scheduler.add_noise(latents, noise if perturbation is None else noise + perturbation, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    return noisy, noise


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) for each timestep, from the schedule that made the noisy input.

    Unlike sd-scripts (specs/training.md 14, item 9), whose SNR table is computed before --zero_terminal_snr rescales
    the schedule and is never updated, there is one schedule here: with --zero_terminal_snr the SNR-based weights and
    the Huber snr schedule see the rescaled abar, whose SNR is 0 at the last step (see SNR_CLAMP)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1 - alphas_cumprod)


def huber_threshold(
    schedule: str, huber_c: float, huber_scale: float, timesteps: torch.Tensor, scheduler: DDPMScheduler
) -> torch.Tensor:
    """The threshold c of the Huber and smooth-L1 losses for each sample (spec 5.4 step 1): constant huber_c *
    huber_scale; exponential huber_scale * exp(ln(huber_c) t / 1000), from huber_scale at t = 0 to huber_c *
    huber_scale at t = 1000; snr (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - abar_t) / abar_t),
    without the scale (abar_t = 0, with zero terminal SNR, gives sigma_t = inf and so huber_c)."""
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) / NUM_TRAIN_TIMESTEPS * timesteps) * huber_scale
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown Huber schedule {schedule!r}; one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(
    kind: str, prediction: torch.Tensor, target: torch.Tensor, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of each element in float32 (spec 5.4 step 1), with d = prediction - target and c each sample's
    threshold: l2 d^2; l1 |d|; huber 2c(sqrt(d^2 + c^2) - c), about d^2 for |d| << c and 2c|d| for |d| >> c;
    smooth_l1 2(sqrt(d^2 + c^2) - c), the same divided by c."""
    prediction, target = prediction.float(), target.float()
    if kind == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if kind not in THRESHOLD_LOSS_TYPES:
        raise ValueError(f"unknown loss type {kind!r}; one of {', '.join(LOSS_TYPES)}")
    c = threshold.float().to(prediction.device).view(-1, *([1] * (prediction.dim() - 1)))
    smooth_l1 = 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    return c * smooth_l1 if kind == "huber" else smooth_l1


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_weights: torch.Tensor,
    alpha_masks: torch.Tensor | None = None,
    kind: str = "l2",
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """The element-wise loss (`kind`, squared error by default), masked by the alpha masks (area-resized to the
    latent size; not renormalised, as sd-scripts), averaged over C, H, W and multiplied by each sample's loss weight."""
    loss = elementwise_loss(kind, prediction, target, threshold)
    if alpha_masks is not None:
        mask = F.interpolate(alpha_masks.unsqueeze(1).float().to(loss.device), size=loss.shape[-2:], mode="area")
        loss = loss * mask
    return loss.mean(dim=(1, 2, 3)) * loss_weights.to(loss.device)


def min_snr_weight(snr_values: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v. The epsilon
    form is computed as gamma / max(SNR, gamma), the same number, which stays 1 where zero terminal SNR makes SNR 0."""
    if v_prediction:
        return torch.clamp(snr_values, max=gamma) / (snr_values + 1)
    return torch.full_like(snr_values, gamma) / torch.clamp(snr_values, min=gamma)


def v_prediction_scale(snr_values: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1), SNR clamped to SNR_CLAMP: the factor between an epsilon loss and the v loss of the same
    error."""
    clamped = snr_values.clamp(*SNR_CLAMP)
    return clamped / (clamped + 1)


def debiased_weight(snr_values: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation: 1 / sqrt(SNR) for epsilon prediction, 1 / (SNR + 1) for v, SNR clamped to SNR_CLAMP."""
    clamped = snr_values.clamp(*SNR_CLAMP)
    return 1 / (clamped + 1) if v_prediction else 1 / torch.sqrt(clamped)


def snr_weighted_loss(
    loss: torch.Tensor, snr_values: torch.Tensor, settings: LossSettings, v_prediction: bool
) -> torch.Tensor:
    """The per-sample loss after spec 5.4 step 5, in its order: Min-SNR-gamma; x SNR / (SNR + 1) with
    --scale_v_pred_loss_like_noise_pred; + v * loss * (SNR + 1) / SNR with --v_pred_like_loss v; the debiased weight."""
    if settings.min_snr_gamma:
        loss = loss * min_snr_weight(snr_values, settings.min_snr_gamma, v_prediction)
    if settings.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_prediction_scale(snr_values)
    if settings.v_pred_like_loss:
        loss = loss + loss / v_prediction_scale(snr_values) * settings.v_pred_like_loss
    if settings.debiased_estimation_loss:
        loss = loss * debiased_weight(snr_values, v_prediction)
    return loss
