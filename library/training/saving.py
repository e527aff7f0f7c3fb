"""When and under which names the trained LoRA is saved (specs/training.md 7.3), and the training metadata
written into each file (7.6)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from library.dataset.captions import tag_frequency
from library.dataset.plan import DatasetPlan

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
    """The --save_state folder saved with a model file: `<name>-000001-state`, `<name>-step00000100-state`, `<name>-state`."""
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


def training_metadata(args: Any, plans: Sequence[DatasetPlan], counts: dict[str, int], optimizer: str, started_at: float) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes from the run's options and datasets; the saving code adds the epoch, the
    step and the finish time. `counts` holds num_train_images, num_reg_images, num_batches_per_epoch, num_epochs."""
    metadata = {
        "ss_session_id": str(args.session_id),
        "ss_training_started_at": str(started_at),
        "ss_output_name": args.output_name or "",
        "ss_learning_rate": str(args.learning_rate),
        "ss_text_encoder_lr": str(args.text_encoder_lr[0] if args.text_encoder_lr else None),
        "ss_unet_lr": str(args.unet_lr),
        "ss_num_train_images": str(counts["num_train_images"]),
        "ss_num_reg_images": str(counts["num_reg_images"]),
        "ss_num_batches_per_epoch": str(counts["num_batches_per_epoch"]),
        "ss_num_epochs": str(counts["num_epochs"]),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_lr_warmup_steps": str(args.lr_warmup_steps),
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_dropout": str(args.network_dropout),
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": str(args.full_fp16),
        "ss_clip_skip": str(args.clip_skip),
        "ss_max_token_length": str(args.max_token_length),
        "ss_cache_latents": str(bool(args.cache_latents or args.cache_latents_to_disk)),
        "ss_seed": str(args.seed),
        "ss_noise_offset": str(args.noise_offset),
        "ss_noise_offset_random_strength": str(args.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(args.adaptive_noise_scale),
        "ss_multires_noise_iterations": str(args.multires_noise_iterations),
        "ss_multires_noise_discount": str(args.multires_noise_discount),
        "ss_ip_noise_gamma": str(args.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(args.ip_noise_gamma_random_strength),
        "ss_zero_terminal_snr": str(args.zero_terminal_snr),
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": str(args.max_grad_norm),
        "ss_prior_loss_weight": str(args.prior_loss_weight),
        "ss_min_snr_gamma": str(args.min_snr_gamma),
        "ss_debiased_estimation": str(bool(args.debiased_estimation_loss)),
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_c": str(args.huber_c),
        "ss_huber_scale": str(args.huber_scale),
        "ss_sd_model_name": Path(args.pretrained_model_name_or_path).name,
        "ss_vae_name": Path(args.vae).name if args.vae else "None",
        "ss_training_comment": str(args.training_comment),
        "ss_datasets": json.dumps([_dataset_metadata(plan) for plan in plans]),
        "ss_tag_frequency": json.dumps(_tag_frequencies(plans)),
    }
    return metadata


def finished_metadata(base: dict[str, str], epoch: int, step: int) -> dict[str, str]:
    return {**base, "ss_epoch": str(epoch), "ss_steps": str(step), "ss_training_finished_at": str(time.time())}


def _dataset_metadata(plan: DatasetPlan) -> dict:
    config = plan.config
    subsets = []
    for subset in config.subsets:
        members = [sample for sample in plan.samples if sample.subset == subset]
        subsets.append({
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
        })
    return {
        "is_dreambooth": config.style == "DreamBooth",
        "batch_size_per_device": config.batch_size,
        "num_train_images": plan.num_train_images,
        "num_reg_images": plan.num_reg_images,
        "resolution": list(config.resolution),
        "enable_bucket": bool(config.enable_bucket),
        "min_bucket_reso": config.min_bucket_reso,
        "max_bucket_reso": config.max_bucket_reso,
        "bucket_info": {"buckets": {str(index): {"resolution": list(bucket), "count": count} for index, (bucket, count) in enumerate(plan.bucket_counts().items())}},
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
