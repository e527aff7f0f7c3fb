"""Dataset configuration: `--dataset_config` TOML/JSON files and the legacy `--train_data_dir` folders, resolved into
typed dataset and subset settings (specs/training.md section 1).

Every value is looked up subset -> dataset -> `[general]` -> the command line -> the default, as in sd-scripts. The
whole file is checked before anything is loaded, and every problem goes into one report that gives its place
(file, dataset, subset, key), the value and the fix.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.dataset.resize import INTERPOLATIONS
from library.errors import UserError

GENERAL, DATASET, SUBSET = "general", "dataset", "subset"
ANY_LEVEL = frozenset({GENERAL, DATASET, SUBSET})
DATASET_LEVELS = frozenset({GENERAL, DATASET})
SUBSET_ONLY = frozenset({SUBSET})
DREAMBOOTH, FINE_TUNING = "DreamBooth", "fine-tuning"


@dataclass(frozen=True)
class Key:
    """One config key: where it may appear, what TOML type it takes, its default, and the command-line option
    that serves as its fallback (sd-scripts' argparse name)."""

    kind: str  # "int", "float" (an int is accepted too), "bool", "str", "resolution", "float_pair", "table"
    levels: frozenset[str]
    default: Any = None
    cli: str | None = None


KEYS: dict[str, Key] = {
    # dataset level
    "batch_size": Key("int", DATASET_LEVELS, 1, "train_batch_size"),
    "resolution": Key("resolution", DATASET_LEVELS, None, "resolution"),
    "enable_bucket": Key("bool", DATASET_LEVELS, False, "enable_bucket"),
    "min_bucket_reso": Key("int", DATASET_LEVELS, 256, "min_bucket_reso"),
    "max_bucket_reso": Key("int", DATASET_LEVELS, 1024, "max_bucket_reso"),
    "bucket_reso_steps": Key("int", DATASET_LEVELS, 64, "bucket_reso_steps"),
    "bucket_no_upscale": Key("bool", DATASET_LEVELS, False, "bucket_no_upscale"),
    "network_multiplier": Key("float", DATASET_LEVELS, 1.0),
    "validation_seed": Key("int", DATASET_LEVELS, None, "validation_seed"),
    "validation_split": Key("float", DATASET_LEVELS, 0.0, "validation_split"),
    # subset level, inherited from the dataset and [general]
    "num_repeats": Key("int", ANY_LEVEL, 1, "dataset_repeats"),
    "shuffle_caption": Key("bool", ANY_LEVEL, False, "shuffle_caption"),
    "caption_separator": Key("str", ANY_LEVEL, ",", "caption_separator"),
    "keep_tokens": Key("int", ANY_LEVEL, 0, "keep_tokens"),
    "keep_tokens_separator": Key("str", ANY_LEVEL, "", "keep_tokens_separator"),
    "secondary_separator": Key("str", ANY_LEVEL, None, "secondary_separator"),
    "enable_wildcard": Key("bool", ANY_LEVEL, False, "enable_wildcard"),
    "color_aug": Key("bool", ANY_LEVEL, False, "color_aug"),
    "flip_aug": Key("bool", ANY_LEVEL, False, "flip_aug"),
    "face_crop_aug_range": Key("float_pair", ANY_LEVEL, None, "face_crop_aug_range"),
    "random_crop": Key("bool", ANY_LEVEL, False, "random_crop"),
    "caption_prefix": Key("str", ANY_LEVEL, None, "caption_prefix"),
    "caption_suffix": Key("str", ANY_LEVEL, None, "caption_suffix"),
    "token_warmup_min": Key("int", ANY_LEVEL, 1, "token_warmup_min"),
    "token_warmup_step": Key("float", ANY_LEVEL, 0, "token_warmup_step"),
    "custom_attributes": Key("table", ANY_LEVEL, None),
    "resize_interpolation": Key("str", ANY_LEVEL, None, "resize_interpolation"),
    "caption_dropout_rate": Key("float", ANY_LEVEL, 0.0, "caption_dropout_rate"),
    "caption_dropout_every_n_epochs": Key("int", ANY_LEVEL, 0, "caption_dropout_every_n_epochs"),
    "caption_tag_dropout_rate": Key("float", ANY_LEVEL, 0.0, "caption_tag_dropout_rate"),
    # DreamBooth and fine-tuning subsets
    "image_dir": Key("str", SUBSET_ONLY),
    "metadata_file": Key("str", SUBSET_ONLY),
    "is_reg": Key("bool", SUBSET_ONLY, False),
    "alpha_mask": Key("bool", SUBSET_ONLY, False, "alpha_mask"),
    "conditioning_data_dir": Key("str", SUBSET_ONLY),  # mask images: their red channel weighs the loss
    "caption_extension": Key("str", ANY_LEVEL, ".caption", "caption_extension"),
    "class_tokens": Key("str", ANY_LEVEL, None),
    "cache_info": Key("bool", ANY_LEVEL, False, "cache_info"),
}
DATASET_KEYS = tuple(name for name, key in KEYS.items() if SUBSET not in key.levels)
SUBSET_KEYS = tuple(name for name, key in KEYS.items() if SUBSET in key.levels)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KIND_NAMES = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "a string in quotes",
    "resolution": "a number or [width, height]",
    "float_pair": "two numbers [low, high]",
    "table": "a table",
}


