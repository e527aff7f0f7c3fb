"""The LoRA training run of train_network.py (specs/training.md sections 0 and 5): check everything, load the
model, cache latents, build the network and optimizer, say what will happen, train, and save as sd-scripts names
its files."""

from __future__ import annotations

import argparse
from collections import deque
import importlib
import importlib.util
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from diffusers import DDPMScheduler
from tqdm import tqdm

from library.dataset.arguments import caches_latents, datasets_from_arguments
from library.dataset.captions import CaptionSettings
from library.dataset.inspection import dataset_summary_lines, debug_dataset
from library.dataset.latent_cache import cache_latents
from library.dataset.loader import BatchSettings, EpochBatches, TrainingBatches, make_data_loader, worker_count
from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.lora.factors import lora_scale
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import StableDiffusionModel, place
from library.text_encoding import CaptionStates, encode_tokens
from library.training import diffusion
from library.training.optimizers import (
    CUDA_ONLY_OPTIMIZERS,
    make_lr_scheduler,
    make_optimizer,
    uses_relative_step,
    optimizer_name,
    parse_key_values,
    warmup_steps,
    warns_about_learning_rate,
)
from library.training.options import MIXED_PRECISION_DTYPES, SAVE_PRECISION_DTYPES, check_noise_and_loss_arguments, load_base_model, vae_dtype
from library.training.samples import SampleSchedule, draw_samples, sample_schedule
from library.training.saving import (
    epoch_file,
    epoch_file_to_remove,
    final_file,
    finished_metadata,
    state_folder,
    step_file,
    step_file_to_remove,
    training_metadata,
)
from library.training.state import TrainState, check_same_run, read_train_state, run_fingerprint, save_state_folder



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
    fingerprint: dict
    start: Progress
    caption_states: CaptionStates | None  # the text encoder's outputs per caption, when neither changes
    noise_scheduler: DDPMScheduler
    noise: diffusion.NoiseSettings
    loss: diffusion.LossSettings
    samples: SampleSchedule | None = None
    on_step: Callable[[int], None] | None = None


@dataclass
class Progress:
    """Where the loop stands: what a saved state records and a resumed run starts from."""

    epoch: int  # 1-based
    step: int  # optimizer steps done
    batches_done: int  # this process's batches of the epoch trained so far


