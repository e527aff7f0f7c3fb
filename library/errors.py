"""User-facing errors: one sentence naming the file, the problem and the fix; never a bare traceback."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input that the user can fix. Its message is shown as is."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main function; a UserError becomes one line on stderr and exit status 2, and so does a file
    this user may not read or write (wherever the script met it).

    The objects that exist by now (the imported modules of torch, diffusers and transformers: hundreds of thousands)
    are moved out of the garbage collector's sight, before and after the work: collections during the run and at the
    interpreter's exit then skip them, which saves about a second per run (bench/NOTES.md). A script that turned the
    collector off for its imports (gc.disable()) gets it back here."""
    gc.freeze()
    gc.enable()
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except PermissionError as error:
        print(
            f"error: {error.filename}: permission denied; change its permissions or give another path.", file=sys.stderr
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        gc.freeze()
