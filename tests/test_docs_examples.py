"""The documentation's "Try it" commands run as written, and do what the text beside them says."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import OFFLINE_ENVIRONMENT, ROOT
from safetensors import safe_open
from safetensors.torch import load_file


def try_it_commands(document: str, heading: str = "## Try it") -> list[str]:
    """The lines of the first bash block after `heading` in the document."""
    text = (ROOT / "docs" / document).read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def run_as_user(command: str, cwd) -> subprocess.CompletedProcess:
    """A `python tools/...` line run from a folder where tools/ is the project's, with this test's Python."""
    arguments = shlex.split(command)
    assert arguments[0] == "python", command
    environment = {**os.environ, **OFFLINE_ENVIRONMENT, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *arguments[1:]], cwd=cwd, capture_output=True, text=True, env=environment, timeout=600
    )


@pytest.mark.slow
def test_dataset_guide_commands(tmp_path):
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    make, cache, reuse, debug = try_it_commands("datasets.md")
    for command in (make, cache):
        assert run_as_user(command, tmp_path).returncode == 0, command
    image_dir = tmp_path / "tiny" / "dataset" / "10_shp shape"
    assert (image_dir / "000_0064x0064_sd.npz").is_file()
    reused = run_as_user(reuse, tmp_path)
    assert "0 images encoded" in reused.stdout and "8 up-to-date cache files reused" in reused.stdout
    shown = run_as_user(debug, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert (
        "bucket 0: resolution (64, 64), count: 60" in shown.stdout
        and "bucket 1: resolution (64, 128), count: 20" in shown.stdout
    )
    assert sorted(path.name for path in (tmp_path / "tiny" / "debug_dataset").iterdir()) == [
        "dataset0_bucket_64x128.png",
        "dataset0_bucket_64x64.png",
    ]


def run_line(command: str, cwd) -> subprocess.CompletedProcess:
    """A "Try it" line: `python ...` as `run_as_user` runs it, anything else (such as `echo ... > file`) with bash."""
    if command.startswith("python "):
        return run_as_user(command, cwd)
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_training_guide_commands(tmp_path):
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    (tmp_path / "train_network.py").symlink_to(ROOT / "train_network.py")
    commands = try_it_commands("training.md")
    assert len(commands) == 6
    for command in commands[:2]:  # the tiny model and dataset, the prompt file
        finished = run_line(command, tmp_path)
        assert finished.returncode == 0, finished.stderr

    trained = run_line(commands[2], tmp_path)
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "tiny" / "out"
    assert "network: networks.lora, rank 4, alpha 1 (scale 0.25)" in trained.stdout
    assert "text encoder: frozen, each caption encoded once at its first use" in trained.stdout
    assert sorted(path.name for path in out.iterdir()) == [
        "demo-state",
        "demo-step00000010-state",
        "demo-step00000010.safetensors",
        "demo.safetensors",
        "sample",
    ]
    assert (out / "demo-step00000010-state" / "train_state.json").is_file()
    samples = sorted(path.name for path in (out / "sample").iterdir())
    assert [name.split("_")[1] for name in samples] == ["000010", "000020", "e000000"] and all(
        name.endswith("_1.png") for name in samples
    )

    resumed = run_line(commands[3], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming tiny/out/demo-step00000010-state: epoch 1, step 10" in resumed.stdout
    again, first = load_file(tmp_path / "tiny" / "resumed" / "demo.safetensors"), load_file(out / "demo.safetensors")
    assert again.keys() == first.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=1e-5, atol=1e-7, msg=key)

    write_config = run_line(commands[4], tmp_path)
    assert write_config.returncode == 0, write_config.stderr
    assert "learning_rate = 0.001" in (tmp_path / "tiny" / "run.toml").read_text()
    assert not (tmp_path / "tiny" / "from_config").exists()
    from_config = run_line(commands[5], tmp_path)
    assert from_config.returncode == 0, from_config.stderr
    with safe_open(tmp_path / "tiny" / "from_config" / "demo.safetensors", "pt") as file:
        assert file.metadata()["ss_steps"] == "5"


@pytest.mark.slow
def test_extract_guide_commands(tmp_path):
    for folder in ("tools", "networks"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    for command in try_it_commands("lora_tools.md", "## `networks/extract_lora_from_models.py`"):
        finished = run_as_user(command, tmp_path)
        assert finished.returncode == 0, f"{command}\n{finished.stderr}"
    assert "saved tiny/out/extracted.safetensors: 295 modules (18 text encoder, 277 U-Net)" in finished.stdout
    assert load_file(tmp_path / "tiny" / "out" / "extracted.safetensors")


def test_check_and_convert_guide_commands(tmp_path):
    for folder in ("tools", "networks"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    finished = [
        run_as_user(line, tmp_path) for line in try_it_commands("lora_tools.md", "### Try it: check and convert")
    ]
    assert all(run.returncode == 0 for run in finished), [run.stderr for run in finished if run.returncode]
    check, to_peft, back = (run.stdout.splitlines() for run in finished[3:])
    assert check[-3:] == [
        "210 modules (SD1.x): te 18, unet 192",
        "U-Net modules per block: IN01 12, IN02 12, IN04 12, IN05 12, IN07 12, IN08 12, MID 12, OUT03 12, OUT04 12,"
        " OUT05 12, OUT06 12, OUT07 12, OUT08 12, OUT09 12, OUT10 12, OUT11 12",
        "flagged: none",
    ]
    assert to_peft == ["saved tiny/out/diff_peft.safetensors: 210 modules in diffusers form"]
    assert back == ["saved tiny/out/diff_again.safetensors: 210 modules in kohya form"]
    original, again = (
        load_file(tmp_path / "tiny" / "out" / name) for name in ("diff.safetensors", "diff_again.safetensors")
    )
    assert original.keys() == again.keys() and all(torch.equal(again[key], original[key]) for key in original)


@pytest.mark.slow
def test_generation_guide_commands(tmp_path):
    from PIL import Image

    (tmp_path / "tools").symlink_to(ROOT / "tools")
    for script in ("train_network.py", "gen_img_diffusers.py"):
        (tmp_path / script).symlink_to(ROOT / script)
    finished = [run_line(command, tmp_path) for command in try_it_commands("generation.md")]
    assert all(run.returncode == 0 for run in finished), [run.stderr for run in finished if run.returncode]
    assert "applied tiny/loras/shapes.safetensors (networks.lora) with multiplier 0.8" in finished[2].stdout
    [applied], [merged] = (list((tmp_path / "tiny" / folder).glob("im_*_000_1.png")) for folder in ("images", "merged"))
    difference = np.abs(
        np.asarray(Image.open(applied), dtype=np.int16) - np.asarray(Image.open(merged), dtype=np.int16)
    )
    assert difference.max() <= 2
    names = sorted(path.name.split("_", 2)[2] for path in (tmp_path / "tiny" / "from_file").iterdir())
    assert names == ["000_12.png", "000_5.png", "001_13.png", "001_6.png"]
    assert Image.open(next((tmp_path / "tiny" / "from_file").glob("*_000_5.png"))).size == (64, 128)
    [sheet] = (tmp_path / "tiny" / "grid").glob("grid_*.png")
    assert Image.open(sheet).size == (192 + 2 * 68, 24 + 2 * 132)  # two columns, two rows; cells of the largest
