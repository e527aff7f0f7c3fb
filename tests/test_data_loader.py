"""Batches for training (specs/training.md 3.4-3.8): the epoch order across datasets, batch contents from images
and from cached latents, reproducibility across worker counts, and bad images found mid-epoch."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest
import torch
from PIL import Image

from library.dataset.arguments import add_dataset_arguments, config_fallbacks, dataset_options, prepare_dataset_plans
from library.dataset.latent_cache import CachedLatents, cache_latents
from library.dataset.loader import BatchSettings, EpochBatches, TrainingBatches, make_data_loader, worker_count
from library.dataset.plan import prepare_datasets
from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.tokenizer import shipped_tokenizer
from library.tiny_models import make_tiny_dataset, make_tiny_model

BUCKETED = {
    "resolution": "128",
    "enable_bucket": True,
    "min_bucket_reso": 64,
    "max_bucket_reso": 256,
    "caption_extension": ".txt",
}


@pytest.fixture(scope="module")
def tokenizer():
    return shipped_tokenizer()


def write_images(folder, sizes, caption="a photo"):
    folder.mkdir(parents=True, exist_ok=True)
    for index, (width, height) in enumerate(sizes):
        Image.new("RGBA" if index % 2 else "RGB", (width, height), (40 * index % 256, 90, 160, 128)).save(
            folder / f"{index:03d}.png"
        )
        (folder / f"{index:03d}.txt").write_text(f"{caption} {index}, red, blue, green", encoding="utf-8")


def plans_for(tmp_path, **options):
    write_images(tmp_path / "train" / "3_sks dog", [(128, 128), (192, 96), (96, 192), (128, 128), (200, 100)])
    write_images(tmp_path / "reg" / "1_dog", [(128, 128)] * 4, caption="a dog")
    plans, _ = prepare_datasets(
        None, {**BUCKETED, **options}, train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg")
    )
    return plans


def all_batches(plans, tokenizer, epoch=1, workers=0, latents=None, **settings):
    sampler = EpochBatches(plans, seed=7)
    sampler.set_epoch(epoch)
    batches = TrainingBatches(plans, tokenizer, BatchSettings(seed=7, **settings), latents)
    return list(make_data_loader(batches, sampler, workers, persistent_workers=False))


def test_an_epoch_holds_every_sample_its_repeats_in_single_bucket_batches(tmp_path):
    plans = plans_for(tmp_path, train_batch_size=2)
    sampler = EpochBatches(plans, seed=7)
    keys = sampler.keys()
    samples = plans[0].samples
    assert len(keys) == len(sampler)
    seen = Counter(index for key in keys for index in key.samples)
    assert seen == {index: sample.repeats for index, sample in enumerate(samples)}
    for key in keys:
        assert len({samples[index].placement.bucket for index in key.samples}) == 1
        assert 1 <= len(key.samples) <= 2
    # 5 train images x 3 repeats = 15, balanced by 4 reg images to 15: 30 samples in one epoch
    assert sum(seen.values()) == 30


def test_the_order_follows_seed_and_epoch(tmp_path):
    plans = plans_for(tmp_path, train_batch_size=2)
    first, again, other_seed = EpochBatches(plans, 7), EpochBatches(plans, 7), EpochBatches(plans, 8)
    assert first.keys() == again.keys()
    assert [key.samples for key in first.keys()] != [key.samples for key in other_seed.keys()]
    second_epoch = EpochBatches(plans, 7)
    second_epoch.set_epoch(2)
    assert [key.samples for key in first.keys()] != [key.samples for key in second_epoch.keys()]


def test_two_datasets_are_interleaved_with_their_own_batch_sizes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write_images(one, [(64, 64)] * 6)
    write_images(two, [(64, 64)] * 6)
    (tmp_path / "datasets.toml").write_text(
        f"""[general]\nresolution = 64\ncaption_extension = ".txt"\n
