"""Checkpoint containers: `.safetensors` and `.ckpt`/`.pt` files, opened lazily.

The safetensors reader parses the header itself (so shapes are known before any tensor is read, and a truncated
file is named as such) and hands out tensors that are views of a private memory map: loading a model costs the
model's memory and nothing more. The writer streams tensors one at a time in the safetensors library's own layout.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from library.file_io import atomic_output

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# The order in which the safetensors library lays out tensor data (then by name): widest first, so every tensor
# starts aligned to its element size. Writing in the same order makes our files byte-identical to the library's.
SAFETENSORS_DATA_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
_HEADER_LIMIT = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointFile:
    """A read-only mapping of key -> tensor, opened lazily: shapes are known before any tensor is read."""

    path: Path
    metadata: dict[str, str]

    def info(self) -> Mapping[str, TensorInfo]:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Let go of the memory that reading `key` brought in, once no tensor views it (a copy was kept instead)."""

    def keys(self) -> Iterable[str]:
        return self.info().keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info()[key].shape

    def __contains__(self, key: str) -> bool:
        return key in self.info()


class SafetensorsFile(CheckpointFile):
    """Tensors are views of a private (copy-on-write) memory map: nothing is read until a tensor is used, the pages
    are the page cache's own, and writing into a tensor never changes the file."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors, self.metadata, self._data_start = _read_safetensors_header(path)
        with open(path, "rb") as stream:
            self._map = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)

    def info(self) -> Mapping[str, TensorInfo]:
        return {key: entry[0] for key, entry in self._tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        info, begin, end = self._tensors[key]
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin)
        if (self._data_start + begin) % info.dtype.itemsize:
            raw = raw.clone()  # a tensor not aligned to its element size cannot be viewed in place
        return raw.view(info.dtype).reshape(info.shape)

    def release(self, key: str) -> None:
        """Drop the tensor's pages from this process's memory. The map is private and never written, so a page read
        again later comes back from the file unchanged; without this, every page read while loading stays counted in
        the process's memory until the whole map closes, doubling the peak of a load that converts dtypes."""
        _, begin, end = self._tensors[key]
        first = -(-(self._data_start + begin) // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (self._data_start + end) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


class PickleCheckpointFile(CheckpointFile):
    """A `.ckpt`/`.pt` file, opened with `weights_only=True` so that it cannot run code."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        self._tensors = {key: value for key, value in load_pickle_dict(path).items() if isinstance(value, torch.Tensor)}

    def info(self) -> Mapping[str, TensorInfo]:
        return {key: TensorInfo(tuple(t.shape), t.dtype) for key, t in self._tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def open_checkpoint(path: str | os.PathLike) -> CheckpointFile:
    """Open a single-file checkpoint (or LoRA) by its extension; bad files raise a one-sentence UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a file; give the .safetensors or .ckpt file.")
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path (a Diffusers model is a folder, not a file).")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: this user may not read the file; change its permissions or give a readable copy.")
    if path.suffix.lower() == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return PickleCheckpointFile(path)
    raise UserError(f"{path}: unknown file type '{path.suffix}'; expected .safetensors or .ckpt.")


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[TensorInfo, int, int]], dict[str, str], int]:
    size = path.stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path}: the file is empty or truncated, not a safetensors file; copy it again.")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_HEADER_LIMIT, size - 8):
            raise UserError(
                f"{path}: not a valid safetensors file (bad header length); it is truncated or of another format."
            )
        try:
            header = json.loads(stream.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(
                f"{path}: not a valid safetensors file (unreadable header); it is truncated or of another format."
            ) from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a valid safetensors file (its header is not a table of tensors).")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_size
    tensors = {}
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(offset) for offset in entry["data_offsets"])
            shape = tuple(int(dim) for dim in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{path}: tensor '{key}' has an unreadable entry in the safetensors header; the file is damaged."
            ) from None
        tensors[key] = (TensorInfo(shape, dtype), begin, end)
    data_end = max((end for _, _, end in tensors.values()), default=0)
    if data_start + data_end > size:
        raise UserError(
            f"{path}: the file is truncated ({size:,} bytes, its header promises {data_start + data_end:,});"
            " download or copy it again."
        )
    return tensors, {str(k): str(v) for k, v in metadata.items()}, data_start


def load_pickle_dict(path: Path) -> dict:
    """A `.ckpt`/`.pt` file's dictionary (its `state_dict` when it has one), opened with `weights_only=True`."""
    mmap = zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Unsupported" in str(error):
            raise UserError(
                f"{path}: this .ckpt holds pickled Python objects besides tensors, which could run code when opened, "
                "so it is refused; convert it to .safetensors with a tool you trust."
            ) from None
        raise UserError(f"{path}: not a readable .ckpt file ({error}); it is truncated or of another format.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(
            f"{path}: not a readable .ckpt file ({str(error).splitlines()[0]}); it is truncated or damaged."
        ) from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: the .ckpt holds a {type(loaded).__name__}, not a dictionary of tensors.")
    return loaded


TensorSource = Callable[[], torch.Tensor]


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, tuple[TensorInfo, TensorSource]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors one at a time (each produced on demand), atomically, laid out exactly as the safetensors
    library lays them out. Peak memory is one tensor."""
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        for chunk in safetensors_chunks(tensors, metadata):
            stream.write(chunk)


def safetensors_chunks(
    tensors: Mapping[str, tuple[TensorInfo, TensorSource]], metadata: Mapping[str, str] | None = None
) -> Iterator[memoryview | bytes]:
    """The bytes of a safetensors file, in order: the length and header first, then each tensor's data. The metadata
    is sorted by key, so the same tensors and metadata always give the same bytes."""
    order = sorted(
        tensors, key=lambda key: (SAFETENSORS_DATA_ORDER.index(SAFETENSORS_DTYPE_NAMES[tensors[key][0].dtype]), key)
    )
    header, offset = {}, 0
    if metadata is not None:  # as the library does, an empty dict is still written
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for key in order:
        info = tensors[key][0]
        nbytes = math.prod(info.shape) * info.dtype.itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    yield struct.pack("<Q", len(encoded)) + encoded
    for key in order:
        info, source = tensors[key]
        tensor = source().detach().to(device="cpu", dtype=info.dtype).contiguous()
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected {info.shape}")
        yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def save_state_dict(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    epoch: int = 0,
    global_step: int = 0,
) -> None:
    """Save tensors as `.safetensors` (with metadata) or `.ckpt`/`.pt` (wrapped in `state_dict`), atomically."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        write_safetensors(path, tensor_sources(tensors), metadata)
        return
    with atomic_output(path) as temporary:
        torch.save(
            {
                "state_dict": {key: t.detach().cpu().contiguous() for key, t in tensors.items()},
                "epoch": epoch,
                "global_step": global_step,
            },
            temporary,
        )


def tensor_sources(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[TensorInfo, TensorSource]]:
    """Tensors already in memory, in the form the safetensors writer takes."""
    return {key: (TensorInfo(tuple(t.shape), t.dtype), _constant(t)) for key, t in tensors.items()}


def _constant(tensor: torch.Tensor) -> TensorSource:
    return lambda: tensor
