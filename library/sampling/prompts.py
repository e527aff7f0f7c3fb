"""Sample prompt files: `.txt`, `.toml` and `.json` (specs/training.md section 8.2).

A `.txt` file has one prompt per line; blank lines and lines starting with `#` are skipped. Options follow the
prompt text, each after " --": `--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps,
`--ss` sampler (`--g` and `--cn` are accepted and ignored, as train_network does); gen_img_diffusers.py also takes
its own (GENERATION_LINE_OPTIONS: `--t` strength, `--am` network strengths, a `--d` seed list, SDXL's size
conditioning). Unlike sd-scripts, the prompt text itself is never read as an option, and a bad value stops the run
at start-up instead of being skipped.

A `.toml` file has a `[prompt]` table of defaults and one `[[prompt.subset]]` table per prompt; a key in the
subset overrides the same key in `[prompt]`. A `.json` file is a list of prompt lines (as in `.txt`) or tables.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.sampling.samplers import check_sampler

DEFAULT_SIZE = 512
MIN_SIZE = 64
SIZE_STEP = 8
DEFAULT_SCALE = 7.5
DEFAULT_STEPS = 30
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1
OPTION_SEPARATOR = " --"


def round_size(pixels: int) -> int:
    """Down to a multiple of 8, at least 64."""
    return max(MIN_SIZE, pixels - pixels % SIZE_STEP)


def clamp_steps(steps: int) -> int:
    return max(1, min(MAX_STEPS, steps))


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to draw. Sizes are rounded and steps clamped however the prompt is made."""

    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int | None = None  # None: a fresh random seed for every image
    scale: float = DEFAULT_SCALE
    steps: int = DEFAULT_STEPS
    sampler: str | None = None  # None: the run's default sampler (--sample_sampler)
    # gen_img_diffusers.py only (prompt-line options --t, --am, a --d list; sdxl_gen_img.py's --ow, --oh, --nw, --nh,
    # --ct, --cl)
    strength: float | None = None  # img2img: how far the start image is noised (None: --strength)
    network_multipliers: tuple[float, ...] | None = None  # one per network (None: --network_mul)
    original_width: int | None = None  # SDXL size conditioning; None: the image's size
    original_height: int | None = None
    original_width_negative: int | None = None  # None: the original size
    original_height_negative: int | None = None
    crop_top: int | None = None  # None: 0
    crop_left: int | None = None
    target_width: int | None = None  # None: the image's size
    target_height: int | None = None
    seeds: tuple[int, ...] | None = None  # the generator's --d list: the prompt's images' seeds in turn

    def __post_init__(self):
        object.__setattr__(self, "width", round_size(self.width))
        object.__setattr__(self, "height", round_size(self.height))
        object.__setattr__(self, "steps", clamp_steps(self.steps))


def read_sample_prompts(
    path: str | Path, defaults: Mapping[str, Any] | None = None, generation: bool = False
) -> list[SamplePrompt]:
    """Every prompt in a `.txt`, `.toml` or `.json` prompt file; any problem is one UserError naming the file.
    `defaults` (SamplePrompt fields, e.g. gen_img_diffusers' --W/--steps) fill what a prompt does not set;
    `generation` allows gen_img_diffusers' own line options."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise UserError(f"{path}: a sample prompt file must be a .txt, .toml or .json file; rename it or convert it.")
    if not path.is_file():
        raise UserError(f"{path}: no such sample prompt file; check --sample_prompts.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: the file is not UTF-8 text; save it as UTF-8.") from None
    prompts = READERS[suffix](text, str(path), dict(defaults or {}), generation)
    if not prompts:
        raise UserError(f"{path}: the file holds no prompt; add at least one.")
    return prompts


def parse_prompt_line(
    line: str, where: str = "sample prompt", defaults: Mapping[str, Any] | None = None, generation: bool = False
) -> SamplePrompt:
    """One `.txt` line: the prompt text, then options each introduced by " --"; `defaults` fill the options it
    does not give. `generation` allows gen_img_diffusers' own options (GENERATION_LINE_OPTIONS)."""
    text, *options = line.strip().split(OPTION_SEPARATOR)
    values: dict[str, Any] = {**(defaults or {}), "prompt": text.strip()}
    known = {**LINE_OPTIONS, **GENERATION_LINE_OPTIONS} if generation else LINE_OPTIONS
    for option in options:
        flag, value = (option.split(maxsplit=1) + [""])[:2]
        flag = flag.lower()
        if flag not in known and flag in GENERATION_LINE_OPTIONS:
            raise UserError(f"{where}: option --{flag} is for gen_img_diffusers.py only; remove it here.")
        if flag in REFUSED_LINE_OPTIONS:
            raise UserError(f"{where}: option --{flag}: {REFUSED_LINE_OPTIONS[flag]}; remove it.")
        if flag not in known:
            raise UserError(
                f"{where}: unknown option --{flag}; use {', '.join('--' + name for name in known)},"
                " and write ' --' only before an option."
            )
        if not value:
            raise UserError(f"{where}: option --{flag} has no value; write it as --{flag} VALUE.")
        key, convert = known[flag]
        if key is not None:
            values[key] = convert(value, f"{where}, --{flag}")
    return SamplePrompt(**values)


