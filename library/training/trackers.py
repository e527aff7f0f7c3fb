"""The loggers of a run (TensorBoard under --logging_dir, wandb with --log_with wandb), started as sd-scripts starts
them: the tracker name (--log_tracker_name, default network_train), the loggers' own settings from a TOML file
(--log_tracker_config), wandb's run name and login, and the run's options as the tracker config (--log_config)."""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

from accelerate import Accelerator

from library.errors import UserError
from library.training.options import TrainingOptions

DEFAULT_TRACKER_NAME = "network_train"


def start_trackers(accelerator: Accelerator, options: TrainingOptions) -> None:
    logging = options.logging
    init_kwargs = _tracker_settings(logging.log_tracker_config) if logging.log_tracker_config else {}
    if logging.wandb_run_name:
        init_kwargs.setdefault("wandb", {})["name"] = logging.wandb_run_name
    if logging.wandb_api_key and logging.tracker in ("wandb", "all") and accelerator.is_main_process:
        import wandb

        wandb.login(key=logging.wandb_api_key)
    config = options_as_config(options) if logging.log_config else None
    accelerator.init_trackers(logging.log_tracker_name or DEFAULT_TRACKER_NAME, config=config, init_kwargs=init_kwargs)


def options_as_config(options: TrainingOptions) -> dict[str, Any]:
    """The options flattened to `group.name` keys with values trackers can store (numbers, text, booleans); the
    wandb key is left out."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                walk(f"{prefix}{field.name}.", getattr(value, field.name))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif not prefix.endswith("wandb_api_key."):
            flat[prefix.rstrip(".")] = value if isinstance(value, int | float | str | bool) else str(value)

    walk("", options)
    return flat


def _tracker_settings(path: str) -> dict[str, dict]:
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--log_tracker_config {path}: not valid TOML ({error}); fix the file.") from error
