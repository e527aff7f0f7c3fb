"""Two processes (torchrun on the CPU, gloo) train as one process with twice the accumulation: the batches are
sharded, the noise belongs to the batch, and the gradients are averaged over the processes before each step."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

from library.model_files.family import ModelFamily
from library.tiny_models import make_tiny_dataset


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SCRIPTS = {
    ModelFamily.SD1: ("train_network.py", []),
    ModelFamily.SDXL: ("sdxl_train_network.py", ["--network_train_unet_only", "--cache_text_encoder_outputs_to_disk"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SCRIPTS), ids=lambda family: family.value)
def test_two_processes_equal_one_with_the_same_effective_batch(tiny_checkpoints, tmp_path, family):
    make_tiny_dataset(tmp_path / "data", images=4, repeats=2)  # 8 batches: 4 optimizer steps of 2 batches either way
    script, family_flags = SCRIPTS[family]
    flags = "--resolution 64 --network_module networks.lora --seed 3 --max_data_loader_n_workers 0 --learning_rate 1e-2"
    flags += " --max_train_steps 4 --cache_latents --output_name tiny"
    model, data = str(tiny_checkpoints[family][1]), str(tmp_path / "data")
    common = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, *flags.split(), *family_flags]
    one = run_script(script, *common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    distributed = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    two = run_script(
        *distributed, "--master_port", str(free_port()), script, *common, "--output_dir", str(tmp_path / "two")
    )
    assert two.returncode == 0, two.stderr
    assert "effective batch 2 (batch x 1 accumulation x 2 processes)" in two.stdout
    assert two.stdout.count("saved ") == 1  # only the main process saves

    single, sharded = load_file(tmp_path / "one" / "tiny.safetensors"), load_file(tmp_path / "two" / "tiny.safetensors")
    assert single.keys() == sharded.keys()
    for key in single:
        # the two sum the same gradients in another order; Adam's first steps magnify that only to float noise
        torch.testing.assert_close(
            sharded[key], single[key], rtol=0, atol=1e-3 * max(1.0, single[key].abs().max().item()), msg=key
        )
