"""Training SDXL (sdxl_train_network.py): two text encoders and the size conditioning (specs/checkpoints.md 5.3).

The U-Net's context is the penultimate hidden states of CLIP ViT-L (text encoder 1) and of OpenCLIP bigG (text
encoder 2), without their final layer norm, concatenated to 2048 features. Its added vector `y` is text encoder 2's
pooled output (the final-normed state at the first EOS of the caption's first 77-token window, through the
projection) followed by the sinusoidal embeddings of the original size, the crop's top-left corner and the target
size (height before width), each per sample from the bucket and crop the dataset really applied; diffusers' U-Net
computes those embeddings from the six numbers (`time_ids`), as SGM does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from library.dataset.latent_cache import SDXL_SUFFIX
from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import StableDiffusionModel, load_stable_diffusion, local_model_family
from library.model_files.vae import load_vae_weights
from library.text_encoding import WINDOW, encode_windows
from library.training.families import TextOutputs, TrainingFamily
from library.training.options import ModelOptions

CONTEXT_LAYER = -2  # the penultimate layer of each encoder (layer 11 of CLIP ViT-L's 12, layer 31 of bigG's 32)


class SDXLTraining(TrainingFamily):
    latent_cache_suffix = SDXL_SUFFIX

    @classmethod
    def load(cls, options: ModelOptions) -> StableDiffusionModel:
        """The U-Net and text encoders in the run's dtype; the VAE always in float32, since SDXL's VAE overflows
        in fp16 (NaN latents and black samples)."""
        path = options.pretrained_model_name_or_path
        if options.v2:
            raise UserError("--v2 names an SD 2.x model, but sdxl_train_network.py trains SDXL models; remove --v2.")
        family = local_model_family(path)
        if family not in (None, ModelFamily.SDXL):
            raise UserError(
                f"{path}: an {family.label} model; train it with train_network.py, which takes the same options."
            )
        if options.disable_mmap_load_safetensors and Path(path).is_file():
            _read_sequentially(Path(path))
        model = load_stable_diffusion(
            path,
            family=ModelFamily.SDXL,
            v_parameterization=options.v_parameterization,
            dtype=options.weight_dtype,
            vae_dtype=torch.float32,
        )
        if options.vae:
            load_vae_weights(model.vae, options.vae)
        return model

    @property
    def vae_dtype(self) -> torch.dtype:
        return torch.float32

    def encode_text(self, token_ids: list[torch.Tensor]) -> TextOutputs:
        """The context (B, 75n + 2, 2048) and text encoder 2's pooled output (B, 1280)."""
        ids1, ids2 = token_ids
        text_encoder1, text_encoder2 = self.model.text_encoders
        context1 = encode_windows(
            lambda flat: text_encoder1(flat, output_hidden_states=True).hidden_states[CONTEXT_LAYER],
            ids1.to(text_encoder1.device),
        )
        pooled = []

        def context2_states(flat: torch.Tensor) -> torch.Tensor:
            output = text_encoder2(flat, output_hidden_states=True)
            pooled.append(self._pooled(output.last_hidden_state, flat, ids2.shape[1]))
            return output.hidden_states[CONTEXT_LAYER]

        context2 = encode_windows(context2_states, ids2.to(text_encoder2.device))
        return torch.cat([context1, context2], dim=-1), pooled[0]

    def _pooled(self, last_hidden_state: torch.Tensor, flat_ids: torch.Tensor, windows: int) -> torch.Tensor:
        """The final-normed state at the first EOS of each caption's first window, through the projection. sd-scripts
        finds the EOS itself rather than trusting the config's eos_token_id, as here."""
        states = last_hidden_state.reshape(-1, windows, WINDOW, last_hidden_state.shape[-1])[:, 0]
        ids = flat_ids.reshape(-1, windows, WINDOW)[:, 0]
        first_eos = (ids == self.model.tokenizers[1].eos_token_id).int().argmax(dim=1)
        return self.model.text_encoders[1].text_projection(states[torch.arange(len(ids), device=ids.device), first_eos])

    def text_outputs_to_arrays(self, outputs: TextOutputs) -> dict[str, np.ndarray]:
        """One caption's outputs as sd-scripts' `_te_outputs.npz` keys: each encoder's states and the pooled vector."""
        context, pooled = outputs
        width = self.model.text_encoders[0].config.hidden_size
        return {
            "hidden_state1": context[:, :width].float().numpy(),
            "hidden_state2": context[:, width:].float().numpy(),
            "pool2": pooled.float().numpy(),
        }

    def text_outputs_from_arrays(self, arrays) -> TextOutputs:
        context = np.concatenate([arrays["hidden_state1"], arrays["hidden_state2"]], axis=-1)
        return torch.from_numpy(context), torch.from_numpy(arrays["pool2"])

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextOutputs, batch: dict
    ) -> torch.Tensor:
        context, pooled = text
        dtype = self.options.weight_dtype
        device = noisy_latents.device
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": size_conditioning(batch).to(device, dtype)}
        return self.unet(noisy_latents, timesteps, context.to(device, dtype), added_cond_kwargs=added).sample


def _read_sequentially(path: Path, chunk: int = 64 * 2**20) -> None:
    """Read the file from start to end, so that the loader's memory-mapped reads come from the page cache instead of
    one small random read each from a slow drive (sd-scripts' --disable_mmap_load_safetensors reads it whole)."""
    with open(path, "rb", buffering=0) as stream:
        while stream.read(chunk):
            pass


def size_conditioning(batch: dict) -> torch.Tensor:
    """(B, 6): original height and width, crop top and left, target height and width, as diffusers' `time_ids`."""
    return torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1).float()
