"""Dataset configs and folders: TOML precedence, the legacy folder layout, and one report that names every problem
(specs/training.md section 1)."""

from __future__ import annotations

import math
import textwrap
from collections import Counter

import pytest
from PIL import Image

from library.dataset.config import load_dataset_config
from library.dataset.plan import balanced_reg_repeats, prepare_datasets
from library.errors import UserError


def write_images(folder, count, size=(64, 48), captions=".txt", start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        Image.new("RGB", size, (index * 20 % 255, 80, 120)).save(folder / f"{index:03d}.png")
        if captions:
            (folder / f"{index:03d}{captions}").write_text(f"caption {index}, red, square\n", encoding="utf-8")
    return folder


def write_toml(path, text):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_values_resolve_subset_then_dataset_then_general_then_command_line(tmp_path):
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "b", 2)
    config = write_toml(
        tmp_path / "dataset.toml",
        f"""
        [general]
        shuffle_caption = true
        keep_tokens = 1
        caption_extension = ".txt"

        [[datasets]]
        resolution = [512, 768]
        batch_size = 4
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = '{tmp_path / "a"}'
          num_repeats = 10
          keep_tokens = 3

          [[datasets.subsets]]
          image_dir = '{tmp_path / "b"}'
        """,
    )
    cli = {"keep_tokens": 9, "flip_aug": True, "train_batch_size": 2, "resolution": "256", "caption_dropout_rate": 0.5}
    (dataset,), problems = load_dataset_config(str(config), cli)
    assert problems.messages == []
    first, second = dataset.subsets
    assert (first.keep_tokens, second.keep_tokens) == (3, 2)  # subset, then dataset
    assert first.shuffle_caption is True  # [general]
    assert first.flip_aug is True and first.caption_dropout_rate == 0.5  # the command line fills what no table sets
    assert (first.num_repeats, second.num_repeats) == (10, 1)  # the default
    assert dataset.batch_size == 4 and dataset.resolution == (512, 768)  # tables win over the command line
    assert first.caption_extension == ".txt" and dataset.bucket_reso_steps == 64


def test_every_config_mistake_is_in_one_report_with_its_place(tmp_path):
    config = write_toml(
        tmp_path / "bad.toml",
        f"""
        [general]
        shuffle_caption = "yes"
        batch_sise = 2

        [[datasets]]
        resolution = 512
        is_reg = true

          [[datasets.subsets]]
          image_dir = '{tmp_path / "missing"}'
          num_repeats = 1.5

          [[datasets.subsets]]
          metadata_file = 'meta.json'
        """,
    )
    with pytest.raises(UserError) as raised:
        prepare_datasets(str(config), {})
    message = str(raised.value)
    assert message.startswith(f"5 problems in {config}; nothing was loaded:")
    assert f"{config}, [general]: shuffle_caption = 'yes' should be true or false." in message
    assert f"{config}, [general]: unknown key 'batch_sise' (did you mean 'batch_size'?)." in message
    assert f"{config}, datasets[0]: 'is_reg' is not allowed in a dataset table; put it in a subset table." in message
    assert f"{config}, datasets[0].subsets[0]: num_repeats = 1.5 should be a whole number." in message
    assert (
        f"{config}, datasets[0]: DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file) are mixed"
        in message
    )


def test_folder_problems_are_reported_together(tmp_path):
    write_images(tmp_path / "empty", 0)
    images = write_images(tmp_path / "ok", 2)
    (images / "001.txt").write_bytes("caption \x82\xa0 cp932".encode("latin-1"))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    config = write_toml(
        tmp_path / "dataset.toml",
        f"""
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = '{tmp_path / "empty"}'
          [[datasets.subsets]]
          image_dir = '{tmp_path / "ok"}'
          caption_extension = ".txt"
          [[datasets.subsets]]
          image_dir = '{tmp_path / "nowhere"}'
        """,
    )
    with pytest.raises(UserError) as raised:
        prepare_datasets(str(config), {})
    message = str(raised.value)
    assert f"datasets[0].subsets[0]: image_dir '{tmp_path / 'empty'}' holds no images" in message
    assert f"{images / '001.txt'}" in message and "UTF-8" in message
    assert f"{images / 'broken.png'}: it cannot be read as an image" in message and "--skip_bad_images" in message
    assert f"datasets[0].subsets[2]: image_dir '{tmp_path / 'nowhere'}' is not a folder" in message