def train(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> Path:
    """Run the whole training; returns the final LoRA file. `on_step(global_step)` is called after every optimizer
    step (the benchmark times steps with it)."""
    resumed = read_train_state(args.resume) if args.resume else None
    if resumed and args.seed is None:
        args.seed = resumed.seed  # the data order and noise of the run being continued
    notes = check_options(args)
    samples, sample_notes = sample_schedule(args)
    plans, dataset_notes = datasets_from_arguments(args)
    for line in notes + sample_notes + dataset_notes + dataset_summary_lines(plans):
        print(line)
    num_processes = PartialState(cpu=_processes_on_cpus()).num_processes
    num_epochs = set_training_length(args, plans, num_processes)
    fingerprint = run_fingerprint(args, plans, num_processes, optimizer_name(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer))
    start = resume_point(args, resumed, fingerprint, _batches_per_epoch(plans, num_processes)) if resumed else Progress(1, 0, 0)
    model = load_base_model(args)
    if model.family is ModelFamily.SDXL:
        raise UserError(f"{args.pretrained_model_name_or_path}: an SDXL model; train it with sdxl_train_network.py (not available yet).")
    if args.debug_dataset:
        settings = BatchSettings(seed=args.seed, max_token_length=args.max_token_length, skip_bad_images=args.skip_bad_images)
        lines, _ = debug_dataset(plans, model.tokenizers[0], settings, Path(args.output_dir) / "debug_dataset")
        print("\n".join(lines))
        return Path(args.output_dir)
    run = prepare(args, model, plans, num_epochs, fingerprint, start)
    run.samples, run.on_step = samples, on_step
    for line in run_summary_lines(run):
        print(line)
    return train_loop(run)


def check_options(args: argparse.Namespace) -> list[str]:
    """Conflicts are refused in one sentence each; options that cannot apply on this machine give a note."""
    notes = check_noise_and_loss_arguments(args)
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
    if args.v2 and args.clip_skip:
        notes.append(f"--clip_skip {args.clip_skip} with --v2: SD 2.x text encoders already stop one layer early, so this skips more; usually leave it out.")
    args.session_id = random.randint(0, 2**32)
    return notes


def _check_logger_installed(args: argparse.Namespace) -> None:
    """accelerate silently logs nothing when the tracker's package is missing; say so instead."""
    if args.log_with and not args.logging_dir:
        raise UserError(f"--log_with {args.log_with} writes its logs under --logging_dir; give --logging_dir too (e.g. --logging_dir logs).")
    if not args.logging_dir:
        return
    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[args.log_with or "tensorboard"]
    for package in wanted:
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--logging_dir logs with {package}, which is not installed; run: pip install {package} (or drop --logging_dir).")


def _processes_on_cpus() -> bool:
    """Several processes (torchrun, accelerate launch) without CUDA train together on the CPU with gloo; accelerate
    would otherwise run them as independent copies that overwrite each other's files."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def set_training_length(args: argparse.Namespace, plans: list[DatasetPlan], num_processes: int) -> int:
    """Sets --max_train_steps from --max_train_epochs and --save_every_n_epochs from --save_n_epoch_ratio; returns the
    number of epochs."""
    steps_per_epoch = math.ceil(_batches_per_epoch(plans, num_processes) / args.gradient_accumulation_steps)  # never 0: empty datasets are refused
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.save_n_epoch_ratio:
        args.save_every_n_epochs = max(1, num_epochs // args.save_n_epoch_ratio)
    return num_epochs


def _batches_per_epoch(plans: list[DatasetPlan], num_processes: int) -> int:
    return EpochBatches(plans, 0, num_processes=num_processes).batches_per_epoch


def resume_point(args: argparse.Namespace, resumed: TrainState, fingerprint: dict, batches_per_epoch: int) -> Progress:
    """Where a resumed run goes on, after checking that it trains what the saved run trained (before anything loads)."""
    check_same_run(args.resume, resumed.run, fingerprint)
    if resumed.step >= args.max_train_steps:
        raise UserError(f"--resume {args.resume}: that run already did {resumed.step} steps, and --max_train_steps is {args.max_train_steps}; raise it to train further.")
    if resumed.batches_done >= batches_per_epoch:
        return Progress(resumed.epoch + 1, resumed.step, 0)
    return Progress(resumed.epoch, resumed.step, resumed.batches_done)


def prepare(args: argparse.Namespace, model: StableDiffusionModel, plans: list[DatasetPlan], num_epochs: int, fingerprint: dict, start: Progress) -> Run:
    accelerator = Accelerator(
        cpu=_processes_on_cpus(),
        gradient_accumulation_steps=1,  # accumulation is counted here, so that an epoch's last partial group also steps
        mixed_precision=args.mixed_precision,
        log_with=(args.log_with or "tensorboard") if args.logging_dir else None,
        project_dir=_log_run_folder(args),
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

    sampler = EpochBatches(plans, args.seed, args.gradient_accumulation_steps, accelerator.process_index, accelerator.num_processes)
    settings = BatchSettings(args.seed, args.max_token_length, args.prior_loss_weight, args.max_train_steps, args.skip_bad_images)
    batches = TrainingBatches(plans, model.tokenizers[0], settings, latents)
    workers = worker_count(args.max_data_loader_n_workers, latents is not None)
    loader = make_data_loader(batches, sampler, workers, args.persistent_data_loader_workers, pin_memory=accelerator.device.type == "cuda")

    # accelerate steps a prepared scheduler once per process at every optimizer step, so its length counts processes
    total_scheduler_steps = args.max_train_steps * accelerator.num_processes
    warmup = warmup_steps(args.lr_warmup_steps, args.max_train_steps) * accelerator.num_processes
    lr_scheduler = make_lr_scheduler(args.lr_scheduler, optimizer, warmup, total_scheduler_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power,
                                     args.learning_rate)
    network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)
    if args.full_fp16:
        _allow_fp16_gradients(accelerator)

    if args.resume:
        _load_state(args.resume, accelerator, start)
    counts = {
        "num_train_images": sum(plan.num_train_images for plan in plans),
        "num_reg_images": sum(plan.num_reg_images for plan in plans),
        "num_batches_per_epoch": sampler.batches_per_epoch,
        "num_epochs": num_epochs,
    }
    metadata = training_metadata(args, plans, counts, optimizer_text, time.time())
    return Run(args, accelerator, model, plans, network, optimizer, lr_scheduler, sampler, loader, weight_dtype, latent_scale,
               train_unet, train_text_encoder, num_epochs, metadata, lr_descriptions, fingerprint, start, _caption_states(plans, train_text_encoder),
               diffusion.training_scheduler(model.v_prediction, args.zero_terminal_snr), diffusion.NoiseSettings.from_args(args),
               diffusion.LossSettings.from_args(args))


def _caption_states(plans: list[DatasetPlan], train_text_encoder: bool) -> CaptionStates | None:
    captions_vary = any(CaptionSettings.of(subset).varies_per_use for plan in plans for subset in plan.config.subsets)
    return None if train_text_encoder or captions_vary else CaptionStates()


def _load_state(folder: str, accelerator: Accelerator, start: Progress) -> None:
    """Load the state folder into the prepared network, optimizer, scheduler and RNGs."""
    try:
        accelerator.load_state(folder)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"--resume {folder}: the state could not be loaded ({error}); was it saved by this trainer with these settings?") from error
    print(f"resuming {folder}: epoch {start.epoch}, step {start.step}")


def _allow_fp16_gradients(accelerator: Accelerator) -> None:
    """With --full_fp16 the LoRA weights and so their gradients are fp16, which torch's gradient scaler refuses to
    unscale unless told it may, as sd-scripts tells it."""
    scaler = accelerator.scaler
    if scaler is None:
        return
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(optimizer, inv_scale, found_inf, True)


def _log_run_folder(args) -> str | None:
    """`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`, as sd-scripts names a run's log folder."""
    if not args.logging_dir:
        return None
    return str(Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cache_latents(args, model: StableDiffusionModel, plans, accelerator: Accelerator):
    dtype = vae_dtype(args)
    vae = place(model.vae, accelerator.device, dtype)
    with accelerator.main_process_first():  # with a disk cache, the other processes then read the main one's files
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
        f"model: {run.model.source} ({run.model.family.label}, {'v' if run.model.v_prediction else 'epsilon'} prediction)"
        f"{f', VAE from {args.vae}' if args.vae else ''}",
        f"training: {run.num_epochs} epochs of {run.sampler.batches_per_epoch} batches, {args.max_train_steps} optimizer steps, "
        f"effective batch {total_batch} (batch x {args.gradient_accumulation_steps} accumulation x {run.accelerator.num_processes} processes)",
        f"network: {args.network_module}, rank {rank}, alpha {alpha:g} (scale {lora_scale(alpha, rank):g}), "
        f"{len(network.unet_loras) if run.train_unet else 0} U-Net and {len(network.text_encoder_loras) if run.train_text_encoder else 0} text-encoder modules trained",
        f"optimizer: {run.metadata['ss_optimizer']}, "
        + ("step size chosen by Adafactor (relative_step), schedule adafactor" if uses_relative_step(run.optimizer.optimizer)
           else f"learning rates per group {', '.join(rates)}, schedule {args.lr_scheduler}"),
        f"precision: {args.mixed_precision} on {run.accelerator.device}, attention: {'xformers' if args.xformers else 'PyTorch SDPA'}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}",
        f"text encoder: {_text_encoder_use(run)}",
    ]


def _text_encoder_use(run: Run) -> str:
    if run.train_text_encoder:
        return "trained, so its outputs are computed at every step"
    if run.caption_states:
        return "frozen, each caption encoded once at its first use"
    return "frozen, but captions change from use to use (shuffle, tag dropout, wildcards or token warmup), so encoded at every step"


def train_loop(run: Run) -> Path:
    args, accelerator = run.args, run.accelerator
    if args.logging_dir:
        accelerator.init_trackers("network_train")
    where = run.start
    recent_losses = deque(maxlen=math.ceil(run.sampler.batches_per_epoch / args.gradient_accumulation_steps))  # about an epoch, as sd-scripts
    progress = tqdm(total=args.max_train_steps, initial=where.step, desc="steps", disable=not accelerator.is_main_process)
    if run.samples and run.samples.at_first and where.step == 0:
        _draw_samples(run, epoch=0)
    with StopRequest() as stop:
        for epoch in range(run.start.epoch, run.num_epochs + 1):
            skip = run.start.batches_done if epoch == run.start.epoch else 0
            where = _train_epoch(run, Progress(epoch, where.step, skip), recent_losses, progress, stop)
            finished = where.step >= args.max_train_steps
            if not finished and stop.agreed(accelerator):
                _stop(run, where)
            if not finished and args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0:
                _save_epoch(run, where)
            if (where.batches_done == run.sampler.batches_per_epoch or finished) and run.samples and run.samples.after_epoch(epoch):
                _draw_samples(run, epoch=epoch)
            if finished:
                break
    progress.close()
    final = final_file(args.output_dir, args.output_name, args.save_model_as)
    _save(run, final, where)
    if args.save_state or args.save_state_on_train_end:
        save_state_folder(accelerator, state_folder(final), _train_state(run, where))
    accelerator.end_training()
    return final


def _train_epoch(run: Run, where: Progress, recent_losses: deque, progress: tqdm, stop: StopRequest) -> Progress:
    """Train from `where` to the end of its epoch, or until the last step or a stop request; returns where it ended."""
    args, accumulation = run.args, run.args.gradient_accumulation_steps
    run.sampler.set_epoch(where.epoch, where.step - where.batches_done // accumulation, where.batches_done)
    run.network.train()
    epoch_losses, group_losses = [], []
    for position, batch in enumerate(run.loader, start=where.batches_done):
        if position % accumulation == 0:
            _start_step(run, where.step)
            group_losses = []
        is_sync = (position + 1) % accumulation == 0 or position + 1 == run.sampler.batches_per_epoch
        if batch is not None:
            group_losses.append(_micro_step(run, batch, where.step + 1))
        if not is_sync:
            continue
        _optimizer_step(run)
        where = Progress(where.epoch, where.step + 1, position + 1)
        progress.update(1)
        if group_losses:
            recent_losses.append(sum(group_losses) / len(group_losses))
            epoch_losses.extend(group_losses)
            progress.set_postfix(avr_loss=f"{sum(recent_losses) / len(recent_losses):.4f}")
            _log(run, recent_losses[-1], recent_losses, where.step)
        if run.samples and run.samples.after_step(where.step):
            _draw_samples(run, step=where.step)
        if run.on_step:
            run.on_step(where.step)
        if args.save_every_n_steps and where.step % args.save_every_n_steps == 0 and where.step < args.max_train_steps:
            _save_step(run, where)
        if where.step >= args.max_train_steps or stop.agreed(run.accelerator):
            return where
    if args.logging_dir and epoch_losses:
        run.accelerator.log({"loss/epoch_average": sum(epoch_losses) / len(epoch_losses)}, step=where.epoch)
    return Progress(where.epoch, where.step, run.sampler.batches_per_epoch)


def _draw_samples(run: Run, epoch: int | None = None, step: int | None = None) -> None:
    """The main process draws the sample images; the others wait for it."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        files = draw_samples(run.samples, run.model, accelerator.unwrap_model(run.network), run.args.output_dir, run.args.output_name,
                             clip_skip=run.args.clip_skip, device=accelerator.device, dtype=run.weight_dtype, epoch=epoch, step=step)
        print(f"sample images: {', '.join(file.name for file in files)}")
    accelerator.wait_for_everyone()


class StopRequest:
    """Ctrl-C during training lets the optimizer step in progress finish, then stops the run (saving a state with
    --save_state); a second Ctrl-C interrupts at once. With several processes they agree on the step to stop at."""

    def __init__(self):
        self.requested = False
        self.previous = None
        self.pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked data-loader worker: the training process decides
            return
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nCtrl-C: stopping after this optimizer step (press it again to stop at once)", flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())


def _stop(run: Run, where: Progress) -> None:
    if run.args.save_state:
        folder = state_folder(step_file(run.args.output_dir, run.args.output_name, where.step, run.args.save_model_as))
        save_state_folder(run.accelerator, folder, _train_state(run, where))
        print(f"stopped at step {where.step}; continue with --resume {folder}")
    else:
        print(f"stopped at step {where.step}; nothing was saved (with --save_state, Ctrl-C saves a state to resume from)")
    raise KeyboardInterrupt


def _train_state(run: Run, where: Progress) -> TrainState:
    return TrainState(where.epoch, where.step, where.batches_done, run.args.seed, run.fingerprint)


def _start_step(run: Run, step: int) -> None:
    """A network with an `on_step_start()` method (networks.dylora draws its rank there) hears of each optimizer step.
    Its random draws are seeded by the step, so that every process draws the same."""
    network = run.accelerator.unwrap_model(run.network)
    if hasattr(network, "on_step_start"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random.Random(f"step/{run.args.seed}/{step}").getrandbits(63))
            network.on_step_start()


def _micro_step(run: Run, batch: dict, step: int) -> float:
    """Forward and backward of one batch; returns its loss, checked to be finite before the optimizer uses it."""
    args, device = run.args, run.accelerator.device
    generator = torch.Generator(device).manual_seed(batch["batch_seed"])
    with torch.no_grad():
        if batch["latents"] is not None:
            latents = batch["latents"].to(device, non_blocking=True)
        else:
            vae = run.model.vae
            latents = vae.encode(batch["images"].to(device, vae.dtype)).latent_dist.sample(generator).float()
        latents = (latents * run.latent_scale).to(run.weight_dtype)
    with run.accelerator.autocast(), torch.set_grad_enabled(run.train_text_encoder):
        if run.caption_states:
            context = run.caption_states.encode(run.model.text_encoders[0], batch["input_ids"].to(device), args.clip_skip)
        else:
            context = encode_tokens(run.model.text_encoders[0], batch["input_ids"].to(device), args.clip_skip)
    noise = diffusion.make_noise(latents, run.noise, generator)
    timesteps = diffusion.sample_timesteps(latents.shape[0], args.min_timestep, args.max_timestep, device, generator)
    perturbation = diffusion.input_perturbation(noise, run.noise, generator)
    noisy, target = diffusion.noisy_latents_and_target(run.noise_scheduler, latents, noise, timesteps, perturbation)
    if args.gradient_checkpointing:
        noisy.requires_grad_(True)  # checkpointed segments need an input that asks for gradients
    with run.accelerator.autocast():
        prediction = run.model.unet(noisy, timesteps, context.to(run.weight_dtype)).sample
    threshold = run.loss.threshold(timesteps, run.noise_scheduler)
    loss = diffusion.per_sample_loss(prediction, target, batch["loss_weights"], batch["alpha_masks"], run.loss.loss_type, threshold)
    loss = diffusion.snr_weighted_loss(loss, diffusion.snr(run.noise_scheduler, timesteps), run.loss, run.model.v_prediction).mean()
    run.accelerator.backward(loss / args.gradient_accumulation_steps)
    value = loss.detach().item()  # read once the backward is queued, so the device does not wait for the host
    if not math.isfinite(value):
        raise UserError(_non_finite_diagnosis(args, step))
    return value


def _optimizer_step(run: Run) -> None:
    args = run.args
    if run.accelerator.num_processes > 1:
        _average_gradients(run.accelerator.unwrap_model(run.network))
    if args.max_grad_norm:
        run.accelerator.clip_grad_norm_(run.network.parameters(), args.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if args.scale_weight_norms:
        run.accelerator.unwrap_model(run.network).apply_max_norm_regularization(args.scale_weight_norms, run.accelerator.device)


def _average_gradients(network: torch.nn.Module) -> None:
    """Average the LoRA gradients over the processes in one all-reduce. DistributedDataParallel cannot do it: the
    network is never called through its wrapper (its modules run inside the U-Net and text encoder), so its
    gradient hooks stay idle, as in sd-scripts, which reduces each gradient by hand."""
    gradients = [parameter.grad for parameter in network.parameters() if parameter.grad is not None]
    flat = torch._utils._flatten_dense_tensors(gradients)
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for gradient, averaged in zip(gradients, torch._utils._unflatten_dense_tensors(flat, gradients)):
        gradient.copy_(averaged)


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


def _save_step(run: Run, where: Progress) -> None:
    args = run.args
    _save_and_prune(run, lambda n: step_file(args.output_dir, args.output_name, n, args.save_model_as), where.step, where,
                    step_file_to_remove(where.step, args.save_every_n_steps, args.save_last_n_steps),
                    step_file_to_remove(where.step, args.save_every_n_steps, args.save_last_n_steps_state or args.save_last_n_steps))


def _save_epoch(run: Run, where: Progress) -> None:
    args = run.args
    _save_and_prune(run, lambda n: epoch_file(args.output_dir, args.output_name, n, args.save_model_as), where.epoch, where,
                    epoch_file_to_remove(where.epoch, args.save_every_n_epochs, args.save_last_n_epochs),
                    epoch_file_to_remove(where.epoch, args.save_every_n_epochs, args.save_last_n_epochs_state or args.save_last_n_epochs))


def _save_and_prune(run: Run, file_for, number: int, where: Progress, old_number: int | None, old_state_number: int | None) -> None:
    """Save as file_for(number), with its state folder under --save_state, then remove the save (and the state) that
    fell out of the kept window."""
    _save(run, file_for(number), where)
    if run.args.save_state:
        save_state_folder(run.accelerator, state_folder(file_for(number)), _train_state(run, where))
    if not run.accelerator.is_main_process:
        return
    if old_number is not None:
        file_for(old_number).unlink(missing_ok=True)
    if run.args.save_state and old_state_number is not None:
        shutil.rmtree(state_folder(file_for(old_state_number)), ignore_errors=True)


def _save(run: Run, path: Path, where: Progress) -> None:
    run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return
    network = run.accelerator.unwrap_model(run.network)
    if not all(torch.isfinite(parameter).all() for parameter in network.parameters()):
        raise UserError(f"the LoRA weights hold NaN or infinite values at step {where.step}; {path.name} was not written. Lower the learning rate or use bf16.")
    metadata = finished_metadata(run.metadata, where.epoch, where.step)
    if run.args.no_metadata:
        metadata = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_dtype = SAVE_PRECISION_DTYPES[run.args.save_precision] if run.args.save_precision else None
    network.save_weights(path, save_dtype, metadata)
    print(f"saved {path}")
