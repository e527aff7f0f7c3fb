"""Validation loss (specs/training.md section 10): the images `validation_split` holds out, evaluated without
gradients at four fixed timesteps (the interior points of six evenly spaced between the timestep limits: 200, 400,
600 and 800 by default) with noise fixed per batch and timestep, so that the curve compares between evaluations and
between runs. The network runs at its full strength with dropout off; the U-Net leaves training mode for it (and
so skips gradient checkpointing). With several processes each takes its share of the batches and the sums are
added up."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from library.dataset.loader import BatchError, BatchKey, TrainingBatches
from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.training.diffusion import NUM_TRAIN_TIMESTEPS
from library.training.forward import batch_loss
from library.training.options import ValidationOptions

if TYPE_CHECKING:  # preparation builds the validation, and a run holds it
    from library.training.preparation import Run

TIMESTEP_POINTS = 6  # evenly spaced from the lowest to the highest timestep; the interior four are used


@dataclass(frozen=True)
class ValidationSchedule:
    every_n_steps: int | None
    every_n_epochs: int  # 1 unless --validate_every_n_epochs says otherwise

    def after_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def after_epoch(self, epoch: int) -> bool:
        return epoch % self.every_n_epochs == 0


@dataclass
class Validation:
    schedule: ValidationSchedule
    batches: TrainingBatches  # over the validation plans
    keys: list[BatchKey]  # this process's batches
    num_images: int  # in all, over the processes


def validation_plans(plans: list[DatasetPlan]) -> list[DatasetPlan]:
    return [plan for plan in (plan.validation_plan() for plan in plans) if plan is not None]


def validation_keys(
    plans: list[DatasetPlan], max_batches: int | None, process_index: int, num_processes: int
) -> list[BatchKey]:
    """The validation batches in a fixed order (dataset by dataset, bucket by bucket), at most `max_batches`
    (--max_validation_steps), this process's share of them."""
    keys = [
        BatchKey(dataset=index, samples=tuple(batch), epoch=1, position=position, global_step=0)
        for index, plan in enumerate(plans)
        for position, batch in enumerate(plan.sorted_batches())
    ]
    return keys[:max_batches][process_index::num_processes]


def validation_timesteps(min_timestep: int | None, max_timestep: int | None) -> list[int]:
    low = 0 if min_timestep is None else min_timestep
    high = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    step = (high - low) / (TIMESTEP_POINTS - 1)
    return [int(low + step * point) for point in range(1, TIMESTEP_POINTS - 1)]


def validation_schedule(options: ValidationOptions) -> ValidationSchedule:
    return ValidationSchedule(options.validate_every_n_steps, options.validate_every_n_epochs or 1)


def validation_loss(run: Run) -> float:
    """The mean loss over the validation batches and the fixed timesteps, the same on every process."""
    batches, keys = run.validation.batches, run.validation.keys
    accelerator, device = run.accelerator, run.accelerator.device
    timesteps = validation_timesteps(run.options.diffusion.min_timestep, run.options.diffusion.max_timestep)
    modules = [run.optimization.network, run.family.model.unet, *run.family.model.text_encoders]
    modes = [(module, module.training) for module in modules]
    total = torch.zeros(2, device=device, dtype=torch.float64)  # sum of per-sample losses, samples
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            for key in tqdm(keys, desc="validation", leave=False, disable=not accelerator.is_main_process):
                batch = _built(batches, key)
                if batch is None:
                    continue
                size = len(batch["captions"])
                for timestep in timesteps:
                    generator = torch.Generator(device).manual_seed(_noise_seed(run.seed, key, timestep))
                    forced = torch.full((size,), timestep, device=device, dtype=torch.long)
                    loss = batch_loss(run, batch, generator, forced, training=False).loss
                    total += torch.stack([loss.double() * size, torch.tensor(size, device=device, dtype=torch.float64)])
    finally:
        for module, training in modes:
            module.train(training)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item() if total[1] else float("nan")


def _built(batches: TrainingBatches, key: BatchKey) -> dict | None:
    batch = batches[key]
    if isinstance(batch, BatchError):
        raise UserError(batch.message)
    return batch


def _noise_seed(seed: int, key: BatchKey, timestep: int) -> int:
    return random.Random(f"validation/{seed}/{key.dataset}/{key.position}/{timestep}").getrandbits(63)
