"""Run a training script as `python SCRIPT ARGS...` runs it, then write what only the process itself can tell (its
torch version, its peak CUDA memory) as JSON to the file named by the MEASURED_RUN_OUT environment variable.

bench/vs_sd_scripts.py starts both trainers through this file, each with its own Python, so that the same numbers
come from both in the same way."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    script, *arguments = sys.argv[1:]
    sys.argv = [script, *arguments]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        record = {"torch": torch.__version__, "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        Path(os.environ["MEASURED_RUN_OUT"]).write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main()
