"""examples/diffusers_pipeline_with_lora.py (the train_network README's Diffusers example) on the tiny SD1 model:
run as a user runs it, and in-process: multiplier 0 gives the base image, a multiplier changes the image, and
merge_to gives apply_to's image."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

from library.model_files.family import ModelFamily
from lora_helpers import fill_randomly
from networks.lora import create_network

EXAMPLE = ROOT / "examples" / "diffusers_pipeline_with_lora.py"
MULTIPLIERS = [0.5, 0.7, 0.5]  # the README's
SIZE, STEPS, SEED = 64, 2, 3


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("diffusers_pipeline_with_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd1_folder(tiny_checkpoints):
    return tiny_checkpoints[ModelFamily.SD1][2]


@pytest.fixture(scope="module")
def lora_files(tiny_checkpoints, tmp_path_factory):
    """Three LoRA files with non-zero up weights: two LoRA-LierLa of different ranks and one LoRA-C3Lier."""
    model = tiny_checkpoints[ModelFamily.SD1][0]
    folder = tmp_path_factory.mktemp("example_loras")
    files = []
    for index, (dim, alpha, args) in enumerate([(4, 2, {}), (8, 8, {}), (4, 1, {"conv_dim": "4", "conv_alpha": "2"})]):
        network = create_network(1.0, dim, alpha, model.vae, model.text_encoders[0], model.unet, **args)
        fill_randomly(network, seed=index, std=0.3)
        files.append(folder / f"lora{index + 1}.safetensors")
        network.save_weights(files[-1], torch.float32)
    return [str(file) for file in files]


def render(example, pipe) -> np.ndarray:
    image = example.generate(pipe, "a photo of a cat", "blurry", "cpu", steps=STEPS, seed=SEED, height=SIZE, width=SIZE)
    return np.asarray(image, dtype=np.int16)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_the_example_runs_as_a_user_runs_it(sd1_folder, lora_files, tmp_path):
    output = tmp_path / "by_diffusers.png"
    arguments = ["--model", str(sd1_folder), "--loras", *lora_files, "--multipliers", *map(str, MULTIPLIERS)]
    arguments += ["--prompt", "a photo of a cat", "--output", str(output), "--device", "cpu", "--steps", str(STEPS)]
    arguments += ["--seed", str(SEED), "--height", str(SIZE), "--width", str(SIZE)]
    finished = run_script(str(EXAMPLE.relative_to(ROOT)), *arguments)
    assert finished.returncode == 0, finished.stderr
    from PIL import Image

    with Image.open(output) as image:
        assert image.size == (SIZE, SIZE)
    assert "3 LoRA networks applied" in finished.stdout


def test_multipliers_change_the_image_and_merge_matches_apply(example, sd1_folder, lora_files):
    base = render(example, example.create_pipe(str(sd1_folder), "cpu"))

    pipe = example.create_pipe(str(sd1_folder), "cpu")
    networks = example.load_lora_networks(pipe, lora_files, MULTIPLIERS, "cpu")
    assert [network.multiplier for network in networks] == MULTIPLIERS
    applied = render(example, pipe)
    assert max_difference(applied, base) > 10, "the LoRAs should change the image"

    for network in networks:
        network.set_multiplier(0.0)
    assert max_difference(render(example, pipe), base) <= 2, "multiplier 0 everywhere should give the base image"

    for network, multiplier in zip(networks, MULTIPLIERS):
        network.set_multiplier(multiplier)
    networks[1].set_multiplier(1.5)
    changed = render(example, pipe)
    assert max_difference(changed, applied) > 10, "set_multiplier should change the image"

    for network, multiplier in zip(networks, MULTIPLIERS):
        network.set_multiplier(multiplier)
    assert max_difference(render(example, pipe), applied) <= 2, "the README's multipliers again give the same image"

    merged_pipe = example.create_pipe(str(sd1_folder), "cpu")
    example.load_lora_networks(merged_pipe, lora_files, MULTIPLIERS, "cpu", merge=True)
    assert max_difference(render(example, merged_pipe), applied) <= 2, "merge_to should give apply_to's image"


def test_the_multipliers_must_match_the_loras(sd1_folder, lora_files):
    finished = run_script(
        str(EXAMPLE.relative_to(ROOT)),
        "--model",
        str(sd1_folder),
        "--loras",
        *lora_files,
        "--multipliers",
        "0.5",
        "0.7",
    )
    assert finished.returncode == 2
    assert "give one per LoRA file (3), not 2" in finished.stderr
