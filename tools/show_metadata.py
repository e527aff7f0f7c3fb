"""Print the metadata of a `.safetensors` file (a LoRA's `ss_*`, `sshs_*` and `modelspec.*` keys) as JSON,
sorted by key, as sd-scripts' tools/show_metadata.py does.

    python tools/show_metadata.py --model my_lora.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from library.errors import UserError, run_cli
from library.model_files.containers import open_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .safetensors file")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    path = Path(args.model)
    if path.suffix.lower() != ".safetensors" and not path.is_dir():
        raise UserError(
            f"{path}: only .safetensors files carry metadata; a {path.suffix or 'suffix-less'} file has none."
        )
    metadata = open_checkpoint(path).metadata
    if not metadata:
        raise UserError(f"{path}: the file has no metadata.")
    print(json.dumps(metadata, indent=4, sort_keys=True, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
