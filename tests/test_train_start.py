"""Starting a run from something other than step 0 of the bare model: --base_weights merges LoRAs into the base model
first (as merge_lora.py's arithmetic does), and --initial_step / --initial_epoch start the step count, the names, the
logs and the learning-rate schedule where they say."""

from __future__ import annotations

import copy

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion
from library.training.families.sd import StableDiffusionTraining
from library.training.network_module import _continuation_line
from library.training.preparation import _merge_base_weights
from library.training.trainer import train
from lora_helpers import ModelProbe, assert_outputs_close, fill_randomly
from networks.lora import create_network
from training_helpers import training_arguments


def test_base_weights_are_merged_into_the_model_as_if_applied(tiny_sd1, tiny_dataset, tmp_path):
    model = load_stable_diffusion(tiny_sd1)
    lora = create_network(1.0, 4, 2, None, model.text_encoders[0], model.unet, conv_dim="2")
    fill_randomly(lora, std=0.05)
    lora.save_weights(tmp_path / "base.safetensors", torch.float32)
    options = training_arguments(
        tiny_sd1,
        tiny_dataset,
        tmp_path,
        "--base_weights",
        str(tmp_path / "base.safetensors"),
        "--base_weights_multiplier",
        "0.5",
    )
    merged = load_stable_diffusion(tiny_sd1)
    _merge_base_weights(options, StableDiffusionTraining(merged, options.model))

    applied, probe = copy.deepcopy(model), ModelProbe(model)
    reference = create_network(0.5, 4, 2, None, applied.text_encoders[0], applied.unet, conv_dim="2")
    reference.load_state_dict(lora.state_dict())
    reference.apply_to(applied.text_encoders[0], applied.unet)
    reference.set_multiplier(0.5)
    assert_outputs_close(
        probe.outputs(applied.text_encoders, applied.unet), probe.outputs(merged.text_encoders, merged.unet)
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--base_weights", "a.safetensors", "--base_weights_multiplier", "1", "0.5"],
            "gives 2 value\\(s\\) for 1 --base_weights",
        ),
        (["--base_weights", "missing.safetensors"], "--base_weights missing.safetensors: no such file"),
        (
            ["--initial_step", "40", "--max_train_steps", "40"],
            "--initial_step starts at step 40, but --max_train_steps is 40",
        ),
        (["--initial_epoch", "2", "--resume", "state"], "--resume continues from the step its state saved"),
    ],
)
def test_start_options_that_cannot_work_are_one_sentence(tiny_sd1, tiny_dataset, tmp_path, extra, message):
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=message):
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, *extra))


@pytest.mark.slow
def test_initial_step_starts_the_count_and_the_schedule_there(tiny_sd1, tiny_dataset, tmp_path):
    def learning_rates(folder, *extra):
        flags = ["--max_train_steps", "8", "--lr_scheduler", "linear", "--learning_rate", "1e-3", "--cache_latents"]
        flags += ["--network_train_unet_only", "--logging_dir", str(folder / "logs"), "--save_every_n_steps", "7"]
        train(training_arguments(tiny_sd1, tiny_dataset, folder, *flags, *extra))
        (run_folder,) = (folder / "logs").iterdir()
        events = EventAccumulator(str(run_folder / "network_train"))
        events.Reload()
        return {event.step: event.value for event in events.Scalars("lr/unet")}

    whole = learning_rates(tmp_path / "whole")
    started = learning_rates(tmp_path / "started", "--initial_step", "5")
    assert sorted(started) == [6, 7, 8]
    assert [started[step] for step in (6, 7, 8)] == pytest.approx([whole[step] for step in (6, 7, 8)])
    assert (tmp_path / "started" / "at-step00000007.safetensors").is_file()


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_loads(tiny_dataset, tmp_path):
    (tmp_path / "taken").write_text("")
    options = training_arguments(tmp_path / "no-model.safetensors", tiny_dataset, tmp_path / "taken" / "out")
    with pytest.raises(UserError, match=f"--output_dir {tmp_path}/taken/out: {tmp_path}/taken is a file, not a folder"):
        train(options)


def test_continuing_from_a_lora_of_another_model_is_refused(tiny_checkpoints, tiny_sd1, tiny_dataset, tmp_path):
    sdxl = tiny_checkpoints[ModelFamily.SDXL][0]
    create_network(1.0, 4, 1, None, list(sdxl.text_encoders), sdxl.unet).save_weights(tmp_path / "xl.safetensors")
    options = training_arguments(
        tiny_sd1, tiny_dataset, tmp_path, "--network_weights", str(tmp_path / "xl.safetensors")
    )
    with pytest.raises(UserError, match=r"xl.safetensors: none of this network's \d+ modules is in the file"):
        train(options)


def test_continuing_names_the_modules_that_start_fresh(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints[ModelFamily.SD1][0]
    network = create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet)
    state = network.state_dict()
    unet_only = {key: value for key, value in state.items() if key.startswith("lora_unet_")}
    missing = network.load_state_dict(unet_only, strict=False).missing_keys
    fresh = len(network.text_encoder_loras)
    assert fresh > 0 and len(missing) == 3 * fresh  # down, up and alpha of each
    line = _continuation_line("u.safetensors", network, missing, [])
    assert line == (
        f"continuing from u.safetensors ({fresh} of the network's {len(state) // 3} modules are not in the file and"
        " start fresh)"
    )
    conv = create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet, conv_dim="2")
    unexpected = network.load_state_dict(conv.state_dict(), strict=False).unexpected_keys
    convs = len({key.split(".")[0] for key in unexpected})
    assert convs == len(conv.unet_loras) - len(network.unet_loras) > 0  # the 3x3 convs this network has no module for
    assert _continuation_line("c.safetensors", network, [], unexpected).startswith(
        f"continuing from c.safetensors ({convs} of the file's modules are not in this network and are left out"
    )
