"""tools/convert_lora.py: a kohya LoRA turned into diffusers/PEFT form computes, loaded by diffusers'
`load_lora_weights`, what diffusers computes from the kohya file through its own converter (SD1 with per-module
alphas, SDXL); a file that diffusers itself saved converts to kohya form and applies what diffusers applies; the
round trip keeps every tensor and alpha; merge_lora.py takes a PEFT file directly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_script
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from library.lora.files import read_lora_inputs
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion
from lora_helpers import ModelProbe, assert_outputs_close, diffusers_pipeline, fill_randomly, text_encoder_argument
from networks.lora import create_network
from networks.merge_lora import MergeOptions, merge_into_checkpoint
from tools.convert_lora import convert


def kohya_lora(model, path, **network_args):
    network = create_network(1.0, 4, 2, None, text_encoder_argument(model), model.unet, **network_args)
    fill_randomly(network, seed=3)
    network.save_weights(path)
    return path


def outputs_with(model, lora) -> list[torch.Tensor]:
    """The text encoders' and U-Net's outputs of a copy of `model` with `lora` loaded by diffusers."""
    copied = copy.deepcopy(model)
    pipeline = diffusers_pipeline(copied)
    pipeline.load_lora_weights(str(lora))
    return ModelProbe(copied).outputs(copied.text_encoders, copied.unet)


@pytest.mark.parametrize(
    ("family", "network_args"),
    [(ModelFamily.SD1, {"conv_dim": 2, "conv_alpha": 1}), (ModelFamily.SDXL, {})],
    ids=["sd1-c3lier", "sdxl"],
)
def test_a_converted_lora_loads_in_diffusers_as_diffusers_loads_the_kohya_file(
    tiny_checkpoints, tmp_path, family, network_args
):
    model = tiny_checkpoints[family][0]
    kohya = kohya_lora(model, tmp_path / "kohya.safetensors", **network_args)
    assert convert(kohya, tmp_path / "peft.safetensors") == (
        "diffusers",
        len({k.split(".")[0] for k in load_file(kohya)}),
    )
    assert all(key.startswith(("unet.", "text_encoder")) for key in load_file(tmp_path / "peft.safetensors"))
    assert_outputs_close(outputs_with(model, kohya), outputs_with(model, tmp_path / "peft.safetensors"), atol=1e-5)
    assert convert(tmp_path / "peft.safetensors", tmp_path / "back.safetensors")[0] == "kohya"
    back, original = load_file(tmp_path / "back.safetensors"), load_file(kohya)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key].to(back[key].dtype)) for key in original)


def test_a_file_diffusers_saved_converts_to_kohya_form_that_applies_the_same(tiny_checkpoints, tmp_path):
    model, checkpoint, _ = tiny_checkpoints[ModelFamily.SD1]
    kohya = kohya_lora(model, tmp_path / "kohya.safetensors", conv_dim=2, conv_alpha=1)
    copied = copy.deepcopy(model)
    pipeline = diffusers_pipeline(copied)
    pipeline.load_lora_weights(str(kohya))
    type(pipeline).save_lora_weights(
        tmp_path / "saved",
        unet_lora_layers=get_peft_model_state_dict(copied.unet, adapter_name="default_0"),
        text_encoder_lora_layers=get_peft_model_state_dict(copied.text_encoders[0], adapter_name="default_0"),
        unet_lora_adapter_metadata=copied.unet.peft_config["default_0"].to_dict(),
        text_encoder_lora_adapter_metadata=copied.text_encoders[0].peft_config["default_0"].to_dict(),
    )
    saved = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    finished = run_script("tools/convert_lora.py", str(saved), str(tmp_path / "kohya_again.safetensors"))
    assert finished.returncode == 0 and "modules in kohya form" in finished.stdout
    again, original = load_file(tmp_path / "kohya_again.safetensors"), load_file(kohya)
    assert again.keys() == original.keys()
    for key, tensor in original.items():
        torch.testing.assert_close(again[key], tensor, rtol=0, atol=0, msg=key)
    # merge_lora.py reads the diffusers file as it is
    options = MergeOptions(progress=False)
    merge_into_checkpoint(checkpoint, tmp_path / "a.safetensors", read_lora_inputs([saved], [0.5]), options)
    merge_into_checkpoint(checkpoint, tmp_path / "b.safetensors", read_lora_inputs([kohya], [0.5]), options)
    merged_a, merged_b = (
        load_stable_diffusion(tmp_path / "a.safetensors"),
        load_stable_diffusion(tmp_path / "b.safetensors"),
    )
    probe = ModelProbe(merged_a)
    assert_outputs_close(
        probe.outputs(merged_b.text_encoders, merged_b.unet), probe.outputs(merged_a.text_encoders, merged_a.unet), 0
    )
