"""networks/merge_lora.py and networks/sdxl_merge_lora.py: LoRAs merged into tiny SD1, SD2 and SDXL checkpoints
equal the base plus deltas computed by hand and compute what the LoRAs applied with `apply_to` compute, every other
tensor passes through unchanged, diffusers loads the result; LoRA + LoRA merges follow sd-scripts' factor sum
exactly, --concat and --shuffle apply exactly the ratio-weighted sum of the deltas; bad input is one sentence
naming the files."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from conftest import run_script
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.lora.block_weights import parse_block_weights
from library.lora.files import read_lora_file, read_lora_inputs, split_modules
from library.metadata import sshs_hashes
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion
from lora_helpers import ModelProbe, assert_outputs_close, fill_randomly, text_encoder_argument
from networks.lora import create_network, create_network_from_weights
from networks.merge_lora import MergeOptions, merge_into_checkpoint, merge_loras

QUIET = MergeOptions(progress=False)
QUIET_SDXL = MergeOptions(sdxl=True, progress=False)
RATIOS = (0.8, -0.5)
UNET = "model.diffusion_model."
# Hand-written from the spec's table (specs/lora_format.md 7.1), for the tiny SD1 U-Net (2 resnets per block; its
# second level is the first whose channel count grows, so the first conv_shortcut is in down_blocks.2).
SD1_CHECKPOINT_KEYS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": UNET
    + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": UNET + "input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_0_resnets_0_conv1": UNET + "input_blocks.1.0.in_layers.2.weight",
    "lora_unet_down_blocks_0_downsamplers_0_conv": UNET + "input_blocks.3.0.op.weight",
    "lora_unet_down_blocks_2_resnets_0_conv_shortcut": UNET + "input_blocks.7.0.skip_connection.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": UNET
    + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": UNET + "output_blocks.2.1.conv.weight",
    "lora_unet_up_blocks_1_resnets_2_time_emb_proj": UNET + "output_blocks.5.0.emb_layers.1.weight",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    ),
}


def make_lora(model, path, seed, dim, alpha, **network_args):
    network = create_network(1.0, dim, alpha, None, text_encoder_argument(model), model.unet, **network_args)
    fill_randomly(network, seed)
    network.save_weights(path)
    return path


@pytest.fixture(scope="module")
def loras(tiny_checkpoints, tmp_path_factory):
    """family -> {c3lier: rank 4 alpha 2 with 3x3 convs of rank 2 alpha 1, lierla: rank 4 alpha 4,
    rank8: rank 8 alpha 1}."""
    folder = tmp_path_factory.mktemp("loras")
    made = {}
    for family, (model, _, _) in tiny_checkpoints.items():
        made[family] = {
            "c3lier": make_lora(
                model, folder / f"c3lier-{family.value}.safetensors", 1, 4, 2.0, conv_dim=2, conv_alpha=1
            ),
            "lierla": make_lora(model, folder / f"lierla-{family.value}.safetensors", 2, 4, 4.0),
            "rank8": make_lora(model, folder / f"rank8-{family.value}.safetensors", 3, 8, 1.0),
        }
    return made


def delta_by_hand(up, down, scale):
    """scale * up @ down in float64, written with einsum, shaped like the layer's weight
    ([out, in] or [out, in, k, k])."""
    up = up.double().reshape(up.shape[0], up.shape[1])
    return scale * torch.einsum("or,ri...->oi...", up, down.double())


def file_deltas(path, ratio):
    """module -> ratio * alpha / rank * up @ down of a LoRA file, by hand."""
    modules = split_modules(read_lora_file(path)[0], str(path))
    return {name: delta_by_hand(f.up, f.down, ratio * f.alpha_value / f.rank) for name, f in modules.items()}


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


# ---------------------------------------------------------------- into a checkpoint


def mixed_checkpoint(single_file, path):
    """The tiny SD1 file with its text encoder in fp16 and two keys no loader knows (EMA), as old .ckpt files have."""
    tensors = load_file(single_file)
    tensors = {
        key: t.half() if key.startswith("cond_stage_model.") and t.is_floating_point() else t
        for key, t in tensors.items()
    }
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    save_file(tensors, path)
    return tensors


def test_merged_checkpoint_is_the_base_plus_the_deltas_by_hand_and_nothing_else_changes(
    tiny_checkpoints, loras, tmp_path
):
    base = mixed_checkpoint(tiny_checkpoints[ModelFamily.SD1][1], tmp_path / "base.safetensors")
    files = [loras[ModelFamily.SD1]["c3lier"], loras[ModelFamily.SD1]["lierla"]]
    merge_into_checkpoint(
        tmp_path / "base.safetensors", tmp_path / "merged.safetensors", read_lora_inputs(files, RATIOS), QUIET
    )
    merged = load_file(tmp_path / "merged.safetensors")
    deltas = [file_deltas(path, ratio) for path, ratio in zip(files, RATIOS)]

    assert merged.keys() == base.keys()
    assert all(merged[key].dtype == base[key].dtype for key in base)
    for name, key in SD1_CHECKPOINT_KEYS.items():
        expected = base[key].double() + sum(delta[name] for delta in deltas if name in delta)
        tolerance = 1e-6 if base[key].dtype == torch.float32 else 2e-3  # the text encoder is fp16 here
        assert relative_error(merged[key], expected) < tolerance, name
    changed = {key for key in base if not torch.equal(merged[key], base[key])}
    modules = set(deltas[0]) | set(deltas[1])
    assert len(changed) == len(modules)  # SD1 has no fused tensors: one weight per module
    assert all(key.endswith(".weight") and key.startswith((UNET, "cond_stage_model.")) for key in changed)
    assert set(SD1_CHECKPOINT_KEYS.values()) <= changed
    metadata = safe_open(tmp_path / "merged.safetensors", "pt").metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.merged_from"] == f"base, {files[0].stem}, {files[1].stem}"


@pytest.mark.parametrize("family", list(ModelFamily), ids=lambda f: f.value)
def test_the_merged_model_computes_what_the_loras_applied_with_apply_to_compute(
    family, tiny_checkpoints, loras, tmp_path
):
    _, single_file, _ = tiny_checkpoints[family]
    files = [loras[family]["c3lier"], loras[family]["lierla"]]
    options = QUIET_SDXL if family is ModelFamily.SDXL else QUIET
    merge_into_checkpoint(single_file, tmp_path / "merged.safetensors", read_lora_inputs(files, RATIOS), options)

    applied = load_stable_diffusion(single_file)
    for path, ratio in zip(files, RATIOS):
        network, weights = create_network_from_weights(ratio, path, None, text_encoder_argument(applied), applied.unet)
        network.apply_to(text_encoder_argument(applied), applied.unet)
        network.load_state_dict(weights)
    merged = load_stable_diffusion(tmp_path / "merged.safetensors")
    probe = ModelProbe(applied)
    assert_outputs_close(
        probe.outputs(applied.text_encoders, applied.unet), probe.outputs(merged.text_encoders, merged.unet), atol=2e-5
    )


def test_diffusers_loads_the_merged_checkpoint_with_the_merged_weights(tiny_checkpoints, loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, single_file, diffusers_folder = tiny_checkpoints[ModelFamily.SD1]
    loras_sd1 = read_lora_inputs([loras[ModelFamily.SD1]["c3lier"]], [0.7])
    merge_into_checkpoint(single_file, tmp_path / "merged.safetensors", loras_sd1, QUIET)
    pipeline = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "merged.safetensors"), config=str(diffusers_folder), local_files_only=True, safety_checker=None
    )
    ours = load_stable_diffusion(tmp_path / "merged.safetensors")
    for theirs, mine in (
        (pipeline.unet, ours.unet),
        (pipeline.text_encoder, ours.text_encoders[0]),
        (pipeline.vae, ours.vae),
    ):
        expected = mine.state_dict()
        assert all(torch.equal(tensor, expected[key]) for key, tensor in theirs.state_dict().items() if key in expected)


def test_a_module_the_checkpoint_lacks_is_skipped_with_a_warning(tiny_checkpoints, loras, tmp_path, caplog):
    weights, metadata = read_lora_file(loras[ModelFamily.SD1]["lierla"])
    weights.update(
        {
            "lora_unet_down_blocks_9_conv.lora_down.weight": torch.ones(4, 4, 3, 3),
            "lora_unet_down_blocks_9_conv.lora_up.weight": torch.ones(32, 4, 1, 1),
        }
    )
    save_file(weights, tmp_path / "extra.safetensors", metadata)
    with caplog.at_level(logging.WARNING):
        merge_into_checkpoint(
            tiny_checkpoints[ModelFamily.SD1][1],
            tmp_path / "m.safetensors",
            read_lora_inputs([tmp_path / "extra.safetensors"], [1.0]),
            QUIET,
        )
    assert "1 of its 211 modules name no layer" in caplog.text and "lora_unet_down_blocks_9_conv" in caplog.text


def test_sdxl_block_weights_scale_each_block_linearly(tiny_checkpoints, loras, tmp_path):
    """--lbws with the 20-value SDXL layout: BASE (the text encoders) 0.5, every U-Net block 0."""
    _, single_file, _ = tiny_checkpoints[ModelFamily.SDXL]
    files = [loras[ModelFamily.SDXL]["lierla"]]
    block_weights = tuple(parse_block_weights([json.dumps([0.5] + [0] * 19)], files))
    weighted = MergeOptions(sdxl=True, block_weights=block_weights, progress=False)
    merge_into_checkpoint(single_file, tmp_path / "weighted.safetensors", read_lora_inputs(files, [1.0]), weighted)
    merge_into_checkpoint(single_file, tmp_path / "half.safetensors", read_lora_inputs(files, [0.5]), QUIET_SDXL)
    base, merged, half = (
        load_file(path) for path in (single_file, tmp_path / "weighted.safetensors", tmp_path / "half.safetensors")
    )
    assert all(torch.equal(merged[key], base[key] if key.startswith(UNET) else half[key]) for key in base)
    assert any(not torch.equal(merged[key], base[key]) for key in base if key.startswith("conditioner."))

    out = merge_loras(
        tmp_path / "weighted-lora.safetensors",
        read_lora_inputs(files, [1.0]),
        MergeOptions(sdxl=True, concat=True, block_weights=block_weights, progress=False),
    )
    merged_lora, wanted = merged_deltas(out), wanted_deltas(files, [0.5])
    assert all(not merged_lora[name].any() for name in wanted if name.startswith("lora_unet_"))
    assert max(relative_error(merged_lora[name], wanted[name]) for name in wanted if name.startswith("lora_te")) < 1e-6


# ---------------------------------------------------------------- LoRA + LoRA


def merged_deltas(path):
    return file_deltas(path, 1.0)


def wanted_deltas(files, ratios):
    """module -> sum ratio_i * delta_i over the files that have it."""
    wanted = {}
    for path, ratio in zip(files, ratios):
        for name, delta in file_deltas(path, ratio).items():
            wanted[name] = wanted[name] + delta if name in wanted else delta
    return wanted


@pytest.mark.parametrize("shuffle", [False, True], ids=["concat", "concat+shuffle"])
def test_concat_applies_exactly_the_ratio_weighted_sum_of_the_deltas(loras, tmp_path, shuffle):
    files = [loras[ModelFamily.SD1]["c3lier"], loras[ModelFamily.SD1]["rank8"], loras[ModelFamily.SD1]["lierla"]]
    ratios = [1.0, -0.7, 0.3]
    out = merge_loras(
        tmp_path / "concat.safetensors",
        read_lora_inputs(files, ratios),
        MergeOptions(concat=True, shuffle=shuffle, progress=False),
    )
    merged, wanted = merged_deltas(out), wanted_deltas(files, ratios)
    assert merged.keys() == wanted.keys()
    assert max(relative_error(merged[name], wanted[name]) for name in wanted) < 1e-6

    tensors, metadata = read_lora_file(out)
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{to_q}.lora_down.weight"].shape[0] == 4 + 8 + 4
    alpha = tensors[f"{to_q}.alpha"]
    assert (
        alpha.dtype == torch.float32 and alpha.dim() == 0 and alpha.item() == 2.0 / 4 * 16
    )  # the first file's scale kept
    assert (
        metadata["ss_network_dim"] == "Dynamic"
    )  # 16 where all three files have the module, 4 in C3Lier's ResNet layers
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert (
        metadata["ss_base_model_version"] == "sd_v1"
        and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    )
    assert {key: metadata[key] for key in ("sshs_model_hash", "sshs_legacy_hash")} == sshs_hashes(tensors, metadata)


def test_shuffle_permutes_the_rank_dimension(loras, tmp_path):
    files = [loras[ModelFamily.SD1]["lierla"], loras[ModelFamily.SD1]["rank8"]]
    plain = read_lora_file(
        merge_loras(
            tmp_path / "plain.safetensors", read_lora_inputs(files, RATIOS), MergeOptions(concat=True, progress=False)
        )
    )[0]
    shuffled = read_lora_file(
        merge_loras(
            tmp_path / "shuffled.safetensors",
            read_lora_inputs(files, RATIOS),
            MergeOptions(concat=True, shuffle=True, progress=False),
        )
    )[0]
    downs = [key for key in plain if key.endswith("lora_down.weight")]
    assert sum(not torch.equal(plain[key], shuffled[key]) for key in downs) > len(downs) // 2
    for key in downs:
        rows = lambda t: sorted(map(tuple, t.reshape(t.shape[0], -1).tolist()))  # noqa: E731
        assert rows(plain[key]) == rows(shuffled[key])


def test_the_default_merge_is_sd_scripts_factor_sum_and_says_it_is_not_the_sum(loras, tmp_path, caplog):
    files = [loras[ModelFamily.SD1]["c3lier"], loras[ModelFamily.SD1]["lierla"]]
    with caplog.at_level(logging.WARNING):
        out = merge_loras(tmp_path / "sum.safetensors", read_lora_inputs(files, RATIOS), QUIET)
    assert "which is not the sum of their deltas" in caplog.text and "use --concat for the exact sum" in caplog.text
    tensors = read_lora_file(out)[0]
    inputs = [split_modules(read_lora_file(path)[0], str(path)) for path in files]
    for name in inputs[0]:
        terms = [(ratio, modules[name]) for ratio, modules in zip(RATIOS, inputs) if name in modules]
        base_alpha = terms[0][1].alpha_value
        s = [math.sqrt(f.alpha_value / base_alpha) * ratio for ratio, f in terms]  # specs/lora_format.md 7.2
        up = sum(abs(si) * f.up for si, (_, f) in zip(s, terms))
        down = sum(si * f.down for si, (_, f) in zip(s, terms))
        torch.testing.assert_close(tensors[f"{name}.lora_up.weight"], up, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(tensors[f"{name}.lora_down.weight"], down, rtol=1e-6, atol=1e-7)
        assert tensors[f"{name}.alpha"].item() == base_alpha


def test_the_default_merge_says_when_it_is_exact(loras, tmp_path, capsys):
    same_twice = [loras[ModelFamily.SD1]["lierla"]] * 2
    out = merge_loras(tmp_path / "halves.safetensors", read_lora_inputs(same_twice, [0.5, 0.5]), QUIET)
    assert "the factor sum is exact here" in capsys.readouterr().out
    merged, wanted = merged_deltas(out), wanted_deltas(same_twice, [0.5, 0.5])
    assert max(relative_error(merged[name], wanted[name]) for name in wanted) < 1e-6


def test_the_default_merge_refuses_different_ranks_naming_both_files(loras, tmp_path):
    files = [loras[ModelFamily.SD1]["lierla"], loras[ModelFamily.SD1]["rank8"]]
    with pytest.raises(
        UserError, match=rf"{files[1]}: module '.*' has rank 8, but in {files[0]} it has rank 4; .*use --concat"
    ):
        merge_loras(tmp_path / "x.safetensors", read_lora_inputs(files, RATIOS), QUIET)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- errors


def test_ratios_must_match_the_models(loras):
    files = [loras[ModelFamily.SD1]["lierla"], loras[ModelFamily.SD1]["rank8"]]
    with pytest.raises(
        UserError, match=r"^--ratios gives 1 value\(s\) but --models names 2 file\(s\) \(.*\); give one ratio per model"
    ):
        read_lora_inputs(files, [1.0])


def test_a_lora_of_another_family_is_refused_naming_both_files(tiny_checkpoints, loras, tmp_path):
    sdxl_lora, sd1_lora = loras[ModelFamily.SDXL]["lierla"], loras[ModelFamily.SD1]["lierla"]
    sd1_checkpoint = tiny_checkpoints[ModelFamily.SD1][1]
    with pytest.raises(UserError, match=rf"^{sdxl_lora} is an SDXL LoRA but {sd1_checkpoint} is an SD1.x checkpoint;"):
        merge_into_checkpoint(sd1_checkpoint, tmp_path / "x.safetensors", read_lora_inputs([sdxl_lora], [1.0]), QUIET)
    with pytest.raises(UserError, match=rf"^{sd1_lora} is an SD1.x LoRA but {sdxl_lora} is an SDXL LoRA;"):
        read_lora_inputs([sd1_lora, sdxl_lora], [1.0, 1.0])
    with pytest.raises(UserError, match=r"is an SDXL checkpoint; merge into it with networks/sdxl_merge_lora.py"):
        merge_into_checkpoint(
            tiny_checkpoints[ModelFamily.SDXL][1],
            tmp_path / "x.safetensors",
            read_lora_inputs([sdxl_lora], [1.0]),
            QUIET,
        )
    with pytest.raises(
        UserError, match=r"a Diffusers folder; LoRAs are merged into a single .safetensors/.ckpt checkpoint"
    ):
        merge_into_checkpoint(
            tiny_checkpoints[ModelFamily.SD1][2], tmp_path / "x.safetensors", read_lora_inputs([sd1_lora], [1.0]), QUIET
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_a_lora_for_another_architecture_is_refused_naming_both_files(tiny_checkpoints, loras, tmp_path):
    """SD1 and SD2 LoRAs share their names; without metadata (a .pt file) the layer shapes tell them apart."""
    weights, _ = read_lora_file(loras[ModelFamily.SD2]["lierla"])
    torch.save(weights, tmp_path / "sd2.pt")
    sd1_checkpoint = tiny_checkpoints[ModelFamily.SD1][1]
    with pytest.raises(
        UserError,
        match=rf"^{tmp_path / 'sd2.pt'}: module '.*' is made for a .* layer, but that layer of {sd1_checkpoint} is",
    ):
        merge_into_checkpoint(
            sd1_checkpoint, tmp_path / "x.safetensors", read_lora_inputs([tmp_path / "sd2.pt"], [1.0]), QUIET
        )
    sd1_lora = loras[ModelFamily.SD1]["lierla"]
    with pytest.raises(
        UserError,
        match=rf"^{sd1_lora} and {tmp_path / 'sd2.pt'}: module '.*' adapts a layer of shape .* in the first but",
    ):
        merge_loras(
            tmp_path / "x.safetensors",
            read_lora_inputs([sd1_lora, tmp_path / "sd2.pt"], RATIOS),
            MergeOptions(concat=True, progress=False),
        )
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- the scripts, as a user runs them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_gives_the_cpu_result(tiny_checkpoints, loras, tmp_path):
    _, single_file, _ = tiny_checkpoints[ModelFamily.SD1]
    files = read_lora_inputs([loras[ModelFamily.SD1]["c3lier"], loras[ModelFamily.SD1]["lierla"]], RATIOS)
    on_gpu = MergeOptions(device=torch.device("cuda"), progress=False)
    merge_into_checkpoint(single_file, tmp_path / "gpu.safetensors", files, on_gpu)
    merge_into_checkpoint(single_file, tmp_path / "cpu.safetensors", files, QUIET)
    gpu, cpu = load_file(tmp_path / "gpu.safetensors"), load_file(tmp_path / "cpu.safetensors")
    assert all(
        relative_error(gpu[key], cpu[key].double()) < 1e-5
        for key in cpu
        if cpu[key].is_floating_point() and cpu[key].any()
    )
    for concat in (False, True):
        options = MergeOptions(device=torch.device("cuda"), concat=concat, shuffle=concat, progress=False)
        merged = merged_deltas(merge_loras(tmp_path / "gpu-lora.safetensors", files, options))
        expected = merged_deltas(
            merge_loras(tmp_path / "cpu-lora.safetensors", files, MergeOptions(concat=concat, progress=False))
        )
        assert max(relative_error(merged[name], expected[name]) for name in expected) < 1e-5


@pytest.mark.slow
def test_merge_lora_script_writes_a_ckpt_in_the_save_precision(tiny_checkpoints, loras, tmp_path):
    _, single_file, _ = tiny_checkpoints[ModelFamily.SD1]
    files = [str(loras[ModelFamily.SD1]["c3lier"]), str(loras[ModelFamily.SD1]["lierla"])]
    finished = run_script(
        "networks/merge_lora.py",
        "--sd_model",
        str(single_file),
        "--save_to",
        str(tmp_path / "merged.ckpt"),
        "--models",
        *files,
        "--ratios",
        *map(str, RATIOS),
        "--save_precision",
        "fp16",
    )
    assert finished.returncode == 0, finished.stderr
    assert f"saved {tmp_path / 'merged.ckpt'}" in finished.stdout
    saved = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    assert set(saved) == {"state_dict", "epoch", "global_step"}
    merge_into_checkpoint(single_file, tmp_path / "reference.safetensors", read_lora_inputs(files, RATIOS), QUIET)
    reference = load_file(tmp_path / "reference.safetensors")
    assert saved["state_dict"].keys() == reference.keys()
    assert all(
        saved["state_dict"][key].dtype == (torch.float16 if t.is_floating_point() else t.dtype)
        for key, t in reference.items()
    )
    assert all(
        torch.equal(saved["state_dict"][key], t.to(saved["state_dict"][key].dtype)) for key, t in reference.items()
    )

    refused = run_script(
        "networks/merge_lora.py", "--save_to", str(tmp_path / "x.safetensors"), "--models", *files, "--ratios", "1"
    )
    assert (
        refused.returncode == 2
        and refused.stderr.startswith("error: --ratios gives 1 value(s) but --models names 2 file(s)")
        and len(refused.stderr.splitlines()) == 1
    )


@pytest.mark.slow
def test_sdxl_merge_lora_script_concatenates_and_shuffles(loras, tmp_path):
    files = [loras[ModelFamily.SDXL]["c3lier"], loras[ModelFamily.SDXL]["rank8"]]
    ratios = [1.0, -0.7]
    finished = run_script(
        "networks/sdxl_merge_lora.py",
        "--save_to",
        str(tmp_path / "ab.safetensors"),
        "--models",
        *map(str, files),
        "--ratios",
        *map(str, ratios),
        "--concat",
        "--shuffle",
        "--save_precision",
        "fp16",
    )
    assert finished.returncode == 0, finished.stderr
    tensors, metadata = read_lora_file(tmp_path / "ab.safetensors")
    assert {t.dtype for key, t in tensors.items() if not key.endswith(".alpha")} == {torch.float16}
    assert (
        metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        and metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    )
    assert any(key.startswith("lora_te2_") for key in tensors)
    merged, wanted = merged_deltas(tmp_path / "ab.safetensors"), wanted_deltas(files, ratios)
    assert max(relative_error(merged[name], wanted[name]) for name in wanted) < 2e-3  # fp16 factors


def test_a_lora_with_nan_is_refused_by_every_merge_tool_and_nothing_is_written(tiny_checkpoints, loras, tmp_path):
    from networks.resize_lora import ResizeOptions, resize
    from networks.svd_merge_lora import SvdMergeOptions, svd_merge

    weights, metadata = read_lora_file(loras[ModelFamily.SD1]["lierla"])
    broken_key = sorted(key for key in weights if key.endswith("lora_up.weight"))[3]
    weights[broken_key][0, 0] = float("nan")
    broken = tmp_path / "diverged.safetensors"
    save_file(weights, broken, metadata)
    out = tmp_path / "out.safetensors"
    refused = run_script(
        "networks/merge_lora.py", "--sd_model", str(tiny_checkpoints[ModelFamily.SD1][1]), "--save_to", str(out),
        "--models", str(broken), "--ratios", "1",
    )  # fmt: skip
    message = f"{broken}: module '{broken_key.split('.')[0]}' holds NaN or infinite values (in lora_up.weight)"
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [f"error: {message}; {MESSAGE_END}"]
    with pytest.raises(UserError, match=re.escape(message)):
        svd_merge(SvdMergeOptions(models=(broken,), ratios=(1.0,), save_to=out))
    with pytest.raises(UserError, match=re.escape(message)):
        resize(ResizeOptions(model=broken, save_to=out))
    weights[broken_key][0, 0] = float("inf")
    save_file(weights, broken, metadata)
    with pytest.raises(UserError, match=re.escape(message)):
        merge_loras(out, read_lora_inputs([loras[ModelFamily.SD1]["lierla"], broken], [1.0, 1.0]), QUIET)
    assert not out.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["diverged.safetensors"]


MESSAGE_END = "the file is broken, most likely by a training run that diverged: use an earlier save of it."
