"""LyCORIS files (LoCon with a Tucker core, LoHa, LoKr, DoRA) in the LoRA tools and the generator: the weight each
algorithm defines equals what the lycoris-lora package's own modules compute, layer by layer; merge_lora.py and
sdxl_merge_lora.py write checkpoints that compute what the package's network computes; resize_lora.py and
svd_merge_lora.py turn them into plain LoRAs (exact at full rank, the optimal truncation below it);
gen_img_diffusers.py draws with them as with the merged checkpoint and as with lycoris.kohya; what a LoRA file
cannot hold is one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.generation import build_parser, generate, options_from_arguments
from library.lora.files import read_lora_file, read_lora_inputs, read_modules, split_modules
from library.lora.low_rank import NewRanks
from library.lora.lycoris import LycorisModule
from library.lora.naming import sd_scripts_view
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion
from library.tiny_models import make_tiny_model
from lora_helpers import ModelProbe, assert_outputs_close, fill_randomly, text_encoder_argument
from networks.lora import create_network, create_network_from_weights
from networks.merge_lora import MergeOptions, merge_into_checkpoint, merge_loras
from networks.resize_lora import ResizeOptions, resize
from networks.svd_merge_lora import SvdMergeOptions, svd_merge

lycoris_kohya = pytest.importorskip("lycoris.kohya")

# The layers sd-scripts' C3Lier adapts, convs included (lycoris-lora 4's "full" preset does not build on diffusers'
# U-Net: "duplicated lora name").
PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# name -> (network_args, rank); each one makes the package write another key layout
ALGORITHMS = {
    "loha": ({"algo": "loha"}, 4),  # conv factors flattened to (rank, in * 3 * 3)
    "loha-tucker": ({"algo": "loha", "use_tucker": "True"}, 4),
    "lokr": ({"algo": "lokr", "factor": "8", "decompose_both": "True"}, 2),  # w1 full or factorised, w2 factorised
    "locon-tucker": ({"algo": "locon", "use_tucker": "True"}, 4),
    "dora-locon": ({"algo": "locon", "dora_wd": "True"}, 4),
    "dora-loha": ({"algo": "loha", "dora_wd": "True"}, 4),
    "dora-lokr-per-input": ({"algo": "lokr", "dora_wd": "True", "wd_on_output": "False"}, 4),
}
QUIET = MergeOptions(progress=False)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "c3lier.toml"
    path.write_text(PRESET, encoding="utf-8")
    return str(path)


def lycoris_network(model, preset: str, algorithm: str, seed: int = 0):
    """The package's network for `algorithm`, applied to `model` (whose layers now run it), with random weights."""
    arguments, rank = ALGORITHMS[algorithm]
    text_encoder = sd_scripts_view(text_encoder_argument(model))
    network = lycoris_kohya.create_network(
        1.0, rank, 2, model.vae, text_encoder, model.unet, preset=preset, conv_dim=rank, conv_alpha=1, **arguments
    )
    network.apply_to(text_encoder, model.unet, True, True)
    fill_randomly(network, seed)
    network.eval()
    return network


def saved(network, path):
    network.save_weights(str(path), None, {})
    return path


def module_count(path) -> int:
    return len({key.split(".")[0] for key in load_file(path)})


