"""Everything the training loop needs, built once before the first step (specs/training.md section 0): the
accelerator, cached latents and text-encoder outputs, the network applied to the frozen model, the optimizer and
schedule, the batches, and the saver."""

from __future__ import annotations

import datetime
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
from diffusers import DDPMScheduler

from library.cpu_layers import onednn_products_available, use_fast_cpu_layers
from library.dataset.captions import CaptionSettings
from library.dataset.latent_cache import cache_latents
from library.dataset.loader import BatchSettings, EpochBatches, TrainingBatches, make_data_loader, worker_count
from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.model_files.stable_diffusion import place
from library.text_encoding import CaptionStates
from library.training import diffusion
from library.training.families import TrainingFamily
from library.training.fp8 import store_weights_in_fp8
from library.training.network_module import build_network
from library.training.optimizers import is_schedule_free, make_lr_scheduler, make_optimizer, warns_about_learning_rate
from library.training.options import TrainingOptions
from library.training.samples import SampleSchedule
from library.training.saving import RunFacts, Saver, base_model_metadata, training_metadata
from library.training.state import Progress, TrainState, load_state_folder
from library.training.text_encoder_cache import cache_text_encoder_outputs
from library.training.validation import Validation, validation_keys, validation_plans, validation_schedule
from networks.lora import create_network_from_weights


@dataclass(frozen=True)
class TrainingLength:
    """The run's length in steps and epochs, from --max_train_steps or --max_train_epochs and the datasets."""

    max_train_steps: int
    num_epochs: int
    batches_per_epoch: int  # each process's
    steps_per_epoch: int  # optimizer steps: the batches over the accumulation, the last group possibly partial
    save_every_n_epochs: int | None  # --save_every_n_epochs, or from --save_n_epoch_ratio


