"""`--optimizer_type` with `--optimizer_args`, and `--lr_scheduler` with its warmup and shape options
(specs/training.md 6.2, 6.3). A missing optional package is one sentence with the pip command."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.optimization import get_piecewise_constant_schedule, get_scheduler

from library.errors import UserError

ADAPTIVE_OPTIMIZERS = ("dadaptation", "dadaptadam", "dadaptadagrad", "dadaptadan", "dadaptlion", "dadaptsgd", "prodigy")
CUDA_ONLY_OPTIMIZERS = (
    "adamw8bit",
    "pagedadamw8bit",
    "pagedadamw",
    "pagedadamw32bit",
    "lion8bit",
    "pagedlion8bit",
    "sgdnesterov8bit",
)
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)


def parse_key_values(pairs: list[str] | None, option: str) -> dict[str, Any]:
    """`key=value` strings, each value a Python literal (`0.01`, `True`, `0.9,0.999` is a tuple), else a string."""
    values = {}
    for pair in pairs or []:
        key, equals, text = pair.partition("=")
        if not equals or not key.strip():
            raise UserError(f"{option} '{pair}' is not key=value; write it like weight_decay=0.01.")
        try:
            values[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            values[key.strip()] = text.strip()
    return values


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"--optimizer_type needs the '{package}' package, which is not installed; run: pip install {package}"
        ) from None


def _bitsandbytes(name: str) -> Callable:
    return getattr(_import("bitsandbytes.optim", "bitsandbytes"), name)


def _sgd_nesterov(params, lr, **kwargs):
    kwargs.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, lr=lr, nesterov=True, **kwargs)


def _adamw(params, lr, **kwargs):
    on_cuda = all(p.is_cuda for group in params for p in group["params"])
    if on_cuda and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = True  # one kernel for all LoRA tensors instead of thousands of small launches
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def _adafactor(params, lr, **kwargs):
    """transformers' Adafactor, as sd-scripts builds it: with relative_step (the default, forced by warmup_init) it
    finds its own step size, so no learning rate is passed and the groups' rates are dropped."""
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init"):
        kwargs["relative_step"] = True
    adafactor = _import("transformers.optimization", "transformers").Adafactor
    if not kwargs["relative_step"]:
        return adafactor(params, lr=lr, **kwargs)
    for group in params:
        group.pop("lr", None)
    return adafactor(params, lr=None, **kwargs)


