"""The documentation's "Try it" commands run as written, and do what the text beside them says."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import OFFLINE_ENVIRONMENT, ROOT


def try_it_commands(document: str) -> list[str]:
    """The lines of the first bash block after the document's '## Try it' heading."""
    text = (ROOT / "docs" / document).read_text(encoding="utf-8")
    section = text.split("## Try it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def run_as_user(command: str, cwd) -> subprocess.CompletedProcess:
    """A `python tools/...` line run from a folder where tools/ is the project's, with this test's Python."""
    arguments = shlex.split(command)
    assert arguments[0] == "python", command
    environment = {**os.environ, **OFFLINE_ENVIRONMENT, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *arguments[1:]], cwd=cwd, capture_output=True, text=True, env=environment, timeout=600)


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
    assert "bucket 0: resolution (64, 64), count: 60" in shown.stdout and "bucket 1: resolution (64, 128), count: 20" in shown.stdout
    assert sorted(path.name for path in (tmp_path / "tiny" / "debug_dataset").iterdir()) == ["dataset0_bucket_64x128.png", "dataset0_bucket_64x64.png"]
