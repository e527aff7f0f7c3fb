"""Family detection from keys and shapes, flags that confirm it, and v-prediction from flag or metadata."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.model_files.family import ModelFamily, check_family, detect_family, detect_v_prediction, family_from_flags
from library.model_files.stable_diffusion import load_stable_diffusion


@pytest.mark.parametrize("family", list(ModelFamily), ids=lambda f: f.value)
def test_tiny_models_are_recognised(family, tiny_checkpoints):
    _, single_file, folder = tiny_checkpoints[family]
    assert load_stable_diffusion(single_file).family is family
    assert load_stable_diffusion(folder).family is family


def test_a_lora_file_is_not_a_checkpoint():
    with pytest.raises(UserError, match="no U-Net weights"):
        detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "x.safetensors")


def test_refiner_is_refused():
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "conditioner.embedders.0.model.ln_final.weight": (1280,),
    }
    with pytest.raises(UserError, match="refiner"):
        detect_family(shapes, "refiner.safetensors")


def test_flags_confirm_the_family():
    check_family(ModelFamily.SD2, family_from_flags(v2=True), "f")
    with pytest.raises(UserError, match="--v2 was given, but the file is an SD1.x model"):
        check_family(ModelFamily.SD1, family_from_flags(v2=True), "f")
    with pytest.raises(UserError, match="--v2 and --sdxl"):
        family_from_flags(v2=True, sdxl=True)


def test_contradicting_flag_is_reported_on_load(tiny_checkpoints):
    _, single_file, _ = tiny_checkpoints[ModelFamily.SD1]
    with pytest.raises(UserError, match=f"{single_file.name}: --sdxl was given"):
        load_stable_diffusion(single_file, family=ModelFamily.SDXL)


def test_v_prediction_sources():
    assert detect_v_prediction({}, [], True) == (True, "--v_parameterization")
    assert detect_v_prediction({"modelspec.prediction_type": "v"}, [], False)[0]
    assert detect_v_prediction({"modelspec.architecture": "stable-diffusion-v2-768-v"}, [], False)[0]
    assert detect_v_prediction({}, ["v_pred"], False)[0]
    assert not detect_v_prediction({"modelspec.prediction_type": "epsilon"}, [], False)[0]


def test_v_prediction_survives_a_save(tiny_checkpoints, tmp_path):
    from library.model_files.stable_diffusion import save_stable_diffusion_checkpoint

    _, single_file, _ = tiny_checkpoints[ModelFamily.SD2]
    model = load_stable_diffusion(single_file, v_parameterization=True)
    save_stable_diffusion_checkpoint(model, tmp_path / "v.safetensors")
    reloaded = load_stable_diffusion(tmp_path / "v.safetensors")
    assert reloaded.v_prediction and reloaded.scheduler_config()["prediction_type"] == "v_prediction"


def test_legacy_sd1_text_keys_and_stray_position_ids_are_accepted(tiny_checkpoints, tmp_path):
    model, single_file, _ = tiny_checkpoints[ModelFamily.SD1]
    tensors = load_file(single_file)
    legacy = {
        key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
        for key, value in tensors.items()
    }
    import torch

    legacy["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77.0)[
        None
    ]  # float, as broken merges have it
    save_file(legacy, tmp_path / "legacy.safetensors")
    loaded = load_stable_diffusion(tmp_path / "legacy.safetensors")
    assert torch.equal(
        loaded.text_encoders[0].embeddings.token_embedding.weight,
        model.text_encoders[0].embeddings.token_embedding.weight,
    )


def test_ema_copies_and_schedule_buffers_are_ignored(tiny_checkpoints, tmp_path):
    import torch

    model, single_file, _ = tiny_checkpoints[ModelFamily.SD1]
    tensors = load_file(single_file)
    tensors["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros_like(
        tensors["model.diffusion_model.input_blocks.0.0.weight"]
    )
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["betas"] = torch.linspace(0.00085, 0.012, 1000)
    tensors["alphas_cumprod"] = torch.ones(1000)
    save_file(tensors, tmp_path / "with_ema.safetensors")
    loaded = load_stable_diffusion(tmp_path / "with_ema.safetensors")
    assert torch.equal(loaded.unet.conv_in.weight, model.unet.conv_in.weight)
