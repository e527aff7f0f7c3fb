"""Sample images during training: drawn when asked, named as sd-scripts names them, with the network being trained
(the last sample equals an image drawn afterwards with the saved LoRA), and a bad prompt file stops the run before
anything is trained."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from library.errors import UserError
from library.model_files.stable_diffusion import load_stable_diffusion
from library.sampling import SamplePrompt, generate_image
from library.tiny_models import make_tiny_dataset
from library.training.trainer import train
from networks.lora import create_network_from_weights
from training_helpers import training_arguments

PROMPTS = "a shape\na red shape --n blurry --d 5 --w 64 --h 64 --s 3\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_tiny_dataset(folder, images=2, repeats=1)
    return folder


@pytest.fixture(scope="module")
def sampled(tiny_sd1, data, tmp_path_factory):
    output = tmp_path_factory.mktemp("output")
    prompts = output / "prompts.txt"
    prompts.write_text(PROMPTS.replace("a shape\n", "a shape --w 64 --h 64 --s 2 --d 9\n"))
    final = train(
        training_arguments(
            tiny_sd1,
            data,
            output,
            "--output_name",
            "tiny",
            "--learning_rate",
            "1e-2",
            "--max_train_steps",
            "4",
            "--sample_prompts",
            str(prompts),
            "--sample_at_first",
            "--sample_every_n_steps",
            "2",
            "--sample_sampler",
            "euler_a",
        )
    )
    return final, output


def sample_names(output):
    return sorted(path.name for path in (output / "sample").iterdir())


def test_samples_are_drawn_first_and_every_n_steps_with_sd_scripts_names(sampled):
    _, output = sampled
    names = sample_names(output)
    pattern = re.compile(r"tiny_(e000000|000002|000004)_(00|01)_\d{14}_(9|5)\.png")
    assert len(names) == 6 and all(pattern.fullmatch(name) for name in names), names
    assert {name.split("_")[1] for name in names} == {"e000000", "000002", "000004"}
    assert Image.open(output / "sample" / names[0]).size == (64, 64)


def test_the_last_sample_is_drawn_with_the_trained_network(sampled, tiny_sd1):
    final, output = sampled
    last = next(name for name in sample_names(output) if name.startswith("tiny_000004_01"))
    model = load_stable_diffusion(tiny_sd1)
    network, weights = create_network_from_weights(1.0, final, model.vae, model.text_encoders[0], model.unet)
    network.load_state_dict(weights)
    network.apply_to(model.text_encoders[0], model.unet)
    prompt = SamplePrompt("a red shape", negative_prompt="blurry", width=64, height=64, seed=5, steps=3)
    expected = generate_image(
        model.unet,
        model.text_encoders,
        model.tokenizers,
        model.vae,
        prompt,
        v_prediction=False,
        clip_skip=None,
        default_sampler="euler_a",
        device="cpu",
        dtype=model.unet.dtype,
    ).image
    drawn = np.asarray(Image.open(output / "sample" / last), dtype=np.int16)
    assert np.abs(drawn - np.asarray(expected, dtype=np.int16)).max() <= 1
    first = next(name for name in sample_names(output) if name.startswith("tiny_e000000_01"))
    assert (
        np.abs(drawn - np.asarray(Image.open(output / "sample" / first), dtype=np.int16)).max() > 1
    )  # training changed it


def test_epoch_sampling_wins_over_step_sampling(tiny_sd1, data, tmp_path):
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('[prompt]\nwidth = 64\nheight = 64\nsample_steps = 1\n[[prompt.subset]]\nprompt = "a shape"\n')
    train(
        training_arguments(
            tiny_sd1,
            data,
            tmp_path,
            "--max_train_steps",
            "4",
            "--sample_prompts",
            str(prompts),
            "--sample_every_n_steps",
            "1",
            "--sample_every_n_epochs",
            "1",
        )
    )  # 2 steps per epoch
    assert [name.split("_")[0] for name in sample_names(tmp_path)] == [
        "e000001",
        "e000002",
    ]  # no --output_name: no prefix


def test_a_bad_prompt_file_stops_the_run_before_training(tiny_sd1, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shape --w wide\n")
    output = tmp_path / "out"
    with pytest.raises(UserError, match="prompts.txt"):
        train(
            training_arguments(
                tiny_sd1, data, output, "--max_train_steps", "2", "--sample_prompts", str(prompts), "--sample_at_first"
            )
        )
    assert not output.exists()
