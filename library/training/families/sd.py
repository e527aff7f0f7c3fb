"""Training SD 1.x / 2.x (train_network.py): one CLIP text encoder, whose hidden states are the U-Net's context."""

from __future__ import annotations

import torch

from library.dataset.latent_cache import SD_SUFFIX
from library.errors import UserError
from library.model_files.family import ModelFamily, family_from_flags
from library.model_files.stable_diffusion import StableDiffusionModel, load_stable_diffusion, local_model_family
from library.model_files.vae import load_vae_weights
from library.text_encoding import encode_tokens
from library.training.families import TextOutputs, TrainingFamily
from library.training.options import ModelOptions


class StableDiffusionTraining(TrainingFamily):
    latent_cache_suffix = SD_SUFFIX

    @classmethod
    def load(cls, options: ModelOptions) -> StableDiffusionModel:
        """Loaded in the dtype it runs in (the VAE in float32 only with --no_half_vae), so that a bf16 run never
        holds a float32 copy of the weights."""
        path = options.pretrained_model_name_or_path
        if local_model_family(path) is ModelFamily.SDXL:
            raise UserError(
                f"{path}: an SDXL model; train it with sdxl_train_network.py, which takes the same options."
            )
        vae_dtype = torch.float32 if options.no_half_vae else options.weight_dtype
        model = load_stable_diffusion(
            path,
            family=family_from_flags(v2=options.v2),
            v_parameterization=options.v_parameterization,
            dtype=options.weight_dtype,
            vae_dtype=vae_dtype,
        )
        if options.vae:
            load_vae_weights(model.vae, options.vae)
        return model

    def encode_text(self, token_ids: list[torch.Tensor]) -> TextOutputs:
        return (encode_tokens(self.model.text_encoders[0], token_ids[0], self.options.clip_skip),)

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextOutputs, batch: dict
    ) -> torch.Tensor:
        (context,) = text
        return self.unet(noisy_latents, timesteps, context.to(noisy_latents.device, self.options.weight_dtype)).sample
