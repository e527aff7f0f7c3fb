"""The safetensors reader and writer against the safetensors library itself."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load_file, save

from library.model_files.containers import open_checkpoint, save_state_dict

MIXED = {
    "weight": torch.randn(3, 5),
    "half": torch.randn(7).half(),
    "brain": torch.randn(2, 3).bfloat16(),
    "alpha": torch.tensor(8.0),
    "index": torch.arange(5),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4),
    "bytes": torch.arange(3, dtype=torch.uint8),
}


def split_safetensors(raw: bytes) -> tuple[int, dict, bytes]:
    (header_size,) = struct.unpack("<Q", raw[:8])
    return header_size, json.loads(raw[8 : 8 + header_size]), raw[8 + header_size :]


def test_written_file_matches_the_library_byte_for_byte_but_metadata_order(tmp_path):
    # The library keeps metadata in a hash map, so its order changes from call to call; ours is sorted.
    metadata = {"ss_network_dim": "4", "modelspec.title": "näme", "a": "1"}
    save_state_dict(tmp_path / "ours.safetensors", MIXED, metadata)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert split_safetensors(ours) == split_safetensors(save(MIXED, metadata=metadata))
    save_state_dict(tmp_path / "plain.safetensors", MIXED)
    assert (tmp_path / "plain.safetensors").read_bytes() == save(MIXED)


def test_reader_gives_the_tensors_the_library_reads(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(save(MIXED, metadata={"k": "v"}))
    checkpoint = open_checkpoint(path)
    assert checkpoint.metadata == {"k": "v"}
    reference = load_file(path)
    for key, tensor in reference.items():
        assert checkpoint.shape(key) == tuple(tensor.shape)
        assert torch.equal(checkpoint.read(key), tensor)


def test_changing_a_read_tensor_never_changes_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_state_dict(path, MIXED)
    tensor = open_checkpoint(path).read("weight")
    tensor += 1
    assert torch.equal(open_checkpoint(path).read("weight"), MIXED["weight"])
    assert torch.equal(load_file(path)["weight"], MIXED["weight"])
