"""--config_file / --output_config: options from a TOML file (any sections), the command line winning, bad keys and
values refused with the file named, and --output_config writing what a later --config_file reads back."""

from __future__ import annotations

import pytest
from conftest import run_script

from library.errors import UserError
from library.training.arguments import build_parser
from library.training.config_file import parse_arguments, write_config_file

REQUIRED = [
    "--pretrained_model_name_or_path",
    "model.safetensors",
    "--output_dir",
    "out",
    "--network_module",
    "networks.lora",
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def parse(*argv):
    return parse_arguments(build_parser(), list(argv))


def test_options_come_from_any_section_and_the_command_line_wins(tmp_path):
    config = write(
        tmp_path / "run.toml",
        """
pretrained_model_name_or_path = "base.safetensors"
output_dir = "out"
network_module = "networks.lora"
[training]
learning_rate = "1e-4"
max_train_steps = 400
gradient_checkpointing = true
[network.arguments]
network_args = ["conv_dim=4", "conv_alpha=1"]
""",
    )
    args = parse("--config_file", str(tmp_path / "run"), "--max_train_steps", "50")  # .toml is added
    assert args.pretrained_model_name_or_path == "base.safetensors"
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)  # converted as on the command line
    assert args.max_train_steps == 50
    assert args.gradient_checkpointing is True
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert config.is_file()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("learning_rat = 1e-4\n", "learning_rat is not an option of this script; did you mean learning_rate?"),
        ('max_train_steps = "many"\n', "invalid int value: 'many'"),
        ('mixed_precision = "fp8"\n', "invalid choice: 'fp8'"),
        ('cache_latents = "yes"\n', "cache_latents is a switch; write cache_latents = true or false"),
        ("seed = 1\n[more]\nseed = 2\n", "seed is given twice"),
        ("seed = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_sentence_naming_it(tmp_path, text, fragment):
    write(tmp_path / "run.toml", text)
    with pytest.raises(UserError) as raised:
        parse("--config_file", str(tmp_path / "run.toml"), *REQUIRED)
    assert str(tmp_path / "run.toml") in str(raised.value) and fragment in str(raised.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse("--config_file", str(tmp_path / "absent.toml"), *REQUIRED)


def test_output_config_writes_the_changed_options_that_read_back_the_same(tmp_path):
    parser = build_parser()
    argv = [
        *REQUIRED,
        "--learning_rate",
        "1e-4",
        "--cache_latents",
        "--network_args",
        "conv_dim=4",
        "--config_file",
        str(tmp_path / "saved"),
        "--output_config",
    ]
    args = parse_arguments(parser, argv)
    file = write_config_file(args, parser)
    text = file.read_text()
    assert file.name == "saved.toml" and "learning_rate = 0.0001" in text and "cache_latents = true" in text
    assert "max_train_steps" not in text and "output_config" not in text  # defaults and the file options are left out
    again = parse("--config_file", str(file))
    assert {key: value for key, value in vars(again).items() if key not in ("config_file", "output_config")} == {
        key: value for key, value in vars(args).items() if key not in ("config_file", "output_config")
    }
    with pytest.raises(UserError, match="exists already"):
        write_config_file(args, parser)


def test_train_network_output_config_writes_the_file_and_exits(tmp_path):
    finished = run_script(
        "train_network.py",
        *REQUIRED,
        "--max_train_steps",
        "7",
        "--config_file",
        str(tmp_path / "run.toml"),
        "--output_config",
    )
    assert finished.returncode == 0, finished.stderr
    assert "max_train_steps = 7" in (tmp_path / "run.toml").read_text()
    assert not (tmp_path / "out").exists()
