"""The start-up summary: what the run will do, said before the first step (model, steps and effective batch,
network and its scale, optimizer and learning rates, precision, what happens to the text encoders)."""

from __future__ import annotations

import torch

from library.lora.factors import lora_scale
from library.training.memory import MemoryEstimate, estimate_peak_memory
from library.training.optimizers import ScheduleSettings, uses_relative_step
from library.training.preparation import Run, uses_fast_cpu_layers
from library.training.validation import validation_timesteps


def run_summary_lines(run: Run) -> list[str]:
    options, model, network = run.options, run.family.model, run.network
    accumulation, processes = options.length.gradient_accumulation_steps, run.accelerator.num_processes
    total_batch = max(plan.config.batch_size for plan in run.batches.plans) * accumulation * processes
    rates = [f"{group.get('lr')}" for group in run.optimization.optimizer.param_groups]
    alpha, rank = float(options.network.network_alpha), options.network.network_dim or network.lora_dim
    trains = options.network
    unet_modules = len(network.unet_loras) if trains.train_unet else 0
    text_modules = len(network.text_encoder_loras) if trains.train_text_encoder else 0
    optimizer = run.optimization.optimizer  # accelerate's wrapper; .optimizer is the torch optimizer
    return [
        f"model: {model.source} ({model.family.label}, {'v' if model.v_prediction else 'epsilon'} prediction)"
        f"{f', VAE from {options.model.vae}' if options.model.vae else ''}",
        f"training: {run.length.num_epochs} epochs of {run.batches.sampler.batches_per_epoch} batches, "
        f"{run.length.max_train_steps} optimizer steps, "
        f"effective batch {total_batch} (batch x {accumulation} accumulation x {processes} processes)",
        f"network: {trains.network_module}{_arguments(trains.network_args)}, rank {rank}, alpha {alpha:g} (scale "
        f"{lora_scale(alpha, rank):g}), "
        f"{unet_modules} U-Net and {text_modules} text-encoder modules trained",
        f"optimizer: {run.optimization.description}, "
        + (
            "step size chosen by Adafactor (relative_step), schedule adafactor"
            if uses_relative_step(optimizer.optimizer)
            else f"learning rates per group {', '.join(rates)}, schedule {_schedule_name(options.optimizer.schedule)}"
        ),
        f"precision: {options.model.mixed_precision} on {run.accelerator.device}, attention: {run.attention}"
        f"{''.join(f', {option}' for option in numerics_options(run))}",
        f"text encoder: {_text_encoder_use(run)}",
        *_validation_lines(run),
        memory_estimate(run).line(),
    ]


def numerics_options(run: Run) -> list[str]:
    """The speed options in use that change the arithmetic (or how memory is traded for it), named in the summary."""
    model = run.options.model
    named = []
    if model.gradient_checkpointing:
        named.append("gradient checkpointing")
    if model.torch_compile:
        named.append(f"U-Net compiled ({model.dynamo_backend})")
    if model.fp8_base or model.fp8_base_unet:
        named.append(f"{'U-Net' if model.fp8_base_unet and not model.fp8_base else 'base'} weights stored in float8")
    if uses_fast_cpu_layers(run.options, run.accelerator.device):
        named.append("oneDNN matrix products for the frozen layers")
    if run.accelerator.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        named.append("TF32 convolutions (PyTorch's default)")
    if run.accelerator.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        named.append("TF32 matrix products")
    return named


def _validation_lines(run: Run) -> list[str]:
    validation = run.validation
    if validation is None:
        return []
    schedule, options = validation.schedule, run.options.diffusion
    when = f"every {schedule.every_n_steps} steps and " if schedule.every_n_steps else ""
    epochs = "every epoch" if schedule.every_n_epochs == 1 else f"every {schedule.every_n_epochs} epochs"
    timesteps = ", ".join(map(str, validation_timesteps(options.min_timestep, options.max_timestep)))
    return [
        f"validation: {validation.num_images} held-out images, {when}at the end of {epochs}, at timesteps {timesteps}"
    ]


def memory_estimate(run: Run) -> MemoryEstimate:
    """For the modules that stay on the device (the VAE and text encoders leave it when their outputs are cached)
    and the largest bucket at the largest batch size."""
    options, model = run.options, run.family.model
    on_device = [model.unet]
    on_device += [] if options.text_encoder_caching.in_memory else model.text_encoders
    on_device += [] if options.dataset.cache_latents else [model.vae]
    buckets = [bucket for plan in run.batches.plans for bucket in plan.bucket_counts()]
    largest = max(buckets, key=lambda size: size[0] * size[1])
    batch_size = max(plan.config.batch_size for plan in run.batches.plans)
    return estimate_peak_memory(options, model.family, on_device, run.network, largest, batch_size)


def _text_encoder_use(run: Run) -> str:
    if run.options.network.train_text_encoder:
        return "trained, so its outputs are computed at every step"
    caching = run.options.text_encoder_caching
    if caching.in_memory:
        return (
            "frozen, every caption encoded before training"
            + (" (kept in _te_outputs.npz files)" if caching.to_disk else "")
            + "; off the device"
        )
    if run.batches.caption_states:
        return "frozen, each caption encoded once at its first use"
    return (
        "frozen, but captions change from use to use (shuffle, tag dropout, wildcards or token warmup), "
        "so encoded at every step"
    )


def _schedule_name(schedule: ScheduleSettings) -> str:
    return schedule.lr_scheduler_type or schedule.lr_scheduler


def _arguments(network_args: tuple[str, ...]) -> str:
    """--network_args as given (LyCORIS's algo=..., conv_dim=...), so that the summary names the algorithm."""
    return f" ({', '.join(network_args)})" if network_args else ""
