"""face_crop_aug_range: without buckets, images named `name_cx_cy_w_h` are scaled so that the face's longer side is
1/high to 1/low of the training size's shorter side, and cut around the face; with buckets it is ignored with a note,
and it cannot be combined with cached latents."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from library.dataset.config import SubsetConfig
from library.dataset.images import face_box, face_crop
from library.dataset.plan import prepare_datasets
from library.errors import UserError
from library.tiny_models import make_tiny_dataset


def subset(low, high, random_crop=False):
    return SubsetConfig(
        "test", {"face_crop_aug_range": (low, high), "random_crop": random_crop, "resize_interpolation": None}
    )


def gradient_image(size=(256, 256)) -> Image.Image:
    x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    return Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8))


def test_the_face_box_comes_from_the_file_name():
    assert face_box("portrait_128_64_32_40.png") == (128, 64, 32, 40)
    assert face_box("portrait.png") is None and face_box("a_b_c_d_e.png") is None


def test_a_fixed_range_cuts_the_target_around_the_face_at_the_scale_it_asks():
    image = gradient_image()
    # face 32 px, target 64 px, range 2: the face should be half the target, which it already is: no resize
    crop, (top, left) = face_crop(image, (64, 64), (128, 64, 32, 32), subset(2.0, 2.0), random.Random(0))
    assert (top, left) == (64 - 32, 128 - 32)
    assert np.array_equal(np.array(crop), np.array(image)[top : top + 64, left : left + 64])


def test_a_range_draws_a_scale_that_keeps_the_face_within_it(monkeypatch):
    from library.dataset import images

    sizes = []
    resize = images._resize
    monkeypatch.setattr(
        images, "_resize", lambda image, size, interpolation: sizes.append(size) or resize(image, size, interpolation)
    )
    for seed in range(20):
        crop, _ = face_crop(gradient_image(), (64, 64), (128, 128, 64, 64), subset(2.0, 4.0), random.Random(seed))
        assert crop.size == (64, 64)
    faces = [64 * width / 256 for width, _ in sizes]  # the 64-pixel face after each drawn scale
    assert len(faces) == 20 and all(64 / 4 - 0.5 <= face <= 64 / 2 + 0.5 for face in faces) and len(set(faces)) > 5


def test_a_small_image_is_enlarged_instead_of_failing():
    crop, _ = face_crop(gradient_image((48, 48)), (64, 64), (24, 24, 8, 8), subset(2.0, 2.0), random.Random(0))
    assert crop.size == (64, 64)


def test_buckets_ignore_it_with_a_note_and_caching_refuses_it(tmp_path):
    make_tiny_dataset(tmp_path, images=2, repeats=1)
    keys = {"resolution": "64", "caption_extension": ".txt", "face_crop_aug_range": [2.0, 4.0]}
    buckets = {"enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 128}
    plans, notes = prepare_datasets(None, {**keys, **buckets}, train_data_dir=str(tmp_path))
    assert any("face_crop_aug_range is ignored with enable_bucket" in note for note in notes)
    assert all(sample.subset.face_crop_aug_range is None for sample in plans[0].samples)
    with pytest.raises(UserError, match="face_crop_aug_range changes the image every epoch"):
        prepare_datasets(None, keys, train_data_dir=str(tmp_path), cache_latents=True)
    with pytest.raises(UserError, match=r"face_crop_aug_range is \[4.0, 2.0\]; give \[low, high\]"):
        prepare_datasets(None, {**keys, "face_crop_aug_range": [4.0, 2.0]}, train_data_dir=str(tmp_path))
