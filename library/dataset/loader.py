"""From dataset plans to training batches (specs/training.md 3.4-3.8): the per-epoch order of batches across all
datasets, and one batch dict per key with latents or images, token ids, loss weights and masks.

The order is decided in the main process by `EpochBatches`, a sampler that yields one `BatchKey` per batch; the key
carries the epoch, the batch's place in it and the optimizer step, so data-loader workers (persistent or not) need
no shared counters. Every random draw of a sample (caption shuffle and dropout, flip, crop, color) comes from a
generator seeded by (seed, epoch, position, slot): the same seed gives the same batches for any worker count, which
sd-scripts does not promise."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from library.dataset.buckets import crop_offsets
from library.dataset.captions import CaptionSettings, process_caption
from library.dataset.images import load_sample
from library.dataset.latent_cache import CachedLatents
from library.dataset.plan import DatasetPlan, Sample
from library.errors import UserError
from library.text_encoding import tokenize
from library.weighted_captions import tokenize_weighted

logger = logging.getLogger(__name__)
DEFAULT_WORKERS = 8  # sd-scripts' --max_data_loader_n_workers
WORKERS_WITH_CACHED_LATENTS = 2  # a cached batch is a few tensor copies; more processes only cost memory
DEFAULT_PRIOR_LOSS_WEIGHT = 1.0


@dataclass(frozen=True)
class BatchKey:
    dataset: int  # index into the plans
    samples: tuple[int, ...]  # indices into that plan's samples
    epoch: int  # 1-based, as caption_dropout_every_n_epochs counts
    position: int  # the batch's place in the epoch
    global_step: int  # optimizer steps done when this batch is trained, for token warmup


@dataclass(frozen=True)
class BatchError:
    """A UserError met while building a batch, carried back from a worker as its message."""

    message: str


@dataclass(frozen=True)
class BatchSettings:
    seed: int
    max_token_length: int | None = None
    prior_loss_weight: float = DEFAULT_PRIOR_LOSS_WEIGHT
    max_train_steps: int = 1  # for token_warmup_step given as a fraction of the run
    skip_bad_images: bool = False
    weighted_captions: bool = False  # --weighted_captions: (word:1.2) emphasis in captions


class EpochBatches(torch.utils.data.Sampler):
    """The keys of one epoch: every dataset's batches (each from one bucket) shuffled together with the seed.
    Call `set_epoch` before iterating.

    With several processes, process i takes the epoch's batches i, i + n, i + 2n, ...: the batches of one optimizer
    step over n processes with accumulation a are the batches one process with accumulation n * a would take for that
    step. When the count does not divide, the first batches of the epoch are used again so that every process gets
    the same number (as accelerate does), and no process waits for another at the end of the epoch."""

    def __init__(
        self,
        plans: Sequence[DatasetPlan],
        seed: int,
        gradient_accumulation_steps: int = 1,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.plans = list(plans)
        self.seed = seed
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch, self.first_step, self.skip = 1, 0, 0

    def set_epoch(self, epoch: int, global_step: int = 0, skip: int = 0) -> None:
        """`epoch` counts from 1; `global_step` is the optimizer step count when the epoch starts; the first `skip`
        batches of this process are left out (a run resumed in the middle of an epoch)."""
        self.epoch, self.first_step, self.skip = epoch, global_step, skip

    def keys(self) -> list[BatchKey]:
        """All processes' keys of the epoch, in training order."""
        batches = [
            (index, batch)
            for index, plan in enumerate(self.plans)
            for batch in plan.epoch_batches(self.seed, self.epoch)
        ]
        random.Random(f"datasets/{self.seed}/{self.epoch}").shuffle(batches)
        per_step = self.gradient_accumulation_steps * self.num_processes
        return [
            BatchKey(dataset, tuple(samples), self.epoch, position, self.first_step + position // per_step)
            for position, (dataset, samples) in enumerate(batches)
        ]

    def process_keys(self) -> list[BatchKey]:
        """This process's share of the epoch, padded to `batches_per_epoch`."""
        keys = self.keys()
        padded = [keys[index % len(keys)] for index in range(self.batches_per_epoch * self.num_processes)]
        return padded[self.process_index :: self.num_processes]

    @property
    def batches_per_epoch(self) -> int:
        """Batches each process trains in a whole epoch."""
        return math.ceil(sum(plan.batch_count() for plan in self.plans) / self.num_processes)

    def __iter__(self) -> Iterator[BatchKey]:
        return iter(self.process_keys()[self.skip :])

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip


class TrainingBatches(torch.utils.data.Dataset):
    """Builds the batch dict for a `BatchKey`. With `latents` (from `cache_latents`) the batch holds latents and no
    images; without, images are decoded and augmented here. Keys follow sd-scripts' batch dict:
    `latents` or `images`, `input_ids` (B, n, 77) and for SDXL's second tokenizer `input_ids2`, `captions`,
    `loss_weights` (B), `alpha_masks` (B, H, W) or None,
    `network_multipliers` (B), `flippeds`, and the SDXL size conditioning `original_sizes_hw`, `crop_top_lefts`,
    `target_sizes_hw` (B, 2), and `batch_seed` for the batch's noise.

    An image that cannot be decoded is a UserError naming it; with skip_bad_images it is left out of its batch with
    a warning, and a batch left with no image at all comes back as None, which the training loop skips."""

    def __init__(
        self,
        plans: Sequence[DatasetPlan],
        tokenizer: CLIPTokenizer | Sequence[CLIPTokenizer],
        settings: BatchSettings,
        latents: dict[Path, CachedLatents] | None = None,
    ):
        self.plans = list(plans)
        self.tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.settings = settings
        self.latents = latents

    def __getitem__(self, key: BatchKey) -> dict | BatchError | None:
        try:
            return self._batch(key)
        except (
            UserError
        ) as error:  # in a worker process; TrainingLoader raises it again, without the worker's traceback
            return BatchError(str(error))

    def _batch(self, key: BatchKey) -> dict | None:
        plan = self.plans[key.dataset]
        items = []
        for slot, index in enumerate(key.samples):
            rng = random.Random(f"{self.settings.seed}/{key.epoch}/{key.position}/{slot}")
            sample = plan.samples[index]
            item = self._item(sample, rng, key)
            if item is not None:
                items.append(item)
        if not items:
            return None
        return self._collate(items, plan, key)

    def _item(self, sample: Sample, rng: random.Random, key: BatchKey) -> dict | None:
        caption = process_caption(
            sample.image.caption,
            CaptionSettings.of(sample.subset),
            rng,
            key.epoch,
            key.global_step,
            self.settings.max_train_steps,
        )
        pixels_or_latents = self._cached(sample, rng) if self.latents is not None else self._loaded(sample, rng)
        if pixels_or_latents is None:
            return None
        tensor, alpha_mask, flipped, (top, left) = pixels_or_latents
        width, height = sample.image.size
        bucket_width, bucket_height = sample.placement.bucket
        if flipped:  # the window's left edge as seen in the mirrored image
            left = sample.placement.resized[0] - bucket_width - left
        return {
            "tensor": tensor,
            "alpha_mask": alpha_mask,
            "flipped": flipped,
            "caption": caption,
            "image_path": str(sample.image.path),
            "loss_weight": sample.loss_weight(self.settings.prior_loss_weight),
            "original_size_hw": (height, width),
            "crop_top_left": (top, left),
            "target_size_hw": (bucket_height, bucket_width),
        }

    def _cached(self, sample: Sample, rng: random.Random) -> tuple | None:
        entry = self.latents.get(sample.image.path)
        if entry is None:  # unreadable when the cache was made, and left out with skip_bad_images
            return None
        flipped = bool(sample.subset.flip_aug) and rng.random() < 0.5
        latents = entry.latents_flipped if flipped else entry.latents
        alpha_mask = entry.alpha_mask
        if flipped and alpha_mask is not None:
            alpha_mask = alpha_mask.flip(-1)
        left, top = crop_offsets(sample.placement.resized, sample.placement.bucket, False, None)
        return latents, alpha_mask, flipped, (top, left)

    def _loaded(self, sample: Sample, rng: random.Random) -> tuple | None:
        try:
            loaded = load_sample(sample.image.path, sample.placement, sample.subset, rng)
        except UserError as error:
            if not self.settings.skip_bad_images:
                raise
            logger.warning("skipped in this batch: %s", error)
            return None
        return loaded.pixels, loaded.alpha_mask, loaded.flipped, loaded.crop_top_left

    def _tokens(self, captions: list[str]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each tokenizer's ids (B, n, 77), and with --weighted_captions the tokens' weights (the same positions for
        both of SDXL's tokenizers, which share their vocabulary), else None."""
        length = self.settings.max_token_length
        if not self.settings.weighted_captions:
            return [tokenize(tokenizer, captions, length) for tokenizer in self.tokenizers], None
        weighted = [tokenize_weighted(tokenizer, captions, length) for tokenizer in self.tokenizers]
        return [ids for ids, _ in weighted], weighted[0][1]

    def _collate(self, items: list[dict], plan: DatasetPlan, key: BatchKey) -> dict:
        stacked = torch.stack([item["tensor"] for item in items])
        captions = [item["caption"] for item in items]
        token_ids, token_weights = self._tokens(captions)
        return {
            "latents": stacked if self.latents is not None else None,
            "images": stacked if self.latents is None else None,
            "captions": captions,
            "image_paths": [item["image_path"] for item in items],
            "input_ids": token_ids[0],
            "input_ids2": token_ids[1] if len(token_ids) > 1 else None,
            "input_weights": token_weights,
            "loss_weights": torch.tensor([item["loss_weight"] for item in items], dtype=torch.float32),
            "alpha_masks": _alpha_masks(items),
            "network_multipliers": torch.full((len(items),), float(plan.config.network_multiplier)),
            "flippeds": [item["flipped"] for item in items],
            "original_sizes_hw": torch.tensor([item["original_size_hw"] for item in items]),
            "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in items]),
            "target_sizes_hw": torch.tensor([item["target_size_hw"] for item in items]),
            "batch_seed": batch_seed(self.settings.seed, key),
        }


def batch_seed(seed: int, key: BatchKey) -> int:
    """The seed of the batch's training noise and timesteps: it depends on the batch, not on the process or on what
    ran before, so that n processes train as one with n times the accumulation, and a resumed run as one that never
    stopped."""
    return random.Random(f"noise/{seed}/{key.epoch}/{key.position}").getrandbits(63)


def _alpha_masks(items: list[dict]) -> torch.Tensor | None:
    """Stacked masks when any sample has one; samples without a mask count as fully opaque (all ones)."""
    masks = [item["alpha_mask"] for item in items]
    present = next((mask for mask in masks if mask is not None), None)
    if present is None:
        return None
    return torch.stack([torch.ones_like(present) if mask is None else mask for mask in masks])


def worker_count(requested: int | None, latents_cached: bool) -> int:
    """`--max_data_loader_n_workers`, capped at the CPU count. Unset, it is sd-scripts' 8, or 2 when the latents
    are cached (a cached batch needs almost no work, and every worker holds a copy of the process)."""
    if requested is None:
        requested = WORKERS_WITH_CACHED_LATENTS if latents_cached else DEFAULT_WORKERS
    return max(0, min(requested, os.cpu_count() or 1))


def make_data_loader(
    batches: TrainingBatches, sampler: EpochBatches, workers: int, persistent_workers: bool, pin_memory: bool = False
) -> TrainingLoader:
    """A loader that yields the sampler's batches as built by `batches`. Persistent workers need at least one
    worker; with none the flag is ignored (sd-scripts lets PyTorch raise there). Workers are forked where the
    system can: a spawned worker would receive every cached latent tensor as its own shared-memory handle. The
    loader draws its worker seeds from its own generator, not from torch's global one, which a resumed run restores."""
    context = "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=persistent_workers and workers > 0,
        collate_fn=_as_built,
        pin_memory=pin_memory,
        multiprocessing_context=context,
        generator=torch.Generator().manual_seed(sampler.seed),
    )
    return TrainingLoader(loader)


class TrainingLoader:
    """The DataLoader, raising a problem met in a worker as the one-sentence UserError it is."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict | None]:
        for batch in self.loader:
            if isinstance(batch, BatchError):
                raise UserError(batch.message)
            yield batch


def _as_built(batch):
    return batch