def layer_output(layer: torch.nn.Module, weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return F.linear(inputs, weight, layer.bias)
    return F.conv2d(inputs, weight, layer.bias, layer.stride, layer.padding)


def layer_input(layer: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(1, layer.in_channels, 8, 8, generator=generator)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_layer_gets_the_weight_the_lycoris_package_computes(preset, tmp_path, algorithm):
    network = lycoris_network(make_tiny_model(ModelFamily.SD1), preset, algorithm)
    strength = 1.0 if algorithm.startswith("dora") else -0.7  # DoRA at other strengths: the next test
    network.set_multiplier(strength)
    modules = read_modules(load_file(saved(network, tmp_path / "l.safetensors")), "l")
    loras = network.text_encoder_loras + network.unet_loras
    assert len(modules) == len(loras) and any(isinstance(module, LycorisModule) for module in modules.values())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in loras:
            layer = lora.org_module[0]
            inputs = layer_input(layer, generator)
            weight = modules[lora.lora_name].for_layer(layer.weight.shape).adapted(layer.weight, strength)
            torch.testing.assert_close(
                layer_output(layer, weight, inputs), lora(inputs), atol=1e-5, rtol=1e-4, msg=lora.lora_name
            )


@pytest.mark.parametrize("algorithm", ["dora-loha", "dora-lokr-per-input"])
def test_dora_at_a_strength_moves_the_weight_that_far_towards_the_rescaled_one(preset, tmp_path, algorithm):
    """As AUTOMATIC1111 and ComfyUI apply DoRA: W + s * (m * V / ||V|| - W) with V = W + delta, the norm per output
    row or per input column as m's shape says (written out here with vector_norm)."""
    network = lycoris_network(make_tiny_model(ModelFamily.SD1), preset, algorithm)
    modules = read_modules(load_file(saved(network, tmp_path / "l.safetensors")), "l")
    for lora in network.unet_loras[:20]:
        layer = lora.org_module[0]
        module = modules[lora.lora_name].for_layer(layer.weight.shape)
        weight = layer.weight.detach().double()
        combined = weight + module.delta().double()
        magnitude = module.dora_scale.double()
        per_output = magnitude.shape[0] == weight.shape[0]
        axes = tuple(range(1, weight.dim())) if per_output else (0, *range(2, weight.dim()))
        norm = torch.linalg.vector_norm(combined, dim=axes, keepdim=True)
        expected = weight + 0.4 * (combined * magnitude.reshape(norm.shape) / norm - weight)
        torch.testing.assert_close(module.adapted(layer.weight, 0.4).double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("family", "algorithm", "ratio"),
    [
        (ModelFamily.SD1, "loha", 0.7),
        (ModelFamily.SD1, "lokr", -0.5),
        (ModelFamily.SD1, "dora-locon", 1.0),
        (ModelFamily.SDXL, "loha-tucker", 0.7),
        (ModelFamily.SDXL, "dora-loha", 1.0),
    ],
)
def test_merged_checkpoint_computes_what_the_lycoris_network_computes(
    tiny_checkpoints, preset, tmp_path, capsys, family, algorithm, ratio
):
    checkpoint = tiny_checkpoints[family][1]
    adapted = load_stable_diffusion(checkpoint)
    network = lycoris_network(adapted, preset, algorithm)
    network.set_multiplier(ratio)
    lora = saved(network, tmp_path / "l.safetensors")
    probe = ModelProbe(adapted)
    options = MergeOptions(sdxl=family is ModelFamily.SDXL, progress=False)
    merge_into_checkpoint(checkpoint, tmp_path / "m.safetensors", read_lora_inputs([lora], [ratio]), options)
    assert f"by {module_count(lora)} LoRA modules" in capsys.readouterr().out
    merged = load_stable_diffusion(tmp_path / "m.safetensors")
    assert_outputs_close(
        probe.outputs(adapted.text_encoders, adapted.unet), probe.outputs(merged.text_encoders, merged.unet), atol=1e-4
    )


def test_lycoris_unet_names_read_as_lora_unet_names(preset, tmp_path):
    weights = load_file(
        saved(lycoris_network(make_tiny_model(ModelFamily.SD1), preset, "loha"), tmp_path / "l.safetensors")
    )
    renamed = {key.replace("lora_unet_", "lycoris_"): tensor for key, tensor in weights.items()}
    assert any(key.startswith("lycoris_") for key in renamed)
    original, read = read_modules(weights, "l"), read_modules(renamed, "r")
    assert read.keys() == original.keys()
    assert all(torch.equal(read[name].delta(), module.delta()) for name, module in original.items() if module.shape)


def test_resize_turns_a_loha_into_a_plain_lora_exact_at_full_rank_optimal_below(tiny_checkpoints, preset, tmp_path):
    checkpoint = tiny_checkpoints[ModelFamily.SD1][1]
    adapted = load_stable_diffusion(checkpoint)
    loha = saved(lycoris_network(adapted, preset, "loha"), tmp_path / "loha.safetensors")
    full = tmp_path / "full.safetensors"
    resize(ResizeOptions(model=loha, save_to=full, ranks=NewRanks(16, 16)))  # a rank-4 LoHa's delta has rank <= 16
    weights, metadata = read_lora_file(full)
    assert metadata["ss_network_module"] == "networks.lora" and "algo" not in metadata.get("ss_network_args", "")
    assert len(split_modules(weights, "full")) == module_count(loha)
    merge_into_checkpoint(checkpoint, tmp_path / "m.safetensors", read_lora_inputs([full], [1.0]), QUIET)
    merged = load_stable_diffusion(tmp_path / "m.safetensors")
    probe = ModelProbe(adapted)
    assert_outputs_close(
        probe.outputs(adapted.text_encoders, adapted.unet), probe.outputs(merged.text_encoders, merged.unet), atol=1e-4
    )

    small = tmp_path / "small.safetensors"
    resize(ResizeOptions(model=loha, save_to=small, ranks=NewRanks(2, 2)))
    exact = read_modules(load_file(loha), "loha")
    for name, factors in list(split_modules(load_file(small), "small").items())[::40]:
        delta = exact[name] if exact[name].shape else exact[name].for_layer(factors.weight_shape)
        singular_values = torch.linalg.svdvals(delta.delta().flatten(1).double())
        error = (delta.delta() - factors.delta()).double().norm() ** 2
        torch.testing.assert_close(error, (singular_values[2:] ** 2).sum(), rtol=1e-3, atol=1e-6, msg=name)


def test_svd_merge_of_a_lokr_and_a_lora_is_their_exact_sum_at_full_rank(tiny_checkpoints, preset, tmp_path):
    model, checkpoint, _ = tiny_checkpoints[ModelFamily.SD1]
    lokr = saved(lycoris_network(load_stable_diffusion(checkpoint), preset, "lokr"), tmp_path / "lokr.safetensors")
    network = create_network(1.0, 4, 2, None, model.text_encoders[0], model.unet, conv_dim=2, conv_alpha=1)
    fill_randomly(network, seed=5)
    network.save_weights(tmp_path / "lora.safetensors")
    files, ratios = [lokr, tmp_path / "lora.safetensors"], [0.5, -0.3]
    merged_lora = tmp_path / "merged.safetensors"
    svd_merge(SvdMergeOptions(models=tuple(files), ratios=tuple(ratios), save_to=merged_lora, ranks=NewRanks(64, 64)))
    merge_into_checkpoint(checkpoint, tmp_path / "one.safetensors", read_lora_inputs([merged_lora], [1.0]), QUIET)
    merge_into_checkpoint(checkpoint, tmp_path / "both.safetensors", read_lora_inputs(files, ratios), QUIET)
    one, both = (
        load_stable_diffusion(tmp_path / "one.safetensors"),
        load_stable_diffusion(tmp_path / "both.safetensors"),
    )
    probe = ModelProbe(one)
    assert_outputs_close(probe.outputs(both.text_encoders, both.unet), probe.outputs(one.text_encoders, one.unet), 1e-4)


def test_what_a_lora_file_cannot_hold_is_one_sentence_and_nothing_is_written(preset, tmp_path):
    model = make_tiny_model(ModelFamily.SD1)
    dora = saved(lycoris_network(model, preset, "dora-locon"), tmp_path / "dora.safetensors")
    loha = saved(lycoris_network(make_tiny_model(ModelFamily.SD1), preset, "loha"), tmp_path / "loha.safetensors")
    out = tmp_path / "out.safetensors"
    rescales = r"dora\.safetensors: module '.*' is a LyCORIS LoCon with DoRA module, whose change rescales"
    with pytest.raises(UserError, match=rescales + ".*merge_lora.py --sd_model"):
        resize(ResizeOptions(model=dora, save_to=out))
    with pytest.raises(UserError, match=rescales):
        svd_merge(SvdMergeOptions(models=(dora,), ratios=(1.0,), save_to=out))
    with pytest.raises(UserError, match=r"is a LyCORIS LoHa module; merging LoRAs into one .* svd_merge_lora.py"):
        merge_loras(out, read_lora_inputs([loha, loha], [1.0, 1.0]), QUIET)
    with pytest.raises(UserError, match=r"LoHa module; networks.lora builds .* --network_module lycoris.kohya"):
        create_network_from_weights(1.0, loha, None, model.text_encoders[0], model.unet)
    assert sorted(tmp_path.iterdir()) == sorted([dora, loha])
    ia3 = tmp_path / "ia3.safetensors"
    save_file({"lora_unet_conv_in.on_input": torch.ones(1), "lora_unet_conv_in.weight": torch.ones(4)}, ia3)
    with pytest.raises(UserError, match=r"key 'lora_unet_conv_in.on_input' belongs to no network type .*IA3"):
        read_lora_inputs([ia3], [1.0])


def draw(ckpt, outdir, *flags: str) -> np.ndarray:
    args = build_parser().parse_args(
        ["--ckpt", str(ckpt), "--outdir", str(outdir), "--W", "64", "--H", "64", "--steps", "2", "--seed", "3"]
        + ["--prompt", "a cat", *flags]
    )
    [path] = generate(options_from_arguments(args, []))
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.slow
def test_gen_img_draws_with_a_lycoris_file_as_with_the_merged_checkpoint_and_lycoris_kohya(
    tiny_checkpoints, preset, tmp_path
):
    checkpoint = tiny_checkpoints[ModelFamily.SD1][1]
    loha = saved(lycoris_network(load_stable_diffusion(checkpoint), preset, "dora-loha"), tmp_path / "l.safetensors")
    merge_into_checkpoint(checkpoint, tmp_path / "m.safetensors", read_lora_inputs([loha], [1.0]), QUIET)
    base = draw(checkpoint, tmp_path / "base")
    with_file = draw(checkpoint, tmp_path / "file", "--network_weights", str(loha))
    with_package = draw(
        checkpoint, tmp_path / "package", "--network_weights", str(loha), "--network_module", "lycoris.kohya"
    )
    merged = draw(tmp_path / "m.safetensors", tmp_path / "merged")
    assert np.abs(base - with_file).max() > 10
    assert np.abs(with_file - merged).max() <= 2 and np.abs(with_file - with_package).max() <= 2
