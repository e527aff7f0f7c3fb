"""What the precision flags (`--precision`, `--save_precision`, `--load_precision`, ...) and the device flags
(`--device`, ...) mean. Kept apart from the model loaders so that light tools need not import diffusers to read a
flag."""

from __future__ import annotations

import torch

from library.errors import UserError

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_CHOICES = ("float", "fp16", "bf16")  # what sd-scripts' flags accept
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed_precision


def parse_precision(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """`--save_precision`/`--precision` values (float, fp16, bf16) -> dtype; None keeps `default`."""
    if name is None:
        return default
    if name not in PRECISIONS:
        raise UserError(f"unknown precision '{name}'; use one of float, fp16, bf16.")
    return PRECISIONS[name]


def parse_device(flag: str, name: str | None) -> torch.device:
    """A device flag's value (None: the CPU), refused with one sentence when it is malformed or not present here."""
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name}: not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"{flag} {name}: this machine has no CUDA device usable by PyTorch; leave {flag} out to use the CPU."
        )
    return device
