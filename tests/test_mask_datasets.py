"""Mask datasets (sd-scripts' conditioning_data_dir with --masked_loss): the red channel of the mask image of the
same name weighs each pixel's loss, resized, cropped and flipped with its image, with and without cached latents;
missing, extra and mis-sized masks are named before anything loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.dataset.images import prepare_image
from library.dataset.latent_cache import cache_latents
from library.dataset.loader import BatchKey, BatchSettings, TrainingBatches
from library.dataset.plan import prepare_datasets
from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.tokenizer import load_tokenizers
from library.tiny_models import make_tiny_dataset, make_tiny_model


def masked_dataset(folder, mask_size=None, drop=None, extra=False):
    image_dir = make_tiny_dataset(folder / "data", images=3, repeats=1)
    masks = folder / "masks"
    masks.mkdir()
    for image in sorted(image_dir.glob("*.png")):
        if image.stem == drop:
            continue
        width, height = mask_size or Image.open(image).size
        red = np.zeros((height, width, 3), dtype=np.uint8)
        red[:, : width // 2, 0] = 255  # the left half counts
        Image.fromarray(red).save(masks / f"{image.stem}.png")
    if extra:
        Image.new("RGB", (8, 8)).save(masks / "stray.png")
    config = folder / "data.toml"
    config.write_text(
        f"[general]\nresolution = 64\ncaption_extension = '.txt'\n[[datasets]]\n[[datasets.subsets]]\n"
        f"image_dir = '{image_dir}'\nconditioning_data_dir = '{masks}'\nflip_aug = true\n",
        encoding="utf-8",
    )
    return config, image_dir, masks


def expected_mask(mask_path, placement) -> torch.Tensor:
    image, _ = prepare_image(Image.open(mask_path).convert("RGB"), placement, None, random_crop=False, rng=None)
    return torch.from_numpy(np.array(image)[:, :, 0].astype(np.float32) / 255)


@pytest.mark.parametrize("cached", [False, True], ids=["loaded", "cached"])
def test_the_mask_images_red_channel_is_the_loss_mask(tmp_path, cached):
    config, _, masks = masked_dataset(tmp_path)
    plans, _ = prepare_datasets(str(config), {}, cache_latents=cached)
    latents = None
    if cached:
        vae = make_tiny_model(ModelFamily.SD1).vae
        latents, _, _ = cache_latents(plans, vae, "cpu", torch.float32, 1, to_disk=False, progress=False)
    batches = TrainingBatches(plans, load_tokenizers(ModelFamily.SD1), BatchSettings(seed=0), latents)
    for index, sample in enumerate(plans[0].samples):
        batch = batches[BatchKey(dataset=0, samples=(index,), epoch=1, position=index, global_step=0)]
        mask = expected_mask(masks / f"{sample.image.path.stem}.png", sample.placement)
        expected = mask.flip(-1) if batch["flippeds"][0] else mask
        torch.testing.assert_close(batch["alpha_masks"][0], expected)
        assert expected.min() == 0 and expected.max() == 1  # half of the image counts


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ({"drop": "000"}, r"has no mask for 1 of 3 images \(first: 000.png\); add a mask image of the same name"),
        ({"extra": True}, r"holds 1 masks without an image of the same name \(first: stray.png\)"),
        ({"mask_size": (10, 10)}, r"the mask 000.png is 10x10 but its image is 64x64"),
    ],
)
def test_missing_extra_and_mis_sized_masks_are_named(tmp_path, problem, message):
    config, _, _ = masked_dataset(tmp_path, **problem)
    with pytest.raises(UserError, match=message):
        prepare_datasets(str(config), {})
