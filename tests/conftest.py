"""Test-wide guards: no network (sockets to anything but this machine fail), no hub downloads; and the fixtures
several test files share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
}
os.environ.update(OFFLINE_ENVIRONMENT)

_real_connect = socket.socket.connect


def _local_only_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family == socket.AF_UNIX or host in ("127.0.0.1", "localhost", "::1"):
        return _real_connect(self, address)
    raise ConnectionRefusedError(f"tests are offline: connection to {address!r} blocked")


socket.socket.connect = _local_only_connect


@pytest.fixture(scope="session", autouse=True)
def empty_hf_home(tmp_path_factory):
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))


def run_script(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, offline; returns the finished process."""
    environment = {**os.environ, **OFFLINE_ENVIRONMENT, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *arguments], cwd=cwd or ROOT, capture_output=True, text=True, env=environment, timeout=600
    )


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> (model, single .safetensors file, Diffusers folder), written once per test session."""
    from library.model_files.family import ModelFamily
    from library.model_files.stable_diffusion import save_diffusers_folder, save_stable_diffusion_checkpoint
    from library.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny_models")
    made = {}
    for seed, family in enumerate(ModelFamily):
        model = make_tiny_model(family, seed=seed)
        single_file = folder / f"tiny-{family.value}.safetensors"
        save_stable_diffusion_checkpoint(model, single_file)
        save_diffusers_folder(model, folder / f"tiny-{family.value}")
        made[family] = (model, single_file, folder / f"tiny-{family.value}")
    return made


@pytest.fixture(scope="session")
def tiny_sd1(tiny_checkpoints):
    """The tiny SD1 model as a single .safetensors file."""
    from library.model_files.family import ModelFamily

    return tiny_checkpoints[ModelFamily.SD1][1]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A DreamBooth folder of 4 captioned images x 5 repeats: 20 batches of one per epoch."""
    from library.tiny_models import make_tiny_dataset

    folder = tmp_path_factory.mktemp("data")
    make_tiny_dataset(folder, images=4, repeats=5)
    return folder


@pytest.fixture
def routed_products(monkeypatch) -> list[int]:
    """The row counts of the products library/cpu_layers.py routes through oneDNN in the test: forward, and the
    input's gradient in the backward."""
    from library import cpu_layers

    seen, apply = [], cpu_layers._FrozenProduct.apply

    def counting(x, weight, bias):
        seen.append(x.shape[0])
        return apply(x, weight, bias)

    monkeypatch.setattr(cpu_layers._FrozenProduct, "apply", counting)
    return seen
