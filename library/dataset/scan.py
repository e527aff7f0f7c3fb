"""Finding a subset's images and captions, and checking them before training starts (specs/training.md sections
1.3, 2.1): missing or empty folders, images without captions, unreadable or truncated images, non-UTF-8 captions."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from library.dataset.captions import caption_file_for, read_caption
from library.dataset.config import FINE_TUNING, IMAGE_SUFFIXES, DatasetConfig, Problems, SubsetConfig
from library.errors import UserError

DEFAULT_CAPTION_EXTENSION = ".caption"
FALLBACK_CAPTION_EXTENSION = ".txt"
MISSING_CAPTIONS_NAMED = 5


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: tuple[int, int]  # (width, height), read from the file's header
    caption: str


@dataclass(frozen=True)
class ScannedSubset:
    subset: SubsetConfig
    images: tuple[ImageRecord, ...]
    caption_extension: str  # the extension the captions were read with
    missing_captions: tuple[Path, ...]


def scan_datasets(
    datasets: list[DatasetConfig], problems: Problems, skip_bad_images: bool
) -> list[list[ScannedSubset]]:
    """Every subset of every dataset scanned; problems and notes go to `problems`."""
    return [
        [_scan_subset(subset, dataset.style, problems, skip_bad_images) for subset in dataset.subsets]
        for dataset in datasets
    ]


def _scan_subset(subset: SubsetConfig, style: str, problems: Problems, skip_bad_images: bool) -> ScannedSubset:
    if style == FINE_TUNING:
        return _scan_metadata_subset(subset, problems, skip_bad_images)
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        problems.add(f"{subset.where}: image_dir '{folder}' is not a folder; check the path.")
        return ScannedSubset(subset, (), subset.caption_extension, ())
    paths = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        problems.add(
            f"{subset.where}: image_dir '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)});"
            " put the images directly in it."
        )
        return ScannedSubset(subset, (), subset.caption_extension, ())
    extension = _caption_extension(paths, subset.caption_extension)
    if extension != _dotted(subset.caption_extension):
        problems.note(
            f"{folder}: no {subset.caption_extension} files, so the captions are read from the {extension} files."
        )
    images, missing = [], []
    for path in paths:
        size = _image_size(path, subset.where, problems, skip_bad_images)
        if size is None:
            continue
        caption_file = caption_file_for(path, extension)
        if caption_file is None:
            missing.append(path)
            caption = subset.class_tokens or ""
        else:
            try:
                caption = read_caption(caption_file, subset.enable_wildcard)
            except UserError as error:
                problems.add(str(error))
                continue
        images.append(ImageRecord(path, size, caption))
    if missing:
        named = ", ".join(path.name for path in missing[:MISSING_CAPTIONS_NAMED]) + (
            ", ..." if len(missing) > MISSING_CAPTIONS_NAMED else ""
        )
        fallback = f"the class tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
        problems.note(
            f"{folder}: {len(missing)} of {len(paths)} images have no {extension} caption and use {fallback}: {named}."
        )
    if subset.conditioning_data_dir:
        _check_masks(subset, images, problems, skip_bad_images)
    return ScannedSubset(subset, tuple(images), extension, tuple(missing))


def _check_masks(subset: SubsetConfig, images: list[ImageRecord], problems: Problems, skip_bad_images: bool) -> None:
    """conditioning_data_dir: one mask image per image, of the same name and size, and nothing else."""
    folder = Path(subset.conditioning_data_dir)
    where = f"{subset.where}: conditioning_data_dir '{folder}'"
    if not folder.is_dir():
        problems.add(f"{where} is not a folder; check the path.")
        return
    masks = {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
    missing = [image.path.name for image in images if image.path.stem not in masks]
    if missing:
        problems.add(
            f"{where} has no mask for {len(missing)} of {len(images)} images (first: {missing[0]}); add a mask image"
            " of the same name for each (its red channel weighs the loss)."
        )
    extra = sorted(set(masks) - {image.path.stem for image in images})
    if extra:
        problems.add(
            f"{where} holds {len(extra)} masks without an image of the same name (first: {masks[extra[0]].name});"
            " remove them or add their images."
        )
    for image in images:
        mask = masks.get(image.path.stem)
        size = mask and _image_size(mask, subset.where, problems, skip_bad_images)
        if size and size != image.size:
            problems.add(
                f"{where}: the mask {mask.name} is {size[0]}x{size[1]} but its image is "
                f"{image.size[0]}x{image.size[1]};"
                " a mask must have its image's size."
            )
            return


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension


def _caption_extension(paths: list[Path], configured: str) -> str:
    """The configured extension; with sd-scripts' default `.caption`, `.txt` when only `.txt` captions exist."""
    configured = _dotted(configured)
    if configured != DEFAULT_CAPTION_EXTENSION or any(path.with_suffix(configured).exists() for path in paths):
        return configured
    if any(path.with_suffix(FALLBACK_CAPTION_EXTENSION).exists() for path in paths):
        return FALLBACK_CAPTION_EXTENSION
    return configured