[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = '{one}'\n
[[datasets]]\nbatch_size = 3\n[[datasets.subsets]]\nimage_dir = '{two}'\n""",
        encoding="utf-8",
    )
    plans, _ = prepare_datasets(str(tmp_path / "datasets.toml"), {})
    keys = EpochBatches(plans, seed=1).keys()
    sizes = {dataset: {len(key.samples) for key in keys if key.dataset == dataset} for dataset in (0, 1)}
    assert sizes == {0: {2}, 1: {3}}
    order = [key.dataset for key in keys]
    assert order != sorted(order)  # shuffled together, not one dataset after the other


def test_global_step_counts_optimizer_steps(tmp_path):
    plans = plans_for(tmp_path)
    sampler = EpochBatches(plans, seed=7, gradient_accumulation_steps=4)
    sampler.set_epoch(3, global_step=100)
    assert [key.global_step for key in sampler.keys()][:9] == [100] * 4 + [101] * 4 + [102]
    assert {key.epoch for key in sampler.keys()} == {3}


def test_image_batches_hold_the_bucket_pixels_tokens_and_loss_weights(tmp_path, tokenizer):
    plans = plans_for(tmp_path, train_batch_size=3)
    samples = plans[0].samples
    sampler = EpochBatches(plans, seed=7)
    keys = sampler.keys()
    for key, batch in zip(keys, all_batches(plans, tokenizer, prior_loss_weight=0.25)):
        chosen = [samples[index] for index in key.samples]
        width, height = chosen[0].placement.bucket
        assert batch["latents"] is None
        assert batch["images"].shape == (len(chosen), 3, height, width)
        assert batch["images"].min() >= -1 and batch["images"].max() <= 1
        assert batch["captions"] == [sample.image.caption for sample in chosen]
        expected_ids = tokenizer(
            batch["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        assert torch.equal(batch["input_ids"][:, 0], expected_ids)
        assert batch["loss_weights"].tolist() == [0.25 if sample.is_reg else 1.0 for sample in chosen]
        assert batch["target_sizes_hw"].tolist() == [[height, width]] * len(chosen)
        assert batch["original_sizes_hw"].tolist() == [
            [sample.image.size[1], sample.image.size[0]] for sample in chosen
        ]
        assert batch["network_multipliers"].tolist() == [1.0] * len(chosen)


def test_alpha_masks_are_stacked_with_ones_for_images_without_alpha(tmp_path, tokenizer):
    folder = tmp_path / "1_masked"
    write_images(folder, [(64, 64)] * 4)  # odd indices are RGBA with alpha 128, even ones RGB
    plans, _ = prepare_datasets(
        None,
        {"resolution": "64", "caption_extension": ".txt", "alpha_mask": True, "train_batch_size": 4},
        train_data_dir=str(tmp_path),
    )
    (batch,) = all_batches(plans, tokenizer)
    key = EpochBatches(plans, 7).keys()[0]
    expected = [128 / 255 if index % 2 else 1.0 for index in key.samples]
    assert batch["alpha_masks"].shape == (4, 64, 64)
    assert batch["alpha_masks"][:, 0, 0].tolist() == pytest.approx(expected)


def test_the_same_seed_gives_the_same_batches_for_any_worker_count(tmp_path, tokenizer):
    plans = plans_for(
        tmp_path,
        train_batch_size=2,
        shuffle_caption=True,
        flip_aug=True,
        random_crop=True,
        caption_tag_dropout_rate=0.3,
    )
    in_process = all_batches(plans, tokenizer)
    with_workers = all_batches(plans, tokenizer, workers=2)
    assert [batch["captions"] for batch in in_process] == [batch["captions"] for batch in with_workers]
    assert [batch["flippeds"] for batch in in_process] == [batch["flippeds"] for batch in with_workers]
    for ours, theirs in zip(in_process, with_workers):
        assert torch.equal(ours["images"], theirs["images"])
    shuffled = [caption for batch in in_process for caption in batch["captions"]]
    assert any(not caption.startswith("a ") for caption in shuffled)  # shuffle_caption did reorder tags
    assert any(flip for batch in in_process for flip in batch["flippeds"]) and not all(
        flip for batch in in_process for flip in batch["flippeds"]
    )


def test_persistent_workers_see_the_new_epoch(tmp_path, tokenizer):
    plans = plans_for(tmp_path, train_batch_size=5, caption_dropout_every_n_epochs=2)
    sampler = EpochBatches(plans, seed=7)
    loader = make_data_loader(
        TrainingBatches(plans, tokenizer, BatchSettings(seed=7)), sampler, workers=1, persistent_workers=True
    )
    captions = {}
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        captions[epoch] = {caption for batch in loader for caption in batch["captions"]}
    assert "" not in captions[1] and captions[2] == {""}  # every caption is dropped in even epochs


def test_cached_batches_hold_the_cached_latents_flipped_or_not(tmp_path, tokenizer):
    make_tiny_dataset(tmp_path, images=3, repeats=2)
    plans, _ = prepare_datasets(
        None,
        {"resolution": "64", "caption_extension": ".txt", "flip_aug": True, "train_batch_size": 2},
        train_data_dir=str(tmp_path),
    )
    vae = make_tiny_model(ModelFamily.SD1).vae
    latents, _, _ = cache_latents(plans, vae, "cpu", torch.float32, 2, to_disk=False, progress=False)
    samples = plans[0].samples
    flips = []
    for key, batch in zip(EpochBatches(plans, 7).keys(), all_batches(plans, tokenizer, latents=latents)):
        assert batch["images"] is None
        for row, (index, flipped) in enumerate(zip(key.samples, batch["flippeds"])):
            entry = latents[samples[index].image.path]
            assert torch.equal(batch["latents"][row], entry.latents_flipped if flipped else entry.latents)
            flips.append(flipped)
    assert True in flips and False in flips


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_broken_after_the_scan_is_named_or_left_out(tmp_path, tokenizer, workers):
    plans = plans_for(tmp_path, train_batch_size=5)
    broken = tmp_path / "train" / "3_sks dog" / "001.png"
    broken.write_bytes(b"not an image any more")
    with pytest.raises(UserError, match="001.png: cannot be decoded") as raised:
        all_batches(plans, tokenizer, workers=workers)
    assert str(raised.value).startswith(str(broken)) and "Traceback" not in str(raised.value)
    batches = all_batches(plans, tokenizer, workers=workers, skip_bad_images=True)
    captions = [caption for batch in batches for caption in batch["captions"]]
    assert len(captions) == 30 - 3  # the broken image's three repeats are left out
    assert "a photo 1, red, blue, green" not in captions


def test_a_batch_of_only_broken_images_comes_back_as_none(tmp_path, tokenizer):
    folder = tmp_path / "1_one"
    write_images(folder, [(64, 64)])
    plans, _ = prepare_datasets(None, {"resolution": "64", "caption_extension": ".txt"}, train_data_dir=str(tmp_path))
    (folder / "000.png").write_bytes(b"broken")
    assert all_batches(plans, tokenizer, skip_bad_images=True) == [None]


@pytest.mark.parametrize(
    ("requested", "cached", "cpus", "expected"),
    [(None, False, 16, 8), (None, True, 16, 2), (None, False, 2, 2), (12, False, 4, 4), (0, True, 4, 0)],
)
def test_worker_count(monkeypatch, requested, cached, cpus, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    assert worker_count(requested, cached) == expected


def parse(*arguments):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(arguments))


def datasets_from_arguments(args):
    """The plans of parsed dataset flags, with the notes of building the options and of the plans."""
    notes = []
    plans, plan_notes = prepare_dataset_plans(dataset_options(args, notes))
    return plans, notes + plan_notes


def test_command_line_options_reach_the_dataset_config(tmp_path):
    make_tiny_dataset(tmp_path / "data", images=2, repeats=3)
    args = parse(
        "--train_data_dir",
        str(tmp_path / "data"),
        "--resolution",
        "64,96",
        "--caption_extention",
        ".txt",
        "--flip_aug",
        "--train_batch_size",
        "2",
    )
    assert config_fallbacks(args)["caption_extension"] == ".txt"
    plans, notes = datasets_from_arguments(args)
    (plan,) = plans
    assert plan.config.resolution == (64, 96) and plan.config.batch_size == 2
    assert all(sample.subset.flip_aug and sample.repeats == 3 for sample in plan.samples)
    assert not any(".caption" in note for note in notes)  # the alias asked for .txt, so there was no fallback


def test_unsupported_and_ignored_options_say_so(tmp_path):
    with pytest.raises(UserError, match="--dataset_class"):
        datasets_from_arguments(parse("--dataset_class", "my.Dataset", "--train_data_dir", str(tmp_path)))
    make_tiny_dataset(tmp_path / "data", images=1)
    args = parse(
        "--train_data_dir",
        str(tmp_path / "data"),
        "--resolution",
        "64",
        "--persistent_data_loader_workers",
        "--max_data_loader_n_workers",
        "0",
    )
    _, notes = datasets_from_arguments(args)
    assert any("--persistent_data_loader_workers ignored" in note for note in notes)


def test_an_image_left_out_when_caching_is_left_out_of_its_batches(tmp_path, tokenizer):
    make_tiny_dataset(tmp_path, images=3, repeats=2)
    plans, _ = prepare_datasets(
        None, {"resolution": "64", "caption_extension": ".txt", "train_batch_size": 6}, train_data_dir=str(tmp_path)
    )
    samples = plans[0].samples
    latents = {sample.image.path: CachedLatents(torch.zeros(4, 8, 8), None, None) for sample in samples[1:]}
    (batch,) = all_batches(plans, tokenizer, latents=latents)
    assert Counter(batch["captions"]) == Counter(sample.image.caption for sample in samples[1:] for _ in range(2))
