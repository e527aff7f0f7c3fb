"""Writing files so that an interrupted save never leaves a truncated output behind, and output paths refused
before any work when nothing could be written there or the output would replace an input."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from library.errors import UserError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes. The file gets the
    mode a plain `open` would give it (the temporary file is private until then)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder is in the way of the file to write; give another file name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as error:
        raise _cannot_write(path, error) from None
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `folder`; put it in the place of `folder` (replacing an old one) only if the
    block finishes, with the mode a plain mkdir would give it."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    except OSError as error:
        raise _cannot_write(folder, error) from None
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())
        _replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cannot_write(path: Path, error: OSError) -> UserError:
    return UserError(f"{path}: cannot write here ({error.strerror}); choose a folder you may write to.")


def _replace_folder(staging: Path, folder: Path) -> None:
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, folder)


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def check_output_file(path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """`path`, refused in one sentence when it is a folder, when its folder cannot be made or written to, or when it
    is one of the `inputs` (which the output would replace)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: a folder, not a file; give a file name such as {path / 'output'}.")
    if any(_entry(path) == Path(os.path.realpath(source)) for source in inputs):
        raise UserError(f"{option} {path}: this is also an input, which writing would replace; give another name.")
    _check_writable(path.parent, f"{option} {path}")
    return path


def check_output_folder(folder: str | os.PathLike, option: str) -> Path:
    """`folder`, refused in one sentence when it is a file or cannot be made or written to."""
    folder = Path(folder)
    _check_writable(folder, f"{option} {folder}")
    return folder


def _entry(path: Path) -> Path:
    """The folder entry that writing `path` replaces (a link named `path` is replaced, not what it points to)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _check_writable(folder: Path, named: str) -> None:
    """Checked on the nearest existing ancestor of `folder`, so that nothing is created before the work starts."""
    existing = next(parent for parent in (folder, *folder.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{named}: {existing} is a file, not a folder; choose another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{named}: this user may not write in {existing}; choose another folder.")
