"""From a user's datasets to the batches of each epoch: repeats, the balance of regularization images, aspect-ratio
buckets and per-epoch shuffling with a seed (specs/training.md sections 3.2, 3.4, 3.7, 3.8). Everything is checked
first, and all problems are reported together before any model is loaded."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from library.dataset.buckets import (
    STEP_DIVISOR,
    BucketAssigner,
    BucketSettings,
    Placement,
    check_bucket_settings,
    normalized,
)
from library.dataset.config import DatasetConfig, Problems, SubsetConfig, load_dataset_config
from library.dataset.scan import ImageRecord, ScannedSubset, scan_datasets


@dataclass(frozen=True)
class Sample:
    image: ImageRecord
    subset: SubsetConfig
    placement: Placement
    repeats: int  # times per epoch, after the regularization balance

    @property
    def is_reg(self) -> bool:
        return bool(self.subset.is_reg)

    def loss_weight(self, prior_loss_weight: float) -> float:
        """--prior_loss_weight applies to regularization samples only."""
        return prior_loss_weight if self.is_reg else 1.0


@dataclass(frozen=True)
class DatasetPlan:
    config: DatasetConfig
    samples: tuple[Sample, ...]
    num_train_images: int  # training images times their repeats
    num_reg_images: int  # regularization images times their repeats, before balancing
    validation_samples: tuple[Sample, ...] = ()  # the images validation_split holds out, one repeat each

    def validation_plan(self) -> DatasetPlan | None:
        """The held-out images as a plan of their own (same buckets and batch size), or None without any."""
        if not self.validation_samples:
            return None
        return DatasetPlan(self.config, self.validation_samples, len(self.validation_samples), 0)

    def sorted_batches(self) -> list[list[int]]:
        """The plan's samples in batches without shuffling: bucket by bucket, in order (for validation)."""
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(self.samples):
            buckets.setdefault(sample.placement.bucket, []).extend([index] * sample.repeats)
        size = self.config.batch_size
        return [
            members[start : start + size]
            for _, members in sorted(buckets.items())
            for start in range(0, len(members), size)
        ]

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Samples per bucket in one epoch (repeats included)."""
        counts: Counter = Counter()
        for sample in self.samples:
            counts[sample.placement.bucket] += sample.repeats
        return dict(sorted(counts.items()))

    def batch_count(self) -> int:
        """Batches per epoch: each bucket's samples cut into batches of batch_size, the last possibly smaller."""
        return sum(math.ceil(count / self.config.batch_size) for count in self.bucket_counts().values())

    def epoch_batches(self, seed: int, epoch: int) -> list[list[int]]:
        """The epoch's batches as sample indices: each sample appears `repeats` times in its bucket, buckets are
        shuffled inside, cut into batches of batch_size (the last may be smaller), and the batches shuffled; one
        batch never mixes buckets. The same seed and epoch always give the same batches."""
        rng = random.Random(seed + epoch)
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(self.samples):
            buckets.setdefault(sample.placement.bucket, []).extend([index] * sample.repeats)
        batch_size = self.config.batch_size
        batches = []
        for bucket in sorted(buckets):
            members = buckets[bucket]
            rng.shuffle(members)
            batches.extend(members[start : start + batch_size] for start in range(0, len(members), batch_size))
        rng.shuffle(batches)
        return batches


def prepare_datasets(
    dataset_config: str | None,
    cli: Mapping[str, Any],
    train_data_dir: str | None = None,
    reg_data_dir: str | None = None,
    in_json: str | None = None,
    skip_bad_images: bool = False,
    cache_latents: bool = False,
    bucket_step_divisor: int = STEP_DIVISOR,
    split_seed: int = 0,
) -> tuple[list[DatasetPlan], list[str]]:
    """Read the config (or legacy folders), scan every folder and check everything; one UserError lists every
    problem. Returns the plans and the notes for the start-up summary."""
    datasets, problems = load_dataset_config(dataset_config, cli, train_data_dir, reg_data_dir, in_json)
    problems.raise_if_any()  # without a valid config there is nothing sensible to scan
    _check_supported(datasets, problems)
    datasets = [
        _without_face_crop_in_buckets(_without_skipped_subsets(dataset, problems), problems) for dataset in datasets
    ]
    scanned = scan_datasets(datasets, problems, skip_bad_images)
    settings = [_bucket_settings(dataset, problems, bucket_step_divisor) for dataset in datasets]
    if cache_latents:
        _check_caching(datasets, problems)
    problems.raise_if_any()
    plans = [
        _plan(dataset, subsets, bucket_settings, problems, split_seed)
        for dataset, subsets, bucket_settings in zip(datasets, scanned, settings)
    ]
    if not any(plan.samples for plan in plans):
        problems.add(
            "no images to train on: every subset was skipped or every image left out (see the notes above);"
            " check the folders, num_repeats and --train_data_dir (the parent of the <repeats>_<name> folders)."
        )
    problems.raise_if_any()
    return plans, problems.notes


def _check_supported(datasets: list[DatasetConfig], problems: Problems) -> None:
    """Values the schema's types allow but training cannot use, reported with everything else."""
    for dataset in datasets:
        if dataset.batch_size < 1:
            problems.add(f"{dataset.where}: batch_size is {dataset.batch_size}; use 1 or more.")
        if not 0 <= dataset.validation_split <= 1:
            problems.add(
                f"{dataset.where}: validation_split is {dataset.validation_split:g}; it is the fraction of each"
                " subset's images held out for validation, from 0 (none) to 1 (the whole dataset), e.g. 0.1."
            )
        for subset in dataset.subsets:
            low_high = subset.face_crop_aug_range
            if low_high is not None and not 0 < low_high[0] <= low_high[1]:
                problems.add(
                    f"{subset.where}: face_crop_aug_range is {list(low_high)}; give [low, high] with 0 < low <= high,"
                    " e.g. [2.0, 4.0] (the face is 1/high to 1/low of the image's shorter side)."
                )


