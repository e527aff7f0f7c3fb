"""Sample images during training (specs/training.md section 8): when to draw them, and drawing the prompt file's
images with the network being trained into `output_dir/sample`, named as sd-scripts names them."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import torch

from library.model_files.stable_diffusion import StableDiffusionModel
from library.sampling import (
    SamplePrompt,
    check_sampler,
    generate_image,
    read_sample_prompts,
    sample_file_name,
    save_sample_image,
)
from library.training.options import SamplingOptions


@dataclass(frozen=True)
class SampleSchedule:
    prompts: tuple[SamplePrompt, ...]
    sampler: str
    at_first: bool
    every_n_steps: int | None
    every_n_epochs: int | None  # wins over every_n_steps, as in sd-scripts

    def after_step(self, step: int) -> bool:
        return not self.every_n_epochs and bool(self.every_n_steps) and step % self.every_n_steps == 0

    def after_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0


def sample_schedule(options: SamplingOptions) -> tuple[SampleSchedule | None, list[str]]:
    """The schedule from the options, read and checked at start-up (a bad prompt file stops the run before anything
    loads), and notes about options that will have no effect."""
    notes = []
    intervals = {
        "--sample_every_n_steps": options.sample_every_n_steps,
        "--sample_every_n_epochs": options.sample_every_n_epochs,
    }
    for flag, value in intervals.items():
        if value is not None and value <= 0:
            notes.append(f"{flag} {value}: not a positive interval; ignored.")
    every_n_steps = options.sample_every_n_steps if (options.sample_every_n_steps or 0) > 0 else None
    every_n_epochs = options.sample_every_n_epochs if (options.sample_every_n_epochs or 0) > 0 else None
    triggered = options.sample_at_first or every_n_steps or every_n_epochs
    if not options.sample_prompts:
        if triggered:
            notes.append("sample images are asked for, but there is no --sample_prompts file; none will be drawn.")
        return None, notes
    if not triggered:
        notes.append(
            "--sample_prompts without --sample_every_n_steps, --sample_every_n_epochs or --sample_at_first: no "
            "samples will be drawn."
        )
    prompts = tuple(read_sample_prompts(options.sample_prompts))
    schedule = SampleSchedule(
        prompts,
        check_sampler(options.sample_sampler, "--sample_sampler"),
        options.sample_at_first,
        every_n_steps,
        every_n_epochs,
    )
    return schedule, notes


def draw_samples(
    schedule: SampleSchedule,
    model: StableDiffusionModel,
    network: torch.nn.Module,
    output_dir: str,
    output_name: str | None,
    *,
    clip_skip: int | None,
    device: torch.device,
    dtype: torch.dtype,
    epoch: int | None = None,
    step: int | None = None,
) -> list[Path]:
    """Draw every prompt with the network applied at its full strength (dropout off); returns the PNG files."""
    was_training = network.training
    network.eval()
    now = datetime.datetime.now()
    files = []
    try:
        for index, prompt in enumerate(schedule.prompts):
            generated = generate_image(
                model.unet,
                model.text_encoders,
                model.tokenizers,
                model.vae,
                prompt,
                v_prediction=model.v_prediction,
                clip_skip=clip_skip,
                default_sampler=schedule.sampler,
                device=device,
                dtype=dtype,
            )
            path = sample_file_name(
                output_dir, output_name, epoch=epoch, step=step, index=index, seed=prompt.seed, now=now
            )
            files.append(save_sample_image(generated, path))
    finally:
        network.train(was_training)
    return files