def training_length(options: TrainingOptions, plans: list[DatasetPlan], num_processes: int) -> TrainingLength:
    batches_per_epoch = EpochBatches(plans, 0, num_processes=num_processes).batches_per_epoch
    steps_per_epoch = math.ceil(
        batches_per_epoch / options.length.gradient_accumulation_steps
    )  # never 0: empty datasets are refused
    max_train_steps = options.length.max_train_steps
    if options.length.max_train_epochs:
        max_train_steps = options.length.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    save_every_n_epochs = options.saving.save_every_n_epochs
    if options.saving.save_n_epoch_ratio:
        save_every_n_epochs = max(1, num_epochs // options.saving.save_n_epoch_ratio)
    return TrainingLength(max_train_steps, num_epochs, batches_per_epoch, steps_per_epoch, save_every_n_epochs)


@dataclass
class Optimization:
    network: torch.nn.Module  # prepared by accelerate
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    lr_descriptions: list[str]  # one per parameter group: textencoder, unet, unet_block3 plus, ...
    description: str  # the optimizer's class and arguments, as the metadata's ss_optimizer


@dataclass
class Batches:
    plans: list[DatasetPlan]
    sampler: EpochBatches
    loader: torch.utils.data.DataLoader
    caption_states: CaptionStates | None  # the text encoders' outputs per caption, when neither changes


@dataclass
class Run:
    """What the loop needs, built once by `prepare`."""

    options: TrainingOptions
    length: TrainingLength
    seed: int
    accelerator: Accelerator
    family: TrainingFamily
    attention: str  # what the U-Net's attention runs on
    batches: Batches
    optimization: Optimization
    noise_scheduler: DDPMScheduler
    saver: Saver
    start: Progress
    samples: SampleSchedule | None
    on_step: Callable[[int], None] | None
    validation: Validation | None

    @property
    def network(self) -> torch.nn.Module:
        """The network itself, unwrapped from accelerate."""
        return self.accelerator.unwrap_model(self.optimization.network)


def processes_on_cpus() -> bool:
    """Several processes (torchrun, accelerate launch) without CUDA train together on the CPU with gloo; accelerate
    would otherwise run them as independent copies that overwrite each other's files."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def prepare(
    options: TrainingOptions,
    family: TrainingFamily,
    plans: list[DatasetPlan],
    length: TrainingLength,
    seed: int,
    fingerprint: dict,
    start: Progress,
    samples: SampleSchedule | None,
    on_step: Callable[[int], None] | None,
) -> Run:
    # accelerate keeps one precision per process; forget the last run's, so that one process can train several times
    # (tests, the benchmark, a notebook). The process group (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=processes_on_cpus(),
        gradient_accumulation_steps=1,  # accumulation is counted here, so that an epoch's last partial group also steps
        mixed_precision=options.model.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=options.ddp_timeout))]
        if options.ddp_timeout
        else None,
        log_with=options.logging.tracker,
        project_dir=_log_run_folder(options),
    )
    _seed_everything(seed)
    _merge_base_weights(options, family)
    held_out = validation_plans(plans)
    every_plan = plans + held_out
    latents = _cache_latents(options, family, every_plan, accelerator) if options.dataset.cache_latents else None
    caption_states = (
        _cache_text_encoder_outputs(options, family, every_plan, accelerator)
        if options.text_encoder_caching.in_memory
        else None
    )
    on_device = caption_states is None  # cached text-encoder outputs leave the encoders on the CPU
    _freeze_and_place(options, family, accelerator.device, vae_needed=latents is None, text_encoders_needed=on_device)
    _use_fast_cpu_layers(options, family, accelerator.device, text_encoders_on_device=on_device)
    _store_base_in_fp8(options, family, text_encoders_on_device=on_device)
    network = build_network(options.network, family)
    attention = _set_attention(options, family)
    if options.model.gradient_checkpointing:
        _enable_gradient_checkpointing(family, options.network.train_text_encoder)
    if options.model.torch_compile:
        family.compile_unet(options.model.dynamo_backend)
    optimization = _optimization(options, network, accelerator, length, start)
    if options.saving.resume:
        load_state_folder(options.saving.resume, accelerator, start)
    if is_schedule_free(optimization.optimizer.optimizer):  # saved states hold the averaged (eval) weights
        optimization.optimizer.optimizer.train()

    dataset = options.dataset
    settings = BatchSettings(
        seed,
        dataset.max_token_length,
        dataset.prior_loss_weight,
        length.max_train_steps,
        dataset.skip_bad_images,
        dataset.weighted_captions,
    )
    batches = _batches(options, family, plans, settings, accelerator, latents, caption_states)
    validation = _validation(options, held_out, settings, family, accelerator, latents)
    facts = RunFacts(
        family=family.model.family,
        v_prediction=family.model.v_prediction,
        seed=seed,
        session_id=random.randint(0, 2**32),
        max_train_steps=length.max_train_steps,
        num_epochs=length.num_epochs,
        num_batches_per_epoch=batches.sampler.batches_per_epoch,
        optimizer=optimization.description,
        started_at=time.time(),
        resolution=plans[0].config.resolution,
    )
    metadata = training_metadata(options, plans, facts), base_model_metadata(options, facts)

    def train_state(where: Progress) -> TrainState:
        return TrainState(where.epoch, where.step, where.batches_done, seed, fingerprint)

    saver = Saver(accelerator, options.saving, length.save_every_n_epochs, *metadata, train_state)
    noise_scheduler = diffusion.training_scheduler(family.model.v_prediction, options.diffusion.zero_terminal_snr)
    return Run(
        options=options,
        length=length,
        seed=seed,
        accelerator=accelerator,
        family=family,
        attention=attention,
        batches=batches,
        optimization=optimization,
        noise_scheduler=noise_scheduler,
        saver=saver,
        start=start,
        samples=samples,
        on_step=on_step,
        validation=validation,
    )


def _batches(
    options: TrainingOptions,
    family: TrainingFamily,
    plans: list[DatasetPlan],
    settings: BatchSettings,
    accelerator: Accelerator,
    latents: dict | None,
    caption_states: CaptionStates | None,
) -> Batches:
    """This process's share of each epoch's batches, and the loader that builds them."""
    dataset = options.dataset
    sampler = EpochBatches(
        plans,
        settings.seed,
        options.length.gradient_accumulation_steps,
        accelerator.process_index,
        accelerator.num_processes,
    )
    training_batches = TrainingBatches(plans, family.model.tokenizers, settings, latents)
    workers = worker_count(dataset.max_data_loader_n_workers, latents is not None)
    pin_memory = accelerator.device.type == "cuda"
    loader = make_data_loader(training_batches, sampler, workers, dataset.persistent_data_loader_workers, pin_memory)
    return Batches(plans, sampler, loader, caption_states or _caption_states(plans, options.network.train_text_encoder))


def _validation(
    options: TrainingOptions,
    held_out: list[DatasetPlan],
    settings: BatchSettings,
    family: TrainingFamily,
    accelerator: Accelerator,
    latents: dict | None,
) -> Validation | None:
    if not held_out:
        return None
    process, processes = accelerator.process_index, accelerator.num_processes
    keys = validation_keys(held_out, options.validation.max_validation_steps, process, processes)
    batches = TrainingBatches(held_out, family.model.tokenizers, settings, latents)
    num_images = sum(len(plan.samples) for plan in held_out)
    return Validation(validation_schedule(options.validation), batches, keys, num_images)


def _caption_states(plans: list[DatasetPlan], train_text_encoder: bool) -> CaptionStates | None:
    captions_vary = any(CaptionSettings.of(subset).varies_per_use for plan in plans for subset in plan.config.subsets)
    return None if train_text_encoder or captions_vary else CaptionStates()


def _optimization(
    options: TrainingOptions,
    network: torch.nn.Module,
    accelerator: Accelerator,
    length: TrainingLength,
    start: Progress,
) -> Optimization:
    network_options, optimizer_options = options.network, options.optimizer
    param_groups, lr_descriptions = network.prepare_optimizer_params(
        list(network_options.text_encoder_lr) or None, network_options.unet_lr, optimizer_options.learning_rate
    )
    if not param_groups:
        raise UserError(
            "every learning rate is 0, so nothing would be trained; give --learning_rate, --unet_lr or "
            "--text_encoder_lr above 0."
        )
    for note in warns_about_learning_rate(optimizer_options.name, param_groups):
        print(note)
    network.to(accelerator.device, options.model.network_dtype)
    optimizer, description = make_optimizer(
        optimizer_options.name, optimizer_options.optimizer_args, param_groups, optimizer_options.learning_rate
    )
    processes = accelerator.num_processes
    lr_scheduler = make_lr_scheduler(
        optimizer_options.schedule, optimizer, length.max_train_steps, processes, optimizer_options.learning_rate
    )
    if not options.saving.resume:  # a resumed run loads the schedule's state; --initial_step starts it at its step
        _fast_forward(lr_scheduler, start.step * processes)
    network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)
    if options.model.full_fp16:
        _allow_fp16_gradients(accelerator)
    return Optimization(network, optimizer, lr_scheduler, lr_descriptions, description)


def _fast_forward(lr_scheduler, steps: int) -> None:
    with warnings.catch_warnings():  # torch warns about a schedule that steps before the optimizer does
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            lr_scheduler.step()


def _allow_fp16_gradients(accelerator: Accelerator) -> None:
    """With --full_fp16 the LoRA weights and so their gradients are fp16, which torch's gradient scaler refuses to
    unscale unless told it may, as sd-scripts tells it."""
    scaler = accelerator.scaler
    if scaler is None:
        return
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(
        optimizer, inv_scale, found_inf, True
    )


def _log_run_folder(options: TrainingOptions) -> str | None:
    """`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`, as sd-scripts names a run's log folder."""
    if not options.logging.logging_dir:
        return None
    return str(Path(options.logging.logging_dir) / f"{options.logging.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cache_latents(
    options: TrainingOptions, family: TrainingFamily, plans: list[DatasetPlan], accelerator: Accelerator
):
    vae = place(family.model.vae, accelerator.device, family.vae_dtype)
    with accelerator.main_process_first():  # with a disk cache, the other processes then read the main one's files
        latents, _, _ = cache_latents(
            plans,
            vae,
            accelerator.device,
            family.vae_dtype,
            options.dataset.vae_batch_size,
            options.dataset.cache_latents_to_disk,
            progress=accelerator.is_main_process,
            skip_bad_images=options.dataset.skip_bad_images,
            suffix=family.latent_cache_suffix,
        )
    place(family.model.vae, "cpu")  # not needed any more: free the device memory
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return latents


def _cache_text_encoder_outputs(
    options: TrainingOptions, family: TrainingFamily, plans: list[DatasetPlan], accelerator: Accelerator
) -> CaptionStates:
    to_disk = options.text_encoder_caching.to_disk
    with accelerator.main_process_first():  # with a disk cache, the other processes then read the main one's files
        states, encoded, reused = cache_text_encoder_outputs(
            family,
            plans,
            options.dataset.max_token_length,
            to_disk,
            accelerator.device,
            options.model.weight_dtype,
            progress=accelerator.is_main_process,
        )
    if accelerator.is_main_process:
        print(
            f"text encoder outputs: {encoded} captions encoded"
            + (f", {reused} reused from _te_outputs.npz files" if to_disk else "")
        )
    return states


def _merge_base_weights(options: TrainingOptions, family: TrainingFamily) -> None:
    """--base_weights: each LoRA's delta added into the base model's weights before anything else sees them (with
    merge_lora.py's arithmetic), so that the new LoRA learns on top of them."""
    network_options, model = options.network, family.model
    text_encoder = family.network_text_encoder()
    for file, multiplier in zip(network_options.base_weights, network_options.base_weights_multiplier):
        merging, weights = create_network_from_weights(multiplier, file, model.vae, text_encoder, model.unet)
        merging.merge_to(text_encoder, model.unet, weights)
        modules = len(merging.text_encoder_loras) + len(merging.unet_loras)
        print(f"merged {file} into the base model at multiplier {multiplier:g} ({modules} modules)")


def _set_attention(options: TrainingOptions, family: TrainingFamily) -> str:
    """PyTorch scaled-dot-product attention is diffusers' default; xformers replaces it when asked and importable."""
    if not options.model.xformers:
        return "PyTorch SDPA"
    try:
        family.model.unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as error:
        print(f"--xformers: not usable here ({error}); using PyTorch's scaled-dot-product attention.")
        return "PyTorch SDPA"
    return "xformers"


def _freeze_and_place(
    options: TrainingOptions, family: TrainingFamily, device: torch.device, vae_needed: bool, text_encoders_needed: bool
) -> None:
    """Frozen modules on the device in the run's dtype; the VAE and text encoders stay on the CPU when their outputs
    are cached (sample images bring them over for the drawing)."""
    model = family.model
    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)
        module.eval()
    place(model.unet, device, options.model.weight_dtype)
    for text_encoder in model.text_encoders:
        place(text_encoder, device if text_encoders_needed else "cpu", options.model.weight_dtype)
    if vae_needed:
        place(model.vae, device, family.vae_dtype)


