"""networks/check_lora_weights.py: one line per module with its rank, alpha, scale and norms (the change's norm
checked against the dense product), zero-change, non-finite and alpha-above-rank modules flagged, counts per text
encoder, U-Net and block (checked against the naming table's own block numbers), sd-scripts' -s listing, and exit
status 1 for a file with NaN."""

from __future__ import annotations

import collections
import re

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file, save_file

from library.lora.naming import SD_BLOCKS, text_encoder_targets, unet_targets
from library.model_files.family import ModelFamily
from library.tiny_models import make_tiny_model
from lora_helpers import fill_randomly, text_encoder_argument
from networks.check_lora_weights import check
from networks.lora import create_network


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory):
    model = make_tiny_model(ModelFamily.SD1)
    network = create_network(1.0, 4, 2, None, model.text_encoders[0], model.unet, conv_dim=2, conv_alpha=1)
    fill_randomly(network)
    path = tmp_path_factory.mktemp("check") / "c3lier.safetensors"
    network.save_weights(path)
    return model, path


def test_each_module_is_reported_with_the_norm_of_its_change(sd1_lora, capsys):
    model, path = sd1_lora
    reports = check(path)
    weights = load_file(path)
    assert len(reports) == len({key.split(".")[0] for key in weights})
    for report in reports[::25]:
        up, down = (
            weights[f"{report.name}.lora_up.weight"].double(),
            weights[f"{report.name}.lora_down.weight"].double(),
        )
        alpha = float(weights[f"{report.name}.alpha"])
        dense = (alpha / down.shape[0]) * up.flatten(1) @ down.flatten(1)
        assert report.rank == down.shape[0] and report.scale == alpha / down.shape[0]
        assert report.norms[2] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)
        assert report.norms[0] == pytest.approx(float(down.norm())) and not report.flags
    printed = capsys.readouterr().out
    assert f"{reports[0].name}: LoRA, rank 4, alpha 2, scale 0.5, float32, |down| " in printed


def test_the_summary_counts_modules_per_encoder_unet_and_block_as_the_naming_table_does(sd1_lora, capsys):
    model, path = sd1_lora
    check(path)
    printed = capsys.readouterr().out.splitlines()
    text, unet = text_encoder_targets(model.text_encoders), unet_targets(model.unet, with_conv_containers=True)
    assert printed[-3] == f"{len(text) + len(unet)} modules (SD1.x): te {len(text)}, unet {len(unet)}"
    slots = collections.Counter(target.block for target in unet)  # the key-map route, not the name route
    names = [f"IN{slot:02d}" for slot in range(12)] + ["MID"] + [f"OUT{slot:02d}" for slot in range(12)]
    assert SD_BLOCKS.slots == len(names)
    expected = {names[slot]: count for slot, count in slots.items()}
    found = dict(re.findall(r"(\w+) (\d+)", printed[-2].removeprefix("U-Net modules per block: ")))
    assert {block: int(count) for block, count in found.items()} == expected
    assert printed[-1] == "flagged: none"


def test_zero_nan_and_alpha_above_rank_are_flagged_and_nan_fails_the_script(sd1_lora, tmp_path, capsys):
    _, path = sd1_lora
    weights = load_file(path)
    names = sorted({key.split(".")[0] for key in weights})
    weights[f"{names[0]}.lora_up.weight"].zero_()
    weights[f"{names[1]}.lora_up.weight"][0, 0] = float("nan")
    weights[f"{names[2]}.alpha"] = torch.tensor(64.0)
    broken = tmp_path / "broken.safetensors"
    save_file(weights, broken)
    flags = {report.name: report.flags for report in check(broken)}
    assert flags[names[0]] == ("ZERO CHANGE",) and flags[names[1]] == ("NON-FINITE",)
    assert flags[names[2]] == ("ALPHA > RANK",) and sum(map(bool, flags.values())) == 3
    assert capsys.readouterr().out.splitlines()[-1] == "flagged: 1 ZERO CHANGE, 1 NON-FINITE, 1 ALPHA > RANK"
    finished = run_script("networks/check_lora_weights.py", str(broken), "-s")
    assert finished.returncode == 1 and f"{names[1]}: LoRA" in finished.stdout
    listing = [line for line in finished.stdout.splitlines() if line.count(",") == 4]
    assert len(listing) == len(weights) and f"{names[2]}.alpha,scalar,float32,64,64" in listing


def test_sdxl_files_count_both_text_encoders(tmp_path, capsys):
    model = make_tiny_model(ModelFamily.SDXL)
    network = create_network(1.0, 4, 4, None, text_encoder_argument(model), model.unet)
    network.save_weights(tmp_path / "sdxl.safetensors")
    reports = check(tmp_path / "sdxl.safetensors")
    counts = collections.Counter(report.name.split("_")[1] for report in reports)
    summary = capsys.readouterr().out.splitlines()[-3]
    assert summary == (
        f"{len(reports)} modules (SDXL): te1 {counts['te1']}, te2 {counts['te2']}, unet {counts['unet']}"
    )
    assert all(report.flags == ("ZERO CHANGE",) for report in reports)  # a fresh network: up = 0 everywhere