def uses_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """Adafactor finding its own step size, which sd-scripts pairs with transformers' AdafactorSchedule."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adafactor": _adafactor,
    "adamw8bit": lambda params, lr, **kw: _bitsandbytes("AdamW8bit")(params, lr=lr, **kw),
    "pagedadamw8bit": lambda params, lr, **kw: _bitsandbytes("PagedAdamW8bit")(params, lr=lr, **kw),
    "pagedadamw": lambda params, lr, **kw: _bitsandbytes("PagedAdamW")(params, lr=lr, **kw),
    "pagedadamw32bit": lambda params, lr, **kw: _bitsandbytes("PagedAdamW32bit")(params, lr=lr, **kw),
    "lion8bit": lambda params, lr, **kw: _bitsandbytes("Lion8bit")(params, lr=lr, **kw),
    "pagedlion8bit": lambda params, lr, **kw: _bitsandbytes("PagedLion8bit")(params, lr=lr, **kw),
    "lion": lambda params, lr, **kw: _import("lion_pytorch", "lion-pytorch").Lion(params, lr=lr, **kw),
    "sgdnesterov": _sgd_nesterov,
    "prodigy": lambda params, lr, **kw: _import("prodigyopt", "prodigyopt").Prodigy(params, lr=lr, **kw),
    "dadaptation": lambda params, lr, **kw: _import("dadaptation.experimental", "dadaptation").DAdaptAdamPreprint(
        params, lr=lr, **kw
    ),
    "dadaptadam": lambda params, lr, **kw: _import("dadaptation", "dadaptation").DAdaptAdam(params, lr=lr, **kw),
    "dadaptadagrad": lambda params, lr, **kw: _import("dadaptation", "dadaptation").DAdaptAdaGrad(params, lr=lr, **kw),
    "dadaptadan": lambda params, lr, **kw: _import("dadaptation", "dadaptation").DAdaptAdan(params, lr=lr, **kw),
    "dadaptlion": lambda params, lr, **kw: _import("dadaptation", "dadaptation").DAdaptLion(params, lr=lr, **kw),
    "dadaptsgd": lambda params, lr, **kw: _import("dadaptation", "dadaptation").DAdaptSGD(params, lr=lr, **kw),
    "dadaptadanip": lambda params, lr, **kw: _import("dadaptation.experimental", "dadaptation").DAdaptAdanIP(
        params, lr=lr, **kw
    ),
    "sgdnesterov8bit": lambda params, lr, **kw: _bitsandbytes("SGD8bit")(
        params, lr=lr, **{"momentum": 0.9, **kw, "nesterov": True}
    ),
    "adamwschedulefree": lambda params, lr, **kw: _import("schedulefree", "schedulefree").AdamWScheduleFree(
        params, lr=lr, **kw
    ),
    "radamschedulefree": lambda params, lr, **kw: _import("schedulefree", "schedulefree").RAdamScheduleFree(
        params, lr=lr, **kw
    ),
    "sgdschedulefree": lambda params, lr, **kw: _import("schedulefree", "schedulefree").SGDScheduleFree(
        params, lr=lr, **kw
    ),
}


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """The schedule-free optimizers keep two sets of weights: the ones training steps from (train mode) and the
    averaged ones to use (eval mode), so sampling, validation and saving switch them to eval first."""
    return type(optimizer).__name__.endswith("ScheduleFree")


def optimizer_name(optimizer_type: str | None, use_8bit_adam: bool = False, use_lion_optimizer: bool = False) -> str:
    """The optimizer asked for: `--optimizer_type` (empty = AdamW) or one of the two legacy flags, not both."""
    given = [
        name
        for name, used in (
            ("--optimizer_type", bool(optimizer_type)),
            ("--use_8bit_adam", use_8bit_adam),
            ("--use_lion_optimizer", use_lion_optimizer),
        )
        if used
    ]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} both choose an optimizer; give only --optimizer_type.")
    if use_8bit_adam:
        return "AdamW8bit"
    if use_lion_optimizer:
        return "Lion"
    return optimizer_type or "AdamW"


def make_optimizer(
    name: str, optimizer_args: dict[str, Any], param_groups: list[dict], lr: float
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and the string logged for it: `module.Class`, followed by `(k=v,...)` when arguments are given."""
    factory = OPTIMIZERS.get(name.lower())
    if factory is None:
        factory = _by_class_path(name)
    try:
        optimizer = factory(param_groups, lr, **optimizer_args)
    except TypeError as error:
        raise UserError(
            f"--optimizer_args {optimizer_args} do not fit {name} ({error}); check the argument names."
        ) from None
    arguments = ",".join(f"{key}={value}" for key, value in optimizer_args.items())
    described = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    return optimizer, described + (f"({arguments})" if arguments else "")  # sd-scripts' ss_optimizer


