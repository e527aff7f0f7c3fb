"""The typed options of a training run, built once from the parsed flags by `training_options` (at the edge, in
the script) and read by everything below it. Each concern has its own frozen dataclass; the field names are
sd-scripts' option names where one option maps to one field.

Conflicts between options are refused here, in one sentence each with the fix; options that cannot apply on this
machine (fp16 or xformers without CUDA, 8-bit optimizers on the CPU) are replaced by what will run, with a note."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from library.compute_options import MIXED_PRECISION_DTYPES, parse_precision
from library.dataset.arguments import DatasetOptions, dataset_options
from library.errors import UserError
from library.sampling.samplers import DEFAULT_SAMPLER
from library.training.diffusion import THRESHOLD_LOSS_TYPES, LossSettings, NoiseSettings
from library.training.optimizers import CUDA_ONLY_OPTIMIZERS, ScheduleSettings, optimizer_name, parse_key_values
from library.training.option_tables import MODELSPEC_FIELDS, UNSUPPORTED_OPTIONS
from library.unsupported_options import refuse_unsupported
from networks import dylora


@dataclass(frozen=True)
class ModelOptions:
    pretrained_model_name_or_path: str
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    tokenizer_cache_dir: str | None = None
    mixed_precision: str = "no"  # what runs: "fp16" becomes "no" without CUDA
    no_half_vae: bool = False
    xformers: bool = False
    full_fp16: bool = False
    full_bf16: bool = False
    fp8_base: bool = False  # the frozen U-Net's and text encoders' Linear/conv weights in float8
    fp8_base_unet: bool = False  # the U-Net's only
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    dynamo_backend: str = "inductor"
    clip_skip: int | None = None
    max_token_length: int | None = None
    disable_mmap_load_safetensors: bool = False

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen weights and of autocast."""
        return MIXED_PRECISION_DTYPES[self.mixed_precision]

    @property
    def network_dtype(self) -> torch.dtype:
        """The LoRA weights' dtype: float32 unless --full_fp16 / --full_bf16."""
        return torch.float16 if self.full_fp16 else torch.bfloat16 if self.full_bf16 else torch.float32


@dataclass(frozen=True)
class TextEncoderCaching:
    """sdxl_train_network.py's --cache_text_encoder_outputs(_to_disk)."""

    in_memory: bool = False
    to_disk: bool = False


@dataclass(frozen=True)
class NetworkOptions:
    network_module: str
    network_weights: str | None = None
    base_weights: tuple[str, ...] = ()  # LoRAs merged into the base model first
    base_weights_multiplier: tuple[float, ...] = ()  # one per base_weights file
    dim_from_weights: bool = False
    network_dim: int | None = None
    network_alpha: float = 1.0
    network_dropout: float | None = None
    network_args: tuple[str, ...] = ()
    train_unet: bool = True
    train_text_encoder: bool = True
    unet_lr: float | None = None
    text_encoder_lr: tuple[float, ...] = ()  # one value, or one per text encoder (SDXL)
    scale_weight_norms: float | None = None

    def keyword_args(self) -> dict[str, str]:
        """--network_args as the keyword arguments of the module's create_network."""
        malformed = [arg for arg in self.network_args if "=" not in arg]
        if malformed:
            raise UserError(f"--network_args {malformed[0]!r} is not key=value; write it like conv_dim=4.")
        return dict(arg.split("=", 1) for arg in self.network_args)


@dataclass(frozen=True)
class OptimizerOptions:
    name: str  # resolved from --optimizer_type and the old --use_8bit_adam / --use_lion_optimizer
    optimizer_args: dict
    learning_rate: float = 2e-6
    schedule: ScheduleSettings = ScheduleSettings()
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class DiffusionOptions:
    """The noise, timesteps and loss of a step."""

    noise: NoiseSettings = NoiseSettings()
    loss: LossSettings = LossSettings()
    min_timestep: int | None = None
    max_timestep: int | None = None
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class LengthOptions:
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    seed: int | None = None  # None: the resumed run's seed, or a random one
    initial_step: int | None = None  # start the count here (--initial_step, or from --initial_epoch)
    initial_epoch: int | None = None
    skip_until_initial_step: bool = False


