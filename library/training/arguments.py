"""The command lines of train_network.py and sdxl_train_network.py, with sd-scripts' option names, types and
defaults (specs/training.md section 11). Options of sd-scripts that are not implemented yet are refused by argparse,
never silently ignored. The parsed flags are turned into typed options once, by `library.training.options`."""

from __future__ import annotations

import argparse

from library.compute_options import MIXED_PRECISION_DTYPES, PRECISION_CHOICES
from library.dataset.arguments import add_dataset_arguments
from library.sampling.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES
from library.training.config_file import add_config_file_arguments
from library.training.diffusion import HUBER_SCHEDULES, LOSS_TYPES, LossSettings, NoiseSettings
from library.training.optimizers import SCHEDULERS
from library.training.option_tables import DYNAMO_BACKENDS, LOG_LEVELS, MODELSPEC_FIELDS, UNSUPPORTED_OPTIONS
from library.training.saving import SAVE_FORMATS
from library.unsupported_options import add_unsupported_arguments

SCRIPTS = {False: "train_network.py", True: "sdxl_train_network.py"}


def build_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    """The parser of train_network.py, or of sdxl_train_network.py with `sdxl` (its extra text-encoder caching and
    loading options)."""
    description = "Train a LoRA for SDXL." if sdxl else "Train a LoRA for Stable Diffusion 1.x / 2.x."
    parser = argparse.ArgumentParser(prog=SCRIPTS[sdxl], description=description, allow_abbrev=False)
    add_model_arguments(parser.add_argument_group("model"))
    if sdxl:
        _sdxl_arguments(parser.add_argument_group("SDXL"))
    add_dataset_arguments(parser)
    _training_arguments(parser.add_argument_group("training"))
    _optimizer_arguments(parser.add_argument_group("optimizer and learning rate"))
    _network_arguments(parser.add_argument_group("network"))
    _saving_arguments(parser.add_argument_group("saving and logging"))
    _sample_arguments(parser.add_argument_group("sample images"))
    _validation_arguments(parser.add_argument_group("validation loss (images from the datasets' validation_split)"))
    _metadata_arguments(parser.add_argument_group("ModelSpec metadata written into every saved LoRA"))
    _console_arguments(parser.add_argument_group("console"))
    add_unsupported_arguments(
        parser.add_argument_group("sd-scripts options that are refused here (each says why)"), UNSUPPORTED_OPTIONS
    )
    add_config_file_arguments(parser)
    return parser


def add_model_arguments(group) -> None:
    """The base-model options, shared with tools/cache_latents.py."""
    group.add_argument(
        "--pretrained_model_name_or_path", required=True, help="base model: .safetensors/.ckpt file or Diffusers folder"
    )
    group.add_argument("--v2", action="store_true", help="the base model is SD 2.x (checked against the file)")
    group.add_argument(
        "--v_parameterization",
        action="store_true",
        help="train with the v-prediction target (SD 2.x 768-v and v-prediction SDXL models)",
    )
    group.add_argument(
        "--tokenizer_cache_dir", help="accepted for compatibility; the tokenizer ships with this project"
    )
    group.add_argument(
        "--vae", help="use this VAE's weights: a VAE file (original or Diffusers names) or a Diffusers VAE folder"
    )
    group.add_argument(
        "--mixed_precision",
        choices=tuple(MIXED_PRECISION_DTYPES),
        default="no",
        help="autocast precision; frozen weights are stored in it",
    )
    group.add_argument(
        "--no_half_vae", action="store_true", help="run the VAE in float32 under mixed precision (always so for SDXL)"
    )
    group.add_argument(
        "--xformers", action="store_true", help="xformers attention when installed on CUDA; PyTorch SDPA otherwise"
    )
    group.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    group.add_argument("--mem_eff_attn", action="store_true", help="accepted for compatibility; PyTorch SDPA is used")


def _sdxl_arguments(group) -> None:
    group.add_argument(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="encode every caption once before training and free the text encoders (needs --network_train_unet_only)",
    )
    group.add_argument(
        "--cache_text_encoder_outputs_to_disk",
        action="store_true",
        help="also keep the outputs in _te_outputs.npz files beside the images (implies --cache_text_encoder_outputs)",
    )
    group.add_argument(
        "--disable_mmap_load_safetensors",
        action="store_true",
        help="read the model file once from start to end before loading it (faster on network drives and WSL)",
    )


