"""What went wrong, said in one sentence with the likely causes: a loss that became NaN or infinite, and the
images whose latents did."""

from __future__ import annotations

from library.training.options import TrainingOptions


def non_finite_loss_message(options: TrainingOptions, step: int) -> str:
    causes = []
    if options.model.mixed_precision == "fp16":
        causes.append("fp16 overflow (try --mixed_precision bf16, or --no_half_vae if the latents are NaN)")
    network = options.network
    causes.append(
        f"a learning rate too high for this network (learning rate {options.optimizer.learning_rate}, unet_lr "
        f"{network.unet_lr})"
    )
    if network.network_alpha and network.network_dim and network.network_alpha > network.network_dim:
        causes.append(
            f"network_alpha {network.network_alpha:g} above network_dim {network.network_dim} (scale above 1)"
        )
    return f"the loss became NaN or infinite at step {step}; nothing was saved from it. Likely: {'; or '.join(causes)}."


def non_finite_latents_message(image_paths: list[str], step: int) -> str:
    return (
        f"the VAE produced NaN or infinite latents at step {step} for {', '.join(image_paths)}; nothing was saved from "
        "it. Run with --no_half_vae (a float32 VAE), use another VAE with --vae, or check the image."
    )
