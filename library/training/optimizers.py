"""`--optimizer_type` with `--optimizer_args`, and `--lr_scheduler` with its warmup and shape options
(specs/training.md 6.2, 6.3). A missing optional package is one sentence with the pip command."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from library.errors import UserError

ADAPTIVE_OPTIMIZERS = ("dadaptation", "dadaptadam", "dadaptadagrad", "dadaptadan", "dadaptlion", "dadaptsgd", "prodigy")
CUDA_ONLY_OPTIMIZERS = ("adamw8bit", "pagedadamw8bit", "pagedadamw", "pagedadamw32bit", "lion8bit", "pagedlion8bit")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


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
}


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
    """The optimizer and the string logged for it (`module.Class(k=v, ...)`)."""
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
    return optimizer, f"{type(optimizer).__module__}.{type(optimizer).__name__}({arguments})"


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


def warmup_steps(value: str | int | float | None, total_steps: int) -> int:
    """`--lr_warmup_steps`: a whole step count, a fraction below 1 of the total steps (0.1), or a percentage (10%)."""
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
            f"--lr_warmup_steps {value}: use a whole step count, a fraction below 1 (0.1) or a percentage (10%)."
        ) from None


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    warmup: int,
    total_steps: int,
    num_cycles: int,
    power: float,
    initial_lr: float = 0.0,
):
    """The schedule; Adafactor with relative_step gets transformers' AdafactorSchedule whatever `name` says, as in
    sd-scripts (it only reports the step size Adafactor chose, starting from `initial_lr`)."""
    if uses_relative_step(optimizer):
        return _import("transformers.optimization", "transformers").AdafactorSchedule(optimizer, initial_lr=initial_lr)
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {name}: use one of {', '.join(SCHEDULERS)}.")
    if name == "constant" and warmup:
        raise UserError(
            f"--lr_scheduler constant has no warmup, but --lr_warmup_steps gives {warmup}; use constant_with_warmup "
            "or drop the warmup."
        )
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, num_cycles=num_cycles, power=power
    )
