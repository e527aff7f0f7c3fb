"""Where outputs go: refused before any work when nothing could be written there or an input would be replaced,
written with the mode a plain open() gives, and never half-written."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import library.file_io as file_io
from library.errors import UserError, run_cli
from library.file_io import atomic_folder, atomic_output, check_output_file, check_output_folder
from library.lora.files import check_lora_output
from library.model_files.containers import open_checkpoint
from tools.convert_lora import convert


@pytest.fixture
def umask_027():
    """Run with umask 027, so that the expected modes differ from both mkstemp's 600 and the usual 644."""
    file_io._umask.cache_clear()
    previous = os.umask(0o027)
    yield
    os.umask(previous)
    file_io._umask.cache_clear()


def test_a_saved_file_and_folder_get_the_mode_a_plain_open_gives(umask_027, tmp_path):
    with atomic_output(tmp_path / "lora.safetensors") as temporary:
        temporary.write_bytes(b"x")
    with atomic_folder(tmp_path / "model") as staging:
        (staging / "model_index.json").write_text("{}")
    with open(tmp_path / "plain", "w"):
        pass
    (tmp_path / "plain_folder").mkdir()
    assert (tmp_path / "lora.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "model").stat().st_mode & 0o777 == (tmp_path / "plain_folder").stat().st_mode & 0o777
    assert (tmp_path / "lora.safetensors").stat().st_mode & 0o777 == 0o640


def test_a_folder_save_replaces_the_old_folder_only_when_finished(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staging:
            (staging / "new.json").write_text("new")
            raise RuntimeError("interrupted")
    assert [path.name for path in tmp_path.iterdir()] == ["model"] and (target / "old.json").exists()
    with atomic_folder(target) as staging:
        (staging / "new.json").write_text("new")
    assert [path.name for path in target.iterdir()] == ["new.json"]
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_file_that_cannot_be_written_is_one_sentence(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(UserError, match="not_a_folder/out.safetensors: cannot write here"):
        with atomic_output(blocker / "out.safetensors"):
            pass
    (tmp_path / "taken.safetensors").mkdir()
    with pytest.raises(UserError, match="taken.safetensors: a folder is in the way"):
        with atomic_output(tmp_path / "taken.safetensors"):
            pass
    assert sorted(path.name for path in tmp_path.iterdir()) == ["not_a_folder", "taken.safetensors"]


def test_outputs_are_checked_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("")
    source = tmp_path / "input.safetensors"
    source.write_text("")
    with pytest.raises(UserError, match="--save_to .*folder.safetensors: a folder, not a file"):
        check_output_file(tmp_path / "folder.safetensors", "--save_to")
    (tmp_path / "sub").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path)
    for same in (tmp_path / "sub" / ".." / "input.safetensors", tmp_path / "linked" / "input.safetensors"):
        with pytest.raises(UserError, match="--save_to .*input.safetensors: this is also an input"):
            check_output_file(same, "--save_to", [source])
    (tmp_path / "link.safetensors").symlink_to(source)  # writing replaces the link, not the input
    assert check_output_file(tmp_path / "link.safetensors", "--save_to", [source])
    with pytest.raises(UserError, match="--output_dir .*file/out: .*file is a file, not a folder"):
        check_output_folder(tmp_path / "file" / "out", "--output_dir")
    assert check_output_file(tmp_path / "other.safetensors", "--save_to", [source]) == tmp_path / "other.safetensors"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, who may write anywhere
    with pytest.raises(UserError, match=f"--outdir .*new/deeper: this user may not write in {tmp_path};"):
        check_output_folder(tmp_path / "new" / "deeper", "--outdir")
    with pytest.raises(UserError, match=f"--save_to .*new/out.safetensors: this user may not write in {tmp_path};"):
        check_output_file(tmp_path / "new" / "out.safetensors", "--save_to")
    assert not (tmp_path / "new").exists()


def test_a_lora_tool_refuses_to_write_over_its_input(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}, lora
    )
    before = lora.read_bytes()
    with pytest.raises(UserError, match="the output .*lora.safetensors: this is also an input"):
        convert(lora, lora)
    with pytest.raises(UserError, match="--save_to .*lora.safetensors: this is also an input"):
        check_lora_output(os.path.relpath(lora), [lora])
    assert lora.read_bytes() == before


def test_an_input_that_is_a_folder_or_unreadable_is_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=f"{tmp_path}: a folder, not a file; give the .safetensors or .ckpt file"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="model.safetensors: this user may not read the file"):
        open_checkpoint(tmp_path / "model.safetensors")


def test_a_file_the_user_may_not_touch_ends_a_script_in_one_sentence(capsys):
    def main():
        raise PermissionError(13, "Permission denied", "/data/prompts.txt")

    with pytest.raises(SystemExit) as exit_status:
        run_cli(main)
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == (
        "error: /data/prompts.txt: permission denied; change its permissions or give another path.\n"
    )
