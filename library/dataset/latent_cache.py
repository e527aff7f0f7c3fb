"""Latent caching in memory and on disk (specs/training.md 4.1, 4.2): every image is encoded once by the VAE, and
with --cache_latents_to_disk the latents are kept beside the image in sd-scripts' `_sd.npz` files.

The files are sd-scripts' format plus two keys of ours, `bucket` and `resized` ([w, h] each), which sd-scripts
ignores; its own files, without them, are read here too."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.dataset.buckets import Size, crop_ltrb
from library.dataset.images import cache_pixels
from library.dataset.plan import DatasetPlan, Sample
from library.errors import UserError
from library.file_io import atomic_output
from library.model_files.stable_diffusion import vae_scale_factor

logger = logging.getLogger(__name__)
LATENT_CHANNELS = 4
MAX_DECODE_THREADS = 8
SD_SUFFIX, SDXL_SUFFIX = "_sd.npz", "_sdxl.npz"  # the cache files' name endings for SD 1.x/2.x and for SDXL
SD_VAE_SCALE = 8  # the real SD VAE; the tiny test VAE downsamples less, so the factor is read from the VAE


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors has no single truth value
class CachedLatents:
    latents: torch.Tensor  # (4, h/8, w/8) float32, unscaled
    latents_flipped: torch.Tensor | None  # the horizontally flipped image's latents, with flip_aug
    alpha_mask: torch.Tensor | None  # (h, w) float32 in [0, 1], when the subset asks for it


def cache_file_path(image_path: Path, original_size: Size, suffix: str = SD_SUFFIX) -> Path:
    """sd-scripts' name: `<image path without extension>_<W:04d>x<H:04d>_sd.npz` (`_sdxl.npz` for SDXL), W x H the
    original size."""
    width, height = original_size
    image_path = Path(image_path)
    return image_path.with_name(f"{image_path.stem}_{width:04d}x{height:04d}{suffix}")


def is_cache_valid(path: Path, sample: Sample, vae_scale: int = SD_VAE_SCALE) -> bool:
    """Whether the cache file at `path` holds what `sample` needs now.

    sd-scripts only checks that the keys exist, so after a change of resolution or bucket settings it silently
    trains on stale latents of the old size, and it keeps applying a cached alpha mask after alpha_mask was turned
    off. Here the latent shape must match the bucket, `latents_flipped` must be there with flip_aug, `alpha_mask`
    must be there exactly when asked for, and our `bucket`/`resized` keys, when present, must equal the placement;
    anything else is re-encoded. A file written by sd-scripts (no `bucket` key) is reused when the shape matches."""
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            bucket_w, bucket_h = sample.placement.bucket
            if "latents" not in keys or npz["latents"].shape != _latent_shape(sample.placement.bucket, vae_scale):
                return False
            if sample.subset.flip_aug and (
                "latents_flipped" not in keys or npz["latents_flipped"].shape != npz["latents"].shape
            ):
                return False
            if sample.subset.loss_mask != ("alpha_mask" in keys):
                return False
            if "alpha_mask" in keys and npz["alpha_mask"].shape != (bucket_h, bucket_w):
                return False
            for key, expected in (("bucket", sample.placement.bucket), ("resized", sample.placement.resized)):
                if key in keys and tuple(npz[key].tolist()) != tuple(expected):
                    return False
            return True
    except Exception:  # missing, truncated or not an npz at all: encode again
        return False


def cache_latents(
    plans: Iterable[DatasetPlan],
    vae: torch.nn.Module,
    device: torch.device | str,
    dtype: torch.dtype,
    vae_batch_size: int,
    to_disk: bool,
    progress: bool = True,
    skip_bad_images: bool = False,
    suffix: str = SD_SUFFIX,
) -> tuple[dict[Path, CachedLatents], int, int]:
    """Encode every distinct image of the plans (the VAE must already be on `device` in `dtype`), reusing valid
    disk caches when `to_disk`. Returns (latents by image path, images encoded, images reused from disk). An image
    that cannot be decoded is a UserError naming it; with skip_bad_images it is left out of the result with a
    warning, and the loader leaves it out of its batches."""
    samples = _distinct_samples(plans)
    vae_scale = vae_scale_factor(vae)
    cached: dict[Path, CachedLatents] = {}
    to_encode = []
    for sample in samples:
        file = cache_file_path(sample.image.path, sample.image.size, suffix)
        if to_disk and is_cache_valid(file, sample, vae_scale):
            cached[sample.image.path] = _load(file, sample)
        else:
            to_encode.append(sample)
    with tqdm(total=len(to_encode), unit="image", desc="caching latents", disable=not progress) as bar:
        for batch, loaded in _prefetched(_batches(to_encode, vae_batch_size), skip_bad_images):
            bar.update(len(batch) - len(loaded))
            batch = [sample for sample in batch if sample.image.path in loaded]
            if not batch:
                continue
            for sample, entry in zip(
                batch, _encode(batch, [loaded[sample.image.path] for sample in batch], vae, device, dtype)
            ):
                cached[sample.image.path] = entry
                if to_disk:
                    _save(cache_file_path(sample.image.path, sample.image.size, suffix), sample, entry)
            bar.update(len(batch))
    reused = len(samples) - len(to_encode)
    return cached, len(cached) - reused, reused


def _latent_shape(bucket: Size, vae_scale: int) -> tuple[int, int, int]:
    return LATENT_CHANNELS, bucket[1] // vae_scale, bucket[0] // vae_scale


def _cache_settings(sample: Sample) -> tuple:
    subset = sample.subset
    return (
        sample.placement,
        bool(subset.flip_aug),
        subset.loss_mask,
        subset.resize_interpolation,
        subset.conditioning_data_dir,
    )


def _distinct_samples(plans: Iterable[DatasetPlan]) -> list[Sample]:
    """One sample per image path. An image used twice with different cache settings would need two caches under one
    name (sd-scripts' file name depends only on the original size), so that is refused."""
    by_path: dict[Path, Sample] = {}
    for plan in plans:
        for sample in plan.samples:
            seen = by_path.setdefault(sample.image.path, sample)
            if _cache_settings(seen) != _cache_settings(sample):
                raise UserError(
                    f"{sample.image.path}: the image is used twice with different bucket, flip_aug, alpha_mask or"
                    " resize_interpolation settings, and its latents can be cached only once; use one setting for both"
                    " datasets or copy the image."
                )
    return list(by_path.values())


def _batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Images in order of bucket area, cut into batches that share one bucket and the same flip/mask settings."""
    groups: dict[tuple, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.placement.bucket[0] * s.placement.bucket[1]):
        key = (sample.placement.bucket, bool(sample.subset.flip_aug), sample.subset.loss_mask)
        groups.setdefault(key, []).append(sample)
    return [
        group[start : start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)
    ]


def _prefetched(batches: list[list[Sample]], skip_bad_images: bool) -> Iterator[tuple[list[Sample], dict[Path, tuple]]]:
    """Each batch with its decoded pixels by image path; threads decode the next batch while the VAE encodes this
    one. Undecodable images are missing from the dict with skip_bad_images, else their UserError is raised."""
    workers = max(1, min(os.cpu_count() or 1, MAX_DECODE_THREADS))
    with ThreadPoolExecutor(workers) as pool:

        def submit(batch: list[Sample]) -> list[Future]:
            return [
                pool.submit(
                    cache_pixels,
                    s.image.path,
                    s.placement,
                    s.subset.loss_mask,
                    s.subset.resize_interpolation,
                    s.subset.conditioning_data_dir,
                )
                for s in batch
            ]

        pending = submit(batches[0]) if batches else []
        for index, batch in enumerate(batches):
            loading, pending = pending, submit(batches[index + 1]) if index + 1 < len(batches) else []
            loaded = {}
            for sample, future in zip(batch, loading):
                try:
                    loaded[sample.image.path] = future.result()
                except UserError as error:
                    if not skip_bad_images:
                        raise
                    logger.warning("left out: %s", error)
            yield batch, loaded


def _encode(
    batch: list[Sample],
    loaded: list[tuple[torch.Tensor, torch.Tensor | None]],
    vae: torch.nn.Module,
    device,
    dtype: torch.dtype,
) -> list[CachedLatents]:
    pixels = torch.stack([p for p, _ in loaded]).to(device, dtype)
    latents = _encode_checked(vae, pixels, batch)
    flipped = (
        _encode_checked(vae, torch.flip(pixels, dims=[3]), batch) if batch[0].subset.flip_aug else [None] * len(batch)
    )
    return [
        CachedLatents(latent, latent_flipped, mask)
        for latent, latent_flipped, (_, mask) in zip(latents, flipped, loaded)
    ]


def _encode_checked(vae: torch.nn.Module, pixels: torch.Tensor, batch: list[Sample]) -> list[torch.Tensor]:
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample().float().cpu()  # one posterior sample, frozen, as sd-scripts
    for sample, latent in zip(batch, latents):
        if not torch.isfinite(latent).all():
            raise UserError(
                f"{sample.image.path}: the VAE produced NaN/Inf latents for this image; run with --no_half_vae"
                " (a float32 VAE) or check the VAE file."
            )
    return list(latents)


def _save(path: Path, sample: Sample, entry: CachedLatents) -> None:
    arrays = {
        "latents": entry.latents.numpy(),
        "original_size": np.array(sample.image.size),
        "crop_ltrb": np.array(crop_ltrb(sample.image.size, sample.placement.bucket)),
        "bucket": np.array(sample.placement.bucket),
        "resized": np.array(sample.placement.resized),
    }
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = entry.latents_flipped.numpy()
    if entry.alpha_mask is not None:
        arrays["alpha_mask"] = entry.alpha_mask.numpy()
    with atomic_output(path) as temporary, open(temporary, "wb") as file:  # a path would get ".npz" appended
        np.savez(file, **arrays)


def _load(path: Path, sample: Sample) -> CachedLatents:
    with np.load(path) as npz:

        def tensor(key: str) -> torch.Tensor:
            return torch.from_numpy(npz[key].astype(np.float32))

        return CachedLatents(
            tensor("latents"),
            tensor("latents_flipped") if sample.subset.flip_aug else None,
            tensor("alpha_mask") if sample.subset.loss_mask else None,
        )