def test_truncated_images_are_skipped_with_a_note_when_asked(tmp_path):
    images = write_images(tmp_path / "10_sks dog", 3)
    Image.effect_noise((256, 256), 60).convert("RGB").save(images / "cut.jpg", quality=95)
    (images / "cut.jpg").write_bytes(
        (images / "cut.jpg").read_bytes()[:-2000]
    )  # an interrupted copy: the header is intact
    with pytest.raises(UserError, match=r"cut\.jpg: it is truncated; replace or delete it"):
        prepare_datasets(None, {"resolution": "64", "caption_extension": ".txt"}, train_data_dir=str(tmp_path))
    (plan,), notes = prepare_datasets(
        None, {"resolution": "64", "caption_extension": ".txt"}, train_data_dir=str(tmp_path), skip_bad_images=True
    )
    assert len(plan.samples) == 3 and any("cut.jpg: skipped, it is truncated" in note for note in notes)


def test_legacy_folders_give_repeats_class_tokens_and_regularization(tmp_path):
    write_images(tmp_path / "train" / "10_sks dog", 4, captions=None)
    write_images(tmp_path / "reg" / "1_dog", 30, captions=None)
    (plan,), notes = prepare_datasets(
        None, {"resolution": "64"}, train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg")
    )
    train = [sample for sample in plan.samples if not sample.is_reg]
    reg = [sample for sample in plan.samples if sample.is_reg]
    assert {sample.image.caption for sample in train} == {"sks dog"} and {s.repeats for s in train} == {10}
    assert plan.num_train_images == 40 and plan.num_reg_images == 30
    assert sum(sample.repeats for sample in reg) == 40 and len(reg) == 30  # 30 once, then 10 of them once more
    assert any("4 of 4 images have no .caption caption and use the class tokens 'sks dog'" in note for note in notes)


def test_a_folder_name_without_repeats_is_named_with_the_fix(tmp_path):
    write_images(tmp_path / "10_sks dog", 1)
    write_images(tmp_path / "sks cat", 1)
    with pytest.raises(
        UserError, match=r"folder 'sks cat' is not named <repeats>_<identifier> <class> \(e\.g\. '10_sks cat'\)"
    ):
        prepare_datasets(None, {"resolution": "64"}, train_data_dir=str(tmp_path))


def test_txt_captions_are_used_when_there_are_no_caption_files(tmp_path):
    write_images(tmp_path / "5_sks dog", 2, captions=".txt")
    (plan,), notes = prepare_datasets(None, {"resolution": "64"}, train_data_dir=str(tmp_path))
    assert {sample.image.caption for sample in plan.samples} == {"caption 0, red, square", "caption 1, red, square"}
    assert any("no .caption files, so the captions are read from the .txt files" in note for note in notes)


def test_caching_conflicts_are_reported_before_anything_loads(tmp_path):
    write_images(tmp_path / "5_sks dog", 2)
    with pytest.raises(UserError, match="random_crop changes the image every epoch, so its latents cannot be cached"):
        prepare_datasets(
            None, {"resolution": "64", "random_crop": True}, train_data_dir=str(tmp_path), cache_latents=True
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_batch_size": 0}, "batch_size is 0; use 1 or more"),
        ({"face_crop_aug_range": [4.0, 2.0]}, "face_crop_aug_range is \\[4.0, 2.0\\]; give \\[low, high\\]"),
        ({"validation_split": 1.5}, "validation_split is 1.5; it is the fraction"),
        ({"dataset_repeats": 0}, "no images to train on"),
    ],
)
def test_values_training_cannot_use_are_refused_up_front(tmp_path, options, message):
    write_images(tmp_path / "images", 2)
    (tmp_path / "data.toml").write_text(
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'images'}'\n", encoding="utf-8"
    )
    with pytest.raises(UserError, match=message):
        prepare_datasets(str(tmp_path / "data.toml"), options)


