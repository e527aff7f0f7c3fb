"""networks/extract_lora_from_models.py: the extract of (base + a known rank-r delta) is that delta, layer by layer
(LierLa, and C3Lier with --conv_dim); unchanged text encoders are left out; SDXL names both encoders; models of
different families or architectures are one error naming both files; the file's metadata and hashes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_script

from library.errors import UserError
from library.lora.files import read_lora_file, split_modules
from library.lora.low_rank import factors_from_delta
from library.metadata import sshs_hashes
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import save_stable_diffusion_checkpoint
from library.tiny_models import make_tiny_model
from lora_helpers import fill_randomly
from networks.extract_lora_from_models import (
    ExtractOptions,
    build_parser,
    extract_lora,
    options_from_args,
    paired_layers,
    summary,
)
from networks.lora import create_network

EXTRACT = "networks/extract_lora_from_models.py"
RANK = 4
EXACT = dict(clamp_quantile=None)  # no clamp: the factors are the optimal truncation


def extract(model_org, model_tuned, save_to, **options):
    """Run the extract (without a progress bar); returns the file it wrote."""
    extract_lora(model_org, model_tuned, save_to, ExtractOptions(progress=False, **options))
    return save_to


def known_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down written with einsum, shaped like the layer's weight ([out, in] or [out, in, k, k])."""
    up = up.reshape(up.shape[0], up.shape[1])
    return torch.einsum("or,ri->oi", up, down) if down.dim() == 2 else torch.einsum("or,rihw->oihw", up, down)


def tuned_copy(model, path, conv: bool, seed: int, text_encoder_scale: float = 1.0):
    """Save base + a random rank-RANK LoRA (alpha = rank, scale 1) merged into a copy of `model` to `path`; returns
    {module name: the delta it added}. The text encoders' deltas are scaled by `text_encoder_scale` (0: unchanged)."""
    tuned = copy.deepcopy(model)
    conv_args = {"conv_dim": RANK, "conv_alpha": RANK} if conv else {}
    network = create_network(1.0, RANK, RANK, None, tuned.text_encoders, tuned.unet, **conv_args)
    fill_randomly(network, seed=seed)
    deltas = {}
    for lora in network.text_encoder_loras + network.unet_loras:
        if lora in network.text_encoder_loras:
            if not text_encoder_scale:
                continue
            lora.lora_up.weight.data *= text_encoder_scale
        deltas[lora.lora_name] = known_delta(lora.lora_up.weight.detach(), lora.lora_down.weight.detach())
        lora.merge_to()
    save_stable_diffusion_checkpoint(tuned, path)
    return deltas


def extracted_deltas(path):
    modules = split_modules(read_lora_file(path)[0], str(path))
    return {name: known_delta(f.up.float(), f.down.float()) * float(f.alpha) / f.rank for name, f in modules.items()}