def _read_txt(text: str, source: str, defaults: dict[str, Any], generation: bool) -> list[SamplePrompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_prompt_line(line, f"{source}, line {number}", defaults, generation))
    return prompts


def _read_toml(text: str, source: str, defaults: dict[str, Any], generation: bool) -> list[SamplePrompt]:
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{source}: not valid TOML ({error}); fix the syntax at that place.") from None
    for key in tables:
        if key != "prompt":
            raise UserError(
                f"{source}: unknown top-level key '{key}';"
                " put defaults in [prompt] and each prompt in a [[prompt.subset]] table."
            )
    table_defaults = _table(tables.get("prompt"), f"{source}, [prompt]")
    subsets = table_defaults.pop("subset", [])
    if not isinstance(subsets, list):
        raise UserError(
            f"{source}: 'subset' must be an array of tables; write each prompt as a [[prompt.subset]] table."
        )
    default_values = {**defaults, **_table_values(table_defaults, f"{source}, [prompt]")}
    prompts = []
    for number, subset in enumerate(subsets, start=1):
        where = f"{source}, [[prompt.subset]] number {number}"
        values = {**default_values, **_table_values(_table(subset, where), where)}
        prompts.append(_prompt_from_values(values, where))
    return prompts


def _read_json(text: str, source: str, defaults: dict[str, Any], generation: bool) -> list[SamplePrompt]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{source}: not valid JSON ({error}); fix the syntax at that place.") from None
    if not isinstance(items, list):
        raise UserError(
            f"{source}: the file must hold a JSON list of prompt strings or objects; wrap the prompts in [ ]."
        )
    prompts = []
    for number, item in enumerate(items, start=1):
        where = f"{source}, item {number}"
        if isinstance(item, str):
            prompts.append(parse_prompt_line(item, where, defaults, generation))
        elif isinstance(item, dict):
            prompts.append(_prompt_from_values({**defaults, **_table_values(item, where)}, where))
        else:
            raise UserError(f"{where}: a prompt must be a string or an object, not {json.dumps(item)}.")
    return prompts


READERS: dict[str, Callable[[str, str, dict[str, Any], bool], list[SamplePrompt]]] = {
    ".txt": _read_txt,
    ".toml": _read_toml,
    ".json": _read_json,
}