def _without_skipped_subsets(dataset: DatasetConfig, problems: Problems) -> DatasetConfig:
    """Subsets with fewer than one repeat, and repeated folders, are left out with a note (as sd-scripts does)."""
    kept, seen = [], set()
    for subset in dataset.subsets:
        identity = (subset.image_dir, subset.metadata_file)
        if subset.num_repeats < 1:
            problems.note(f"{subset.where}: skipped, num_repeats is {subset.num_repeats}.")
        elif identity in seen:
            problems.note(f"{subset.where}: skipped, the same folder is already a subset of this dataset.")
        else:
            seen.add(identity)
            kept.append(subset)
    return DatasetConfig(dataset.where, dataset.style, dataset.settings, tuple(kept))


def _without_face_crop_in_buckets(dataset: DatasetConfig, problems: Problems) -> DatasetConfig:
    """face_crop_aug_range works on fixed-size training only; with buckets sd-scripts ignores it, and so does this,
    saying so."""
    if not dataset.enable_bucket or not any(subset.face_crop_aug_range for subset in dataset.subsets):
        return dataset
    problems.note(f"{dataset.where}: face_crop_aug_range is ignored with enable_bucket (as in sd-scripts).")
    subsets = tuple(
        SubsetConfig(subset.where, {**subset.settings, "face_crop_aug_range": None}) for subset in dataset.subsets
    )
    return DatasetConfig(dataset.where, dataset.style, dataset.settings, subsets)


def _bucket_settings(dataset: DatasetConfig, problems: Problems, step_divisor: int) -> BucketSettings:
    settings = BucketSettings(
        resolution=dataset.resolution,
        enable_bucket=dataset.enable_bucket,
        min_bucket_reso=dataset.min_bucket_reso,
        max_bucket_reso=dataset.max_bucket_reso,
        bucket_reso_steps=dataset.bucket_reso_steps,
        bucket_no_upscale=dataset.bucket_no_upscale,
    )
    for message in check_bucket_settings(settings, dataset.where, step_divisor):
        problems.add(message)
    return settings


def _check_caching(datasets: list[DatasetConfig], problems: Problems) -> None:
    for dataset in datasets:
        for subset in dataset.subsets:
            for key in ("color_aug", "random_crop", "face_crop_aug_range"):
                if getattr(subset, key):
                    problems.add(
                        f"{subset.where}: {key} changes the image every epoch, so its latents cannot be cached;"
                        f" turn {key} off or drop --cache_latents / --cache_latents_to_disk."
                    )


def _plan(
    dataset: DatasetConfig, scanned: list[ScannedSubset], settings: BucketSettings, problems: Problems, split_seed: int
) -> DatasetPlan:
    settings, notes = normalized(settings)
    for note in notes:
        problems.note(f"{dataset.where}: {note}")
    assigner = BucketAssigner(settings)
    train, held_out = [], []
    for part in scanned:
        if not part.subset.is_reg:
            kept, validation = _split(part, dataset, split_seed)
            train += [(image, part.subset) for image in kept]
            held_out += [Sample(image, part.subset, assigner.place(image.size), 1) for image in validation]
    reg = [(image, part.subset) for part in scanned if part.subset.is_reg for image in part.images]
    num_train = sum(subset.num_repeats for _, subset in train)
    num_reg = sum(subset.num_repeats for _, subset in reg)
    if reg and num_train < num_reg:
        problems.note(
            f"{dataset.where}: {num_reg} regularization samples for {num_train} training samples;"
            " only as many as needed are used."
        )
    reg_repeats = balanced_reg_repeats([subset.num_repeats for _, subset in reg], num_train)
    samples = [Sample(image, subset, assigner.place(image.size), subset.num_repeats) for image, subset in train]
    samples += [
        Sample(image, subset, assigner.place(image.size), repeats)
        for (image, subset), repeats in zip(reg, reg_repeats)
        if repeats
    ]
    return DatasetPlan(dataset, tuple(samples), num_train, num_reg, tuple(held_out))


def _split(part: ScannedSubset, dataset: DatasetConfig, split_seed: int) -> tuple[list, list]:
    """validation_split p: the subset's images in an order drawn from validation_seed (else the run's seed); the
    first ceil(n (1 - p)) train, the rest validate. Every image lands on exactly one side, and the same seed always
    gives the same split (sd-scripts draws the two sides separately without validation_seed, so they can overlap)."""
    split = dataset.validation_split
    if not split:
        return list(part.images), []
    seed = dataset.validation_seed if dataset.validation_seed is not None else split_seed
    images = sorted(part.images, key=lambda image: str(image.path))
    random.Random(f"{seed}/{part.subset.where}").shuffle(images)
    kept = math.ceil(len(images) * (1 - split))
    return images[:kept], images[kept:]


def balanced_reg_repeats(subset_repeats: list[int], num_train: int) -> list[int]:
    """Repeats per regularization image so that an epoch has about as many regularization samples as training
    samples: images are taken in order with their own repeats until there are enough, then the taken ones get one
    more repeat each, round after round, until the count reaches the training count."""
    repeats = [0] * len(subset_repeats)
    total = 0
    for index, own in enumerate(subset_repeats):
        if total >= num_train:
            break
        repeats[index] = own
        total += own
    taken = [index for index, count in enumerate(repeats) if count]
    while taken and total < num_train:
        for index in taken:
            if total >= num_train:
                break
            repeats[index] += 1
            total += 1
    return repeats
