"""Shared pieces of the LoRA tests: tiny models with inputs for every component, and non-zero LoRA weights."""

from __future__ import annotations

import copy

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from library.model_files.family import ModelFamily
from library.tiny_models import make_tiny_model


def text_encoder_argument(model):
    """What sd-scripts passes as `text_encoder`: the model, or the list of both for SDXL."""
    return model.text_encoders if model.family is ModelFamily.SDXL else model.text_encoders[0]


def fill_randomly(network, seed: int = 0, std: float = 0.2) -> None:
    """Give every LoRA factor random values: a fresh network has up = 0 and changes nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


class ModelProbe:
    """Fixed inputs for a model's text encoders and U-Net, and their outputs."""

    def __init__(self, model, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        config = model.unet.config
        self.token_ids = torch.randint(0, 49406, (2, 77), generator=generator)
        self.latents = torch.randn(2, 4, 16, 16, generator=generator)
        self.timesteps = torch.tensor([10, 500])
        self.context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
        self.added = {}
        if model.family is ModelFamily.SDXL:
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            self.added = {
                "added_cond_kwargs": {
                    "text_embeds": torch.randn(2, pooled, generator=generator),
                    "time_ids": torch.randn(2, 6, generator=generator),
                }
            }

    @torch.no_grad()
    def outputs(self, text_encoders, unet) -> list[torch.Tensor]:
        hidden = [encoder(self.token_ids).last_hidden_state for encoder in text_encoders]
        return hidden + [unet(self.latents, self.timesteps, self.context, **self.added).sample]


def tiny_model_pair(family: ModelFamily, seed: int = 0):
    """Two identical tiny models: one to adapt, one to keep as it is."""
    model = make_tiny_model(family, seed=seed)
    return model, copy.deepcopy(model)


def assert_outputs_close(expected: list[torch.Tensor], actual: list[torch.Tensor], atol: float = 1e-5) -> None:
    for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-5, msg=lambda m, index=index: f"output {index}: {m}")


def diffusers_pipeline(model):
    parts = dict(vae=model.vae, unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config()))
    if model.family is ModelFamily.SDXL:
        encoders, tokenizers = model.text_encoders, model.tokenizers
        return StableDiffusionXLPipeline(
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            **parts,
        )
    return StableDiffusionPipeline(
        text_encoder=model.text_encoders[0],
        tokenizer=model.tokenizers[0],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )


def peft_layer_count(module: torch.nn.Module) -> int:
    return sum(1 for layer in module.modules() if hasattr(layer, "lora_A") and len(layer.lora_A) > 0)