def _training_arguments(group) -> None:
    group.add_argument("--max_train_steps", type=int, default=1600, help="optimizer steps to train (default 1600)")
    group.add_argument(
        "--max_train_epochs", type=int, help="train this many epochs instead (overrides --max_train_steps)"
    )
    group.add_argument("--seed", type=int, help="random seed (random when unset; recorded in the file)")
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in the backward pass to save memory",
    )
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="batches accumulated per optimizer step"
    )
    group.add_argument(
        "--full_fp16", action="store_true", help="keep the LoRA weights in fp16 too (needs --mixed_precision fp16)"
    )
    group.add_argument(
        "--full_bf16", action="store_true", help="keep the LoRA weights in bf16 too (needs --mixed_precision bf16)"
    )
    group.add_argument(
        "--fp8_base",
        action="store_true",
        help="store the frozen U-Net's and text encoders' weights in float8 (needs mixed precision)",
    )
    group.add_argument("--fp8_base_unet", action="store_true", help="store only the frozen U-Net's weights in float8")
    group.add_argument(
        "--clip_skip", type=int, help="use the k-th hidden layer of CLIP from the end (2 for many anime models)"
    )
    group.add_argument("--noise_offset", type=float, help="offset-noise strength (e.g. 0.05)")
    group.add_argument(
        "--noise_offset_random_strength",
        action="store_true",
        help="scale --noise_offset by U(0, 1), drawn once per batch",
    )
    group.add_argument(
        "--adaptive_noise_scale",
        type=float,
        help="add this times |mean of each latent channel| to --noise_offset (needs --noise_offset)",
    )
    group.add_argument(
        "--multires_noise_iterations",
        type=int,
        help="pyramid (multi-resolution) noise with this many levels (6 to 10 is common)",
    )
    group.add_argument(
        "--multires_noise_discount",
        type=float,
        default=NoiseSettings.multires_noise_discount,
        help="weight of each coarser pyramid-noise level relative to the one before (default %(default)s)",
    )
    group.add_argument(
        "--ip_noise_gamma",
        type=float,
        help="input-perturbation strength (e.g. 0.1): extra noise in the U-Net's input, not in the target",
    )
    group.add_argument(
        "--ip_noise_gamma_random_strength",
        action="store_true",
        help="scale --ip_noise_gamma by U(0, 1), drawn once per batch",
    )
    group.add_argument(
        "--zero_terminal_snr",
        action="store_true",
        help="rescale the noise schedule so that its last step is pure noise (for v-prediction)",
    )
    group.add_argument(
        "--loss_type",
        choices=LOSS_TYPES,
        default=LossSettings.loss_type,
        help="element-wise loss (default %(default)s)",
    )
    group.add_argument(
        "--huber_schedule",
        choices=HUBER_SCHEDULES,
        default=LossSettings.huber_schedule,
        help="how the huber/smooth_l1 threshold follows the timestep (default %(default)s)",
    )
    group.add_argument(
        "--huber_c", type=float, default=LossSettings.huber_c, help="huber/smooth_l1 threshold (default %(default)s)"
    )
    group.add_argument(
        "--huber_scale",
        type=float,
        default=LossSettings.huber_scale,
        help="multiplier of the threshold in the constant and exponential schedules (default %(default)s)",
    )
    group.add_argument(
        "--masked_loss",
        action="store_true",
        help="accepted for compatibility: datasets with alpha_mask always mask the loss, with or without it",
    )
    group.add_argument("--min_snr_gamma", type=float, help="Min-SNR loss weighting gamma (5 is common)")
    group.add_argument(
        "--scale_v_pred_loss_like_noise_pred",
        action="store_true",
        help="scale the v-prediction loss by SNR/(SNR+1), like a noise-prediction loss (needs --v_parameterization)",
    )
    group.add_argument(
        "--v_pred_like_loss",
        type=float,
        help="add a v-prediction-like loss term with this weight (not with --v_parameterization)",
    )
    group.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="weight the loss by 1/sqrt(SNR), or 1/(SNR+1) with --v_parameterization",
    )
    group.add_argument("--min_timestep", type=int, help="lowest training timestep (default 0)")
    group.add_argument("--max_timestep", type=int, help="training timesteps stay below this (default 1000)")
    group.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="clip the LoRA gradients' norm to this; 0 = no clipping"
    )
    group.add_argument("--lowram", action="store_true", help="accepted for compatibility")
    group.add_argument("--torch_compile", action="store_true", help="compile the U-Net with torch.compile (once)")
    group.add_argument(
        "--dynamo_backend",
        choices=DYNAMO_BACKENDS,
        default="inductor",
        help="torch.compile's backend (default inductor)",
    )
    group.add_argument("--ddp_timeout", type=int, help="minutes the processes wait for each other (default 30)")
    group.add_argument(
        "--ddp_gradient_as_bucket_view", action="store_true", help="accepted; DDP's buckets are not used here"
    )
    group.add_argument("--ddp_static_graph", action="store_true", help="accepted; DDP is not used here")
    group.add_argument("--highvram", action="store_true", help="accepted for compatibility")


