"""Caption files and the per-use caption processing (specs/training.md sections 2.1 and 2.2).

A caption is read once, when the dataset is built, and processed again each time its image is loaded: prefix and
suffix, dropout, wildcards, then tag handling (keep, warmup, shuffle, tag dropout), as sd-scripts does. Randomness
comes from the `random.Random` the caller passes in, so a seed fixes the result.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from library.dataset.config import KEYS, SubsetConfig
from library.errors import UserError

WILDCARD_GROUP = re.compile(r"\{([^}]+)\}")
FACE_CROP_PARTS = 4  # `name_cx_cy_w_h`: the face-crop tool appends four `_` fields to the image name


def _default(key: str):
    return field(default=KEYS[key].default)


@dataclass(frozen=True)
class CaptionSettings:
    """The caption keys of a dataset subset; the defaults are the config schema's."""

    shuffle_caption: bool = _default("shuffle_caption")
    caption_separator: str = _default("caption_separator")
    keep_tokens: int = _default("keep_tokens")
    keep_tokens_separator: str = _default("keep_tokens_separator")
    secondary_separator: str | None = _default("secondary_separator")
    enable_wildcard: bool = _default("enable_wildcard")
    caption_prefix: str | None = _default("caption_prefix")
    caption_suffix: str | None = _default("caption_suffix")
    caption_dropout_rate: float = _default("caption_dropout_rate")
    caption_dropout_every_n_epochs: int = _default("caption_dropout_every_n_epochs")
    caption_tag_dropout_rate: float = _default("caption_tag_dropout_rate")
    token_warmup_min: int = _default("token_warmup_min")
    token_warmup_step: float = _default("token_warmup_step")

    @property
    def varies_per_use(self) -> bool:
        """Whether one image's caption can come out differently from one use to the next (dropout makes it empty,
        which is one more caption, not a varying one)."""
        return (
            self.shuffle_caption
            or self.caption_tag_dropout_rate > 0
            or self.token_warmup_step > 0
            or self.enable_wildcard
        )

    @classmethod
    def of(cls, subset: SubsetConfig) -> CaptionSettings:
        """The caption settings a resolved subset config gives."""
        return cls(**{item.name: getattr(subset, item.name) for item in fields(cls)})


def caption_file_for(image_path: Path, caption_extension: str) -> Path | None:
    """The caption file of an image: `name<ext>`, else for face-crop names `name_cx_cy_w_h` also `name<ext>`."""
    stem = str(Path(image_path).with_suffix(""))
    # sd-scripts splits the whole path, folders included, on "_"
    parts = stem.split("_")
    face_crop_stem = "_".join(parts[:-FACE_CROP_PARTS]) if len(parts) > FACE_CROP_PARTS else stem
    for candidate in (Path(stem + caption_extension), Path(face_crop_stem + caption_extension)):
        if candidate.is_file():
            return candidate
    return None


def read_caption(path: Path, enable_wildcard: bool) -> str:
    """The first non-empty line of a caption file, or with wildcards all non-empty lines joined by newlines."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"caption file {path} is not UTF-8 text; save it as UTF-8.") from None
    if text == "":
        raise UserError(f"caption file {path} is empty; write a caption or delete the file.")
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if enable_wildcard:
        return "\n".join(lines)
    return lines[0] if lines else ""


def process_caption(
    caption: str, settings: CaptionSettings, rng: random.Random, epoch: int, global_step: int, max_train_steps: int
) -> str:
    """The caption as used for one sample load; `epoch` is 1-based, `global_step` counts optimizer steps."""
    if settings.caption_prefix:
        caption = settings.caption_prefix + " " + caption
    if settings.caption_suffix:
        caption = caption + " " + settings.caption_suffix

    if _is_dropped(settings, rng, epoch):
        return ""

    if settings.enable_wildcard:
        caption = _resolve_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if settings.shuffle_caption or settings.token_warmup_step > 0 or settings.caption_tag_dropout_rate > 0:
        caption = _process_tags(caption, settings, rng, global_step, max_train_steps)

    if settings.secondary_separator:
        caption = caption.replace(settings.secondary_separator, settings.caption_separator)
    return caption


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs (lower-cased), for the `ss_tag_frequency` metadata."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip().lower() for tag in caption.split(",") if tag.strip())
    return dict(counts)


def _is_dropped(settings: CaptionSettings, rng: random.Random, epoch: int) -> bool:
    # The random draw only happens when a rate is set, so the rng sequence matches sd-scripts'.
    if settings.caption_dropout_rate > 0 and rng.random() < settings.caption_dropout_rate:
        return True
    every = settings.caption_dropout_every_n_epochs
    return every > 0 and epoch % every == 0


def _resolve_wildcards(caption: str, rng: random.Random) -> str:
    """One random line, then each `{a|b|c}` replaced by one alternative; `{{` and `}}` are literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_marker, close_marker = "⦅", "⦆"
    while open_marker in caption or close_marker in caption:
        open_marker += "⦅"
        close_marker += "⦆"
    caption = caption.replace("{{", open_marker).replace("}}", close_marker)
    caption = WILDCARD_GROUP.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_marker, "{").replace(close_marker, "}")


def _process_tags(
    caption: str, settings: CaptionSettings, rng: random.Random, global_step: int, max_train_steps: int
) -> str:
    separator = settings.caption_separator
    marker = settings.keep_tokens_separator
    tail: list[str] = []
    if marker and marker in caption:
        head_text, flexible_text = caption.split(marker, 1)
        if marker in flexible_text:
            flexible_text, tail_text = flexible_text.split(marker, 1)
            tail = _split_tags(tail_text, separator)
        head, flexible = _split_tags(head_text, separator), _split_tags(flexible_text, separator)
    else:
        tags = [tag.strip() for tag in caption.strip().split(separator)]  # empty tags are kept here
        head, flexible = tags[: settings.keep_tokens], tags[settings.keep_tokens :]

    warmup_steps = settings.token_warmup_step
    if warmup_steps < 1:
        warmup_steps = math.floor(warmup_steps * max_train_steps)
    if warmup_steps and global_step < warmup_steps:
        # sd-scripts' exact expression (the order of the float operations decides the floor)
        count = (
            math.floor(global_step * ((len(flexible) - settings.token_warmup_min) / warmup_steps))
            + settings.token_warmup_min
        )
        flexible = flexible[:count]

    if settings.shuffle_caption:
        rng.shuffle(flexible)
    if settings.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= settings.caption_tag_dropout_rate]
    return ", ".join(head + flexible + tail)


def _split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]
