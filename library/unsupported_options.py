"""sd-scripts' options that a script here knows but cannot apply: added to the parser, so that sd-scripts' commands
and option files parse, and refused in one sentence naming the option and why when set to anything but
sd-scripts' default."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class UnsupportedOption:
    name: str
    why: str  # the end of the refusal: what is wrong and what to do instead
    kind: str = "switch"  # or "value"
    default: object = None  # sd-scripts' default, which is accepted
    nargs: str | None = None


def add_unsupported_arguments(group, options: Iterable[UnsupportedOption]) -> None:
    for option in options:
        if option.kind == "switch":
            group.add_argument(f"--{option.name}", action="store_true", help=option.why)
        else:
            group.add_argument(f"--{option.name}", nargs=option.nargs, default=option.default, help=option.why)


def refuse_unsupported(args: argparse.Namespace, options: Iterable[UnsupportedOption]) -> None:
    for option in options:
        value = getattr(args, option.name)
        if value not in (None, False, [], option.default, str(option.default)):
            raise UserError(f"--{option.name}: {option.why}.")