@dataclass(frozen=True)
class SavingOptions:
    output_dir: str
    output_name: str | None = None
    save_model_as: str = "safetensors"
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_n_epoch_ratio: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    save_last_n_epochs_state: int | None = None
    save_last_n_steps_state: int | None = None
    resume: str | None = None
    no_metadata: bool = False
    training_comment: str | None = None

    @property
    def save_dtype(self) -> torch.dtype | None:
        return parse_precision(self.save_precision)


@dataclass(frozen=True)
class ValidationOptions:
    """When the validation loss is computed; the images come from the datasets' validation_split."""

    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None  # every epoch when unset
    max_validation_steps: int | None = None  # batches per evaluation; all when unset


@dataclass(frozen=True)
class SamplingOptions:
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_sampler: str = DEFAULT_SAMPLER


@dataclass(frozen=True)
class LoggingOptions:
    logging_dir: str | None = None
    log_with: str | None = None  # tensorboard, wandb or all; tensorboard when only --logging_dir is given
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    log_tracker_config: str | None = None
    log_config: bool = False
    wandb_run_name: str | None = None
    wandb_api_key: str | None = None
    console_log_level: str | None = None
    console_log_file: str | None = None
    console_log_simple: bool = False

    @property
    def tracker(self) -> str | None:
        """What accelerate logs with, or None for no logging."""
        return self.log_with or ("tensorboard" if self.logging_dir else None)


@dataclass(frozen=True)
class ModelSpecOptions:
    """--metadata_<field>: written as modelspec.<field> into every saved LoRA."""

    title: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | None = None
    trigger_phrase: str | None = None
    usage_hint: str | None = None
    thumbnail: str | None = None
    merged_from: str | None = None
    preprocessor: str | None = None
    is_negative_embedding: str | None = None


@dataclass(frozen=True)
class TrainingOptions:
    sdxl: bool  # which script: sdxl_train_network.py or train_network.py
    model: ModelOptions
    dataset: DatasetOptions
    network: NetworkOptions
    optimizer: OptimizerOptions
    diffusion: DiffusionOptions
    length: LengthOptions
    saving: SavingOptions
    sampling: SamplingOptions
    validation: ValidationOptions
    logging: LoggingOptions
    text_encoder_caching: TextEncoderCaching = TextEncoderCaching()
    modelspec: ModelSpecOptions = ModelSpecOptions()
    ddp_timeout: int | None = None  # minutes
    # how options were resolved (replaced on this machine, accepted but ignored), for the summary
    notes: tuple[str, ...] = ()


def training_options(args: argparse.Namespace, sdxl: bool = False) -> TrainingOptions:
    """The typed options of parsed flags, checked, with the notes for the start-up summary."""
    notes = []
    _refuse_unsupported(args, notes)
    model = _model_options(args, sdxl, notes)
    options = TrainingOptions(
        sdxl=sdxl,
        model=model,
        dataset=dataset_options(args, notes, sdxl),
        network=_network_options(args),
        optimizer=_optimizer_options(args, notes),
        diffusion=_diffusion_options(args, notes),
        length=_fields_of(LengthOptions, args),
        saving=_fields_of(SavingOptions, args),
        sampling=_fields_of(SamplingOptions, args),
        validation=_validation_options(args),
        logging=_logging_options(args),
        text_encoder_caching=_text_encoder_caching(args),
        modelspec=ModelSpecOptions(**{field: getattr(args, f"metadata_{field}") for field in MODELSPEC_FIELDS}),
        ddp_timeout=args.ddp_timeout,
        notes=tuple(notes),
    )
    if options.saving.resume and (args.initial_step is not None or args.initial_epoch is not None):
        raise UserError(
            "--resume continues from the step its state saved; drop --initial_step / --initial_epoch (they start the "
            "count of a run without a state)."
        )
    if options.length.gradient_accumulation_steps < 1:
        raise UserError(
            f"--gradient_accumulation_steps is {options.length.gradient_accumulation_steps}; use 1 or more."
        )
    if not options.network.train_unet and not options.network.train_text_encoder:
        raise UserError(
            "--network_train_unet_only and --network_train_text_encoder_only together leave nothing to train; give one."
        )
    return options


