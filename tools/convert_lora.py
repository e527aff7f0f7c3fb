"""Convert a LoRA between sd-scripts' (kohya) form and the diffusers/PEFT form, for SD 1.x, 2.x and SDXL.

    python tools/convert_lora.py my_lora.safetensors my_lora_peft.safetensors            # kohya -> diffusers/PEFT
    python tools/convert_lora.py pytorch_lora_weights.safetensors my_lora.safetensors    # diffusers/PEFT -> kohya

The direction follows the input (`--to kohya|diffusers` says it explicitly). The factors are copied as they are
(`lora_down` <-> `lora_A`, `lora_up` <-> `lora_B`) and every module keeps its alpha exactly: as `.alpha` tensors in
kohya form, as PEFT's `lora_alpha` / `alpha_pattern` in the `lora_adapter_metadata` that diffusers'
`load_lora_weights` reads. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.errors import UserError, run_cli
from library.lora.files import (
    check_finite,
    check_lora_output,
    lora_family,
    read_lora_file,
    save_lora_file,
    split_modules,
)
from library.lora.peft_format import is_peft_file, kohya_to_peft, peft_to_kohya
from library.metadata import common_value, lora_network_metadata
from library.model_files.containers import tensor_sources, write_safetensors
from networks.lora import NETWORK_MODULE

FORMS = ("kohya", "diffusers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="the LoRA to convert (.safetensors, .ckpt or .pt)")
    parser.add_argument("output", help="the converted LoRA (.safetensors; a kohya LoRA may also be .ckpt or .pt)")
    parser.add_argument("--to", choices=FORMS, help="the output's form (default: the other one than the input's)")
    return parser


def convert(source: str | Path, target: str | Path, to: str | None = None) -> tuple[str, int]:
    """Convert `source` into `target`; returns the form written and the number of modules."""
    source, target = Path(source), check_lora_output(target, [source], "the output")
    weights, metadata = read_lora_file(source)
    peft = is_peft_file(weights)
    to = to or ("kohya" if peft else "diffusers")
    kohya = peft_to_kohya(weights, metadata, str(source)) if peft else weights
    modules = split_modules(kohya, str(source), "only LoRA-LierLa/C3Lier files have a diffusers/PEFT form here.")
    check_finite(modules, source)
    family = lora_family(modules, metadata)
    if to == "kohya":
        ranks = [str(module.rank) for module in modules.values() if not module.uses_conv_rank]
        alphas = [str(module.alpha_value) for module in modules.values() if not module.uses_conv_rank]
        network_metadata = lora_network_metadata(
            NETWORK_MODULE, common_value(ranks, "None"), common_value(alphas, "None"), None, family, False
        )
        save_lora_file(target, kohya, {**metadata, **network_metadata} if not peft else network_metadata)
        return to, len(modules)
    if target.suffix.lower() != ".safetensors":
        raise UserError(f"{target}: a diffusers/PEFT LoRA is written as .safetensors (diffusers reads no other).")
    triples = {name: (module.down, module.up, module.alpha_value) for name, module in modules.items()}
    tensors, peft_metadata = kohya_to_peft(triples, family, str(source))
    write_safetensors(target, tensor_sources(tensors), {"format": "pt", **peft_metadata})
    return to, len(modules)


def main() -> None:
    args = build_parser().parse_args()
    form, modules = convert(args.input, args.output, args.to)
    print(f"saved {args.output}: {modules} modules in {form} form")


if __name__ == "__main__":
    run_cli(main)