def _image_size(path: Path, where: str, problems: Problems, skip_bad_images: bool) -> tuple[int, int] | None:
    """The size from the header, or None for a file that cannot be an intact image (reported)."""
    try:
        with Image.open(path) as image:
            size, image_format = image.size, image.format
        damage = "it is truncated" if _looks_truncated(path, image_format) else None
    except (UnidentifiedImageError, OSError, ValueError, struct.error) as error:
        damage = f"it cannot be read as an image ({error})"
    if damage is None:
        return size
    if skip_bad_images:
        problems.note(f"{path}: skipped, {damage}.")
    else:
        problems.add(
            f"{where}: {path}: {damage}; replace or delete it, or pass --skip_bad_images to leave such files out."
        )
    return None


def _looks_truncated(path: Path, image_format: str | None) -> bool:
    """Cheap end-of-file checks that catch interrupted downloads and copies without decoding the image."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        stream.seek(max(0, size - 4096))
        tail = stream.read()
        stream.seek(0)
        head = stream.read(16)
    if image_format == "JPEG":
        return b"\xff\xd9" not in tail  # the end-of-image marker; stuffed entropy data never contains it
    if image_format == "PNG":
        return b"IEND" not in tail[-64:]
    if image_format == "WEBP":
        return struct.unpack("<I", head[4:8])[0] + 8 > size
    return False


def _scan_metadata_subset(subset: SubsetConfig, problems: Problems, skip_bad_images: bool) -> ScannedSubset:
    """A fine-tuning subset: captions and tags from a metadata JSON (or JSON lines) file."""
    metadata_path = Path(subset.metadata_file)
    if not metadata_path.is_file():
        problems.add(f"{subset.where}: metadata_file '{metadata_path}' does not exist; check the path.")
        return ScannedSubset(subset, (), "", ())
    try:
        entries = _read_metadata(metadata_path)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        problems.add(
            f"{subset.where}: metadata_file '{metadata_path}' is not a valid UTF-8 JSON metadata file ({error})."
        )
        return ScannedSubset(subset, (), "", ())
    images = []
    for key, entry in entries.items():
        path = Path(key)
        if not path.is_absolute():
            if not subset.image_dir:
                problems.add(
                    f"{subset.where}: '{key}' in {metadata_path} is a relative path;"
                    " set image_dir to the folder it is relative to."
                )
                return ScannedSubset(subset, (), "", ())
            path = Path(subset.image_dir) / key
        size = _image_size(path, subset.where, problems, skip_bad_images) if path.exists() else None
        if size is None:
            if not path.exists():
                problems.add(f"{subset.where}: image '{path}' listed in {metadata_path} does not exist.")
            continue
        caption = entry.get("caption") or ""
        if entry.get("tags"):
            caption = f"{caption}{subset.caption_separator}{entry['tags']}" if caption else entry["tags"]
        images.append(ImageRecord(path, size, caption))
    if not images and not problems.messages:
        problems.add(f"{subset.where}: metadata_file '{metadata_path}' lists no images.")
    return ScannedSubset(subset, tuple(images), "", ())


def _read_metadata(path: Path) -> dict[str, dict]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {row["image_path"]: row for row in rows}
    return json.loads(text)
