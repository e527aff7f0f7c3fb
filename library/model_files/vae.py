"""`--vae`: a separate VAE's weights in place of the model's own. Accepted as sd-scripts accepts them: a VAE file with
the original (LDM) key names, bare (`encoder.conv_in.weight`, as in vae-ft-mse-840000-ema-pruned.safetensors) or
inside a full checkpoint (`first_stage_model.`), a file with Diffusers key names, or a Diffusers VAE folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from library.errors import UserError
from library.model_files.containers import open_checkpoint
from library.model_files.family import VAE_PREFIX
from library.model_files.key_maps import to_model_tensor, vae_links

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_vae_weights(vae: AutoencoderKL, path: str | os.PathLike) -> None:
    """Replace `vae`'s weights with those in `path`; the architecture must be the same."""
    path = Path(path)
    file = _weights_file(path) if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--vae {path}: no such file; give a VAE .safetensors/.ckpt file or a Diffusers VAE folder.")
    checkpoint = open_checkpoint(file)
    keys = set(checkpoint.keys())
    if set(vae.state_dict()) <= keys:
        weights = {key: checkpoint.read(key) for key in vae.state_dict()}  # Diffusers names
    else:
        weights = _from_ldm_names(vae, checkpoint, keys, path)
    _check_shapes(vae, weights, path)
    dtype = next(vae.parameters()).dtype
    vae.load_state_dict({key: tensor.to(dtype) for key, tensor in weights.items()})


def _weights_file(folder: Path) -> Path:
    for candidate in (folder, folder / "vae"):
        for name in DIFFUSERS_WEIGHTS:
            if (candidate / name).is_file():
                return candidate / name
    raise UserError(
        f"--vae {folder}: a folder without {DIFFUSERS_WEIGHTS[0]} (or in vae/);"
        " give a Diffusers VAE folder or a VAE file."
    )


def _from_ldm_names(vae: AutoencoderKL, checkpoint, keys: set[str], path: Path) -> dict[str, torch.Tensor]:
    prefix = VAE_PREFIX if any(key.startswith(VAE_PREFIX) for key in keys) else ""
    links = vae_links(vae.state_dict().keys(), vae.config)
    missing = [link.file_key for link in links.values() if prefix + link.file_key[len(VAE_PREFIX) :] not in keys]
    if missing:
        raise UserError(
            f"--vae {path}: {len(missing)} VAE tensors are missing (first: {missing[0]});"
            " it is not a VAE file, or not one of this model's kind."
        )
    return {
        key: to_model_tensor(checkpoint.read(prefix + link.file_key[len(VAE_PREFIX) :]), link)
        for key, link in links.items()
    }


def _check_shapes(vae: AutoencoderKL, weights: dict[str, torch.Tensor], path: Path) -> None:
    expected = vae.state_dict()
    wrong = [
        f"{key} {tuple(tensor.shape)} instead of {tuple(expected[key].shape)}"
        for key, tensor in weights.items()
        if tensor.shape != expected[key].shape
    ]
    if wrong:
        raise UserError(
            f"--vae {path}: {len(wrong)} tensors have another shape (first: {wrong[0]});"
            " it is not a VAE of this model's kind."
        )
