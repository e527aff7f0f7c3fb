"""The LoRA training run of train_network.py and sdxl_train_network.py (specs/training.md sections 0 and 5): check
everything, load the model, prepare, say what will happen, then the loop, which reads top to bottom: epochs of
batches, a forward and backward per batch, an optimizer step per accumulated group, saves and samples between."""

from __future__ import annotations

import contextlib
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm import tqdm

from library.dataset.arguments import prepare_dataset_plans
from library.dataset.inspection import dataset_summary_lines, debug_dataset
from library.dataset.loader import BatchSettings
from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.file_io import check_output_folder
from library.training.diagnosis import non_finite_latents_message, non_finite_loss_message
from library.training.families import load_training_family
from library.training.forward import batch_loss
from library.training.memory import measured_peak_line, out_of_memory_advice
from library.training.optimizers import is_schedule_free
from library.training.options import TrainingOptions
from library.training.preparation import Run, TrainingLength, prepare, processes_on_cpus, training_length
from library.training.samples import draw_samples, sample_schedule
from library.training.state import (
    Progress,
    TrainState,
    initial_point,
    read_train_state,
    resume_point,
    run_fingerprint,
)
from library.training.stop_request import StopRequest
from library.training.summary import run_summary_lines
from library.training.text_encoder_cache import check_captions_fixed
from library.training.trackers import start_trackers
from library.training.validation import validation_loss
from library.weighted_captions import check_weighted_caption


def train(options: TrainingOptions, on_step: Callable[[int], None] | None = None) -> Path:
    """Run the whole training; returns the final LoRA file. `on_step(global_step)` is called after every optimizer
    step (the benchmark times steps with it)."""
    _check_output_folders(options)
    resumed = read_train_state(options.saving.resume) if options.saving.resume else None
    seed = options.length.seed
    if seed is None:  # the data order and noise of the run being continued, or a new random seed
        seed = resumed.seed if resumed else random.randint(0, 2**32 - 1)
    samples, sample_notes = sample_schedule(options.sampling)
    plans, dataset_notes = prepare_dataset_plans(options.dataset, seed)
    _check_captions(options, plans)
    for line in [*options.notes, *sample_notes, *dataset_notes, *dataset_summary_lines(plans)]:
        print(line)
    num_processes = PartialState(cpu=processes_on_cpus()).num_processes
    length = training_length(options, plans, num_processes)
    fingerprint = run_fingerprint(options, plans, num_processes)
    start = _start(options, length, resumed, fingerprint)
    family = load_training_family(options.model, options.sdxl)
    if options.dataset.debug_dataset:
        settings = BatchSettings(
            seed=seed,
            max_token_length=options.dataset.max_token_length,
            skip_bad_images=options.dataset.skip_bad_images,
        )
        lines, _ = debug_dataset(
            plans, family.model.tokenizers[0], settings, Path(options.saving.output_dir) / "debug_dataset"
        )
        print("\n".join(lines))
        return Path(options.saving.output_dir)
    batch_size = max(plan.config.batch_size for plan in plans)
    try:
        run = prepare(options, family, plans, length, seed, fingerprint, start, samples, on_step)
        for line in run_summary_lines(run):
            print(line)
        return train_loop(run)
    except torch.cuda.OutOfMemoryError as error:
        raise UserError(
            f"CUDA ran out of memory; to need less, try {out_of_memory_advice(options, batch_size)}."
        ) from error


def _check_output_folders(options: TrainingOptions) -> None:
    """Where the run writes, checked before anything loads, so that no run ends unable to save its work."""
    check_output_folder(options.saving.output_dir, "--output_dir")
    if options.logging.logging_dir:
        check_output_folder(options.logging.logging_dir, "--logging_dir")


def _check_captions(options: TrainingOptions, plans: list[DatasetPlan]) -> None:
    """What the captions must allow, checked before anything loads: fixed captions for cached text-encoder
    outputs, and weights above 0 with --weighted_captions."""
    if options.text_encoder_caching.in_memory:
        check_captions_fixed(plans, "--cache_text_encoder_outputs")
    if options.dataset.weighted_captions:
        for plan in plans:
            for sample in plan.samples:
                check_weighted_caption(sample.image.caption, str(sample.image.path))


def _start(options: TrainingOptions, length: TrainingLength, resumed: TrainState | None, fingerprint: dict) -> Progress:
    """Where the run starts: a resumed run where its state stood, --initial_step / --initial_epoch there, else at
    the first batch."""
    if resumed:
        return resume_point(
            options.saving.resume, resumed, fingerprint, length.max_train_steps, length.batches_per_epoch
        )
    lengths = options.length
    if lengths.initial_step is None and lengths.initial_epoch is None:
        return Progress(1, 0, 0)
    return initial_point(
        lengths.initial_step,
        lengths.initial_epoch,
        lengths.skip_until_initial_step,
        length.max_train_steps,
        length.steps_per_epoch,
        lengths.gradient_accumulation_steps,
    )


