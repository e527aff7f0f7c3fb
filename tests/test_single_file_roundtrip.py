"""Our single-file writer and reader against diffusers' own LDM/SGM converters, on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as oracle
from safetensors.torch import load_file

from library.model_files.family import TEXT_ENCODER_LAYOUTS, ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion, save_stable_diffusion_checkpoint

FAMILIES = list(ModelFamily)


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(expected) == sorted(actual)
    different = [key for key in expected if not torch.equal(expected[key], actual[key].to(expected[key].dtype))]
    assert not different, f"{len(different)} tensors differ, first: {different[:3]}"


def text_encoder_oracle(family: ModelFamily, index: int, encoder, file_tensors: dict) -> dict:
    layout = TEXT_ENCODER_LAYOUTS[family][index]
    if not layout.open_clip:
        converted = oracle.convert_ldm_clip_checkpoint(file_tensors)
    else:
        # diffusers skips SD2's unused last layer only by its literal real-size name (resblocks.23), so the tiny
        # file's unused last layer is taken out before calling it.
        unused_layer = f"{layout.prefix}transformer.resblocks.{encoder.config.num_hidden_layers}."
        kept = {key: value for key, value in file_tensors.items() if not key.startswith(unused_layer)}
        converted = oracle.convert_open_clip_checkpoint(encoder, kept, prefix=layout.prefix)
    own_keys = set(encoder.state_dict())
    return {
        key if key in own_keys else key.removeprefix("text_model."): value
        for key, value in converted.items()
        if "position_ids" not in key
    }


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_written_file_converts_back_exactly_with_diffusers(family, tiny_checkpoints):
    model, single_file, _ = tiny_checkpoints[family]
    file_tensors = load_file(single_file)
    assert_same_tensors(
        model.unet.state_dict(), oracle.convert_ldm_unet_checkpoint(file_tensors, dict(model.unet.config))
    )
    assert_same_tensors(model.vae.state_dict(), oracle.convert_ldm_vae_checkpoint(file_tensors, dict(model.vae.config)))
    for index, encoder in enumerate(model.text_encoders):
        assert_same_tensors(encoder.state_dict(), text_encoder_oracle(family, index, encoder, file_tensors))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_reader_matches_diffusers_from_single_file(family, tiny_checkpoints):
    _, single_file, diffusers_folder = tiny_checkpoints[family]
    ours = load_stable_diffusion(single_file)
    unet = UNet2DConditionModel.from_single_file(
        str(single_file), config=str(diffusers_folder), subfolder="unet", local_files_only=True
    )
    vae = AutoencoderKL.from_single_file(
        str(single_file), config=str(diffusers_folder), subfolder="vae", local_files_only=True
    )
    assert_same_tensors(unet.state_dict(), ours.unet.state_dict())
    assert_same_tensors(vae.state_dict(), ours.vae.state_dict())
    assert ours.family is family


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_loaded_model_computes_what_the_original_computes(family, tiny_checkpoints):
    model, single_file, _ = tiny_checkpoints[family]
    loaded = load_stable_diffusion(single_file)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    tokens = model.tokenizers[0](["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids
    context = torch.randn(1, 77, model.unet.config.cross_attention_dim)
    extra = {}
    if family is ModelFamily.SDXL:
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, 64),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
            }
        }
    # The weights are bit-identical (tests above); outputs may differ in the last bits because the loaded weights are
    # views of the memory-mapped file, aligned differently, and CPU kernels round by alignment.
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for original, reloaded in zip(model.text_encoders, loaded.text_encoders):
            torch.testing.assert_close(reloaded(tokens).last_hidden_state, original(tokens).last_hidden_state, **close)
        torch.testing.assert_close(
            loaded.unet(latents, 10, context, **extra).sample, model.unet(latents, 10, context, **extra).sample, **close
        )
        image = torch.rand(1, 3, 32, 32)
        torch.testing.assert_close(
            loaded.vae.encode(image).latent_dist.mean, model.vae.encode(image).latent_dist.mean, **close
        )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.value)
def test_diffusers_folder_round_trip(family, tiny_checkpoints):
    model, _, diffusers_folder = tiny_checkpoints[family]
    loaded = load_stable_diffusion(diffusers_folder)
    assert loaded.family is family
    for original, reloaded in zip(
        (model.unet, model.vae, *model.text_encoders), (loaded.unet, loaded.vae, *loaded.text_encoders)
    ):
        assert_same_tensors(original.state_dict(), reloaded.state_dict())


def test_sd2_unused_text_tensors_are_written_back_unchanged(tiny_checkpoints, tmp_path):
    _, single_file, _ = tiny_checkpoints[ModelFamily.SD2]
    original = load_file(single_file)
    layer = "cond_stage_model.model.transformer.resblocks.3.mlp.c_fc.weight"
    original[layer] = torch.randn_like(original[layer])  # no longer a copy of layer 2: must survive as is
    from safetensors.torch import save_file

    edited = tmp_path / "edited.safetensors"
    save_file(original, edited)
    resaved = tmp_path / "resaved.safetensors"
    save_stable_diffusion_checkpoint(load_stable_diffusion(edited), resaved)
    assert_same_tensors(original, load_file(resaved))


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_save_precision_casts_every_float_tensor(precision, tiny_checkpoints, tmp_path):
    model, _, _ = tiny_checkpoints[ModelFamily.SD1]
    path = tmp_path / "half.safetensors"
    save_stable_diffusion_checkpoint(model, path, dtype=precision)
    tensors = load_file(path)
    assert {t.dtype for t in tensors.values()} == {precision}
    loaded = load_stable_diffusion(path, dtype=torch.float32)
    torch.testing.assert_close(
        loaded.unet.conv_in.weight, model.unet.conv_in.weight.to(precision).float(), rtol=0, atol=0
    )


def test_ckpt_round_trip_with_state_dict_wrapper(tiny_checkpoints, tmp_path):
    model, _, _ = tiny_checkpoints[ModelFamily.SD1]
    path = tmp_path / "model.ckpt"
    save_stable_diffusion_checkpoint(model, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "epoch", "global_step"}
    loaded = load_stable_diffusion(path)
    assert_same_tensors(model.unet.state_dict(), loaded.unet.state_dict())