def uses_fast_cpu_layers(options: TrainingOptions, device: torch.device) -> bool:
    """Float32 on the CPU: the frozen layers that the LoRA adapts and the gradients pass through run on oneDNN's
    matrix product (library/cpu_layers.py). A compiled U-Net is left to the compiler, float8 layers to their own
    forward."""
    model = options.model
    return (
        device.type == "cpu"
        and model.weight_dtype == torch.float32
        and not (model.torch_compile or model.fp8_base or model.fp8_base_unet)
        and onednn_products_available()
    )


def _use_fast_cpu_layers(
    options: TrainingOptions, family: TrainingFamily, device: torch.device, text_encoders_on_device: bool
) -> None:
    if not uses_fast_cpu_layers(options, device):
        return
    use_fast_cpu_layers(family.model.unet)
    if text_encoders_on_device:
        for text_encoder in family.model.text_encoders:
            use_fast_cpu_layers(text_encoder)


def _store_base_in_fp8(options: TrainingOptions, family: TrainingFamily, text_encoders_on_device: bool) -> None:
    """--fp8_base: the U-Net and the text encoders on the device (cached ones stay on the CPU as they are);
    --fp8_base_unet: the U-Net only."""
    model, dtype = family.model, options.model.weight_dtype
    if options.model.fp8_base or options.model.fp8_base_unet:
        store_weights_in_fp8(model.unet, dtype)
    if options.model.fp8_base and text_encoders_on_device:
        for text_encoder in model.text_encoders:
            store_weights_in_fp8(text_encoder, dtype)


def _enable_gradient_checkpointing(family: TrainingFamily, train_text_encoder: bool) -> None:
    family.model.unet.enable_gradient_checkpointing()
    family.model.unet.train()  # diffusers checkpoints only in train mode
    if train_text_encoder:
        for text_encoder in family.model.text_encoders:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            text_encoder.train()