class _ResolvedSettings:
    """Resolved values read as attributes (`subset.flip_aug`); the names and defaults live in KEYS only."""

    settings: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")  # absent while unpickling in a data-loader worker
        if settings is None or name not in settings:
            raise AttributeError(name)
        return settings[name]


@dataclass(frozen=True)
class SubsetConfig(_ResolvedSettings):
    """One image folder (DreamBooth) or metadata file (fine-tuning) with its resolved settings."""

    where: str  # "dataset.toml, datasets[0].subsets[1]": used in every message about it
    settings: Mapping[str, Any]  # every subset key of KEYS, resolved

    @property
    def loss_mask(self) -> bool:
        """Whether the images carry a loss mask: their alpha channel (alpha_mask), or the red channel of the mask
        image of the same name in conditioning_data_dir."""
        return bool(self.alpha_mask or self.conditioning_data_dir)


@dataclass(frozen=True)
class DatasetConfig(_ResolvedSettings):
    where: str
    style: str  # DREAMBOOTH or FINE_TUNING
    settings: Mapping[str, Any]  # every dataset key of KEYS, resolved
    subsets: tuple[SubsetConfig, ...] = field(default_factory=tuple)


class Problems:
    """Collects every problem found, then raises them together as one UserError; notes are things the start-up
    summary mentions (skipped folders, adjusted values) that do not stop the run."""

    def __init__(self, source: str):
        self.source = source
        self.messages: list[str] = []
        self.notes: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise UserError(self.messages[0])
        if self.messages:
            listed = "\n".join(f"  - {message}" for message in self.messages)
            raise UserError(f"{len(self.messages)} problems in {self.source}; nothing was loaded:\n{listed}")


