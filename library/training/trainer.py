"""The LoRA training run of train_network.py (specs/training.md sections 0 and 5): check everything, load the
model, cache latents, build the network and optimizer, say what will happen, train, and save as sd-scripts names
its files."""

from __future__ import annotations

import argparse
from collections import deque
import importlib
import importlib.util
import math
import random
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from library.dataset.arguments import caches_latents, datasets_from_arguments
from library.dataset.inspection import dataset_summary_lines, debug_dataset
from library.dataset.latent_cache import cache_latents
from library.dataset.loader import BatchSettings, EpochBatches, TrainingBatches, make_data_loader, worker_count
from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.lora.factors import lora_scale
from library.model_files.family import ModelFamily, family_from_flags
from library.model_files.stable_diffusion import StableDiffusionModel, load_stable_diffusion, place
from library.text_encoding import encode_tokens
from library.training import diffusion
from library.training.optimizers import (
    CUDA_ONLY_OPTIMIZERS,
    make_lr_scheduler,
    make_optimizer,
    optimizer_name,
    parse_key_values,
    warmup_steps,
    warns_about_learning_rate,
)
from library.training.options import MIXED_PRECISION_DTYPES, SAVE_PRECISION_DTYPES, check_model_arguments, vae_dtype
from library.training.saving import epoch_file, epoch_file_to_remove, final_file, finished_metadata, step_file, step_file_to_remove, training_metadata



@dataclass
class Run:
    """What the loop needs, built once by `prepare`."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: StableDiffusionModel
    plans: list[DatasetPlan]
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    sampler: EpochBatches
    loader: torch.utils.data.DataLoader
    weight_dtype: torch.dtype
    latent_scale: float
    train_unet: bool
    train_text_encoder: bool
    num_epochs: int
    metadata: dict[str, str]
    lr_descriptions: list[str]
    on_step: Callable[[int], None] | None = None


def train(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> Path:
    """Run the whole training; returns the final LoRA file. `on_step(global_step)` is called after every optimizer
    step (the benchmark times steps with it)."""
    check_model_arguments(args)
    notes = check_options(args)
    plans, dataset_notes = datasets_from_arguments(args)
    for line in notes + dataset_notes + dataset_summary_lines(plans):
        print(line)
    model = load_stable_diffusion(args.pretrained_model_name_or_path, family=family_from_flags(v2=args.v2), v_parameterization=args.v_parameterization)
    if model.family is ModelFamily.SDXL:
        raise UserError(f"{args.pretrained_model_name_or_path}: an SDXL model; train it with sdxl_train_network.py (not available yet).")
    if args.debug_dataset:
        settings = BatchSettings(seed=args.seed, max_token_length=args.max_token_length, skip_bad_images=args.skip_bad_images)
        lines, _ = debug_dataset(plans, model.tokenizers[0], settings, Path(args.output_dir) / "debug_dataset")
        print("\n".join(lines))
        return Path(args.output_dir)
    run = prepare(args, model, plans)
    run.on_step = on_step
    for line in run_summary_lines(run):
        print(line)
    return train_loop(run)


def check_options(args: argparse.Namespace) -> list[str]:
    """Conflicts are refused in one sentence each; options that cannot apply on this machine give a note."""
    notes = []
    if args.seed is None:
        args.seed = random.randint(0, 2**32 - 1)
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16.")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16.")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only together leave nothing to train; give one.")
    _check_logger_installed(args)
    if args.gradient_accumulation_steps < 1:
        raise UserError(f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}; use 1 or more.")
    if not torch.cuda.is_available():
        if args.mixed_precision == "fp16":
            notes.append("--mixed_precision fp16 needs a CUDA GPU; training on the CPU in float32.")
            args.mixed_precision, args.full_fp16 = "no", False
        if args.xformers:
            notes.append("--xformers needs a CUDA GPU; using PyTorch's scaled-dot-product attention.")
            args.xformers = False
        name = optimizer_name(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer)
        if name.lower() in CUDA_ONLY_OPTIMIZERS:
            notes.append(f"--optimizer_type {name} needs bitsandbytes on a CUDA GPU; using AdamW on the CPU.")
            args.optimizer_type, args.use_8bit_adam = "AdamW", False
    if args.mem_eff_attn:
        notes.append("--mem_eff_attn: PyTorch's scaled-dot-product attention is used, which is as memory-efficient.")
    args.session_id = random.randint(0, 2**32)
    return notes


def _check_logger_installed(args: argparse.Namespace) -> None:
    """accelerate silently logs nothing when the tracker's package is missing; say so instead."""
    if not args.logging_dir:
        return
    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[args.log_with or "tensorboard"]
    for package in wanted:
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--logging_dir logs with {package}, which is not installed; run: pip install {package} (or drop --logging_dir).")


