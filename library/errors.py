"""User-facing errors: one sentence naming the file, the problem and the fix; never a bare traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input that the user can fix. Its message is shown as is."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main function; a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