def _fields_of(cls, args: argparse.Namespace, **overrides):
    """The dataclass `cls` with each field taken from the flag of the same name, unless overridden."""
    values = {
        field.name: getattr(args, field.name)
        for field in fields(cls)
        if field.name not in overrides and hasattr(args, field.name)
    }
    return cls(**values, **overrides)


def _model_options(args: argparse.Namespace, sdxl: bool, notes: list[str]) -> ModelOptions:
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16.")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16.")
    if (args.fp8_base or args.fp8_base_unet) and args.mixed_precision == "no":
        flag = "--fp8_base" if args.fp8_base else "--fp8_base_unet"
        raise UserError(
            f"{flag} computes each layer in the mixed-precision dtype; give --mixed_precision bf16 (or fp16)."
        )
    model = _fields_of(ModelOptions, args)
    if sdxl and model.clip_skip is not None:
        notes.append(
            f"--clip_skip {model.clip_skip} ignored: SDXL is trained on the penultimate layer of both text encoders, "
            "as sd-scripts does."
        )
        model = replace(model, clip_skip=None)
    if args.mem_eff_attn:
        notes.append("--mem_eff_attn: PyTorch's scaled-dot-product attention is used, which is as memory-efficient.")
    if args.v2 and args.clip_skip:
        notes.append(
            f"--clip_skip {args.clip_skip} with --v2: SD 2.x text encoders already stop one layer early, so this "
            "skips more; usually leave it out."
        )
    if torch.cuda.is_available():
        return model
    if model.mixed_precision == "fp16":
        notes.append("--mixed_precision fp16 needs a CUDA GPU; training on the CPU in float32.")
        model = replace(model, mixed_precision="no", full_fp16=False)
    if model.xformers:
        notes.append("--xformers needs a CUDA GPU; using PyTorch's scaled-dot-product attention.")
        model = replace(model, xformers=False)
    return model


def _network_options(args: argparse.Namespace) -> NetworkOptions:
    if args.scale_weight_norms and args.network_module == dylora.NETWORK_MODULE:
        raise UserError(dylora.MAX_NORM_REFUSAL)  # before anything loads, not at the first step
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights needs --network_weights FILE to take the ranks from.")
    files, multipliers = args.base_weights or [], args.base_weights_multiplier or []
    if multipliers and len(multipliers) != len(files):
        raise UserError(
            f"--base_weights_multiplier gives {len(multipliers)} value(s) for {len(files)} --base_weights file(s); "
            "give one per file, in the same order (or none for 1.0 each)."
        )
    for file in files:
        if not Path(file).is_file():
            raise UserError(f"--base_weights {file}: no such file; give the LoRA files to merge into the base model.")
    return _fields_of(
        NetworkOptions,
        args,
        network_args=tuple(args.network_args or ()),
        train_unet=not args.network_train_text_encoder_only,
        train_text_encoder=not args.network_train_unet_only,
        text_encoder_lr=tuple(args.text_encoder_lr or ()),
        base_weights=tuple(files),
        base_weights_multiplier=tuple(multipliers) or (1.0,) * len(files),
    )


def _optimizer_options(args: argparse.Namespace, notes: list[str]) -> OptimizerOptions:
    name = optimizer_name(args.optimizer_type, args.use_8bit_adam, args.use_lion_optimizer)
    if not torch.cuda.is_available() and name.lower() in CUDA_ONLY_OPTIMIZERS:
        notes.append(f"--optimizer_type {name} needs bitsandbytes on a CUDA GPU; using AdamW on the CPU.")
        name = "AdamW"
    schedule = _fields_of(
        ScheduleSettings, args, lr_scheduler_args=parse_key_values(args.lr_scheduler_args, "--lr_scheduler_args")
    )
    schedule.check()
    optimizer_args = parse_key_values(args.optimizer_args, "--optimizer_args")
    return _fields_of(OptimizerOptions, args, name=name, optimizer_args=optimizer_args, schedule=schedule)