def prepare(args: argparse.Namespace, model: StableDiffusionModel, plans: list[DatasetPlan]) -> Run:
    accelerator = Accelerator(
        gradient_accumulation_steps=1,  # accumulation is counted here, so that an epoch's last partial group also steps
        mixed_precision=args.mixed_precision,
        log_with=(args.log_with or "tensorboard") if args.logging_dir else None,
        project_dir=args.logging_dir,
    )
    _seed_everything(args.seed)
    weight_dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
    latent_scale = model.vae.config.scaling_factor
    latents = _cache_latents(args, model, plans, accelerator) if caches_latents(args) else None

    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    network = _make_network(args, model, train_unet, train_text_encoder)
    _set_attention(args, model)
    _freeze_and_place(args, model, accelerator.device, weight_dtype, latents is None)
    if args.gradient_checkpointing:
        _enable_gradient_checkpointing(model, train_text_encoder)

    param_groups, lr_descriptions = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    if not param_groups:
        raise UserError("every learning rate is 0, so nothing would be trained; give --learning_rate, --unet_lr or --text_encoder_lr above 0.")
    name = optimizer_name(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer)
    for note in warns_about_learning_rate(name, param_groups):
        print(note)
    network_dtype = torch.float16 if args.full_fp16 else torch.bfloat16 if args.full_bf16 else torch.float32
    network.to(accelerator.device, network_dtype)
    optimizer, optimizer_text = make_optimizer(name, parse_key_values(args.optimizer_args, "--optimizer_args"), param_groups, args.learning_rate)

    sampler = EpochBatches(plans, args.seed, args.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(len(sampler) / args.gradient_accumulation_steps)  # never 0: empty datasets are refused
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    settings = BatchSettings(args.seed, args.max_token_length, args.prior_loss_weight, args.max_train_steps, args.skip_bad_images)
    batches = TrainingBatches(plans, model.tokenizers[0], settings, latents)
    workers = worker_count(args.max_data_loader_n_workers, latents is not None)
    loader = make_data_loader(batches, sampler, workers, args.persistent_data_loader_workers, pin_memory=accelerator.device.type == "cuda")

    total_scheduler_steps = args.max_train_steps * accelerator.num_processes
    warmup = warmup_steps(args.lr_warmup_steps, total_scheduler_steps)
    lr_scheduler = make_lr_scheduler(args.lr_scheduler, optimizer, warmup, total_scheduler_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power)
    network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)

    counts = {
        "num_train_images": sum(plan.num_train_images for plan in plans),
        "num_reg_images": sum(plan.num_reg_images for plan in plans),
        "num_batches_per_epoch": len(sampler),
        "num_epochs": num_epochs,
    }
    metadata = training_metadata(args, plans, counts, optimizer_text, time.time())
    return Run(args, accelerator, model, plans, network, optimizer, lr_scheduler, sampler, loader, weight_dtype, latent_scale,
               train_unet, train_text_encoder, num_epochs, metadata, lr_descriptions)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cache_latents(args, model: StableDiffusionModel, plans, accelerator: Accelerator):
    dtype = vae_dtype(args)
    vae = place(model.vae, accelerator.device, dtype)
    latents, _, _ = cache_latents(plans, vae, accelerator.device, dtype, args.vae_batch_size, args.cache_latents_to_disk,
                                  progress=accelerator.is_main_process, skip_bad_images=args.skip_bad_images)
    place(model.vae, "cpu")  # not needed any more: free the device memory
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return latents


def _make_network(args, model: StableDiffusionModel, train_unet: bool, train_text_encoder: bool):
    module = importlib.import_module(args.network_module)
    network_kwargs = dict(arg.split("=", 1) for arg in (args.network_args or []) if "=" in arg)
    malformed = [arg for arg in (args.network_args or []) if "=" not in arg]
    if malformed:
        raise UserError(f"--network_args {malformed[0]!r} is not key=value; write it like conv_dim=4.")
    text_encoder = model.text_encoders[0]
    if args.dim_from_weights:
        if not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights FILE to take the ranks from.")
        network, weights = module.create_network_from_weights(1.0, args.network_weights, model.vae, text_encoder, model.unet)
        network.load_state_dict(weights)
    else:
        network = module.create_network(1.0, args.network_dim, args.network_alpha, model.vae, text_encoder, model.unet,
                                        neuron_dropout=args.network_dropout, **network_kwargs)
    network.apply_to(text_encoder, model.unet, train_text_encoder, train_unet)
    if args.network_weights and not args.dim_from_weights:
        missing = network.load_weights(args.network_weights)
        print(f"continuing from {args.network_weights}" + (f" ({len(missing.missing_keys)} modules not in the file start fresh)" if missing.missing_keys else ""))
    return network