def train_loop(run: Run) -> Path:
    accelerator, length = run.accelerator, run.length
    if run.options.logging.tracker:
        start_trackers(run.accelerator, run.options)
    where = run.start
    display = LossDisplay(run, where.step)
    if run.samples and run.samples.at_first and where.step == 0:
        with averaged_weights(run):
            _draw_samples(run, epoch=0)
    with StopRequest() as stop:
        for epoch in range(run.start.epoch, length.num_epochs + 1):
            skip = run.start.batches_done if epoch == run.start.epoch else 0
            where = _train_epoch(run, Progress(epoch, where.step, skip), display, stop)
            finished = where.step >= length.max_train_steps
            if not finished and stop.agreed(accelerator):
                with averaged_weights(run):
                    run.saver.on_stop(where)
                raise KeyboardInterrupt
            epoch_ended = where.batches_done == length.batches_per_epoch or finished
            validates = epoch_ended and run.validation and run.validation.schedule.after_epoch(epoch)
            samples = epoch_ended and run.samples and run.samples.after_epoch(epoch)
            saves = not finished and run.saver.saves_after_epoch(where)
            with averaged_weights(run, needed=bool(validates or samples or saves)):
                if validates:
                    display.validated(validation_loss(run), "epoch", epoch)
                if saves:
                    run.saver.after_epoch(run.optimization.network, where)
                if samples:
                    _draw_samples(run, epoch=epoch)
            if finished:
                break
    display.close()
    with averaged_weights(run):
        final = run.saver.final(run.optimization.network, where)
    accelerator.end_training()
    return final


class LossDisplay:
    """The progress bar with the moving average of the loss (about an epoch of optimizer steps, as sd-scripts) and
    the last validation loss, and the TensorBoard log of both."""

    def __init__(self, run: Run, initial_step: int):
        self.run = run
        self.recent: deque[float] = deque(maxlen=run.length.steps_per_epoch)
        self.shown: dict[str, str] = {}
        self.peak_reported = False  # the measured peak memory is said once, after the first step
        disabled = not run.accelerator.is_main_process
        self.bar = tqdm(total=run.length.max_train_steps, initial=initial_step, desc="steps", disable=disabled)

    @property
    def average(self) -> float:
        return sum(self.recent) / len(self.recent)

    def stepped(self, losses: list[float], step: int, reported: dict[str, float]) -> None:
        self.bar.update(1)
        if not self.peak_reported and self.run.accelerator.is_main_process:
            self.bar.write(measured_peak_line(self.run.accelerator.device))
        self.peak_reported = True
        if "max_norm/keys_scaled" in reported:
            self._show(keys_scaled=reported["max_norm/keys_scaled"], avr_key_norm=reported["norm/avg_key_norm"])
        if not losses:
            return
        self.recent.append(sum(losses) / len(losses))
        self._show(avr_loss=self.average)
        logs = {"loss/current": self.recent[-1], "loss/average": self.average, **_rates(self.run), **reported}
        _log(self.run, logs, step)

    def validated(self, loss: float, kind: str, at: int) -> None:
        """A validation loss after a step (`kind` "step") or an epoch ("epoch"), logged at that step or epoch with
        its divergence from the training loss's moving average."""
        self._show(val_loss=loss)
        divergence = loss - self.average if self.recent else float("nan")
        _log(self.run, {f"loss/validation/{kind}_average": loss, f"loss/validation/{kind}_divergence": divergence}, at)

    def _show(self, **values: float) -> None:
        self.shown.update({key: f"{value:.4f}" for key, value in values.items()})
        self.bar.set_postfix(self.shown)

    def close(self) -> None:
        self.bar.close()


