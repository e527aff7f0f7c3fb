"""The training state of `--save_state` and `--resume` (specs/training.md 7.4-7.5): accelerate's folder (LoRA
weights, optimizer, LR scheduler, RNG states, gradient scaler) plus `train_state.json`, which says where the run
stood and what it trained, so that a resumed run continues exactly and refuses a different network or dataset.

sd-scripts restarts the step count at 0 on resume (save names, logs and samples start over); here the step and
epoch count on from where the state was saved, in the middle of an epoch too."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.training.options import TrainingOptions

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
        return {
            "current_epoch": self.epoch,
            "current_step": self.step,
            "batches_done_in_epoch": self.batches_done,
            "seed": self.seed,
            "run": self.run,
        }


@dataclass(frozen=True)
class Progress:
    """Where the loop stands: what a saved state records and a resumed run starts from."""

    epoch: int  # 1-based
    step: int  # optimizer steps done
    batches_done: int  # this process's batches of the epoch trained so far


def run_fingerprint(options: TrainingOptions, plans: Sequence[DatasetPlan], num_processes: int) -> dict[str, Any]:
    """The settings that decide what the saved optimizer state and step count mean."""
    network = options.network
    fingerprint = {
        "network_module": network.network_module,
        "network_dim": network.network_dim,
        "network_alpha": network.network_alpha,
        "network_args": list(network.network_args),
        "network_train_unet_only": not network.train_text_encoder,
        "network_train_text_encoder_only": not network.train_unet,
        "optimizer": options.optimizer.name,
        "gradient_accumulation_steps": options.length.gradient_accumulation_steps,
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
        raise UserError(
            f"--resume {folder}: no such folder; give a state folder written with --save_state (name-000001-state, "
            "...)."
        )
    if not file.is_file():
        raise UserError(
            f"--resume {folder}: no {TRAIN_STATE_FILE} in it; give a state folder written with --save_state."
        )
    saved = json.loads(file.read_text())
    if "run" not in saved:
        raise UserError(
            f"--resume {folder}: this state was written by sd-scripts (or without the run's settings) and cannot be "
            "continued "
            f"exactly; start from its weights with --network_weights {folder / 'model.safetensors'} instead."
        )
    return TrainState(
        saved["current_epoch"], saved["current_step"], saved["batches_done_in_epoch"], saved["seed"], saved["run"]
    )


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


def resume_point(
    folder: str, resumed: TrainState, fingerprint: dict, max_train_steps: int, batches_per_epoch: int
) -> Progress:
    """Where a resumed run goes on, after checking that it trains what the saved run trained (before anything loads)."""
    check_same_run(folder, resumed.run, fingerprint)
    if resumed.step >= max_train_steps:
        raise UserError(
            f"--resume {folder}: that run already did {resumed.step} steps, and --max_train_steps is "
            f"{max_train_steps}; raise it to train further."
        )
    if resumed.batches_done >= batches_per_epoch:
        return Progress(resumed.epoch + 1, resumed.step, 0)
    return Progress(resumed.epoch, resumed.step, resumed.batches_done)


def initial_point(
    initial_step: int | None,
    initial_epoch: int | None,
    skip: bool,
    max_train_steps: int,
    steps_per_epoch: int,
    accumulation: int,
) -> Progress:
    """Where --initial_step (or the start of --initial_epoch) puts a run without a state: the step count starts there
    (names, logs, the learning-rate schedule), in the epoch that step falls in, from that epoch's first batch, or
    with --skip_until_initial_step from the batch the step would have reached."""
    step = initial_step if initial_step is not None else (initial_epoch - 1) * steps_per_epoch
    flag = "--initial_step" if initial_step is not None else "--initial_epoch"
    if step < 0 or (initial_step is None and initial_epoch < 1):
        raise UserError(f"{flag} must be 0 or more (--initial_epoch 1 or more).")
    if step >= max_train_steps:
        raise UserError(
            f"{flag} starts at step {step}, but --max_train_steps is {max_train_steps}; raise --max_train_steps."
        )
    within = step % steps_per_epoch
    return Progress(step // steps_per_epoch + 1, step, within * accumulation if skip else 0)


def load_state_folder(folder: str, accelerator, start: Progress) -> None:
    """Load the state folder into the prepared network, optimizer, scheduler and RNGs."""
    try:
        accelerator.load_state(folder)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise UserError(
            f"--resume {folder}: the state could not be loaded ({error}); was it saved by this trainer with these "
            "settings?"
        ) from error
    print(f"resuming {folder}: epoch {start.epoch}, step {start.step}")
