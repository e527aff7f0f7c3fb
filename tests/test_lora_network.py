"""networks.lora against the spec: targets and names on real-size models, the forward and merge formulas computed
by hand, files written from the key grammar, and clear errors for LoRAs of the wrong model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import empty_model
from lora_helpers import ModelProbe, assert_outputs_close, fill_randomly, text_encoder_argument, tiny_model_pair
from networks.lora import create_network, create_network_from_weights

# Module counts of the released models (specs/lora_format.md section 1): text encoder(s), U-Net LierLa, U-Net C3Lier.
REAL_COUNTS = {ModelFamily.SD1: (72, 192, 278), ModelFamily.SD2: (138, 192, 278), ModelFamily.SDXL: (264, 722, 788)}


@pytest.fixture(scope="module")
def real_models():
    return {family: empty_model(family) for family in ModelFamily}


@pytest.mark.parametrize("family", list(ModelFamily), ids=lambda f: f.value)
def test_real_models_get_the_modules_sd_scripts_creates(family, real_models):
    model = real_models[family]
    text_count, lierla_count, c3lier_count = REAL_COUNTS[family]
    lierla = create_network(1.0, 1, 1, None, text_encoder_argument(model), model.unet)
    c3lier = create_network(1.0, 1, 1, None, text_encoder_argument(model), model.unet, conv_dim=1)
    assert (len(lierla.text_encoder_loras), len(lierla.unet_loras), len(c3lier.unet_loras)) == (
        text_count,
        lierla_count,
        c3lier_count,
    )
    prefixes = {"lora_te1_", "lora_te2_", "lora_unet_"} if family is ModelFamily.SDXL else {"lora_te_", "lora_unet_"}
    assert {key[: key.index("_", 5) + 1] for key in c3lier.state_dict()} == prefixes


def test_sd15_names_and_shapes_match_the_spec_table(real_models):
    model = real_models[ModelFamily.SD1]
    network = create_network(1.0, 8, 1, None, model.text_encoders[0], model.unet, conv_dim=4)
    shapes = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    expected = {  # specs/lora_format.md section 2.1
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((8, 768), (768, 8)),
        "lora_te_text_model_encoder_layers_11_mlp_fc1": ((8, 768), (3072, 8)),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": ((8, 3072), (768, 8)),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((8, 320, 1, 1), (320, 8, 1, 1)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((8, 320), (320, 8)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((8, 768), (320, 8)),
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0": ((8, 1280), (1280, 8)),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": ((8, 1280), (10240, 8)),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": ((8, 5120), (1280, 8)),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((4, 320, 3, 3), (320, 4, 1, 1)),
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj": ((8, 1280), (640, 8)),
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ((8, 320, 1, 1), (640, 8, 1, 1)),
        "lora_unet_down_blocks_0_downsamplers_0_conv": ((4, 320, 3, 3), (320, 4, 1, 1)),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ((4, 1280, 3, 3), (1280, 4, 1, 1)),
    }
    for name, (down, up) in expected.items():
        assert (shapes[f"{name}.lora_down.weight"], shapes[f"{name}.lora_up.weight"], shapes[f"{name}.alpha"]) == (
            down,
            up,
            (),
        )
    assert len(shapes) == 3 * (72 + 278)


def test_sdxl_unet_modules_have_sgm_names(real_models):
    model = real_models[ModelFamily.SDXL]
    network = create_network(1.0, 4, 1, None, model.text_encoders, model.unet, conv_dim=4)
    shapes = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    assert shapes["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] == (4, 768)
    assert shapes["lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight"] == (5120, 4)
    assert shapes["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (4, 2048)
    assert shapes["lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj.lora_up.weight"] == (10240, 4)
    assert shapes["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] == (4, 320, 3, 3)
    assert shapes["lora_unet_output_blocks_2_2_conv.lora_down.weight"] == (4, 1280, 3, 3)
    assert not any("down_blocks" in key or "up_blocks" in key or "mid_block_" in key for key in shapes)


def test_a_new_network_changes_nothing_and_scales_by_alpha_over_rank():
    model, untouched = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, None, None, None, model.text_encoders[0], model.unet, conv_dim="4")
    lora = network.unet_loras[0]
    assert (lora.lora_dim, lora.scale, network.unet_loras[-1].scale) == (4, 0.25, 0.25)  # defaults: dim 4, alpha 1
    assert all(torch.count_nonzero(lora.lora_up.weight) == 0 for lora in network.unet_loras)
    network.apply_to(model.text_encoders[0], model.unet)
    probe = ModelProbe(model)
    assert_outputs_close(
        probe.outputs(untouched.text_encoders, untouched.unet), probe.outputs(model.text_encoders, model.unet), atol=0
    )


def merged_by_hand(weight, up, down, factor):
    """W + factor * sum_j up[o, j] * down[j, i, ...], written out with einsum, independently of the library."""
    up2 = up.reshape(up.shape[0], up.shape[1])
    if weight.dim() == 2:
        return weight + factor * torch.einsum("oj,ji->oi", up2, down.reshape(down.shape[0], -1))
    return weight + factor * torch.einsum(
        "oj,jihw->oihw", up2, down.reshape(down.shape[0], weight.shape[1], *weight.shape[2:])
    )


def test_forward_and_merge_follow_the_formula_for_linear_1x1_and_3x3():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(0.6, 3, 2, None, model.text_encoders[0], model.unet, conv_dim=2, conv_alpha=5)
    fill_randomly(network)
    loras = {lora.lora_name: lora for lora in network.unet_loras}
    cases = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (2 / 3, torch.randn(2, 7, 32)),
        "lora_unet_down_blocks_0_attentions_0_proj_in": (2 / 3, torch.randn(2, 32, 5, 5)),
        "lora_unet_down_blocks_0_resnets_0_conv1": (5 / 2, torch.randn(2, 32, 5, 5)),
        "lora_unet_down_blocks_0_downsamplers_0_conv": (5 / 2, torch.randn(2, 32, 6, 6)),
    }
    originals = {name: loras[name].org_module.weight.detach().clone() for name in cases}
    network.apply_to(model.text_encoders[0], model.unet)
    for name, (scale, x) in cases.items():
        lora, layer = loras[name], loras[name].org_module
        assert lora.scale == pytest.approx(scale)
        expected_weight = merged_by_hand(originals[name], lora.lora_up.weight, lora.lora_down.weight, 0.6 * scale)
        if isinstance(layer, torch.nn.Conv2d):
            expected = F.conv2d(x, expected_weight, layer.bias, layer.stride, layer.padding)
        else:
            expected = F.linear(x, expected_weight, layer.bias)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
            lora.merge_to()
        torch.testing.assert_close(layer.weight, expected_weight, atol=1e-6, rtol=1e-6)


def hand_written_file(path, model):
    """A LoRA written key by key from the spec's grammar: per-module ranks, one module without alpha."""
    generator = torch.Generator().manual_seed(3)

    def factors(name, rank, in_shape, out, alpha):
        tensors = {
            f"{name}.lora_down.weight": torch.randn(rank, *in_shape, generator=generator),
            f"{name}.lora_up.weight": torch.randn(
                out, rank, *([1, 1] if len(in_shape) == 3 else []), generator=generator
            ),
        }
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        return tensors

    width = model.text_encoders[0].config.hidden_size
    tensors = {
        **factors("lora_te_text_model_encoder_layers_1_self_attn_v_proj", 2, (width,), width, 1.0),
        **factors("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 5, (width,), 64, None),
        **factors("lora_unet_mid_block_resnets_1_conv2", 3, (64, 3, 3), 64, 6.0),
        **factors("lora_unet_down_blocks_1_attentions_1_proj_out", 1, (32, 1, 1), 32, 0.5),
    }
    save_file(tensors, path)
    return tensors


def test_network_from_a_hand_written_file_has_its_modules_ranks_and_outputs(tmp_path):
    model, untouched = tiny_model_pair(ModelFamily.SD1)
    tensors = hand_written_file(tmp_path / "hand.safetensors", model)
    network, weights = create_network_from_weights(
        0.9, tmp_path / "hand.safetensors", None, model.text_encoders[0], model.unet
    )
    ranks = {lora.lora_name: (lora.lora_dim, lora.scale) for lora in network.text_encoder_loras + network.unet_loras}
    assert ranks == {
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (2, 0.5),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (5, 1.0),  # no alpha: scale 1
        "lora_unet_mid_block_resnets_1_conv2": (3, 2.0),
        "lora_unet_down_blocks_1_attentions_1_proj_out": (1, 0.5),
    }
    network.apply_to(model.text_encoders[0], model.unet)
    network.load_state_dict(weights)  # strict, as in the Diffusers recipe: the file's keys are exactly the network's

    by_hand = untouched
    for name in ranks:
        prefix = "lora_te_" if name.startswith("lora_te_") else "lora_unet_"
        path = name.removeprefix(prefix)
        root = by_hand.text_encoders[0] if prefix == "lora_te_" else by_hand.unet
        layer = _layer_by_underscored_path(root, path.removeprefix("text_model_"))
        with torch.no_grad():
            layer.weight.copy_(
                merged_by_hand(
                    layer.weight,
                    tensors[f"{name}.lora_up.weight"],
                    tensors[f"{name}.lora_down.weight"],
                    0.9 * ranks[name][1],
                )
            )
    probe = ModelProbe(model)
    assert_outputs_close(
        probe.outputs(by_hand.text_encoders, by_hand.unet), probe.outputs(model.text_encoders, model.unet), atol=2e-5
    )


def _layer_by_underscored_path(root, underscored):
    for path, module in root.named_modules():
        if path.replace(".", "_") == underscored:
            return module
    raise KeyError(underscored)


def test_merging_a_state_dict_uses_its_own_alpha():
    model, untouched = tiny_model_pair(ModelFamily.SD1)
    network = create_network(0.5, 3, 1, None, model.text_encoders[0], model.unet)
    fill_randomly(network)
    weights = {
        key: torch.tensor(6.0) if key.endswith(".alpha") else value * 2 for key, value in network.state_dict().items()
    }
    network.merge_to(model.text_encoders[0], model.unet, weights)
    for lora in network.text_encoder_loras[:3] + network.unet_loras[-3:]:
        name = lora.lora_name
        original = _layer_by_underscored_path(
            untouched.text_encoders[0] if name.startswith("lora_te_") else untouched.unet,
            name.split("_", 2)[2].removeprefix("text_model_"),
        ).weight
        expected = merged_by_hand(
            original, weights[f"{name}.lora_up.weight"], weights[f"{name}.lora_down.weight"], 0.5 * 6.0 / 3
        )
        torch.testing.assert_close(lora.org_module.weight, expected, atol=1e-5, rtol=1e-5)


def test_without_a_text_encoder_only_the_unet_modules_are_built(tmp_path, caplog):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet)
    network.save_weights(tmp_path / "both.safetensors")
    unet_only, weights = create_network_from_weights(1.0, tmp_path / "both.safetensors", None, None, model.unet)
    assert unet_only.text_encoder_loras == [] and len(unet_only.unet_loras) == len(network.unet_loras)
    assert all(key.startswith("lora_unet_") for key in weights)
    assert "no text encoder was given" in caplog.text