@pytest.mark.parametrize(
    ("subset_repeats", "num_train", "expected"),
    [
        ([1] * 300, 200, [1] * 200 + [0] * 100),  # the spec's worked example: 100 images are never used
        ([1] * 50, 200, [4] * 50),  # 50 once, then three more rounds
        ([3, 3, 3], 7, [3, 3, 3]),  # 3 + 3 = 6 is short of 7, so the third image is taken too (9 samples)
        ([2, 2], 7, [4, 3]),  # 2 + 2, then +1 +1, +1: 7
        ([5], 0, [0]),  # no training images: no regularization images
    ],
)
def test_regularization_balance(subset_repeats, num_train, expected):
    assert balanced_reg_repeats(subset_repeats, num_train) == expected


def test_plans_survive_pickling_into_data_loader_workers(tmp_path):
    import pickle

    write_images(tmp_path / "5_sks dog", 2)
    (plan,), _ = prepare_datasets(None, {"resolution": "64", "flip_aug": True}, train_data_dir=str(tmp_path))
    copy = pickle.loads(pickle.dumps(plan))
    assert copy.samples[0].subset.flip_aug is True and copy.epoch_batches(3, 1) == plan.epoch_batches(3, 1)


def test_epoch_batches_keep_buckets_apart_and_follow_the_seed(tmp_path):
    write_images(tmp_path / "3_wide", 5, size=(300, 100))
    write_images(tmp_path / "2_tall", 4, size=(100, 300))
    cli = {
        "resolution": "128",
        "enable_bucket": True,
        "min_bucket_reso": 64,
        "max_bucket_reso": 256,
        "train_batch_size": 4,
    }
    (plan,), _ = prepare_datasets(None, cli, train_data_dir=str(tmp_path))
    batches = plan.epoch_batches(seed=7, epoch=1)
    assert all(len({plan.samples[i].placement.bucket for i in batch}) == 1 for batch in batches)
    counts = Counter(index for batch in batches for index in batch)
    assert {plan.samples[i].repeats for i in counts} == {3, 2} and all(
        counts[i] == plan.samples[i].repeats for i in counts
    )
    assert len(batches) == math.ceil(15 / 4) + math.ceil(8 / 4)  # 15 wide samples, 8 tall ones
    assert plan.epoch_batches(seed=7, epoch=1) == batches and plan.epoch_batches(seed=7, epoch=2) != batches
    assert plan.bucket_counts() == {(64, 192): 8, (192, 64): 15}  # aspect 3 and 1/3 buckets of 128x128's area


def test_caption_settings_come_from_the_resolved_subset(tmp_path):
    from library.dataset.captions import CaptionSettings

    write_images(tmp_path / "5_sks dog", 1)
    cli = {"resolution": "64", "shuffle_caption": True, "keep_tokens": 2, "caption_tag_dropout_rate": 0.1}
    (plan,), _ = prepare_datasets(None, cli, train_data_dir=str(tmp_path))
    settings = CaptionSettings.of(plan.samples[0].subset)
    assert (settings.shuffle_caption, settings.keep_tokens, settings.caption_tag_dropout_rate) == (True, 2, 0.1)
    assert settings.caption_separator == "," and settings.token_warmup_min == 1  # schema defaults


def test_a_resolution_that_does_not_parse_is_named_as_typed(tmp_path):
    write_images(tmp_path / "10_cat", 1)
    with pytest.raises(UserError, match="'64x' is not a resolution"):
        prepare_datasets(None, {"resolution": "64x"}, train_data_dir=str(tmp_path))
