"""LoRA files: the metadata and `sshs_*` hashes every save writes, recomputed independently from the spec's
definition (specs/lora_format.md section 11.2), other containers, and tools/show_metadata.py."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch
from conftest import run_script

from library.errors import UserError
from library.lora.files import save_lora_file
from library.metadata import sshs_hashes
from library.model_files.containers import open_checkpoint
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import empty_model
from lora_helpers import fill_randomly, tiny_model_pair
from networks.lora import create_network, create_network_from_weights


def reference_hashes(tensors, metadata):
    """The spec's procedure with the safetensors library itself: serialize in memory with only the ss_* keys; the
    model hash covers the bytes after the header, the legacy hash the 64 KiB at offset 1 MiB."""
    buffer = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (header_length,) = struct.unpack("<Q", buffer[:8])
    return {
        "sshs_model_hash": hashlib.sha256(buffer[8 + header_length :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(buffer[0x100000:0x110000]).hexdigest()[:8],
    }


def lora_tensors(dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"lora_unet_block_{i}.lora_down.weight": torch.randn(16, 1280, generator=generator).to(dtype) for i in range(40)
    }
    tensors.update(
        {f"lora_unet_block_{i}.alpha": torch.tensor(8) for i in range(40)}
    )  # int64, as svd_merge_lora writes
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_hashes_match_the_safetensors_serialization(dtype):
    tensors = lora_tensors(dtype)
    assert sum(t.numel() * t.itemsize for t in tensors.values()) > 0x110000  # the legacy window lies inside the data
    # One ss_ key: the safetensors library orders metadata arbitrarily, so only then is its output unique.
    metadata = {"ss_network_module": "networks.lora", "modelspec.title": "not hashed", "sshs_model_hash": "not hashed"}
    assert sshs_hashes(tensors, metadata) == reference_hashes(tensors, metadata)


def test_a_file_under_one_mebibyte_has_the_empty_legacy_hash():
    tensors = {"m.lora_down.weight": torch.ones(2, 3), "m.lora_up.weight": torch.ones(3, 2)}
    assert sshs_hashes(tensors, {"ss_v2": "False"})["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]


def safetensors_bytes_with_sorted_metadata(tensors, metadata):
    """The safetensors library's serialization with the metadata in sorted order: the library writes it in an
    arbitrary order, and the legacy hash covers the header, so the sorted order is the one reproducible choice."""
    buffer = safetensors.torch.save(tensors, metadata)
    (header_length,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(buffer[8 : 8 + header_length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    assert len(encoded) == header_length
    return buffer[:8] + encoded + buffer[8 + header_length :]


def test_saved_file_carries_metadata_and_hashes_of_the_cast_tensors(tmp_path):
    model = empty_model(ModelFamily.SD1)  # real layer sizes, so that the file is larger than the legacy hash window
    network = create_network(1.0, 8, 4, None, model.text_encoders[0], model.unet, conv_dim="4", conv_alpha="1")
    fill_randomly(network)
    path = tmp_path / "my_lora.safetensors"
    network.save_weights(path, torch.float16, {"ss_training_comment": "hello"})

    checkpoint = open_checkpoint(path)
    metadata = checkpoint.metadata
    assert {checkpoint.info()[key].dtype for key in checkpoint.keys()} == {torch.float16}  # alpha too
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_v2"]) == ("8", "4.0", "False")
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_output_name"] == "my_lora"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}
    assert metadata["ss_training_comment"] == "hello"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["modelspec.title"] == "my_lora"

    # AUTOMATIC1111's hash of the file is the sha256 of everything after the header: it must equal sshs_model_hash.
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    assert len(data) > 0x110000
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_length :]).hexdigest()
    saved = {key: checkpoint.read(key) for key in checkpoint.keys()}
    ss_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    window = safetensors_bytes_with_sorted_metadata(saved, ss_only)[0x100000:0x110000]
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(window).hexdigest()[:8]


def test_the_trainers_output_name_titles_epoch_files(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet)
    network.save_weights(tmp_path / "style-000003.safetensors", None, {"ss_output_name": "style"})
    metadata = open_checkpoint(tmp_path / "style-000003.safetensors").metadata
    assert (metadata["ss_output_name"], metadata["modelspec.title"]) == ("style", "style")
    assert metadata["modelspec.implementation_version"].startswith("sd-lora-suite/")


def test_pickle_files_hold_the_bare_state_dict_and_load_back(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, 4, 2, None, model.text_encoders[0], model.unet)
    fill_randomly(network)
    network.save_weights(tmp_path / "lora.pt")
    loaded = torch.load(tmp_path / "lora.pt", weights_only=True)
    assert sorted(loaded) == sorted(network.state_dict())
    rebuilt, weights = create_network_from_weights(1.0, tmp_path / "lora.pt", None, model.text_encoders[0], model.unet)
    rebuilt.load_state_dict(weights)
    assert all(torch.equal(rebuilt.state_dict()[key], value) for key, value in network.state_dict().items())


def test_an_unknown_suffix_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(UserError, match=r"lora\.bin2: unknown LoRA file type"):
        save_lora_file(tmp_path / "lora.bin2", {"m.alpha": torch.tensor(1.0)}, {})
    assert list(tmp_path.iterdir()) == []


def test_show_metadata_prints_the_files_metadata_as_json(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet).save_weights(tmp_path / "lora.safetensors")
    shown = run_script("tools/show_metadata.py", "--model", str(tmp_path / "lora.safetensors"))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == open_checkpoint(tmp_path / "lora.safetensors").metadata

    missing = run_script("tools/show_metadata.py", "--model", str(tmp_path / "absent.safetensors"))
    assert missing.returncode == 2 and missing.stderr.startswith(
        f"error: {tmp_path / 'absent.safetensors'}: no such file"
    )