def test_resumed_weights_set_the_scale_from_the_files_alpha(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    trained = create_network(1.0, 4, 2, None, model.text_encoders[0], model.unet)
    trained.save_weights(tmp_path / "alpha2.safetensors")
    resumed = create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet)
    resumed.load_weights(tmp_path / "alpha2.safetensors")
    assert {lora.scale for lora in resumed.unet_loras} == {0.5}


def test_rank_mismatch_on_resume_names_the_file_and_the_fix(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    create_network(1.0, 8, 1, None, model.text_encoders[0], model.unet).save_weights(tmp_path / "rank8.safetensors")
    with pytest.raises(UserError, match=r"rank8\.safetensors.*--dim_from_weights"):
        create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet).load_weights(tmp_path / "rank8.safetensors")


@pytest.mark.parametrize(
    ("trained_for", "used_with", "message"),
    [
        (ModelFamily.SD1, ModelFamily.SDXL, r"modules name layers this SDXL model does not have.*trained for sd_v1"),
        (ModelFamily.SD1, ModelFamily.SD2, r"this SD2.x model's layer is .*trained for sd_v1"),
    ],
    ids=["sd1-on-sdxl", "sd1-on-sd2"],
)
def test_a_lora_for_another_model_is_refused_with_one_sentence(trained_for, used_with, message, tmp_path):
    source, _ = tiny_model_pair(trained_for)
    create_network(1.0, 4, 1, None, text_encoder_argument(source), source.unet).save_weights(
        tmp_path / "other.safetensors"
    )
    target, _ = tiny_model_pair(used_with, seed=1)
    with pytest.raises(UserError, match=message):
        create_network_from_weights(
            1.0, tmp_path / "other.safetensors", None, text_encoder_argument(target), target.unet
        )


