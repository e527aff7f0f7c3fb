"""Latent caching (specs/training.md 4.1, 4.2) with the tiny real SD1 VAE and small images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from library.dataset.images import cache_pixels
from library.dataset.latent_cache import cache_file_path, cache_latents, is_cache_valid
from library.dataset.plan import prepare_datasets
from library.errors import UserError
from library.model_files.family import ModelFamily
from library.tiny_models import make_tiny_dataset, make_tiny_model


@pytest.fixture(scope="module")
def vae():
    return make_tiny_model(ModelFamily.SD1).vae


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    """The cache stores one random posterior sample, drawn from the global RNG in batch order. Replacing the sample
    by the mean makes every expected latent a plain function of the image, so the tests compare exactly what was
    encoded (pixels, flip, batching) without reproducing the RNG's order of draws."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


@pytest.fixture
def data_root(tmp_path):
    make_tiny_dataset(tmp_path, images=4)
    return tmp_path


def plan_for(root: Path, **options):
    plans, _ = prepare_datasets(
        None, {"resolution": "64", "caption_extension": ".txt", "flip_aug": True, **options}, train_data_dir=str(root)
    )
    return plans


TINY_VAE_SCALE = 2  # the tiny VAE has two encoder blocks, so it downsamples by 2, not 8


def run(plans, vae, to_disk=True, batch_size=2, skip_bad_images=False):
    return cache_latents(
        plans, vae, "cpu", torch.float32, batch_size, to_disk, progress=False, skip_bad_images=skip_bad_images
    )


def test_file_name_is_sd_scripts_name():
    assert cache_file_path(Path("/data/cat.png"), (768, 1024)) == Path("/data/cat_0768x1024_sd.npz")


def test_latents_are_the_vae_encoding_and_written_to_disk(data_root, vae):
    plans = plan_for(data_root)
    cached, encoded, reused = run(plans, vae)
    samples = plans[0].samples
    assert (encoded, reused) == (len(samples), 0)
    for sample in samples:
        pixels, _ = cache_pixels(sample.image.path, sample.placement, False)
        with torch.no_grad():
            expected = vae.encode(pixels[None]).latent_dist.mean[0]
            expected_flipped = vae.encode(torch.flip(pixels, dims=[2])[None]).latent_dist.mean[0]
        entry = cached[sample.image.path]
        assert entry.latents.shape == (4, 32, 32) and entry.alpha_mask is None
        torch.testing.assert_close(entry.latents, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(entry.latents_flipped, expected_flipped, rtol=1e-4, atol=1e-5)
        with np.load(cache_file_path(sample.image.path, sample.image.size)) as npz:
            assert npz["latents"].dtype == np.float32
            np.testing.assert_array_equal(npz["latents"], entry.latents.numpy())
            assert list(npz["original_size"]) == list(sample.image.size)
            assert list(npz["bucket"]) == [64, 64] and len(npz["crop_ltrb"]) == 4
    assert not list(data_root.rglob("*.partial"))


def test_second_run_reuses_every_file(data_root, vae):
    plans = plan_for(data_root)
    first, _, _ = run(plans, vae)
    second, encoded, reused = run(plans, vae)
    assert (encoded, reused) == (0, len(plans[0].samples))
    for path, entry in first.items():
        torch.testing.assert_close(second[path].latents, entry.latents, rtol=0, atol=0)
        torch.testing.assert_close(second[path].latents_flipped, entry.latents_flipped, rtol=0, atol=0)


def test_changed_resolution_is_re_encoded(data_root, vae):
    old = {sample.image.path: sample.placement for sample in plan_for(data_root)[0].samples}
    run(plan_for(data_root), vae)
    # at 96 only the tall image changes bucket (64x64 -> 64x128); the others keep their placement, so stay valid
    plans = plan_for(data_root, resolution="96", enable_bucket=True, min_bucket_reso=64)
    changed = sum(sample.placement != old[sample.image.path] for sample in plans[0].samples)
    assert changed == 1
    assert run(plans, vae)[1:] == (changed, len(plans[0].samples) - changed)
    plans = plan_for(data_root, resolution="128", enable_bucket=True, min_bucket_reso=64)
    cached, encoded, reused = run(plans, vae)
    assert (encoded, reused) == (len(plans[0].samples), 0)
    for sample in plans[0].samples:
        width, height = sample.placement.bucket
        assert cached[sample.image.path].latents.shape == (4, height // TINY_VAE_SCALE, width // TINY_VAE_SCALE)
        assert is_cache_valid(cache_file_path(sample.image.path, sample.image.size), sample, TINY_VAE_SCALE)


def test_same_shape_but_other_resize_is_stale(data_root, vae):
    plans = plan_for(data_root)
    run(plans, vae)
    sample = plans[0].samples[1]  # 96x64, resized to 96x64 and center-cropped to 64x64
    path = cache_file_path(sample.image.path, sample.image.size)
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **{**arrays, "resized": np.array([64, 64])})
    assert not is_cache_valid(path, sample, TINY_VAE_SCALE)


def test_turning_flip_aug_on_re_encodes(data_root, vae):
    run(plan_for(data_root, flip_aug=False), vae)
    cached, encoded, _ = run(plan_for(data_root), vae)
    assert encoded == len(cached)
    assert all(entry.latents_flipped is not None for entry in cached.values())


def test_corrupted_file_is_recomputed(data_root, vae):
    plans = plan_for(data_root)
    run(plans, vae)
    broken = plans[0].samples[0]
    cache_file_path(broken.image.path, broken.image.size).write_bytes(b"PK\x03\x04 not really a zip")
    cached, encoded, reused = run(plans, vae)
    assert (encoded, reused) == (1, len(plans[0].samples) - 1)
    assert torch.isfinite(cached[broken.image.path].latents).all()


def test_sd_scripts_file_without_our_keys_is_reused(data_root, vae):
    plans = plan_for(data_root)
    sample = plans[0].samples[0]
    latents = np.full((4, 32, 32), 0.5, dtype=np.float32)
    path = cache_file_path(sample.image.path, sample.image.size)
    np.savez(
        path,
        latents=latents,
        latents_flipped=-latents,
        original_size=np.array(sample.image.size),
        crop_ltrb=np.zeros(4),
    )
    assert is_cache_valid(path, sample, TINY_VAE_SCALE)
    cached, encoded, reused = run(plans, vae)
    assert reused == 1 and encoded == len(plans[0].samples) - 1
    assert torch.equal(cached[sample.image.path].latents, torch.from_numpy(latents))


def test_nan_latents_name_the_image(data_root, vae, monkeypatch):
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: torch.full_like(self.mean, float("nan"))
    )
    plans = plan_for(data_root)
    with pytest.raises(UserError, match="--no_half_vae") as error:
        run(plans, vae, batch_size=1)
    assert any(str(sample.image.path) in str(error.value) for sample in plans[0].samples)
    assert not list(data_root.rglob("*.npz"))


def test_an_undecodable_image_is_named_or_left_out_and_its_batches_go_on(data_root, vae):
    plans = plan_for(data_root, train_batch_size=4)
    broken = plans[0].samples[1].image.path
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # still a PNG name, but nothing decodable
    with pytest.raises(UserError, match=f"{broken.name}: cannot be decoded"):
        run(plans, vae)
    cached, encoded, _ = run(plans, vae, skip_bad_images=True)
    assert broken not in cached and encoded == len(plans[0].samples) - 1
    assert not cache_file_path(broken, plans[0].samples[1].image.size).exists()
