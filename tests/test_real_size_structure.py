"""Released SD1.5, SD2.1 and SDXL architectures, built on the meta device (no memory): our single-file key set and
shapes against diffusers' converters and the counts and names listed in specs/checkpoints.md."""

from __future__ import annotations

import pytest
from diffusers.loaders import single_file_utils as oracle

from library.model_files.architecture import architecture_from_shapes, shipped_architecture
from library.model_files.family import ModelFamily, detect_family
from library.model_files.stable_diffusion import empty_model, single_file_tensors

# Tensor counts per component of the single file (specs/checkpoints.md section 2.1) and parameter counts of the
# modules (section 12).
FILE_TENSORS = {
    ModelFamily.SD1: {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196},
    ModelFamily.SD2: {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 294},
    ModelFamily.SDXL: {
        "model.diffusion_model.": 1680,
        "first_stage_model.": 248,
        "conditioner.embedders.0.": 196,
        "conditioner.embedders.1.": 390,
    },
}
UNET_PARAMETERS = {ModelFamily.SD1: 859_520_964, ModelFamily.SD2: 865_910_724, ModelFamily.SDXL: 2_567_463_684}
TEXT_PARAMETERS = {
    ModelFamily.SD1: [123_060_480],
    ModelFamily.SD2: [340_387_840],
    ModelFamily.SDXL: [123_060_480, 694_659_840],
}
UPSAMPLERS = {
    ModelFamily.SD1: ["output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"],
    ModelFamily.SD2: ["output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"],
    ModelFamily.SDXL: ["output_blocks.2.2.conv", "output_blocks.5.2.conv"],
}
DIFFUSERS_TYPES = {ModelFamily.SD1: "v1", ModelFamily.SD2: "v2", ModelFamily.SDXL: "xl_base"}


@pytest.fixture(scope="module", params=list(ModelFamily), ids=lambda f: f.value)
def released(request):
    family = request.param
    model = empty_model(family)
    file_tensors = {key: source() for key, (_, source) in single_file_tensors(model).items()}
    return family, model, file_tensors


def test_file_layout_has_the_documented_counts_and_names(released):
    family, model, file_tensors = released
    for prefix, count in FILE_TENSORS[family].items():
        assert sum(key.startswith(prefix) for key in file_tensors) == count, prefix
    for upsampler in UPSAMPLERS[family]:
        assert f"model.diffusion_model.{upsampler}.weight" in file_tensors
    assert sum(p.numel() for p in model.unet.parameters()) == UNET_PARAMETERS[family]
    assert [sum(p.numel() for p in e.parameters()) for e in model.text_encoders] == TEXT_PARAMETERS[family]


def test_diffusers_recognises_and_converts_our_layout(released):
    family, model, file_tensors = released
    assert oracle.infer_diffusers_model_type(file_tensors) == DIFFUSERS_TYPES[family]
    converted = oracle.convert_ldm_unet_checkpoint(file_tensors, dict(model.unet.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.unet.state_dict().items()
    }
    converted = oracle.convert_ldm_vae_checkpoint(file_tensors, dict(model.vae.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.vae.state_dict().items()
    }


def test_shapes_give_back_the_family_and_the_released_configs(released):
    family, _, file_tensors = released
    shapes = {key: tuple(t.shape) for key, t in file_tensors.items()}
    assert detect_family(shapes, "meta") is family
    inferred, shipped = architecture_from_shapes(family, shapes), shipped_architecture(family)
    assert inferred.unet == shipped.unet
    assert inferred.vae == shipped.vae
    assert inferred.text_encoders == shipped.text_encoders


def test_inpainting_input_channels_are_noticed():
    model = empty_model(ModelFamily.SD1)
    shapes = {key: info.shape for key, (info, _) in single_file_tensors(model).items()}
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert architecture_from_shapes(ModelFamily.SD1, shapes).unet["in_channels"] == 9
