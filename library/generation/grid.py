"""--grid: what users do by hand to compare LoRAs, as one labelled contact sheet. Rows are the run's images (each
prompt, with its seed), columns the --network_weights files one at a time (`epochs`: each at its --network_mul,
the others off) or every network at each strength of `mul=...`; a row keeps its seed across the columns."""

from __future__ import annotations

import dataclasses
import datetime
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from library.file_io import atomic_output
from library.generation.drawing import PlannedImage, batches, draw_batch
from library.generation.networks import AttachedNetworks
from library.generation.options import GenerationOptions
from library.model_files.stable_diffusion import StableDiffusionModel
from library.sampling.generate import DrawingSetup

LABEL_HEIGHT = 24  # pixels above each column for its label
ROW_LABEL_WIDTH = 192  # pixels left of each row for its prompt
MARGIN = 4
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def columns(networks: AttachedNetworks, options: GenerationOptions) -> list[tuple[str, tuple[float, ...]]]:
    """(label, each network's strength) per column."""
    if options.grid.multipliers is not None:
        return [(f"strength {value:g}", (value,) * len(networks.defaults)) for value in options.grid.multipliers]
    return [
        (
            choice.weights.stem,
            tuple(default if index == column else 0.0 for index, default in enumerate(networks.defaults)),
        )
        for column, choice in enumerate(options.networks)
    ]


def draw_grid(
    model: StableDiffusionModel,
    networks: AttachedNetworks,
    options: GenerationOptions,
    planned: list[PlannedImage],
    setup: DrawingSetup,
    now: datetime.datetime | None = None,
) -> Path:
    """Draw every cell and write the sheet as `grid_<YYYYmmddHHMMSS>.png` in the output folder."""
    planned = [
        dataclasses.replace(image, prompt=dataclasses.replace(image.prompt, network_multipliers=None))
        for image in planned
    ]
    cells = []
    for label, multipliers in columns(networks, options):
        networks.set_multipliers(multipliers, f"--grid column {label}")
        column = []
        for batch in batches(planned, options.batch_size, options.sampler):
            column += [image.image for image in draw_batch(model, batch, setup, options)[-1][1]]
        cells.append((label, column))
        print(f"grid column {label}: {len(column)} images")
    sheet = contact_sheet([image.prompt.prompt for image in planned], cells)
    path = options.outdir / f"grid_{now or datetime.datetime.now():%Y%m%d%H%M%S}.png"
    with atomic_output(path) as temporary:
        sheet.save(temporary, format="PNG")
    print(f"saved {path}")
    return path


def contact_sheet(row_labels: list[str], cells: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """The cells (columns of images, one per row) on a white sheet, each column's label above it and each row's
    label at its left; every cell takes the largest image's size."""
    width = max(image.width for _, column in cells for image in column)
    height = max(image.height for _, column in cells for image in column)
    sheet = Image.new(
        "RGB",
        (ROW_LABEL_WIDTH + len(cells) * (width + MARGIN), LABEL_HEIGHT + len(row_labels) * (height + MARGIN)),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for column, (label, images) in enumerate(cells):
        left = ROW_LABEL_WIDTH + column * (width + MARGIN)
        draw.text((left + MARGIN, MARGIN), label, fill=INK, font=font)
        for row, image in enumerate(images):
            sheet.paste(image, (left, LABEL_HEIGHT + row * (height + MARGIN)))
    characters = ROW_LABEL_WIDTH // 7
    for row, label in enumerate(row_labels):
        lines = textwrap.wrap(label, characters)[: max(1, height // 12)]
        draw.multiline_text((MARGIN, LABEL_HEIGHT + row * (height + MARGIN)), "\n".join(lines), fill=INK, font=font)
    return sheet
