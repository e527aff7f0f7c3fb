"""What the benchmarks share: the results file, the device's name, the real-size SD1.5 U-Net with random weights."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results.jsonl")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def record_result(record: dict) -> None:
    """Print the result and append it as one JSON line to bench/results.jsonl."""
    print(json.dumps(record))
    with RESULTS.open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_sd15_unet(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The SD1.5 U-Net with random weights (seed 0), frozen, on `device` in `dtype`."""
    from diffusers import UNet2DConditionModel

    from library.model_files.architecture import shipped_config
    from library.model_files.family import ModelFamily

    config = {key: value for key, value in shipped_config(ModelFamily.SD1, "unet").items() if not key.startswith("_")}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device)
    if dtype != torch.float32:
        unet.to(dtype)
    unet.requires_grad_(False)
    return unet