def _set_attention(args, model: StableDiffusionModel) -> None:
    """PyTorch scaled-dot-product attention is diffusers' default; xformers replaces it when asked and importable."""
    if not args.xformers:
        return
    try:
        model.unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as error:
        print(f"--xformers: not usable here ({error}); using PyTorch's scaled-dot-product attention.")
        args.xformers = False


def _freeze_and_place(args, model: StableDiffusionModel, device, weight_dtype, vae_needed: bool) -> None:
    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)
        module.eval()
    place(model.unet, device, weight_dtype)
    place(model.text_encoders[0], device, weight_dtype)
    if vae_needed:
        place(model.vae, device, vae_dtype(args))


def _enable_gradient_checkpointing(model: StableDiffusionModel, train_text_encoder: bool) -> None:
    model.unet.enable_gradient_checkpointing()
    model.unet.train()  # diffusers checkpoints only in train mode
    if train_text_encoder:
        model.text_encoders[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.text_encoders[0].train()


def run_summary_lines(run: Run) -> list[str]:
    args = run.args
    network = run.accelerator.unwrap_model(run.network)
    total_batch = max(plan.config.batch_size for plan in run.plans) * args.gradient_accumulation_steps * run.accelerator.num_processes
    rates = [f"{group.get('lr')}" for group in run.optimizer.param_groups]
    alpha, rank = float(args.network_alpha), args.network_dim or network.lora_dim
    return [
        f"model: {run.model.source} ({run.model.family.label}, {'v' if run.model.v_prediction else 'epsilon'} prediction)",
        f"training: {run.num_epochs} epochs of {len(run.sampler)} batches, {args.max_train_steps} optimizer steps, "
        f"effective batch {total_batch} (batch x {args.gradient_accumulation_steps} accumulation x {run.accelerator.num_processes} processes)",
        f"network: {args.network_module}, rank {rank}, alpha {alpha:g} (scale {lora_scale(alpha, rank):g}), "
        f"{len(network.unet_loras) if run.train_unet else 0} U-Net and {len(network.text_encoder_loras) if run.train_text_encoder else 0} text-encoder modules trained",
        f"optimizer: {run.metadata['ss_optimizer']}, learning rates per group {', '.join(rates)}, schedule {args.lr_scheduler}",
        f"precision: {args.mixed_precision} on {run.accelerator.device}, attention: {'xformers' if args.xformers else 'PyTorch SDPA'}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}",
    ]


def train_loop(run: Run) -> Path:
    args, accelerator = run.args, run.accelerator
    scheduler = diffusion.training_scheduler(run.model.v_prediction)
    if args.logging_dir:
        accelerator.init_trackers(f"{args.log_prefix or ''}network_train")
    global_step, recent_losses = 0, deque(maxlen=len(run.sampler))  # the loss average over about an epoch, as sd-scripts
    progress = tqdm(total=args.max_train_steps, desc="steps", disable=not accelerator.is_main_process)
    for epoch in range(1, run.num_epochs + 1):
        run.sampler.set_epoch(epoch, global_step)
        run.network.train()
        epoch_losses = []
        for position, batch in enumerate(run.loader):
            if position % args.gradient_accumulation_steps == 0:
                _start_step(run)
            if batch is None:
                continue
            is_sync = (position + 1) % args.gradient_accumulation_steps == 0 or position + 1 == len(run.sampler)
            value = _micro_step(run, scheduler, batch, global_step + 1)
            epoch_losses.append(value)
            if not is_sync:
                continue
            _optimizer_step(run)
            global_step += 1
            recent_losses.append(value)
            progress.update(1)
            progress.set_postfix(avr_loss=f"{sum(recent_losses) / len(recent_losses):.4f}")
            _log(run, value, recent_losses, global_step)
            if run.on_step:
                run.on_step(global_step)
            if args.save_every_n_steps and global_step % args.save_every_n_steps == 0 and global_step < args.max_train_steps:
                _save_step(run, epoch, global_step)
            if global_step >= args.max_train_steps:
                break
        if args.logging_dir and epoch_losses:
            accelerator.log({"loss/epoch_average": sum(epoch_losses) / len(epoch_losses)}, step=epoch)
        if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < run.num_epochs:
            _save_epoch(run, epoch, global_step)
        if global_step >= args.max_train_steps:
            break
    progress.close()
    final = final_file(args.output_dir, args.output_name, args.save_model_as)
    _save(run, final, epoch, global_step)
    accelerator.end_training()
    return final


def _start_step(run: Run) -> None:
    """A network with an `on_step_start()` method (networks.dylora draws its rank there) hears of each optimizer step."""
    network = run.accelerator.unwrap_model(run.network)
    if hasattr(network, "on_step_start"):
        network.on_step_start()


def _micro_step(run: Run, scheduler, batch: dict, step: int) -> float:
    """Forward and backward of one batch; returns its loss, checked to be finite before anything uses it."""
    args, device = run.args, run.accelerator.device
    with torch.no_grad():
        if batch["latents"] is not None:
            latents = batch["latents"].to(device, non_blocking=True)
        else:
            vae = run.model.vae
            latents = vae.encode(batch["images"].to(device, vae.dtype)).latent_dist.sample().float()
        latents = (latents * run.latent_scale).to(run.weight_dtype)
    with run.accelerator.autocast(), torch.set_grad_enabled(run.train_text_encoder):
        context = encode_tokens(run.model.text_encoders[0], batch["input_ids"].to(device), args.clip_skip)
    noise = diffusion.make_noise(latents, args.noise_offset)
    timesteps = diffusion.sample_timesteps(latents.shape[0], args.min_timestep, args.max_timestep, device)
    noisy, target = diffusion.noisy_latents_and_target(scheduler, latents, noise, timesteps)
    if args.gradient_checkpointing:
        noisy.requires_grad_(True)  # checkpointed segments need an input that asks for gradients
    with run.accelerator.autocast():
        prediction = run.model.unet(noisy, timesteps, context.to(run.weight_dtype)).sample
    loss = diffusion.per_sample_loss(prediction, target, batch["loss_weights"], batch["alpha_masks"])
    if args.min_snr_gamma:
        loss = loss * diffusion.min_snr_weight(diffusion.snr(scheduler, timesteps), args.min_snr_gamma, run.model.v_prediction)
    loss = loss.mean()
    value = loss.detach().item()  # one sync per batch, as sd-scripts; it also keeps the CPU from running ahead
    if not math.isfinite(value):
        raise UserError(_non_finite_diagnosis(args, step))
    run.accelerator.backward(loss / args.gradient_accumulation_steps)
    return value


def _optimizer_step(run: Run) -> None:
    args = run.args
    if args.max_grad_norm:
        run.accelerator.clip_grad_norm_(run.network.parameters(), args.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if args.scale_weight_norms:
        run.accelerator.unwrap_model(run.network).apply_max_norm_regularization(args.scale_weight_norms, run.accelerator.device)


def _non_finite_diagnosis(args, step: int) -> str:
    causes = []
    if args.mixed_precision == "fp16":
        causes.append("fp16 overflow (try --mixed_precision bf16, or --no_half_vae if the latents are NaN)")
    causes.append(f"a learning rate too high for this network (learning rate {args.learning_rate}, unet_lr {args.unet_lr})")
    if args.network_alpha and args.network_dim and args.network_alpha > args.network_dim:
        causes.append(f"network_alpha {args.network_alpha:g} above network_dim {args.network_dim} (scale above 1)")
    return f"the loss became NaN or infinite at step {step}; nothing was saved from it. Likely: {'; or '.join(causes)}."


def _log(run: Run, value: float, recent_losses: deque[float], step: int) -> None:
    if not run.args.logging_dir:
        return
    logs = {"loss/current": value, "loss/average": sum(recent_losses) / len(recent_losses)}
    for description, rate in zip(run.lr_descriptions, run.lr_scheduler.get_last_lr()):
        logs[f"lr/{description}"] = rate
    run.accelerator.log(logs, step=step)


def _save_step(run: Run, epoch: int, step: int) -> None:
    args = run.args
    _save_and_prune(run, lambda n: step_file(args.output_dir, args.output_name, n, args.save_model_as), step,
                    step_file_to_remove(step, args.save_every_n_steps, args.save_last_n_steps), epoch, step)


def _save_epoch(run: Run, epoch: int, step: int) -> None:
    args = run.args
    _save_and_prune(run, lambda n: epoch_file(args.output_dir, args.output_name, n, args.save_model_as), epoch,
                    epoch_file_to_remove(epoch, args.save_every_n_epochs, args.save_last_n_epochs), epoch, step)


def _save_and_prune(run: Run, file_for, number: int, old_number: int | None, epoch: int, step: int) -> None:
    """Save as file_for(number), then remove file_for(old_number), the save that fell out of the kept window."""
    _save(run, file_for(number), epoch, step)
    if old_number is not None and run.accelerator.is_main_process:
        file_for(old_number).unlink(missing_ok=True)


def _save(run: Run, path: Path, epoch: int, step: int) -> None:
    run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return
    network = run.accelerator.unwrap_model(run.network)
    if not all(torch.isfinite(parameter).all() for parameter in network.parameters()):
        raise UserError(f"the LoRA weights hold NaN or infinite values at step {step}; {path.name} was not written. Lower the learning rate or use bf16.")
    metadata = finished_metadata(run.metadata, epoch, step)
    if run.args.no_metadata:
        metadata = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_dtype = SAVE_PRECISION_DTYPES[run.args.save_precision] if run.args.save_precision else None
    network.save_weights(path, save_dtype, metadata)
    print(f"saved {path}")
