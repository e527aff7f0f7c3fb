"""Every option of sd-scripts' train_network.py and sdxl_train_network.py is known here: implemented, accepted with a
note, or refused in one sentence naming the option and why (never "unrecognized arguments"); an option file written
by sd-scripts, with its defaults for the refused options, loads; the ModelSpec options reach the saved file."""

from __future__ import annotations

import pytest
from PIL import Image
from safetensors import safe_open
from sd_scripts_options import SDXL_TRAIN_NETWORK_EXTRA_OPTIONS, TRAIN_NETWORK_OPTIONS

from library.errors import UserError
from library.training.arguments import build_parser
from library.training.config_file import parse_arguments
from library.training.options import training_options
from library.training.trainer import train
from training_helpers import training_arguments, training_flags


@pytest.mark.parametrize("sdxl", [False, True], ids=["train_network", "sdxl_train_network"])
def test_the_parser_knows_every_option_of_sd_scripts(sdxl):
    known = {flag for action in build_parser(sdxl)._actions for flag in action.option_strings}
    expected = TRAIN_NETWORK_OPTIONS + (SDXL_TRAIN_NETWORK_EXTRA_OPTIONS if sdxl else [])
    assert [name for name in expected if f"--{name}" not in known] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--deepspeed"], "--deepspeed: DeepSpeed is not supported"),
        (["--conditioning_data_dir", "masks"], "--conditioning_data_dir: give it per subset in the dataset config"),
        (["--zero_stage", "3"], "--zero_stage: DeepSpeed is not supported"),
        (
            ["--huggingface_repo_id", "me/lora"],
            "--huggingface_repo_id: uploading to the Hugging Face Hub is not done here",
        ),
        (["--fused_backward_pass"], "--fused_backward_pass: sd-scripts applies it to full fine-tuning only"),
        (
            ["--lr_scheduler_type", "no_such_package.Scheduler"],
            "--lr_scheduler_type no_such_package.Scheduler: cannot import Scheduler from no_such_package",
        ),
    ],
)
def test_refused_options_are_one_sentence_naming_them(extra, message):
    with pytest.raises(UserError, match=message) as error:
        training_options(training_flags("m.safetensors", "data", "out", *extra))
    assert "\n" not in str(error.value)


def test_sd_scripts_defaults_of_refused_options_pass_and_ddp_switches_give_a_note():
    defaults = ["--zero_stage", "2", "--dynamo_backend", "inductor", "--lr_decay_steps", "0", "--ddp_static_graph"]
    options = training_options(training_flags("m.safetensors", "data", "out", *defaults))
    assert any("--ddp_static_graph: no effect" in note for note in options.notes)


def test_an_option_file_written_by_sd_scripts_loads(tmp_path):
    (tmp_path / "sd_scripts.toml").write_text(
        """
pretrained_model_name_or_path = "model.safetensors"
output_dir = "out"
network_module = "networks.lora"
learning_rate = 0.0001
zero_stage = 2
dynamo_backend = "inductor"
deepspeed = false
lr_scheduler_type = ""
lr_decay_steps = 0
weighted_captions = false
ddp_gradient_as_bucket_view = false
console_log_simple = false
metadata_author = "me"
""",
        encoding="utf-8",
    )
    args = parse_arguments(build_parser(), ["--config_file", str(tmp_path / "sd_scripts.toml")])
    assert training_options(args).modelspec.author == "me"


def test_modelspec_options_and_timestep_range_reach_the_file(tiny_sd1, tiny_dataset, tmp_path):
    thumbnail = tmp_path / "thumb.png"
    Image.new("RGB", (4, 4), "red").save(thumbnail)
    metadata_flags = ["--metadata_title", "Red shapes", "--metadata_author", "me", "--metadata_license", "CC-BY-4.0"]
    metadata_flags += ["--metadata_tags", "shape,red", "--metadata_thumbnail", str(thumbnail), "--min_timestep", "100"]
    final = train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, "--max_train_steps", "1", *metadata_flags))
    with safe_open(str(final), "pt") as file:
        metadata = file.metadata()
    assert (metadata["modelspec.title"], metadata["modelspec.author"]) == ("Red shapes", "me")
    assert (metadata["modelspec.license"], metadata["modelspec.tags"]) == ("CC-BY-4.0", "shape,red")
    assert metadata["modelspec.thumbnail"].startswith("data:image/png;base64,")
    assert metadata["modelspec.timestep_range"] == "100,1000" and metadata["modelspec.resolution"] == "64x64"


def test_the_tracker_name_and_config_options_reach_tensorboard(tiny_sd1, tiny_dataset, tmp_path):
    logs = tmp_path / "logs"
    flags = ["--logging_dir", str(logs), "--log_tracker_name", "my_run", "--log_config", "--max_train_steps", "1"]
    train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "out", *flags))
    (run_folder,) = logs.iterdir()
    assert (run_folder / "my_run").is_dir()
    assert any(path.name.startswith("events.out") for path in (run_folder / "my_run").rglob("*"))
