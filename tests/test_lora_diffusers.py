"""Files written by networks.lora, loaded by diffusers' `load_lora_weights` (through PEFT) into tiny SD1 and SDXL
pipelines, compute what our network computes, applied or merged; and diffusers applies every module."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from library.model_files.family import ModelFamily
from lora_helpers import (
    ModelProbe,
    assert_outputs_close,
    diffusers_pipeline,
    fill_randomly,
    peft_layer_count,
    text_encoder_argument,
    tiny_model_pair,
)
from networks.lora import create_network, create_network_from_weights

VARIANTS = {"LierLa": {}, "C3Lier": {"conv_dim": "4", "conv_alpha": "2"}}


class WarningRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SDXL], ids=lambda f: f.value)
def test_diffusers_loads_every_module_and_computes_the_same(family, variant, tmp_path):
    model, untouched = tiny_model_pair(family)
    probe = ModelProbe(model)
    network = create_network(0.75, 8, 4, model.vae, text_encoder_argument(model), model.unet, **VARIANTS[variant])
    fill_randomly(network)
    lora_file = tmp_path / "lora.safetensors"
    network.save_weights(lora_file, torch.float32)

    network.apply_to(text_encoder_argument(model), model.unet)
    network.set_multiplier(1.0)  # the file holds the weights; diffusers' default scale is 1
    applied = probe.outputs(model.text_encoders, model.unet)
    assert not torch.allclose(applied[-1], probe.outputs(untouched.text_encoders, untouched.unet)[-1])

    pipeline = diffusers_pipeline(tiny_model_pair(family)[0])
    recorder = WarningRecorder()
    diffusers_logging.get_logger("diffusers").addHandler(recorder)
    try:
        pipeline.load_lora_weights(str(lora_file))
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(recorder)
    assert recorder.messages == []
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family is ModelFamily.SDXL else [])
    assert sum(peft_layer_count(encoder) for encoder in encoders) == len(network.text_encoder_loras)
    assert peft_layer_count(pipeline.unet) == len(network.unet_loras)
    assert_outputs_close(applied, probe.outputs(encoders, pipeline.unet))

    merge_target = tiny_model_pair(family)[0]
    merging, weights = create_network_from_weights(
        1.0, lora_file, merge_target.vae, text_encoder_argument(merge_target), merge_target.unet
    )
    merging.merge_to(text_encoder_argument(merge_target), merge_target.unet, weights)
    assert_outputs_close(applied, probe.outputs(merge_target.text_encoders, merge_target.unet))