def read_config_file(path: str | Path) -> dict:
    """The raw tables of a `.toml` or `.json` dataset config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such dataset config file; check --dataset_config.")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UserError(f"{path}: a dataset config must be a .toml or .json file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: the file is not UTF-8 text; save it as UTF-8.") from None
    try:
        return tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid {suffix[1:].upper()} ({error}); fix the syntax at that place.") from None


def resolve_config(raw: Mapping, cli: Mapping[str, Any], source: str, problems: Problems) -> list[DatasetConfig]:
    """Datasets from the raw tables, every value resolved; problems are collected, not raised."""
    for key in raw:
        if key not in ("general", "datasets"):
            problems.add(f"{source}: unknown top-level key '{key}'; only [general] and [[datasets]] may appear there.")
    general = _table(raw.get("general", {}), f"{source}, [general]", problems)
    _check_keys(general, GENERAL, f"{source}, [general]", problems)
    datasets = raw.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        problems.add(f"{source}: no [[datasets]] table; add one with at least one [[datasets.subsets]] entry.")
        return []
    resolved = []
    for index, dataset in enumerate(datasets):
        where = f"{source}, datasets[{index}]"
        dataset = _table(dataset, where, problems)
        _check_keys({k: v for k, v in dataset.items() if k != "subsets"}, DATASET, where, problems)
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            problems.add(f"{where}: no [[datasets.subsets]] entry; add one with image_dir (or metadata_file).")
            continue
        subset_configs = []
        for subset_index, subset in enumerate(subsets):
            subset_where = f"{where}.subsets[{subset_index}]"
            subset = _table(subset, subset_where, problems)
            _check_keys(subset, SUBSET, subset_where, problems)
            settings = {name: _resolve(name, (subset, dataset, general), cli) for name in SUBSET_KEYS}
            subset_configs.append(SubsetConfig(subset_where, settings))
        style = _style(subset_configs, where, problems)
        settings = {name: _resolve(name, (dataset, general), cli) for name in DATASET_KEYS}
        settings["resolution"] = _resolution(settings["resolution"], f"{where}: resolution", problems)
        resolved.append(DatasetConfig(where, style, settings, tuple(subset_configs)))
    return resolved


def _table(value: Any, where: str, problems: Problems) -> dict:
    if isinstance(value, dict):
        return value
    problems.add(f"{where}: expected a table of settings, found {value!r}.")
    return {}


def _check_keys(table: Mapping, level: str, where: str, problems: Problems) -> None:
    for name, value in table.items():
        if name == "subsets" and level == DATASET:
            continue
        key = KEYS.get(name)
        if key is None:
            problems.add(f"{where}: unknown key '{name}'{_did_you_mean(name)}.")
        elif level not in key.levels:
            allowed = " or ".join(sorted(key.levels))
            problems.add(f"{where}: '{name}' is not allowed in a {level} table; put it in a {allowed} table.")
        elif not _has_kind(value, key.kind):
            problems.add(f"{where}: {name} = {value!r} should be {KIND_NAMES[key.kind]}.")
        elif name == "resize_interpolation" and value not in INTERPOLATIONS:
            problems.add(f"{where}: resize_interpolation = {value!r} is not one of {', '.join(INTERPOLATIONS)}.")


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, KEYS, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _has_kind(value: Any, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return number
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "table":
        return isinstance(value, dict)
    if kind == "float_pair":
        return isinstance(value, list) and len(value) == 2 and all(_has_kind(v, "float") for v in value)
    if kind == "resolution":  # 512, [512, 768] or "512,768"
        if isinstance(value, str):
            return all(part.strip().isdigit() for part in value.split(",")) and 1 <= len(value.split(",")) <= 2
        return _has_kind(value, "int") or (
            isinstance(value, list) and len(value) == 2 and all(_has_kind(v, "int") for v in value)
        )
    raise ValueError(kind)


def _resolve(name: str, tables: tuple[Mapping, ...], cli: Mapping[str, Any]) -> Any:
    for table in tables:
        if table.get(name) is not None:
            return table[name]
    key = KEYS[name]
    if key.cli and cli.get(key.cli) is not None:
        return cli[key.cli]
    return key.default


def _resolution(value: Any, where: str, problems: Problems) -> tuple[int, int] | None:
    if value is None:
        problems.add(
            f"{where}: no training resolution; give --resolution 512 (or 'W,H') or resolution = 512 in the config."
        )
        return None
    given = value
    if isinstance(value, str):
        value = [int(part) for part in value.split(",")] if _has_kind(value, "resolution") else None
    if isinstance(value, int):
        value = [value, value]
    if not value or len(value) == 1:
        value = value * 2 if value else None
    if value is None or min(value) <= 0:
        problems.add(f"{where}: {given!r} is not a resolution; use a positive number or [width, height].")
        return None
    return (int(value[0]), int(value[1]))


def _style(subsets: list[SubsetConfig], where: str, problems: Problems) -> str:
    with_metadata = [subset for subset in subsets if subset.metadata_file]
    if with_metadata and len(with_metadata) < len(subsets):
        problems.add(
            f"{where}: DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file) are mixed;"
            " put them into separate [[datasets]]."
        )
    for subset in subsets:
        if not subset.metadata_file and not subset.image_dir:
            problems.add(f"{subset.where}: no image_dir; give the folder that holds the images.")
    return FINE_TUNING if with_metadata and len(with_metadata) == len(subsets) else DREAMBOOTH


# ---------------------------------------------------------------- legacy command-line datasets


def legacy_config(
    train_data_dir: str | None, reg_data_dir: str | None, in_json: str | None, problems: Problems
) -> dict:
    """The config tables that `--train_data_dir` / `--reg_data_dir` / `--in_json` stand for."""
    if in_json:
        return {"datasets": [{"subsets": [{"image_dir": train_data_dir, "metadata_file": in_json}]}]}
    if not train_data_dir:
        problems.add(
            "no dataset: give --dataset_config FILE.toml,"
            " or --train_data_dir with folders named <repeats>_<identifier> <class>."
        )
        return {"datasets": []}
    subsets = _repeat_folders(Path(train_data_dir), "--train_data_dir", False, problems)
    if reg_data_dir:
        subsets += _repeat_folders(Path(reg_data_dir), "--reg_data_dir", True, problems)
    return {"datasets": [{"subsets": subsets}]}


def _repeat_folders(parent: Path, option: str, is_reg: bool, problems: Problems) -> list[dict]:
    """One subset per `<repeats>_<identifier> <class>` folder; images right inside `parent` are one more subset."""
    if not parent.is_dir():
        problems.add(
            f"{option} {parent}: no such folder;"
            " give the folder that holds the <repeats>_<identifier> <class> image folders."
        )
        return []
    subsets = []
    for folder in sorted(path for path in parent.iterdir() if path.is_dir()):
        repeats, _, tokens = folder.name.partition("_")
        if not repeats.isdigit() or not tokens:
            problems.add(
                f"{option} {parent}: folder '{folder.name}' is not named <repeats>_<identifier> <class>"
                f" (e.g. '10_{folder.name}'); rename it or move it out of {parent}."
            )
        elif int(repeats) < 1:
            problems.note(f"{folder}: skipped, its repeat count is 0.")
        else:
            subsets.append(
                {"image_dir": str(folder), "num_repeats": int(repeats), "class_tokens": tokens, "is_reg": is_reg}
            )
    if any(path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES for path in parent.iterdir()):
        problems.note(
            f"{parent}: its own images are used as one more subset (1 repeat, captions from their caption files)."
        )
        subsets.append({"image_dir": str(parent), "is_reg": is_reg})
    if not subsets and not problems.messages:
        problems.add(
            f"{option} {parent}: no image folders in it;"
            " put images into folders named <repeats>_<identifier> <class>, e.g. 10_sks dog."
        )
    return subsets


def load_dataset_config(
    dataset_config: str | None,
    cli: Mapping[str, Any],
    train_data_dir: str | None = None,
    reg_data_dir: str | None = None,
    in_json: str | None = None,
) -> tuple[list[DatasetConfig], Problems]:
    """Datasets from `--dataset_config` or the legacy options. Problems are returned, not raised, so that the folder
    scan can add its own before one report is shown."""
    if dataset_config:
        problems = Problems(str(dataset_config))
        ignored = [
            option
            for option, value in (
                ("--train_data_dir", train_data_dir),
                ("--reg_data_dir", reg_data_dir),
                ("--in_json", in_json),
            )
            if value
        ]
        if ignored:
            problems.note(f"{', '.join(ignored)} ignored: --dataset_config {dataset_config} defines the datasets.")
        return resolve_config(read_config_file(dataset_config), cli, str(dataset_config), problems), problems
    problems = Problems("the dataset options")
    raw = legacy_config(train_data_dir, reg_data_dir, in_json, problems)
    return ([] if problems.messages else resolve_config(raw, cli, "the command line", problems)), problems
