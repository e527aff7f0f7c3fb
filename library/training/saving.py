"""When and under which names the trained LoRA is saved (specs/training.md 7.3), the training metadata written
into each file (7.6), and the saving itself: the main process writes, old saves beyond the kept window are removed."""

from __future__ import annotations

import base64
import dataclasses
import json
import mimetypes
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from library.dataset.captions import tag_frequency
from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.metadata import base_model_version, lora_modelspec
from library.model_files.family import ModelFamily
from library.training.diffusion import NUM_TRAIN_TIMESTEPS
from library.training.options import SavingOptions, TrainingOptions
from library.training.state import Progress, TrainState, save_state_folder

SAVE_FORMATS = ("safetensors", "ckpt", "pt")
DEFAULT_NAMES = {"epoch": "epoch", "step": "at", "last": "last"}


def epoch_file(output_dir: str | Path, output_name: str | None, epoch: int, save_model_as: str) -> Path:
    """`<name>-000001.safetensors` (`epoch-000001` without --output_name)."""
    return Path(output_dir) / f"{output_name or DEFAULT_NAMES['epoch']}-{epoch:06d}.{save_model_as}"


def step_file(output_dir: str | Path, output_name: str | None, step: int, save_model_as: str) -> Path:
    """`<name>-step00000100.safetensors` (`at-step00000100` without --output_name)."""
    return Path(output_dir) / f"{output_name or DEFAULT_NAMES['step']}-step{step:08d}.{save_model_as}"


def final_file(output_dir: str | Path, output_name: str | None, save_model_as: str) -> Path:
    """`<name>.safetensors` (`last` without --output_name)."""
    return Path(output_dir) / f"{output_name or DEFAULT_NAMES['last']}.{save_model_as}"


def state_folder(model_file: Path) -> Path:
    """The --save_state folder saved with a model file: `<name>-000001-state`, `<name>-step00000100-state`,
    `<name>-state`."""
    return model_file.with_name(f"{model_file.stem}-state")


def epoch_file_to_remove(epoch: int, save_every_n_epochs: int, save_last_n_epochs: int | None) -> int | None:
    """With --save_last_n_epochs N, saving epoch e removes epoch e - every * N (the N latest are kept)."""
    if not save_last_n_epochs:
        return None
    old = epoch - save_every_n_epochs * save_last_n_epochs
    return old if old > 0 else None


def step_file_to_remove(step: int, save_every_n_steps: int, save_last_n_steps: int | None) -> int | None:
    """With --save_last_n_steps N, saving step s removes the step save at (s - N - 1) rounded down to a multiple of
    the save interval (step saves within the last N steps are kept)."""
    if not save_last_n_steps:
        return None
    old = (step - save_last_n_steps - 1) // save_every_n_steps * save_every_n_steps
    return old if old > 0 else None


@dataclass(frozen=True)
class RunFacts:
    """What the training metadata says beyond the options: the model really trained and the counts of the run."""

    family: ModelFamily
    v_prediction: bool
    seed: int
    session_id: int
    max_train_steps: int
    num_epochs: int
    num_batches_per_epoch: int
    optimizer: str  # the optimizer's class and arguments, as sd-scripts writes it
    started_at: float
    resolution: tuple[int, int]  # the first dataset's, for modelspec.resolution


def base_model_metadata(options: TrainingOptions, facts: RunFacts) -> dict[str, str]:
    """The keys that say which model the LoRA is for, from the model the run trained (not from the flags): written
    with --no_metadata too, as sd-scripts' minimum metadata."""
    return {
        "ss_v2": str(facts.family is ModelFamily.SD2),
        "ss_base_model_version": base_model_version(facts.family, facts.v_prediction),
        **_modelspec(options, facts),
    }


