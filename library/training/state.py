"""The training state of `--save_state` and `--resume` (specs/training.md 7.4-7.5): accelerate's folder (LoRA
weights, optimizer, LR scheduler, RNG states, gradient scaler) plus `train_state.json`, which says where the run
stood and what it trained, so that a resumed run continues exactly and refuses a different network or dataset.

sd-scripts restarts the step count at 0 on resume (save names, logs and samples start over); here the step and
epoch count on from where the state was saved, in the middle of an epoch too."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from library.dataset.plan import DatasetPlan
from library.errors import UserError

TRAIN_STATE_FILE = "train_state.json"
PATH_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")


@dataclass(frozen=True)
class TrainState:
    epoch: int  # the 1-based epoch the state was saved in
    step: int  # optimizer steps done
    batches_done: int  # batches of that epoch each process had trained
    seed: int
    run: dict[str, Any]  # what a resumed run must match, from `run_fingerprint`

    def to_json(self) -> dict:
        # current_epoch and current_step are sd-scripts' names for the first two
        return {"current_epoch": self.epoch, "current_step": self.step, "batches_done_in_epoch": self.batches_done,
                "seed": self.seed, "run": self.run}


def run_fingerprint(args: Any, plans: Sequence[DatasetPlan], num_processes: int, optimizer: str) -> dict[str, Any]:
    """The settings that decide what the saved optimizer state and step count mean."""
    fingerprint = {
        "network_module": args.network_module,
        "network_dim": args.network_dim,
        "network_alpha": args.network_alpha,
        "network_args": list(args.network_args or []),
        "network_train_unet_only": args.network_train_unet_only,
        "network_train_text_encoder_only": args.network_train_text_encoder_only,
        "optimizer": optimizer,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": num_processes,
        "datasets": [_dataset_fingerprint(plan) for plan in plans],
    }
    return json.loads(json.dumps(fingerprint, default=str))  # tuples become lists, as they come back from the file


def _dataset_fingerprint(plan: DatasetPlan) -> dict[str, Any]:
    paths = "\n".join(sorted(str(Path(sample.image.path).resolve()) for sample in plan.samples))
    return {
        "settings": dict(plan.config.settings),
        "subsets": [_with_absolute_paths(subset.settings) for subset in plan.config.subsets],
        "images": f"{len(plan.samples)} images, list {hashlib.sha256(paths.encode()).hexdigest()[:12]}",
    }


def _with_absolute_paths(settings) -> dict[str, Any]:
    """A folder given relative to another working directory is the same folder."""
    return {key: str(Path(value).resolve()) if key in PATH_KEYS and value else value for key, value in settings.items()}


def write_train_state(folder: Path, state: TrainState) -> None:
    (folder / TRAIN_STATE_FILE).write_text(json.dumps(state.to_json(), indent=2))


def read_train_state(folder: str | Path) -> TrainState:
    folder = Path(folder)
    file = folder / TRAIN_STATE_FILE
    if not folder.is_dir():
        raise UserError(f"--resume {folder}: no such folder; give a state folder written with --save_state (name-000001-state, ...).")
    if not file.is_file():
        raise UserError(f"--resume {folder}: no {TRAIN_STATE_FILE} in it; give a state folder written with --save_state.")
    saved = json.loads(file.read_text())
    if "run" not in saved:
        raise UserError(
            f"--resume {folder}: this state was written by sd-scripts (or without the run's settings) and cannot be continued "
            f"exactly; start from its weights with --network_weights {folder / 'model.safetensors'} instead."
        )
    return TrainState(saved["current_epoch"], saved["current_step"], saved["batches_done_in_epoch"], saved["seed"], saved["run"])


def check_same_run(folder: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    difference = first_difference(saved, current)
    if difference:
        path, before, now = difference
        raise UserError(
            f"--resume {folder}: {path} was {json.dumps(before)} in the saved run and is {json.dumps(now)} now; "
            "resume with the same settings, or start a new run from the weights with --network_weights."
        )


def first_difference(saved: Any, current: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first place where two JSON-like values differ, as (dotted path, saved value, current value)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in [*saved, *(key for key in current if key not in saved)]:
            found = first_difference(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (before, now) in enumerate(zip(saved, current)):
            found = first_difference(before, now, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if saved == current else (path, saved, current)


def save_state_folder(accelerator, folder: Path, state: TrainState) -> None:
    """Write the state to a staging folder and rename it, so an interrupted save never leaves a partial state."""
    staging = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))  # every process writes its own RNG state file
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_train_state(staging, state)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        print(f"saved state {folder}")
    accelerator.wait_for_everyone()
