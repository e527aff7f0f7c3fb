"""Loading one sample (specs/training.md 3.3) and the cache's pixels (4.1) on small synthetic images."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from library.dataset.buckets import Placement
from library.dataset.config import KEYS, SUBSET_KEYS, SubsetConfig
from library.dataset.images import apply_gamma, cache_pixels, color_augment, load_image, load_sample, shift_hue
from library.errors import UserError


def make_subset(**overrides) -> SubsetConfig:
    settings = {name: KEYS[name].default for name in SUBSET_KEYS}
    return SubsetConfig("dataset.toml, datasets[0].subsets[0]", {**settings, **overrides})


def noise_image(path, width, height, mode="RGB", seed=0) -> np.ndarray:
    channels = len(mode)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(array, mode).save(path)
    return array


def normalized(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


def test_downscale_matches_a_pil_area_resize(tmp_path):
    path = tmp_path / "wide.png"
    noise_image(path, 100, 50)
    sample = load_sample(path, Placement((64, 32), (64, 32)), make_subset(), random.Random(0))

    expected = np.array(Image.open(path).resize((64, 32), Image.Resampling.BOX))  # both sides shrink: area
    assert sample.pixels.shape == (3, 32, 64) and sample.pixels.dtype == torch.float32
    assert sample.pixels.min() >= -1 and sample.pixels.max() <= 1
    torch.testing.assert_close(sample.pixels, normalized(expected))
    assert sample.original_size == (100, 50)
    assert sample.crop_top_left == (0, 0)
    assert sample.alpha_mask is None and sample.flipped is False


def test_center_crop_of_an_image_larger_than_its_bucket(tmp_path):
    path = tmp_path / "large.png"
    array = noise_image(path, 70, 35)
    # excess (6, 3): left 6 // 2 = 3, top 3 // 2 = 1
    sample = load_sample(path, Placement((64, 32), (70, 35)), make_subset(), random.Random(0))

    assert sample.crop_top_left == (1, 3)
    torch.testing.assert_close(sample.pixels, normalized(array[1:33, 3:67]))


def test_random_crop_stays_in_range(tmp_path):
    path = tmp_path / "large.png"
    array = noise_image(path, 70, 35)
    offsets = set()
    for seed in range(20):
        sample = load_sample(path, Placement((64, 32), (70, 35)), make_subset(random_crop=True), random.Random(seed))
        top, left = sample.crop_top_left
        assert 0 <= top <= 3 and 0 <= left <= 6
        torch.testing.assert_close(sample.pixels, normalized(array[top : top + 32, left : left + 64]))
        offsets.add((top, left))
    assert len(offsets) > 1


def test_flip_mirrors_pixels_and_mask(tmp_path):
    path = tmp_path / "rgba.png"
    noise_image(path, 64, 32, mode="RGBA")
    placement = Placement((64, 32), (64, 32))
    plain = load_sample(path, placement, make_subset(alpha_mask=True), random.Random(0))
    flip_subset = make_subset(alpha_mask=True, flip_aug=True)
    samples = [load_sample(path, placement, flip_subset, random.Random(seed)) for seed in range(10)]

    assert {sample.flipped for sample in samples} == {True, False}
    for seed, sample in enumerate(samples):
        assert sample.flipped == (random.Random(seed).random() < 0.5)  # the first draw decides the flip
        if sample.flipped:
            assert torch.equal(sample.pixels, torch.flip(plain.pixels, [2]))
            assert torch.equal(sample.alpha_mask, torch.flip(plain.alpha_mask, [1]))
        else:
            assert torch.equal(sample.pixels, plain.pixels)


def test_alpha_mask_from_the_alpha_channel(tmp_path):
    path = tmp_path / "mask.png"
    array = np.full((32, 64, 4), 200, dtype=np.uint8)
    array[:, :, 3] = np.arange(64, dtype=np.uint8) * 4  # 0, 4, ..., 252 along the width
    Image.fromarray(array, "RGBA").save(path)
    sample = load_sample(path, Placement((64, 32), (64, 32)), make_subset(alpha_mask=True), random.Random(0))

    assert sample.alpha_mask.shape == (32, 64) and sample.alpha_mask.dtype == torch.float32
    torch.testing.assert_close(sample.alpha_mask[5], torch.arange(64, dtype=torch.float32) * 4 / 255)
    torch.testing.assert_close(sample.pixels, torch.full((3, 32, 64), 200 / 127.5 - 1))  # alpha does not darken


def test_alpha_mask_is_all_ones_without_alpha(tmp_path):
    path = tmp_path / "rgb.png"
    noise_image(path, 64, 32)
    sample = load_sample(path, Placement((64, 32), (64, 32)), make_subset(alpha_mask=True), random.Random(0))
    assert torch.equal(sample.alpha_mask, torch.ones(32, 64))


def test_resizing_rgba_keeps_the_color_of_transparent_pixels(tmp_path):
    path = tmp_path / "transparent.png"
    array = np.zeros((50, 100, 4), dtype=np.uint8)
    array[:, :, 0] = 255  # red everywhere, fully transparent: OpenCV (sd-scripts) keeps it red
    Image.fromarray(array, "RGBA").save(path)
    pixels, alpha_mask = cache_pixels(path, Placement((64, 32), (64, 32)), with_mask=True)
    assert torch.equal(pixels[0], torch.ones(32, 64)) and torch.equal(pixels[1], -torch.ones(32, 64))
    assert torch.equal(alpha_mask, torch.zeros(32, 64))


def test_gamma_is_the_pixel_power():
    array = np.array([[[0, 1, 128], [128, 200, 255]]], dtype=np.uint8)
    # 128 ** 0.95 = 100.4, 200 ** 0.95 = 153.5, 255 ** 0.95 = 193.3; 128 ** 1.05 = 163.1, 200 ** 1.05 = 260.6 -> 255
    assert apply_gamma(array, 0.95).tolist() == [[[0, 1, 100], [100, 153, 193]]]
    assert apply_gamma(array, 1.05).tolist() == [[[0, 1, 163], [163, 255, 255]]]


def test_hue_shift_reads_the_array_as_bgr():
    red_in_bgr = np.array([[[0, 0, 255]]], dtype=np.uint8)
    # +8 OpenCV units = 16 degrees: R 255, G 255 * 16 / 60 = 68, B 0 -> BGR (0, 68, 255); Pillow truncates to 66
    np.testing.assert_allclose(shift_hue(red_in_bgr, 8.0).astype(int), [[[0, 68, 255]]], atol=3)
    gray = np.full((2, 2, 3), 90, dtype=np.uint8)
    assert np.array_equal(shift_hue(gray, -8.0), gray)


def test_color_augment_sometimes_changes_the_image():
    array = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outputs = [color_augment(array, random.Random(seed)) for seed in range(60)]
    changed = [not np.array_equal(out, array) for out in outputs]
    assert 0 < sum(changed) < len(changed)
    assert all(out.shape == array.shape and out.dtype == np.uint8 for out in outputs)


def test_color_augment_gamma_branch_with_a_seed():
    array = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    seed = next(s for s in range(100) if (r := random.Random(s)).random() <= 0.33 and r.random() <= 0.5)
    replay = random.Random(seed)
    replay.random(), replay.random()
    gamma = replay.uniform(0.95, 1.05)
    expected = np.clip(array.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    assert np.array_equal(color_augment(array, random.Random(seed)), expected)


def test_color_aug_in_a_sample_keeps_shape_and_alpha(tmp_path):
    path = tmp_path / "rgba.png"
    array = noise_image(path, 64, 32, mode="RGBA")
    subset = make_subset(color_aug=True, alpha_mask=True)
    for seed in range(10):
        sample = load_sample(path, Placement((64, 32), (64, 32)), subset, random.Random(seed))
        assert sample.pixels.shape == (3, 32, 64) and sample.pixels.dtype == torch.float32
        torch.testing.assert_close(sample.alpha_mask, torch.from_numpy(array[:, :, 3] / 255).float())


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    noise_image(tmp_path / "whole.jpg", 64, 64)
    path.write_bytes((tmp_path / "whole.jpg").read_bytes()[:600])
    with pytest.raises(UserError, match="broken.jpg.*--skip_bad_images"):
        load_image(path, with_alpha=False)
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="garbage.png"):
        load_image(tmp_path / "garbage.png", with_alpha=True)


def test_cache_pixels_center_crop_without_augmentation(tmp_path):
    path = tmp_path / "large.png"
    array = noise_image(path, 70, 35)
    pixels, alpha_mask = cache_pixels(path, Placement((64, 32), (70, 35)), with_mask=False)
    torch.testing.assert_close(pixels, normalized(array[1:33, 3:67]))
    assert alpha_mask is None