def _modelspec(options: TrainingOptions, facts: RunFacts) -> dict[str, str]:
    """The LoRA's ModelSpec with --metadata_* (title, else the output name), the training resolution, and, as
    sd-scripts adds them, the timestep range and the CLIP skip."""
    spec, given = options.modelspec, dataclasses.asdict(options.modelspec)
    title = spec.title or options.saving.output_name or DEFAULT_NAMES["last"]
    width, height = facts.resolution
    keys = lora_modelspec(facts.family, facts.v_prediction, title, f"{width}x{height}")
    keys |= {f"modelspec.{field}": value for field, value in given.items() if value is not None and field != "title"}
    if spec.thumbnail:
        keys["modelspec.thumbnail"] = _data_url(spec.thumbnail)
    diffusion = options.diffusion
    if diffusion.min_timestep is not None or diffusion.max_timestep is not None:
        keys["modelspec.timestep_range"] = (
            f"{diffusion.min_timestep or 0},{diffusion.max_timestep or NUM_TRAIN_TIMESTEPS}"
        )
    if options.model.clip_skip is not None:
        keys["modelspec.encoder_layer"] = str(options.model.clip_skip)
    return keys


def _data_url(thumbnail: str) -> str:
    """An image file as a data: URL, as sd-scripts stores --metadata_thumbnail; any other text as it is."""
    path = Path(thumbnail)
    if not path.is_file():
        return thumbnail
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def training_metadata(options: TrainingOptions, plans: Sequence[DatasetPlan], facts: RunFacts) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes from the run's options and datasets; the saving code adds the epoch, the
    step and the finish time."""
    model, network, optimizer, diffusion = options.model, options.network, options.optimizer, options.diffusion
    noise, loss, dataset = diffusion.noise, diffusion.loss, options.dataset
    metadata = {
        "ss_session_id": str(facts.session_id),
        "ss_training_started_at": str(facts.started_at),
        "ss_output_name": options.saving.output_name or "",
        "ss_learning_rate": str(optimizer.learning_rate),
        "ss_text_encoder_lr": str(network.text_encoder_lr[0] if network.text_encoder_lr else None),
        "ss_unet_lr": str(network.unet_lr),
        "ss_num_train_images": str(sum(plan.num_train_images for plan in plans)),
        "ss_num_reg_images": str(sum(plan.num_reg_images for plan in plans)),
        "ss_num_batches_per_epoch": str(facts.num_batches_per_epoch),
        "ss_num_epochs": str(facts.num_epochs),
        "ss_max_train_steps": str(facts.max_train_steps),
        "ss_gradient_checkpointing": str(model.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(options.length.gradient_accumulation_steps),
        "ss_lr_warmup_steps": str(optimizer.schedule.lr_warmup_steps),
        "ss_lr_scheduler": optimizer.schedule.lr_scheduler,
        "ss_network_dropout": str(network.network_dropout),
        "ss_mixed_precision": model.mixed_precision,
        "ss_full_fp16": str(model.full_fp16),
        "ss_fp8_base": str(model.fp8_base),
        "ss_fp8_base_unet": str(model.fp8_base_unet),
        "ss_clip_skip": str(model.clip_skip),
        "ss_max_token_length": str(model.max_token_length),
        "ss_cache_latents": str(dataset.cache_latents),
        "ss_seed": str(facts.seed),
        "ss_noise_offset": str(noise.noise_offset),
        "ss_noise_offset_random_strength": str(noise.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(noise.adaptive_noise_scale),
        "ss_multires_noise_iterations": str(noise.multires_noise_iterations),
        "ss_multires_noise_discount": str(noise.multires_noise_discount),
        "ss_ip_noise_gamma": str(noise.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(noise.ip_noise_gamma_random_strength),
        "ss_zero_terminal_snr": str(diffusion.zero_terminal_snr),
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": str(optimizer.max_grad_norm),
        "ss_prior_loss_weight": str(dataset.prior_loss_weight),
        "ss_min_snr_gamma": str(loss.min_snr_gamma),
        "ss_debiased_estimation": str(bool(loss.debiased_estimation_loss)),
        "ss_loss_type": loss.loss_type,
        "ss_huber_schedule": loss.huber_schedule,
        "ss_huber_c": str(loss.huber_c),
        "ss_huber_scale": str(loss.huber_scale),
        "ss_sd_model_name": Path(model.pretrained_model_name_or_path).name,
        "ss_training_comment": str(options.saving.training_comment),
        "ss_num_validation_images": str(sum(len(plan.validation_samples) for plan in plans)),
        "ss_validation_split": str(dataset.fallbacks.get("validation_split") or 0.0),  # sd-scripts' default
        "ss_validation_seed": str(dataset.fallbacks.get("validation_seed")),
        "ss_validate_every_n_steps": str(options.validation.validate_every_n_steps),
        "ss_validate_every_n_epochs": str(options.validation.validate_every_n_epochs),
        "ss_max_validation_steps": str(options.validation.max_validation_steps),
        "ss_datasets": json.dumps([_dataset_metadata(plan) for plan in plans]),
        "ss_tag_frequency": json.dumps(_tag_frequencies(plans)),
    }
    if model.vae:  # sd-scripts writes the key only for a --vae
        metadata["ss_vae_name"] = Path(model.vae).name
    return {**metadata, **base_model_metadata(options, facts)}


def finished_metadata(base: dict[str, str], epoch: int, step: int) -> dict[str, str]:
    return {**base, "ss_epoch": str(epoch), "ss_steps": str(step), "ss_training_finished_at": str(time.time())}


def _dataset_metadata(plan: DatasetPlan) -> dict:
    config = plan.config
    subsets = []
    for subset in config.subsets:
        members = [sample for sample in plan.samples if sample.subset == subset]
        subsets.append(
            {
                "img_count": len(members),
                "num_repeats": subset.num_repeats,
                "color_aug": bool(subset.color_aug),
                "flip_aug": bool(subset.flip_aug),
                "random_crop": bool(subset.random_crop),
                "shuffle_caption": bool(subset.shuffle_caption),
                "keep_tokens": subset.keep_tokens,
                "image_dir": Path(subset.image_dir).name if subset.image_dir else None,
                "class_tokens": subset.class_tokens,
                "is_reg": bool(subset.is_reg),
            }
        )
    return {
        "is_dreambooth": config.style == "DreamBooth",
        "batch_size_per_device": config.batch_size,
        "num_train_images": plan.num_train_images,
        "num_reg_images": plan.num_reg_images,
        "resolution": list(config.resolution),
        "enable_bucket": bool(config.enable_bucket),
        "min_bucket_reso": config.min_bucket_reso,
        "max_bucket_reso": config.max_bucket_reso,
        "bucket_info": {
            "buckets": {
                str(index): {"resolution": list(bucket), "count": count}
                for index, (bucket, count) in enumerate(plan.bucket_counts().items())
            }
        },
        "subsets": subsets,
    }


def _tag_frequencies(plans: Sequence[DatasetPlan]) -> dict[str, dict[str, int]]:
    """Per image folder (its name with the repeat prefix), how often each tag occurs, counted once per image."""
    frequencies: dict[str, dict[str, int]] = {}
    for plan in plans:
        for subset in plan.config.subsets:
            captions = [sample.image.caption for sample in plan.samples if sample.subset == subset]
            name = Path(subset.image_dir or subset.metadata_file).name
            frequencies[name] = tag_frequency(captions)
    return frequencies


class Saver:
    """Saves the network (and with --save_state the training state) when the options ask for it, under sd-scripts'
    names, and removes the saves that fall out of the kept window. Every process calls it; the main one writes."""

    def __init__(
        self,
        accelerator: Accelerator,
        options: SavingOptions,
        save_every_n_epochs: int | None,
        metadata: dict[str, str],
        base_metadata: dict[str, str],
        train_state: Callable[[Progress], TrainState],
    ):
        self.accelerator = accelerator
        self.options = options
        self.save_every_n_epochs = save_every_n_epochs
        self.metadata = metadata  # written without --no_metadata
        self.base_metadata = base_metadata  # always written
        self.train_state = train_state

    def saves_after_step(self, where: Progress, max_train_steps: int) -> bool:
        every = self.options.save_every_n_steps
        return bool(every) and where.step % every == 0 and where.step < max_train_steps

    def saves_after_epoch(self, where: Progress) -> bool:
        return bool(self.save_every_n_epochs) and where.epoch % self.save_every_n_epochs == 0

    def after_step(self, network: torch.nn.Module, where: Progress, max_train_steps: int) -> None:
        every, options = self.options.save_every_n_steps, self.options
        if not self.saves_after_step(where, max_train_steps):
            return
        self._save_and_prune(
            network,
            lambda n: step_file(options.output_dir, options.output_name, n, options.save_model_as),
            where.step,
            where,
            step_file_to_remove(where.step, every, options.save_last_n_steps),
            step_file_to_remove(where.step, every, options.save_last_n_steps_state or options.save_last_n_steps),
        )

    def after_epoch(self, network: torch.nn.Module, where: Progress) -> None:
        every, options = self.save_every_n_epochs, self.options
        if not self.saves_after_epoch(where):
            return
        self._save_and_prune(
            network,
            lambda n: epoch_file(options.output_dir, options.output_name, n, options.save_model_as),
            where.epoch,
            where,
            epoch_file_to_remove(where.epoch, every, options.save_last_n_epochs),
            epoch_file_to_remove(where.epoch, every, options.save_last_n_epochs_state or options.save_last_n_epochs),
        )

    def final(self, network: torch.nn.Module, where: Progress) -> Path:
        path = final_file(self.options.output_dir, self.options.output_name, self.options.save_model_as)
        self.save(network, path, where)
        if self.options.save_state or self.options.save_state_on_train_end:
            save_state_folder(self.accelerator, state_folder(path), self.train_state(where))
        return path

    def on_stop(self, where: Progress) -> None:
        """Ctrl-C: a state to resume from with --save_state, else nothing; then the run ends."""
        options = self.options
        if options.save_state:
            folder = state_folder(step_file(options.output_dir, options.output_name, where.step, options.save_model_as))
            save_state_folder(self.accelerator, folder, self.train_state(where))
            print(f"stopped at step {where.step}; continue with --resume {folder}")
        else:
            print(
                f"stopped at step {where.step}; nothing was saved (with --save_state, Ctrl-C saves a state to resume "
                "from)"
            )

    def _save_and_prune(
        self,
        network,
        file_for: Callable[[int], Path],
        number: int,
        where: Progress,
        old_number: int | None,
        old_state_number: int | None,
    ) -> None:
        """Save as file_for(number), with its state folder under --save_state, then remove the save (and the state)
        that fell out of the kept window."""
        self.save(network, file_for(number), where)
        if self.options.save_state:
            save_state_folder(self.accelerator, state_folder(file_for(number)), self.train_state(where))
        if not self.accelerator.is_main_process:
            return
        if old_number is not None:
            file_for(old_number).unlink(missing_ok=True)
        if self.options.save_state and old_state_number is not None:
            shutil.rmtree(state_folder(file_for(old_state_number)), ignore_errors=True)

    def save(self, network: torch.nn.Module, path: Path, where: Progress) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        network = self.accelerator.unwrap_model(network)
        if not all(torch.isfinite(parameter).all() for parameter in network.parameters()):
            raise UserError(
                f"the LoRA weights hold NaN or infinite values at step {where.step}; {path.name} was not written. "
                "Lower the learning rate or use bf16."
            )
        metadata = (
            self.base_metadata
            if self.options.no_metadata
            else finished_metadata(self.metadata, where.epoch, where.step)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        network.save_weights(path, self.options.save_dtype, metadata)
        print(f"saved {path}")
