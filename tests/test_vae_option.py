"""--vae: the weights of a separate VAE replace the model's own, from any of the layouts sd-scripts accepts; anything
else is one sentence naming the file."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from library.errors import UserError
from library.model_files.containers import open_checkpoint
from library.model_files.family import VAE_PREFIX, ModelFamily
from library.model_files.vae import load_vae_weights
from library.tiny_models import make_tiny_dataset, make_tiny_model
from library.training.trainer import train
from training_helpers import training_arguments


@pytest.fixture(scope="module")
def source(tiny_checkpoints):
    return tiny_checkpoints[ModelFamily.SD1]  # (model, single file, Diffusers folder), seed 0


@pytest.fixture(scope="module")
def bare_vae_file(source, tmp_path_factory):
    """The VAE alone with its original names, like vae-ft-mse-840000-ema-pruned.safetensors."""
    checkpoint = open_checkpoint(source[1])
    tensors = {
        key[len(VAE_PREFIX) :]: checkpoint.read(key).contiguous()
        for key in checkpoint.keys()
        if key.startswith(VAE_PREFIX)
    }
    file = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_file(tensors, file)
    return file


def vae_file(kind, source, bare_vae_file):
    return {
        "bare original names": bare_vae_file,
        "full checkpoint": source[1],
        "Diffusers folder": source[2],
        "Diffusers vae folder": source[2] / "vae",
        "Diffusers-named file": source[2] / "vae" / "diffusion_pytorch_model.safetensors",
    }[kind]


@pytest.mark.parametrize(
    "kind",
    ["bare original names", "full checkpoint", "Diffusers folder", "Diffusers vae folder", "Diffusers-named file"],
)
def test_every_layout_gives_the_source_vae(kind, source, bare_vae_file):
    other = make_tiny_model(ModelFamily.SD1, seed=5).vae
    load_vae_weights(other, vae_file(kind, source, bare_vae_file))
    expected = source[0].vae.state_dict()
    for key, tensor in other.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)


def test_a_file_that_is_not_a_vae_or_not_this_kind_is_one_sentence(source, tmp_path):
    not_vae = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, not_vae)
    with pytest.raises(UserError, match=r"lora.safetensors: \d+ VAE tensors are missing"):
        load_vae_weights(make_tiny_model(ModelFamily.SD1).vae, not_vae)
    with pytest.raises(UserError, match="no such file"):
        load_vae_weights(make_tiny_model(ModelFamily.SD1).vae, tmp_path / "absent.safetensors")
    narrower = AutoencoderKL(
        block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    with pytest.raises(UserError, match="tensors have another shape"):
        load_vae_weights(narrower, source[1])


def test_the_trainer_uses_the_vae(source, bare_vae_file, tmp_path, capsys):
    make_tiny_dataset(tmp_path / "data", images=2, repeats=1)
    train(
        training_arguments(
            source[1], tmp_path / "data", tmp_path / "out", "--max_train_steps", "1", "--vae", str(bare_vae_file)
        )
    )
    assert f"VAE from {bare_vae_file}" in capsys.readouterr().out