def _train_epoch(run: Run, where: Progress, display: LossDisplay, stop: StopRequest) -> Progress:
    """Train from `where` to the end of its epoch, or until the last step or a stop request; returns where it ended."""
    accumulation, sampler = run.options.length.gradient_accumulation_steps, run.batches.sampler
    sampler.set_epoch(where.epoch, where.step - where.batches_done // accumulation, where.batches_done)
    run.optimization.network.train()
    epoch_losses, group_losses = [], []
    for position, batch in enumerate(run.batches.loader, start=where.batches_done):
        if position % accumulation == 0:
            _start_step(run, where.step)
            group_losses = []
        is_sync = (position + 1) % accumulation == 0 or position + 1 == sampler.batches_per_epoch
        if batch is not None:
            group_losses.append(_micro_step(run, batch, where.step + 1))
        if not is_sync:
            continue
        reported = _optimizer_step(run)
        where = Progress(where.epoch, where.step + 1, position + 1)
        display.stepped(group_losses, where.step, reported)
        epoch_losses.extend(group_losses)
        validates = run.validation and run.validation.schedule.after_step(where.step)
        samples = run.samples and run.samples.after_step(where.step)
        saves = run.saver.saves_after_step(where, run.length.max_train_steps)
        with averaged_weights(run, needed=bool(validates or samples or saves)):
            if validates:
                display.validated(validation_loss(run), "step", where.step)
            if samples:
                _draw_samples(run, step=where.step)
            if saves:
                run.saver.after_step(run.optimization.network, where, run.length.max_train_steps)
        if run.on_step:
            run.on_step(where.step)
        if where.step >= run.length.max_train_steps or stop.agreed(run.accelerator):
            return where
    if epoch_losses:
        _log(run, {"loss/epoch_average": sum(epoch_losses) / len(epoch_losses)}, where.epoch)
    return Progress(where.epoch, where.step, sampler.batches_per_epoch)


@contextlib.contextmanager
def averaged_weights(run: Run, needed: bool = True) -> Iterator[None]:
    """A schedule-free optimizer's averaged weights for sampling, validation and saving, and its training weights
    again afterwards; other optimizers have one set. Switched only when `needed`, since each switch rounds."""
    optimizer = run.optimization.optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
    if not (needed and is_schedule_free(optimizer)):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def _draw_samples(run: Run, epoch: int | None = None, step: int | None = None) -> None:
    """The main process draws the sample images; the others wait for it."""
    accelerator, options = run.accelerator, run.options
    if accelerator.is_main_process:
        files = draw_samples(
            run.samples,
            run.family.model,
            run.network,
            options.saving.output_dir,
            options.saving.output_name,
            clip_skip=options.model.clip_skip,
            device=accelerator.device,
            dtype=options.model.weight_dtype,
            epoch=epoch,
            step=step,
        )
        print(f"sample images: {', '.join(file.name for file in files)}")
    accelerator.wait_for_everyone()


def _start_step(run: Run, step: int) -> None:
    """A network with an `on_step_start()` method (networks.dylora draws its rank there) hears of each optimizer step.
    Its random draws are seeded by the step, so that every process draws the same."""
    network = run.network
    if hasattr(network, "on_step_start"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random.Random(f"step/{run.seed}/{step}").getrandbits(63))
            network.on_step_start()


def _micro_step(run: Run, batch: dict, step: int) -> float:
    """Forward and backward of one batch; returns its loss, checked to be finite before the optimizer uses it."""
    generator = torch.Generator(run.accelerator.device).manual_seed(batch["batch_seed"])
    result = batch_loss(run, batch, generator)
    run.accelerator.backward(result.loss / run.options.length.gradient_accumulation_steps)
    value = result.loss.detach().item()  # read once the backward is queued, so the device does not wait for the host
    if not math.isfinite(value):
        if not torch.isfinite(result.latents).all():
            raise UserError(non_finite_latents_message(batch["image_paths"], step))
        raise UserError(non_finite_loss_message(run.options, step))
    return value


def _optimizer_step(run: Run) -> dict[str, float]:
    """One optimizer step; returns what it has to report (with --scale_weight_norms, how many modules it scaled and
    the modules' norms, under sd-scripts' log keys)."""
    optimization, accelerator = run.optimization, run.accelerator
    if accelerator.num_processes > 1:
        _average_gradients(run.network)
    if run.options.optimizer.max_grad_norm:
        accelerator.clip_grad_norm_(optimization.network.parameters(), run.options.optimizer.max_grad_norm)
    optimization.optimizer.step()
    optimization.lr_scheduler.step()
    optimization.optimizer.zero_grad(set_to_none=True)
    if not run.options.network.scale_weight_norms:
        return {}
    scaled, mean_norm, max_norm = run.network.apply_max_norm_regularization(
        run.options.network.scale_weight_norms, accelerator.device
    )
    return {
        "max_norm/keys_scaled": scaled.item(),
        "norm/avg_key_norm": mean_norm.item(),
        "max_norm/max_key_norm": max_norm.item(),
    }


def _average_gradients(network: torch.nn.Module) -> None:
    """Average the LoRA gradients over the processes in one all-reduce. DistributedDataParallel cannot do it: the
    network is never called through its wrapper (its modules run inside the U-Net and text encoder), so its
    gradient hooks stay idle, as in sd-scripts, which reduces each gradient by hand."""
    gradients = [parameter.grad for parameter in network.parameters() if parameter.grad is not None]
    flat = torch._utils._flatten_dense_tensors(gradients)
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for gradient, averaged in zip(gradients, torch._utils._unflatten_dense_tensors(flat, gradients)):
        gradient.copy_(averaged)


def _log(run: Run, values: dict[str, float], step: int) -> None:
    if run.options.logging.tracker:
        run.accelerator.log(values, step=step)


def _rates(run: Run) -> dict[str, float]:
    """Each parameter group's current learning rate, as `lr/<group>`."""
    optimization = run.optimization
    return {
        f"lr/{name}": rate for name, rate in zip(optimization.lr_descriptions, optimization.lr_scheduler.get_last_lr())
    }