def test_a_lycoris_file_is_refused(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(UserError, match="hada_w1_a.*another network type"):
        create_network_from_weights(1.0, tmp_path / "loha.safetensors", None, model.text_encoders[0], model.unet)


def test_sdxl_file_with_diffusers_unet_names_is_renamed():
    model, _ = tiny_model_pair(ModelFamily.SDXL)
    network = create_network(1.0, 4, 1, None, model.text_encoders, model.unet, conv_dim=2)
    fill_randomly(network)
    ours = network.state_dict()
    diffusers_to_sgm = {  # written out from the layouts (specs/lora_format.md sections 1.4 and 7.1)
        "down_blocks_0_resnets_0_conv1": "input_blocks_1_0_in_layers_2",
        "down_blocks_1_attentions_0_proj_in": "input_blocks_4_1_proj_in",
        "down_blocks_1_resnets_0_conv_shortcut": "input_blocks_4_0_skip_connection",
        "down_blocks_0_downsamplers_0_conv": "input_blocks_3_0_op",
        "mid_block_attentions_0_transformer_blocks_1_attn2_to_k": "middle_block_1_transformer_blocks_1_attn2_to_k",
        "mid_block_resnets_1_time_emb_proj": "middle_block_2_emb_layers_1",
        "up_blocks_0_upsamplers_0_conv": "output_blocks_2_2_conv",
        "up_blocks_1_resnets_2_conv2": "output_blocks_5_0_out_layers_3",
    }
    diffusers_named = {}
    for diffusers_name, sgm_name in diffusers_to_sgm.items():
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            diffusers_named[f"lora_unet_{diffusers_name}.{part}"] = ours[f"lora_unet_{sgm_name}.{part}"]
    rebuilt, weights = create_network_from_weights(
        1.0, None, None, model.text_encoders, model.unet, weights_sd=diffusers_named
    )
    assert sorted(lora.lora_name for lora in rebuilt.unet_loras) == sorted(
        f"lora_unet_{name}" for name in diffusers_to_sgm.values()
    )
    assert all(torch.equal(tensor, ours[key]) for key, tensor in weights.items())


def test_sd2_projection_factors_load_in_either_shape():
    model, _ = tiny_model_pair(ModelFamily.SD2)
    network = create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet)
    fill_randomly(network)
    four_d = {
        key: value[..., None, None] if "proj_" in key and "lora_" in key and value.dim() == 2 else value
        for key, value in network.state_dict().items()
    }
    assert any(value.dim() == 4 for value in four_d.values())
    rebuilt, weights = create_network_from_weights(
        1.0, None, None, model.text_encoders[0], model.unet, weights_sd=four_d
    )
    rebuilt.load_state_dict(weights)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def test_set_multiplier_scales_the_change_linearly():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, 4, 4, None, model.text_encoders[0], model.unet)
    fill_randomly(network, std=0.05)
    network.apply_to(model.text_encoders[0], model.unet)
    layer = network.text_encoder_loras[0].org_module
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        plain = F.linear(x, layer.weight, layer.bias)
        network.set_multiplier(1.0)
        full = layer(x) - plain
        network.set_multiplier(0.25)
        quarter = layer(x) - plain
    torch.testing.assert_close(quarter, full * 0.25, atol=1e-6, rtol=1e-5)