def _by_class_path(name: str) -> Callable:
    module_name, _, class_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim
        optimizer_class = getattr(module, class_name)
    except (ImportError, AttributeError):
        known = ", ".join(
            ["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "SGDNesterov", "Prodigy", "DAdaptation", "DAdaptAdam"]
        )
        raise UserError(
            f"--optimizer_type {name}: no such optimizer; use one of {known}, a torch.optim class name, or "
            "module.ClassName."
        ) from None
    return lambda params, lr, **kwargs: optimizer_class(params, lr=lr, **kwargs)


def warns_about_learning_rate(name: str, param_groups: list[dict]) -> list[str]:
    """sd-scripts' advice for D-Adaptation and Prodigy, which set their own step size."""
    if name.lower() not in ADAPTIVE_OPTIMIZERS:
        return []
    notes = []
    rates = [group["lr"] for group in param_groups]
    if min(rates) <= 0.1:
        notes.append(f"{name} sets its own step size; the learning rate should be about 1.0 (it is {min(rates)}).")
    if len(set(rates)) > 1:
        notes.append(
            f"{name} uses the first group's learning rate only; --unet_lr and --text_encoder_lr differ "
            f"({sorted(set(rates))})."
        )
    return notes


def warmup_steps(value: str | int | float | None, total_steps: int, option: str = "--lr_warmup_steps") -> int:
    """`--lr_warmup_steps` (and `--lr_decay_steps`): a whole step count, a fraction below 1 of the total steps (0.1),
    or a percentage (10%)."""
    text = "0" if value is None else str(value).strip()
    try:
        if text.endswith("%"):
            return int(total_steps * float(text[:-1]) / 100)
        if "." in text:
            fraction = float(text)
            if not 0 <= fraction < 1:
                raise ValueError(text)
            return int(total_steps * fraction)
        return int(text)
    except ValueError:
        raise UserError(
            f"{option} {value}: use a whole step count, a fraction below 1 (0.1) or a percentage (10%)."
        ) from None


@dataclass(frozen=True)
class ScheduleSettings:
    """The learning-rate schedule's options, named as the flags (specs/training.md 6.3)."""

    lr_scheduler: str = "constant"
    lr_warmup_steps: str = "0"
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_type: str = ""  # a scheduler class (torch.optim.lr_scheduler.X or module.Class) instead
    lr_scheduler_args: Mapping[str, Any] = field(default_factory=dict)
    lr_decay_steps: str = "0"  # warmup_stable_decay's decay, as a count, fraction or percentage
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_timescale: int | None = None

    def check(self) -> None:
        """What can be told from the options alone, before anything loads."""
        name, _, rate = self.lr_scheduler.partition(":")
        if name not in SCHEDULERS:
            raise UserError(f"--lr_scheduler {self.lr_scheduler}: use one of {', '.join(SCHEDULERS)}.")
        if rate and name == "adafactor":
            parse_rate(rate)
        if self.lr_scheduler_type:
            _scheduler_class(self.lr_scheduler_type)
        if name == "piecewise_constant" and "step_rules" not in self.lr_scheduler_args:
            raise UserError(
                "--lr_scheduler piecewise_constant follows rules; give them with --lr_scheduler_args "
                '"step_rules=1:10,0.1" (multiplier 1 until step 10, then 0.1).'
            )


def parse_rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(
            f"--lr_scheduler adafactor:{text}: the part after the colon is the initial learning rate, a number."
        ) from None


def make_lr_scheduler(
    settings: ScheduleSettings,
    optimizer: torch.optim.Optimizer,
    max_train_steps: int,
    processes: int,
    initial_lr: float,
):
    """The schedule. accelerate steps a prepared scheduler once per process at every optimizer step, so its lengths
    count processes. Adafactor with relative_step gets transformers' AdafactorSchedule whatever the name says, as in
    sd-scripts (it only reports the step size Adafactor chose, starting from `initial_lr` or adafactor:LR)."""
    name, _, rate = settings.lr_scheduler.partition(":")
    if is_schedule_free(optimizer):  # it schedules itself (warmup_steps in --optimizer_args); sd-scripts does the same
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if uses_relative_step(optimizer):
        schedule = _import("transformers.optimization", "transformers").AdafactorSchedule
        return schedule(optimizer, initial_lr=parse_rate(rate) if rate else initial_lr)
    if name == "adafactor":
        raise UserError(
            "--lr_scheduler adafactor reports Adafactor's own step sizes; it needs --optimizer_type AdaFactor (with "
            "relative_step)."
        )
    warmup = warmup_steps(settings.lr_warmup_steps, max_train_steps) * processes
    decay = warmup_steps(settings.lr_decay_steps, max_train_steps, "--lr_decay_steps") * processes
    total, args = max_train_steps * processes, dict(settings.lr_scheduler_args)
    if settings.lr_scheduler_type:
        if warmup:
            raise UserError(f"--lr_scheduler_type {settings.lr_scheduler_type} has no warmup; drop --lr_warmup_steps.")
        return _scheduler_class(settings.lr_scheduler_type)(optimizer, **args)
    if name == "constant" and warmup:
        raise UserError(
            f"--lr_scheduler constant has no warmup, but --lr_warmup_steps gives {warmup}; use constant_with_warmup "
            "or drop the warmup."
        )
    transformers_schedules = _import("transformers.optimization", "transformers")
    cycles, min_ratio = settings.lr_scheduler_num_cycles, settings.lr_scheduler_min_lr_ratio or 0.0
    if name == "inverse_sqrt":
        timescale = settings.lr_scheduler_timescale or warmup or None
        return transformers_schedules.get_inverse_sqrt_schedule(optimizer, warmup, timescale=timescale, **args)
    if name == "cosine_with_min_lr":
        return transformers_schedules.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, num_cycles=cycles / 2, min_lr_rate=min_ratio, **args
        )
    if name == "warmup_stable_decay":
        return transformers_schedules.get_wsd_schedule(
            optimizer, warmup, decay, total, min_lr_ratio=min_ratio, num_cycles=cycles / 2, **args
        )
    if name == "piecewise_constant":
        return get_piecewise_constant_schedule(optimizer, **args)
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        num_cycles=cycles,
        power=settings.lr_scheduler_power,
    )


def _scheduler_class(name: str) -> Callable:
    """`X` from torch.optim.lr_scheduler, or `module.Class`."""
    if "." not in name:
        if hasattr(torch.optim.lr_scheduler, name):
            return getattr(torch.optim.lr_scheduler, name)
        raise UserError(
            f"--lr_scheduler_type {name}: no such class in torch.optim.lr_scheduler; give one of its names or "
            "module.ClassName."
        )
    module, _, cls = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise UserError(
            f"--lr_scheduler_type {name}: cannot import {cls} from {module}; check the name, or pip install the "
            "package."
        ) from None
