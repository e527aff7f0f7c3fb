"""`--config_file` and `--output_config` (specs/training.md section 11): the command line's options kept in a TOML
file. Keys are option names without the dashes, in any table nesting; options given on the command line win.

The file's values go through the same parser as the command line, so a wrong type or choice is refused as it would
be there, with the file named. `--output_config` writes the options that differ from their defaults and exits."""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import toml

from library.errors import UserError
from library.file_io import atomic_output

CONFIG_OPTIONS = ("config_file", "output_config")


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("options file")
    group.add_argument(
        "--config_file", help="read options from this TOML file (.toml added if missing); the command line wins"
    )
    group.add_argument("--output_config", action="store_true", help="write the options given to --config_file and exit")


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The options of `argv`, on top of those in its --config_file (unless --output_config is writing that file)."""
    wanted = _config_request(argv)
    if wanted.config_file and not wanted.output_config:
        file = config_path(wanted.config_file)
        tokens = list(_as_tokens(_read(file), parser, file))
        _check_tokens(parser, tokens, file)
        argv = [*tokens, *argv]  # argparse keeps the last value given: the command line's
    return parser.parse_args(argv)


def write_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Write the options that differ from the parser's defaults to --config_file, which must not exist yet."""
    if not args.config_file:
        raise UserError("--output_config writes to the file named by --config_file; give --config_file out.toml too.")
    file = config_path(args.config_file)
    if file.exists():
        raise UserError(f"--output_config: {file} exists already; name a new file with --config_file, or delete it.")
    values = {
        name: value
        for name, value in vars(args).items()
        if name not in CONFIG_OPTIONS and value is not None and value != parser.get_default(name)
    }
    with atomic_output(file) as temporary:
        Path(temporary).write_text(toml.dumps(values), encoding="utf-8")
    return file


def config_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix == ".toml" else path.with_name(path.name + ".toml")


def _config_request(argv: Sequence[str]) -> argparse.Namespace:
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_config_file_arguments(finder)
    return finder.parse_known_args(argv)[0]


def _read(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"--config_file {file}: no such file; check the path.")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--config_file {file}: not valid TOML ({error}); fix the file.") from error


def _flattened(table: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The keys and values at any depth; the tables' names only group them (sd-scripts' files use sections)."""
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flattened(value)
        else:
            yield key, value


def _as_tokens(table: dict[str, Any], parser: argparse.ArgumentParser, file: Path) -> Iterator[str]:
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    seen = set()
    for key, value in _flattened(table):
        if key in seen:
            raise UserError(f"--config_file {file}: {key} is given twice; keep one.")
        seen.add(key)
        if key not in actions or key in CONFIG_OPTIONS:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see {parser.prog} --help."
            raise UserError(f"--config_file {file}: {key} is not an option of this script{hint}")
        action = actions[key]
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise UserError(f"--config_file {file}: {key} is a switch; write {key} = true or false.")
            if value != action.default:
                yield flag
        else:
            yield flag
            yield from (str(item) for item in value) if isinstance(value, list) else (str(value),)


def _check_tokens(parser: argparse.ArgumentParser, tokens: list[str], file: Path) -> None:
    """Parse the file's options alone, so that a bad value is reported as the file's."""
    required = [action for action in parser._actions if action.required]
    original_error = parser.error

    def refuse(message: str):
        raise UserError(f"--config_file {file}: {message}.")

    parser.error = refuse
    for action in required:
        action.required = False
    try:
        parser.parse_args(tokens)
    finally:
        parser.error = original_error
        for action in required:
            action.required = True
