"""--save_state / --resume: a run stopped (at an epoch save, or by Ctrl-C in the middle of an epoch) and resumed ends
with the same LoRA as a run that never stopped, and a resume with other settings is refused, naming the difference."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.training.trainer import train
from training_helpers import training_arguments

# 4 images x 5 repeats, batch 1, accumulation 2: 10 optimizer steps per epoch; 14 steps end inside epoch 2.
# Dropout draws from torch's global RNG, so an exact result also shows the RNG state was restored.
RUN_OPTIONS = {
    "--output_name": "tiny",
    "--learning_rate": "1e-2",
    "--network_dim": "8",
    "--network_alpha": "8",
    "--network_dropout": "0.1",
    "--gradient_accumulation_steps": "2",
    "--max_train_steps": "14",
    "--lr_scheduler": "cosine",
}


def run(**changes: str) -> list[str]:
    """The run's options as a list, with `changes` (option name without dashes -> value) applied."""
    options = {**RUN_OPTIONS, **{f"--{name}": value for name, value in changes.items()}}
    return ["--cache_latents", *(item for pair in options.items() for item in pair)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd1, tiny_dataset, tmp_path_factory):
    """The reference run; it also saves a state with its epoch-1 save."""
    output = tmp_path_factory.mktemp("uninterrupted")
    return train(
        training_arguments(tiny_sd1, tiny_dataset, output, *run(), "--save_every_n_epochs", "1", "--save_state")
    ), output


def assert_same_lora(file, reference):
    tensors, expected = load_file(file), load_file(reference)
    assert tensors.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(tensors[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_the_states_are_saved_with_sd_scripts_names(uninterrupted):
    final, output = uninterrupted
    epoch_state = output / "tiny-000001-state"
    assert (epoch_state / "train_state.json").is_file() and (output / "tiny-000001.safetensors").is_file()
    saved = json.loads((epoch_state / "train_state.json").read_text())
    assert (saved["current_epoch"], saved["current_step"]) == (1, 10)
    assert (output / "tiny-state" / "train_state.json").is_file()  # the end state comes with --save_state
    assert not list(output.glob("*.partial"))


def test_resuming_from_an_epoch_state_ends_with_the_same_lora(uninterrupted, tiny_sd1, tiny_dataset, tmp_path):
    final, output = uninterrupted
    resumed = train(
        training_arguments(tiny_sd1, tiny_dataset, tmp_path, *run(), "--resume", str(output / "tiny-000001-state"))
    )
    assert_same_lora(resumed, final)
    assert load_file(resumed).keys()  # and the file names continue from step 10: no step save restarted at 1


def test_ctrl_c_mid_epoch_saves_a_state_that_resumes_exactly(uninterrupted, tiny_sd1, tiny_dataset, tmp_path):
    final, _ = uninterrupted

    def press_ctrl_c_at_step_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(
            training_arguments(tiny_sd1, tiny_dataset, tmp_path, *run(), "--save_state"), on_step=press_ctrl_c_at_step_5
        )
    state = tmp_path / "tiny-step00000005-state"
    saved = json.loads((state / "train_state.json").read_text())
    assert (saved["current_epoch"], saved["current_step"], saved["batches_done_in_epoch"]) == (1, 5, 10)
    assert not (tmp_path / "tiny.safetensors").exists()

    steps_seen = []
    resumed = train(
        training_arguments(tiny_sd1, tiny_dataset, tmp_path, *run(), "--resume", str(state)), on_step=steps_seen.append
    )
    assert steps_seen == list(range(6, 15))
    assert_same_lora(resumed, final)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"network_dim": "4"}, "network_dim was 8 in the saved run and is 4 now"),
        ({"gradient_accumulation_steps": "1"}, "gradient_accumulation_steps was 2"),
        ({"caption_extension": ".text"}, "datasets[0].subsets[0].caption_extension"),
    ],
)
def test_a_resume_with_other_settings_is_refused_naming_the_difference(
    uninterrupted, tiny_sd1, tiny_dataset, tmp_path, change, named
):
    _, output = uninterrupted
    with pytest.raises(UserError, match="resume with the same settings") as raised:
        train(
            training_arguments(
                tiny_sd1, tiny_dataset, tmp_path, *run(**change), "--resume", str(output / "tiny-000001-state")
            )
        )
    assert named in str(raised.value)
    assert not list(tmp_path.iterdir())


def test_a_resume_past_the_last_step_or_from_elsewhere_is_one_sentence(uninterrupted, tiny_sd1, tiny_dataset, tmp_path):
    _, output = uninterrupted
    with pytest.raises(UserError, match="already did 10 steps, and --max_train_steps is 10; raise it"):
        train(
            training_arguments(
                tiny_sd1,
                tiny_dataset,
                tmp_path,
                *run(max_train_steps="10"),
                "--resume",
                str(output / "tiny-000001-state"),
            )
        )
    with pytest.raises(UserError, match="no such folder"):
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, *run(), "--resume", str(tmp_path / "missing-state")))
    foreign = tmp_path / "sd-scripts-state"
    foreign.mkdir()
    (foreign / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 10}))
    with pytest.raises(UserError, match="--network_weights"):
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, *run(), "--resume", str(foreign)))


def test_the_same_folder_given_relative_or_absolute_is_the_same_run(tiny_dataset, monkeypatch):
    from library.dataset.plan import prepare_datasets
    from library.training.state import first_difference, run_fingerprint

    def fingerprint(folder):
        plans, _ = prepare_datasets(None, {"resolution": "64"}, train_data_dir=str(folder))
        return run_fingerprint(training_arguments("m", folder, "o"), plans, 1)

    absolute = fingerprint(tiny_dataset)
    monkeypatch.chdir(tiny_dataset.parent)
    assert first_difference(absolute, fingerprint(Path(tiny_dataset.name))) is None
