"""The start-up summary of the datasets, `--debug_dataset` (buckets, captions as trained, contact sheets) and
tools/cache_latents.py run as a user runs it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from library.dataset.inspection import SHEET_GAP, SHEET_TILE, dataset_summary_lines, debug_dataset
from library.dataset.latent_cache import cache_file_path
from library.dataset.loader import BatchSettings, EpochBatches, TrainingBatches
from library.dataset.plan import prepare_datasets
from library.model_files.family import ModelFamily
from library.model_files.tokenizer import shipped_tokenizer
from library.tiny_models import make_tiny_dataset

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def solid_images(folder, sizes):
    folder.mkdir(parents=True)
    for index, size in enumerate(sizes):
        Image.new("RGB", size, COLORS[index % len(COLORS)]).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(f"color {index}, plain", encoding="utf-8")


@pytest.fixture
def plans(tmp_path):
    solid_images(tmp_path / "train" / "2_sks thing", [(64, 64), (64, 64), (64, 64), (128, 64)])
    solid_images(tmp_path / "reg" / "1_thing", [(64, 64)] * 3)
    options = {
        "resolution": "64,128",
        "enable_bucket": True,
        "min_bucket_reso": 64,
        "train_batch_size": 4,
        "caption_extension": ".txt",
        "shuffle_caption": True,
        "flip_aug": True,
    }
    made, _ = prepare_datasets(
        None, options, train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg")
    )
    return made


def test_summary_counts_images_repeats_buckets_and_batches(plans):
    lines = dataset_summary_lines(plans)
    text = "\n".join(lines)
    assert "resolution 64x128, buckets on, batch size 4" in text
    assert "2_sks thing: 4 images x 2 repeats" in text
    # 8 training samples; the 3 regularization images are balanced to 8 samples: repeats 3, 3, 2
    assert "1_thing: 3 regularization images x 2-3 repeats" in text
    assert "8 training samples, 3 regularization samples per epoch" in text
    # 128x64 goes to the (128, 64) bucket (2 samples); 3 train x 2 + 8 reg in (64, 64)
    assert "bucket 0: resolution (64, 64), count: 14" in text and "bucket 1: resolution (128, 64), count: 2" in text
    assert lines[-1].strip() == "5 batches per epoch"  # ceil(14 / 4) + ceil(2 / 4)


def test_debug_dataset_shows_each_bucket_once_with_captions_as_trained(plans, tmp_path):
    tokenizer = shipped_tokenizer()
    settings = BatchSettings(seed=3)
    lines, sheets = debug_dataset(plans, tokenizer, settings, tmp_path / "sheets")
    assert [sheet.name for sheet in sheets] == ["dataset0_bucket_64x64.png", "dataset0_bucket_128x64.png"]

    keys = EpochBatches(plans, 3).keys()
    batches = TrainingBatches(plans, tokenizer, settings)
    samples = plans[0].samples
    for sheet in sheets:
        width, height = (int(side) for side in sheet.stem.split("_")[-1].split("x"))
        key = next(key for key in keys if samples[key.samples[0]].placement.bucket == (width, height))
        batch = batches[key]
        for caption in batch["captions"][:3]:
            tokens = len(tokenizer(caption).input_ids) - 2
            assert f"  caption ({tokens} tokens): {caption!r}" in lines
        picture = np.asarray(Image.open(sheet))
        scale = SHEET_TILE / max(width, height)
        tile_width, tile_height = round(width * scale), round(height * scale)
        for slot, index in enumerate(key.samples):  # every tile shows its image's colour at its centre
            left = SHEET_GAP + slot * (tile_width + SHEET_GAP)
            centre = picture[SHEET_GAP + tile_height // 2, left + tile_width // 2]
            expected = Image.open(samples[index].image.path).getpixel((0, 0))
            assert np.abs(centre.astype(int) - np.array(expected)).max() <= 1


@pytest.mark.slow
def test_cache_latents_tool_writes_then_reuses_the_files(tiny_checkpoints, tmp_path):
    _, model_file, _ = tiny_checkpoints[ModelFamily.SD1]
    image_dir = make_tiny_dataset(tmp_path / "data", images=3)
    arguments = [
        "tools/cache_latents.py",
        "--pretrained_model_name_or_path",
        str(model_file),
        "--train_data_dir",
        str(tmp_path / "data"),
        "--resolution",
        "64",
    ]
    first = run_script(*arguments, "--vae_batch_size", "2")
    assert first.returncode == 0, first.stderr
    assert "3 images encoded" in first.stdout and "0 up-to-date cache files reused" in first.stdout
    for image in sorted(image_dir.glob("*.png")):
        assert cache_file_path(image, Image.open(image).size).is_file()
    again = run_script(*arguments)
    assert "0 images encoded" in again.stdout and "3 up-to-date cache files reused" in again.stdout
    flipped = run_script(*arguments, "--flip_aug")  # the old files lack the flipped latents: encoded again
    assert "3 images encoded" in flipped.stdout


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--random_crop", "random_crop changes the image every epoch"),
        ("--sdxl", "{model}: an SD1.x model; leave out --sdxl"),
    ],
)
def test_cache_latents_tool_refuses_before_loading(tiny_checkpoints, tmp_path, flag, message):
    _, model_file, _ = tiny_checkpoints[ModelFamily.SD1]
    make_tiny_dataset(tmp_path / "data", images=1)
    result = run_script(
        "tools/cache_latents.py",
        "--pretrained_model_name_or_path",
        str(model_file),
        "--train_data_dir",
        str(tmp_path / "data"),
        "--resolution",
        "64",
        flag,
    )
    assert result.returncode == 2
    assert message.format(model=model_file) in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "data").rglob("*.npz"))