def test_module_dropout_skips_and_rank_dropout_rescales_only_in_training():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, 4, 4, None, model.text_encoders[0], model.unet, module_dropout="0.5")
    fill_randomly(network)
    network.apply_to(model.text_encoders[0], model.unet)
    lora = network.text_encoder_loras[0]
    assert lora.module_dropout == 0.5
    lora.module_dropout = 1.0  # always skipped (the argument refuses 1, which would train nothing)
    x = torch.randn(2, 5, lora.org_module.in_features)
    with torch.no_grad():
        plain = F.linear(x, lora.org_module.weight, lora.org_module.bias)
        lora.train()
        torch.testing.assert_close(lora.org_module(x), plain)
        lora.eval()
        assert not torch.allclose(lora.org_module(x), plain)

        lora.module_dropout, lora.rank_dropout = None, 0.5
        lora.train()
        torch.manual_seed(0)
        samples = torch.stack([lora.org_module(x) - plain for _ in range(4000)]).mean(0)
        lora.eval()
        expected = lora.org_module(x) - plain
    torch.testing.assert_close(samples, expected, atol=0.15 * expected.abs().max().item(), rtol=0)


def test_max_norm_regularization_caps_each_delta_norm():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, 4, 2, None, model.text_encoders[0], model.unet, conv_dim=2)
    fill_randomly(network, std=0.3)
    loras = network.text_encoder_loras + network.unet_loras
    before = torch.stack([torch.linalg.norm(lora.get_weight(1.0)) for lora in loras])
    cap = before.median().item()
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    after = torch.stack([torch.linalg.norm(lora.get_weight(1.0)) for lora in loras])
    assert int(scaled) == int((before > cap).sum())
    torch.testing.assert_close(after, before.clamp(max=cap), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((mean_norm, max_norm), (after.mean(), after.max()), atol=1e-4, rtol=1e-4)


def test_apply_to_with_one_side_off_trains_and_saves_only_the_other(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = create_network(1.0, 4, 1, None, model.text_encoders[0], model.unet)
    network.apply_to(model.text_encoders[0], model.unet, apply_text_encoder=False, apply_unet=True)
    assert network.text_encoder_loras == [] and all(key.startswith("lora_unet_") for key in network.state_dict())
    groups, descriptions = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert descriptions == ["unet"] and groups[0]["lr"] == 1e-4
    assert math.isclose(sum(p.numel() for p in groups[0]["params"]), sum(p.numel() for p in network.parameters()))