def _whole_number(value: Any, where: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{where}: {value!r} is not a whole number; write digits only, such as 512.")
    return value


def _seed(value: Any, where: str) -> int:
    seed = _whole_number(value, where)
    if seed > MAX_SEED:
        raise UserError(f"{where}: {seed} is too large for a seed; use a number below 2**64.")
    return seed


def _number(value: Any, where: str) -> float:
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if not isinstance(number, (int, float)) or isinstance(number, bool) or not math.isfinite(number):
        raise UserError(f"{where}: {value!r} is not a number; write a number such as 7.5.")
    return float(number)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {value!r} is not text; write it in quotes.")
    return value


def _sampler(value: Any, where: str) -> str:
    return check_sampler(_text(value, where), where)


def _ignored(value: Any, where: str) -> None:
    return None


def _strength(value: Any, where: str) -> float:
    strength = _number(value, where)
    if not 0 < strength <= 1:
        raise UserError(f"{where}: strength {strength:g} is outside (0, 1]; use a value such as 0.8.")
    return strength


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    return tuple(_seed(part, where) for part in _text(value, where).split(","))


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    return tuple(_number(part, where) for part in _text(value, where).split(","))


# .txt flag -> (SamplePrompt field, value check); a None field is accepted and ignored.
LINE_OPTIONS: dict[str, tuple[str | None, Callable[[Any, str], Any]]] = {
    "n": ("negative_prompt", _text),
    "w": ("width", _whole_number),
    "h": ("height", _whole_number),
    "d": ("seed", _seed),
    "l": ("scale", _number),
    "s": ("steps", _whole_number),
    "ss": ("sampler", _sampler),
    "g": (None, _ignored),
    "cn": (None, _ignored),
}
# gen_img_diffusers.py's and sdxl_gen_img.py's own line options
GENERATION_LINE_OPTIONS: dict[str, tuple[str | None, Callable[[Any, str], Any]]] = {
    "t": ("strength", _strength),
    "am": ("network_multipliers", _numbers),
    "ow": ("original_width", _whole_number),
    "oh": ("original_height", _whole_number),
    "nw": ("original_width_negative", _whole_number),
    "nh": ("original_height_negative", _whole_number),
    "ct": ("crop_top", _whole_number),
    "cl": ("crop_left", _whole_number),
    "c": (None, _ignored),  # sd-scripts' CLIP-guidance prompt, used only with --clip_guidance_scale
    "d": ("seeds", _seeds),  # the trainer's --d takes one seed; the generator's a comma-separated list, one per image
}
REFUSED_LINE_OPTIONS = {
    "nl": "sd-scripts' negative scale is not implemented here",
    **{name: "Deep Shrink is not implemented here" for name in ("dsd1", "dst1", "dsd2", "dst2", "dsr")},
    **{name: "gradual latent is not implemented here" for name in ("glt", "glr", "gle", "gls", "glsn", "glus")},
}
# .toml / .json key -> (SamplePrompt field, value check)
TABLE_KEYS: dict[str, tuple[str | None, Callable[[Any, str], Any]]] = {
    "prompt": ("prompt", _text),
    "negative_prompt": ("negative_prompt", _text),
    "width": ("width", _whole_number),
    "height": ("height", _whole_number),
    "seed": ("seed", _seed),
    "scale": ("scale", _number),
    "sample_steps": ("steps", _whole_number),
    "sample_sampler": ("sampler", _sampler),
    "guidance_scale": (None, _ignored),
    "controlnet_image": (None, _ignored),
}


def _table(value: Any, where: str) -> dict:
    if value is None:
        raise UserError(f"{where}: missing; add a [prompt] table with [[prompt.subset]] tables, one per prompt.")
    if not isinstance(value, dict):
        raise UserError(
            f'{where}: must be a table of keys such as prompt = "..."; write each prompt as a [[prompt.subset]] table.'
        )
    return dict(value)


def _table_values(table: Mapping, where: str) -> dict[str, Any]:
    """SamplePrompt fields from `.toml`/`.json` keys, each value checked."""
    values = {}
    for key, value in table.items():
        if key not in TABLE_KEYS:
            raise UserError(f"{where}: unknown key '{key}'; use {', '.join(TABLE_KEYS)}.")
        field_name, convert = TABLE_KEYS[key]
        if field_name is not None:
            values[field_name] = convert(value, f"{where}, {key}")
    return values


def _prompt_from_values(values: dict[str, Any], where: str) -> SamplePrompt:
    if "prompt" not in values:
        raise UserError(f"{where}: no 'prompt' key; add prompt = \"...\".")
    return SamplePrompt(**values)