def _metadata_arguments(group) -> None:
    for field in MODELSPEC_FIELDS:
        hint = " (an image file becomes a data: URL)" if field == "thumbnail" else ""
        group.add_argument(f"--metadata_{field}", help=f"modelspec.{field} of the saved LoRA{hint}")


def _console_arguments(group) -> None:
    group.add_argument(
        "--console_log_level", choices=LOG_LEVELS, help="the level of the messages printed (default INFO)"
    )
    group.add_argument("--console_log_file", help="also write the log messages to this file")
    group.add_argument("--console_log_simple", action="store_true", help="messages without time and logger name")


def _validation_arguments(group) -> None:
    group.add_argument(
        "--validate_every_n_steps", type=int, help="also compute the validation loss every N optimizer steps"
    )
    group.add_argument(
        "--validate_every_n_epochs", type=int, help="compute the validation loss every N epochs (default: every epoch)"
    )
    group.add_argument("--max_validation_steps", type=int, help="validation batches per evaluation (default: all)")


def _optimizer_arguments(group) -> None:
    group.add_argument(
        "--optimizer_type",
        default="",
        help="AdamW (default), AdamW8bit, PagedAdamW8bit, Lion, SGDNesterov, Prodigy, DAdaptation..., or module.Class",
    )
    group.add_argument("--use_8bit_adam", action="store_true", help="old spelling of --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true", help="old spelling of --optimizer_type Lion")
    group.add_argument(
        "--optimizer_args", nargs="*", help="optimizer arguments as key=value, e.g. weight_decay=0.01 betas=0.9,0.99"
    )
    group.add_argument(
        "--learning_rate",
        type=float,
        default=2e-6,
        help="learning rate (default 2e-6, as sd-scripts; LoRA usually 1e-4)",
    )
    group.add_argument(
        "--lr_scheduler", default="constant", help=f"learning-rate schedule (default constant): {', '.join(SCHEDULERS)}"
    )
    group.add_argument(
        "--lr_scheduler_type",
        default="",
        help="a scheduler class instead: a torch.optim.lr_scheduler name or module.Class",
    )
    group.add_argument(
        "--lr_scheduler_args", nargs="*", help="the schedule's arguments as key=value, e.g. step_rules=1:10,0.1"
    )
    group.add_argument(
        "--lr_decay_steps", default="0", help="warmup_stable_decay's decay steps: a count, a fraction below 1, or N%%"
    )
    group.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        help="cosine_with_min_lr / warmup_stable_decay: the lowest rate, as a fraction of the first",
    )
    group.add_argument(
        "--lr_scheduler_timescale", type=int, help="inverse_sqrt's timescale (default: the warmup steps)"
    )
    group.add_argument("--lr_warmup_steps", default="0", help="warmup steps: a count, a fraction below 1, or N%%")
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    group.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")


def _network_arguments(group) -> None:
    group.add_argument("--network_module", required=True, help="networks.lora, or any module with the same API")
    group.add_argument("--network_weights", help="LoRA file to start from")
    group.add_argument("--base_weights", nargs="*", help="LoRA files merged into the base model before training")
    group.add_argument(
        "--base_weights_multiplier",
        type=float,
        nargs="*",
        help="the multiplier of each --base_weights file (default 1)",
    )
    group.add_argument(
        "--dim_from_weights", action="store_true", help="take the ranks and alphas from --network_weights"
    )
    group.add_argument("--network_dim", type=int, help="rank (networks.lora: 4 when unset)")
    group.add_argument(
        "--network_alpha", type=float, default=1.0, help="alpha; the LoRA output is scaled by alpha / rank (default 1)"
    )
    group.add_argument("--network_dropout", type=float, help="dropout of the LoRA down-projection's output")
    group.add_argument("--network_args", nargs="*", help="network arguments as key=value, e.g. conv_dim=4 conv_alpha=1")
    group.add_argument("--network_train_unet_only", action="store_true", help="train the U-Net's LoRA only")
    group.add_argument(
        "--network_train_text_encoder_only", action="store_true", help="train the text encoder's LoRA only"
    )
    group.add_argument("--unet_lr", type=float, help="learning rate of the U-Net LoRA (default --learning_rate)")
    group.add_argument(
        "--text_encoder_lr",
        type=float,
        nargs="*",
        help="learning rate of the text-encoder LoRA (default --learning_rate)",
    )
    group.add_argument("--scale_weight_norms", type=float, help="cap each LoRA delta's norm at this after every step")