def assert_recovers(path, expected):
    extracted = extracted_deltas(path)
    assert sorted(extracted) == sorted(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(
            extracted[name], delta, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.fixture(scope="module")
def sd1_tuned(tiny_checkpoints, tmp_path_factory):
    """The tiny SD1 base and base + a random rank-4 C3Lier LoRA (text encoder too), with its known deltas."""
    model, single_file, folder = tiny_checkpoints[ModelFamily.SD1]
    path = tmp_path_factory.mktemp("extract") / "tuned-sd1.safetensors"
    return single_file, folder, path, tuned_copy(model, path, conv=True, seed=10)


def is_3x3_or_resnet(name: str) -> bool:
    return "resnets" in name or "samplers" in name


# ---------------------------------------------------------------- recovering a known delta


def test_lierla_extract_of_base_plus_rank_r_delta_is_that_delta(sd1_tuned, tmp_path):
    single_file, folder, tuned, deltas = sd1_tuned
    out = extract(folder, tuned, tmp_path / "lierla.safetensors", dim=RANK, **EXACT)  # a Diffusers folder and a file
    lierla = {name: delta for name, delta in deltas.items() if not is_3x3_or_resnet(name)}
    assert any(name.startswith("lora_te_") for name in lierla) and len(lierla) < len(deltas)
    assert_recovers(out, lierla)


def test_c3lier_extract_with_conv_dim_recovers_the_3x3_convs_too(sd1_tuned, tmp_path):
    single_file, _, tuned, deltas = sd1_tuned
    out = tmp_path / "c3lier.safetensors"
    modules = extract_lora(single_file, tuned, out, ExtractOptions(dim=RANK, conv_dim=RANK, progress=False, **EXACT))
    assert max(module.relative_error for module in modules.values()) < 1e-4
    assert summary(modules).startswith(
        f"{len(deltas)} modules (18 text encoder, {len(deltas) - 18} U-Net);"
        " relative error ||dW - up @ down|| / ||dW||: 0.0% on average"
    )
    assert any(delta.dim() == 4 and delta.shape[-1] == 3 for delta in deltas.values())
    assert_recovers(out, deltas)
    weights, metadata = read_lora_file(out)
    assert weights["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[1:] == (32, 3, 3)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": str(float(RANK))}


def test_a_lower_rank_keeps_the_best_approximation_and_the_default_clamp_is_sd_scripts(sd1_tuned, tmp_path):
    single_file, _, tuned, deltas = sd1_tuned
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"
    out = extract(single_file, tuned, tmp_path / "r2.safetensors", dim=2)
    expected = factors_from_delta(deltas[name], 2, 0.99)  # sd-scripts' default --clamp_quantile
    factors = split_modules(read_lora_file(out)[0], "out")[name]
    torch.testing.assert_close(
        known_delta(factors.up, factors.down), known_delta(expected.up, expected.down), atol=2e-5, rtol=1e-4
    )
    assert factors.rank == 2 and float(factors.alpha) == 2.0


# ---------------------------------------------------------------- text encoders


@pytest.fixture(scope="module")
def sd1_small_text_change(tiny_checkpoints, tmp_path_factory):
    """base + a LoRA whose text-encoder part changes no weight by more than 0.01 (the default --min_diff)."""
    model, single_file, _ = tiny_checkpoints[ModelFamily.SD1]
    path = tmp_path_factory.mktemp("extract_te") / "tuned.safetensors"
    deltas = tuned_copy(model, path, conv=False, seed=20, text_encoder_scale=0.01)
    largest = max(delta.abs().max().item() for name, delta in deltas.items() if name.startswith("lora_te_"))
    assert 0 < largest < 0.01
    return single_file, path, deltas, largest


def test_a_text_encoder_within_min_diff_is_left_out_with_a_message(sd1_small_text_change, tmp_path, capsys):
    base, tuned, deltas, largest = sd1_small_text_change
    out = extract(base, tuned, tmp_path / "unet_only.safetensors", dim=RANK, **EXACT)
    assert "the text encoder did not change" in capsys.readouterr().out
    assert_recovers(out, {name: delta for name, delta in deltas.items() if name.startswith("lora_unet_")})

    out = extract(base, tuned, tmp_path / "with_te.safetensors", dim=RANK, min_diff=largest / 2, **EXACT)
    assert "did not change" not in capsys.readouterr().out
    assert_recovers(out, deltas)


def test_sdxl_extract_names_both_text_encoders_and_recovers_the_delta(tiny_checkpoints, tmp_path):
    model, single_file, _ = tiny_checkpoints[ModelFamily.SDXL]
    deltas = tuned_copy(model, tmp_path / "tuned-sdxl.safetensors", conv=False, seed=30)
    out = extract(
        single_file,
        tmp_path / "tuned-sdxl.safetensors",
        tmp_path / "xl.safetensors",
        dim=RANK,
        family=ModelFamily.SDXL,
        **EXACT,
    )
    assert {name.split("_")[1] for name in deltas} == {"te1", "te2", "unet"}
    assert_recovers(out, deltas)
    metadata = read_lora_file(out)[1]
    assert (
        metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        and metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    )


def test_unchanged_sdxl_text_encoders_are_judged_together(tiny_checkpoints, tmp_path, capsys):
    model, single_file, _ = tiny_checkpoints[ModelFamily.SDXL]
    deltas = tuned_copy(model, tmp_path / "tuned-sdxl.safetensors", conv=False, seed=40, text_encoder_scale=0)
    out = extract(single_file, tmp_path / "tuned-sdxl.safetensors", tmp_path / "xl.safetensors", dim=RANK, **EXACT)
    assert "the text encoders did not change" in capsys.readouterr().out
    assert_recovers(out, deltas)


# ---------------------------------------------------------------- mismatches


def test_models_of_different_families_are_one_error_naming_both(tiny_checkpoints, tmp_path):
    sd1, sdxl = tiny_checkpoints[ModelFamily.SD1][1], tiny_checkpoints[ModelFamily.SDXL][1]
    with pytest.raises(UserError, match="SD1.x model but .* is an SDXL model") as caught:
        extract(sd1, sdxl, tmp_path / "x.safetensors")
    assert str(sd1) in str(caught.value) and str(sdxl) in str(caught.value)
    with pytest.raises(UserError, match="the same weights in every layer") as caught:
        extract(sd1, sd1, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="--v2 was given"):
        extract(sd1, sd1, tmp_path / "x.safetensors", family=ModelFamily.SD2)
    assert not list(tmp_path.iterdir())


def test_models_of_different_architectures_are_one_error_naming_both(tiny_checkpoints):
    model = tiny_checkpoints[ModelFamily.SD1][0]
    narrower = copy.deepcopy(model)
    narrower.source = "narrower.safetensors"
    narrower.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(UserError, match="different architectures") as caught:
        paired_layers(model, narrower, ExtractOptions())
    message = str(caught.value)
    assert (
        model.source in message
        and "narrower.safetensors" in message
        and "64x64 in the first, 32x64 in the second" in message
    )


# ---------------------------------------------------------------- as a user runs it


def flags(*extra: str) -> ExtractOptions:
    return options_from_args(
        build_parser().parse_args(["--model_org", "a", "--model_tuned", "b", "--save_to", "c.safetensors", *extra])
    )


def test_the_flags_keep_sd_scripts_defaults_and_refuse_nonsense():
    default = flags()
    assert (default.dim, default.conv_dim, default.clamp_quantile, default.min_diff, default.save_precision) == (
        4,
        None,
        0.99,
        0.01,
        torch.float32,
    )
    assert default.v_parameterization is None and default.family is None and default.device == torch.device("cpu")
    v2 = flags("--v2")
    assert (
        v2.family is ModelFamily.SD2 and v2.v_parameterization is True
    )  # sd-scripts: --v_parameterization defaults to --v2
    assert flags("--clamp_quantile", "1").clamp_quantile is None and flags("--no_metadata").modelspec is False
    for wrong, message in (
        (("--v2", "--sdxl"), "give at most one"),
        (("--dim", "0"), "at least 1"),
        (("--clamp_quantile", "1.5"), "lies in"),
    ):
        with pytest.raises(UserError, match=message):
            flags(*wrong)


def test_the_script_writes_an_fp16_lora_with_metadata_and_fresh_hashes(sd1_tuned, tmp_path):
    single_file, _, tuned, deltas = sd1_tuned
    out = tmp_path / "out.safetensors"
    finished = run_script(
        EXTRACT, "--model_org", str(single_file), "--model_tuned", str(tuned), "--save_to", str(out),
        "--dim", str(RANK), "--clamp_quantile", "1", "--save_precision", "fp16",
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert f"saved {out}" in finished.stdout and "extracting" in finished.stderr  # the progress bar
    weights, metadata = read_lora_file(out)
    assert {tensor.dtype for tensor in weights.values()} == {torch.float16}
    alpha = weights["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]
    assert alpha.shape == () and float(alpha) == RANK
    assert {key: metadata[key] for key in (
        "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_v2", "ss_base_model_version",
    )} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0", "ss_network_args": "{}",
        "ss_v2": "False", "ss_base_model_version": "sd_v1",
    }  # fmt: skip
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["modelspec.title"] == "out"
    assert {key: metadata[key] for key in ("sshs_model_hash", "sshs_legacy_hash")} == sshs_hashes(weights, metadata)
    lierla = {name: delta for name, delta in deltas.items() if not is_3x3_or_resnet(name)}
    extracted = extracted_deltas(out)
    for name, delta in lierla.items():
        torch.testing.assert_close(extracted[name], delta, atol=2e-3, rtol=1e-2)  # fp16 factors


@pytest.mark.slow
def test_the_script_reports_a_mismatch_in_one_line_and_writes_nothing(tiny_checkpoints, tmp_path):
    sd1, sdxl = tiny_checkpoints[ModelFamily.SD1][1], tiny_checkpoints[ModelFamily.SDXL][1]
    failed = run_script(
        EXTRACT, "--model_org", str(sd1), "--model_tuned", str(sdxl), "--save_to", str(tmp_path / "x.safetensors")
    )
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith(f"error: {sd1} is an SD1.x model but {sdxl} is an SDXL model")
    assert not list(tmp_path.iterdir())


def test_sd2_v_prediction_metadata_and_no_metadata_drops_the_modelspec(tmp_path):
    for seed, name in ((0, "base"), (1, "tuned")):  # two unrelated models of one architecture
        save_stable_diffusion_checkpoint(make_tiny_model(ModelFamily.SD2, seed=seed), tmp_path / f"{name}.safetensors")
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    with_v2 = extract(base, tuned, tmp_path / "v.safetensors", family=ModelFamily.SD2, v_parameterization=True)
    metadata = read_lora_file(with_v2)[1]
    assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2_v"
    assert (
        metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
        and metadata["modelspec.prediction_type"] == "v"
    )
    plain = extract(base, tuned, tmp_path / "eps.safetensors", modelspec=False)
    metadata = read_lora_file(plain)[1]
    assert metadata["ss_base_model_version"] == "sd_v2" and not any(key.startswith("modelspec.") for key in metadata)
    assert "sshs_model_hash" in metadata