def _diffusion_options(args: argparse.Namespace, notes: list[str]) -> DiffusionOptions:
    """sd-scripts' checks of the noise and loss options (specs/training.md 1.5), one sentence each."""
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        raise UserError(
            "--adaptive_noise_scale adds to the offset of --noise_offset; give --noise_offset too (e.g. "
            "--noise_offset 0.05)."
        )
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise UserError(
            "--scale_v_pred_loss_like_noise_pred rescales a v-prediction loss, so it needs --v_parameterization."
        )
    if args.v_pred_like_loss and args.v_parameterization:
        raise UserError(
            "--v_pred_like_loss adds a v-prediction-like term to a noise-prediction loss; leave it out with "
            "--v_parameterization."
        )
    if args.multires_noise_iterations is not None and args.multires_noise_iterations < 0:
        raise UserError(
            f"--multires_noise_iterations is {args.multires_noise_iterations}; use 1 or more (6 to 10 is common), or "
            "0 for none."
        )
    if args.loss_type in THRESHOLD_LOSS_TYPES and args.huber_c <= 0:
        raise UserError(
            f"--huber_c is {args.huber_c:g}, but the {args.loss_type} threshold must be above 0 (default "
            f"{LossSettings.huber_c})."
        )
    if args.zero_terminal_snr and not args.v_parameterization:
        notes.append(
            "--zero_terminal_snr without --v_parameterization: the last timestep's input is pure noise, which a "
            "noise-predicting "
            "model can only copy, so training may go unexpectedly; the option is meant for v-prediction."
        )
    return _fields_of(
        DiffusionOptions, args, noise=_fields_of(NoiseSettings, args), loss=_fields_of(LossSettings, args)
    )


def _validation_options(args: argparse.Namespace) -> ValidationOptions:
    options = _fields_of(ValidationOptions, args)
    for flag, value in vars(options).items():
        if value is not None and value < 1:
            raise UserError(f"--{flag} is {value}; use 1 or more, or leave it out.")
    return options


def _logging_options(args: argparse.Namespace) -> LoggingOptions:
    """accelerate silently logs nothing when the tracker's package is missing; say so instead. TensorBoard writes
    under --logging_dir; wandb keeps its runs itself."""
    options = _fields_of(LoggingOptions, args)
    packages = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], None: []}
    wanted = packages[options.tracker]
    if "tensorboard" in wanted and not options.logging_dir:
        raise UserError(
            f"--log_with {args.log_with} writes TensorBoard logs under --logging_dir; give --logging_dir too (e.g. "
            "--logging_dir logs)."
        )
    for package in wanted:
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"logging with {package} needs the {package} package; run: pip install {package} (or drop "
                "--logging_dir / --log_with)."
            )
    if options.log_tracker_config and not Path(options.log_tracker_config).is_file():
        raise UserError(
            f"--log_tracker_config {options.log_tracker_config}: no such file; give a TOML file of the loggers' "
            "settings."
        )
    return options


def _refuse_unsupported(args: argparse.Namespace, notes: list[str]) -> None:
    """sd-scripts' options that cannot apply: refused when set to anything but sd-scripts' default."""
    refuse_unsupported(args, UNSUPPORTED_OPTIONS)
    for flag in ("ddp_gradient_as_bucket_view", "ddp_static_graph"):
        if getattr(args, flag):
            notes.append(f"--{flag}: no effect; the LoRA's gradients are averaged in one all-reduce, not by DDP.")


def _text_encoder_caching(args: argparse.Namespace) -> TextEncoderCaching:
    """sdxl_train_network.py's caching flags; --cache_text_encoder_outputs_to_disk implies
    --cache_text_encoder_outputs."""
    to_disk = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
    caching = TextEncoderCaching(
        in_memory=to_disk or bool(getattr(args, "cache_text_encoder_outputs", False)), to_disk=to_disk
    )
    if caching.in_memory and args.weighted_captions:
        raise UserError(
            "--cache_text_encoder_outputs keeps the text encoders' outputs of plain captions; it cannot be combined "
            "with --weighted_captions, so drop one of them."
        )
    if caching.in_memory and not args.network_train_unet_only:
        flag = "--cache_text_encoder_outputs_to_disk" if to_disk else "--cache_text_encoder_outputs"
        raise UserError(
            f"{flag} encodes each caption once with the frozen text encoders, so their LoRA cannot train; "
            "add --network_train_unet_only, or drop the caching option."
        )
    return caching
