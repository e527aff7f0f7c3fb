"""What the datasets will train on, said before anything heavy starts: the start-up summary of every dataset, and
`--debug_dataset`, which prints the buckets with their counts and a few captions as they will be trained, and
writes a contact sheet PNG of one batch per bucket."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from transformers import CLIPTokenizer

from library.dataset.buckets import bucket_summary_lines, mean_aspect_error
from library.dataset.loader import BatchKey, BatchSettings, EpochBatches, TrainingBatches
from library.dataset.plan import DatasetPlan
from library.file_io import atomic_output

CAPTIONS_SHOWN_PER_BUCKET = 3
SHEET_TILE = 256  # the longer side of each image on a contact sheet
SHEET_GAP = 8
SHEET_COLUMNS = 8
SHEET_LABEL_LINES = 4
SHEET_LINE_HEIGHT = 12
SHEET_BACKGROUND = (32, 32, 32)


def dataset_summary_lines(plans: Sequence[DatasetPlan]) -> list[str]:
    """Per dataset: resolution, bucketing, batch size, images and repeats per subset, the regularization balance,
    the buckets with their counts and the batches per epoch."""
    lines = []
    for plan in plans:
        config = plan.config
        width, height = config.resolution
        bucketing = "on" if config.enable_bucket else "off"
        lines.append(
            f"{config.where}: {config.style}, resolution {width}x{height}, buckets {bucketing},"
            f" batch size {config.batch_size}"
        )
        for subset in config.subsets:
            members = [sample for sample in plan.samples if sample.subset == subset]
            source = subset.image_dir or subset.metadata_file
            kind = "regularization images" if subset.is_reg else "images"
            repeats = sorted({sample.repeats for sample in members})
            shown = str(repeats[0]) if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]}" if repeats else "0"
            lines.append(f"  {source}: {len(members)} {kind} x {shown} repeats")
        lines.append(
            f"  {plan.num_train_images} training samples, {plan.num_reg_images} regularization samples"
            " per epoch before balancing"
        )
        lines.extend(f"  {line}" for line in bucket_summary_lines(plan.bucket_counts()))
        if config.enable_bucket:
            error = mean_aspect_error((sample.placement, sample.image.size) for sample in plan.samples)
            lines.append(f"  mean aspect ratio error: {error:.4f}")
        lines.append(f"  {plan.batch_count()} batches per epoch")
    return lines


def debug_dataset(
    plans: Sequence[DatasetPlan], tokenizer: CLIPTokenizer, settings: BatchSettings, output_dir: str | Path
) -> tuple[list[str], list[Path]]:
    """The first epoch's first batch of each bucket, built as training will build it (augmentation and caption
    processing included). Returns the lines to print and the contact sheets written to `output_dir`."""
    batches = TrainingBatches(plans, tokenizer, settings)
    lines, sheets = [], []
    for key in _first_batch_per_bucket(EpochBatches(plans, settings.seed).keys(), plans):
        plan = plans[key.dataset]
        bucket = plan.samples[key.samples[0]].placement.bucket
        batch = batches[key]
        lines.append(
            f"{plan.config.where}, bucket {bucket[0]}x{bucket[1]}: {plan.bucket_counts()[bucket]} samples per epoch"
        )
        if batch is None:
            lines.append("  (every image of this batch was unreadable and skipped)")
            continue
        for caption, tokens in zip(batch["captions"][:CAPTIONS_SHOWN_PER_BUCKET], batch["input_ids"]):
            lines.append(f"  caption ({_token_count(tokens, tokenizer)} tokens): {caption!r}")
        sheet = Path(output_dir) / f"dataset{key.dataset}_bucket_{bucket[0]}x{bucket[1]}.png"
        _save_sheet(contact_sheet(batch["images"], [Path(path).name for path in batch["image_paths"]]), sheet)
        sheets.append(sheet)
        lines.append(f"  contact sheet: {sheet}")
    return lines, sheets


def _first_batch_per_bucket(keys: list[BatchKey], plans: Sequence[DatasetPlan]) -> list[BatchKey]:
    chosen: dict[tuple, BatchKey] = {}
    for key in keys:
        bucket = plans[key.dataset].samples[key.samples[0]].placement.bucket
        chosen.setdefault((key.dataset, bucket), key)
    return [chosen[place] for place in sorted(chosen)]


def _token_count(tokens, tokenizer: CLIPTokenizer) -> int:
    """Content tokens of one caption's windows (BOS, EOS and padding left out)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sum(int(token) not in special for token in tokens.flatten())


def contact_sheet(images, labels: Sequence[str]) -> Image.Image:
    """The batch's images ((B, 3, H, W) in [-1, 1]) in a grid of up to SHEET_COLUMNS, each scaled to SHEET_TILE
    on its longer side, with its label (the file name) wrapped below."""
    tiles = [_to_image(pixels) for pixels in images]
    width, height = tiles[0].size
    scale = SHEET_TILE / max(width, height)
    tile_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    cell = (tile_size[0] + SHEET_GAP, tile_size[1] + SHEET_LABEL_LINES * SHEET_LINE_HEIGHT + SHEET_GAP)
    columns = min(len(tiles), SHEET_COLUMNS)
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * cell[0] + SHEET_GAP, rows * cell[1] + SHEET_GAP), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    characters_per_line = max(8, tile_size[0] // 6)
    for index, (tile, label) in enumerate(zip(tiles, labels)):
        left, top = SHEET_GAP + (index % columns) * cell[0], SHEET_GAP + (index // columns) * cell[1]
        sheet.paste(tile.resize(tile_size, Image.Resampling.LANCZOS), (left, top))
        for line_number, line in enumerate(textwrap.wrap(label, characters_per_line)[:SHEET_LABEL_LINES]):
            draw.text((left, top + tile_size[1] + 2 + line_number * SHEET_LINE_HEIGHT), line, fill=(230, 230, 230))
    return sheet


def _to_image(pixels) -> Image.Image:
    array = ((pixels.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _save_sheet(sheet: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        sheet.save(temporary, format="PNG")