def _saving_arguments(group) -> None:
    group.add_argument("--output_dir", required=True, help="folder for the LoRA files")
    group.add_argument(
        "--output_name", help="file name without extension (default: last, epoch-NNNNNN, at-stepNNNNNNNN)"
    )
    group.add_argument(
        "--save_model_as", choices=SAVE_FORMATS, default="safetensors", help="file format (default safetensors)"
    )
    group.add_argument(
        "--save_precision", choices=PRECISION_CHOICES, help="dtype of the saved tensors (default: as trained)"
    )
    group.add_argument("--save_every_n_epochs", type=int, help="also save after every N epochs (not after the last)")
    group.add_argument("--save_every_n_steps", type=int, help="also save after every N optimizer steps")
    group.add_argument("--save_last_n_epochs", type=int, help="keep only the N latest epoch saves")
    group.add_argument("--save_last_n_steps", type=int, help="keep only step saves of the last N steps")
    group.add_argument(
        "--save_n_epoch_ratio", type=int, help="save about N times over the run: every max(1, epochs // N) epochs"
    )
    group.add_argument(
        "--save_state",
        action="store_true",
        help="with every save, also save the training state (optimizer, scheduler, RNG, step) for --resume; "
        "Ctrl-C saves one too",
    )
    group.add_argument(
        "--save_state_on_train_end", action="store_true", help="save the training state once, at the end"
    )
    group.add_argument(
        "--save_last_n_epochs_state",
        type=int,
        help="keep only the N latest epoch states (default --save_last_n_epochs)",
    )
    group.add_argument(
        "--save_last_n_steps_state",
        type=int,
        help="keep only step states of the last N steps (default --save_last_n_steps)",
    )
    group.add_argument("--resume", help="a state folder from --save_state: continue that run exactly where it stopped")
    group.add_argument(
        "--initial_step", type=int, help="start counting at this optimizer step (names, logs, the LR schedule)"
    )
    group.add_argument("--initial_epoch", type=int, help="start at the beginning of this epoch (1-based)")
    group.add_argument(
        "--skip_until_initial_step",
        action="store_true",
        help="with --initial_step, also skip that epoch's batches before it (a --resume always continues exactly)",
    )
    group.add_argument("--no_metadata", action="store_true", help="write only the minimal metadata")
    group.add_argument("--training_comment", help="text stored in the file's metadata")
    group.add_argument("--logging_dir", help="write TensorBoard logs under this folder")
    group.add_argument(
        "--log_with",
        choices=("tensorboard", "wandb", "all"),
        help="logger (default tensorboard when --logging_dir is given)",
    )
    group.add_argument("--log_prefix", help="prefix of the run's log folder name")
    group.add_argument("--log_tracker_name", help="the run's name in the logger (default network_train)")
    group.add_argument("--log_tracker_config", help="a TOML file of the loggers' settings, e.g. [wandb] entity = ...")
    group.add_argument("--log_config", action="store_true", help="log the run's options to the logger as its config")
    group.add_argument("--wandb_run_name", help="the run's name in wandb")
    group.add_argument("--wandb_api_key", help="log in to wandb with this key first")


def _sample_arguments(group) -> None:
    group.add_argument(
        "--sample_prompts", help="prompt file (.txt, .toml or .json) for sample images in output_dir/sample"
    )
    group.add_argument("--sample_every_n_steps", type=int, help="draw the samples every N optimizer steps")
    group.add_argument(
        "--sample_every_n_epochs", type=int, help="draw the samples every N epochs (wins over --sample_every_n_steps)"
    )
    group.add_argument("--sample_at_first", action="store_true", help="also draw the samples before the first step")
    group.add_argument(
        "--sample_sampler",
        default=DEFAULT_SAMPLER,
        help=f"sampler of the samples (default {DEFAULT_SAMPLER}): {', '.join(SAMPLER_NAMES)}",
    )
