"""`--network_args` of networks.lora: block-wise learning rates and ranks, LoRA+, dropouts, and one clear error for
each kind of mistake (specs/lora_format.md section 4)."""

from __future__ import annotations

import math

import pytest

from library.errors import UserError
from library.lora.naming import block_layout, ldm_block, unet_targets
from library.model_files.family import ModelFamily
from lora_helpers import tiny_model_pair
from networks.lora import create_network

# The SD U-Net's LierLa modules sit in these block slots (specs/lora_format.md section 4.3).
LIERLA_SLOTS = {1, 2, 4, 5, 7, 8, 12, 16, 17, 18, 19, 20, 21, 22, 23, 24}


@pytest.fixture(scope="module")
def sd1():
    return tiny_model_pair(ModelFamily.SD1)[0]


def network(model, dim=4, alpha=1, **network_args):
    return create_network(1.0, dim, alpha, None, model.text_encoders[0], model.unet, **network_args)


def lr_by_description(net, text_encoder_lr=1e-5, unet_lr=1e-4, default_lr=1e-3):
    groups, descriptions = net.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
    return {description: group["lr"] for group, description in zip(groups, descriptions)}


def test_block_lr_presets_offsets_and_mid_weight(sd1):
    net = network(
        sd1, down_lr_weight="sine+.5", mid_lr_weight="1.5", up_lr_weight="cosine+.5", block_lr_zero_threshold="0.1"
    )
    rates = lr_by_description(net)
    sine = [math.sin(math.pi / 2 * i / 11) + 0.5 for i in range(12)]
    expected = {"textencoder": 1e-5}
    for slot in sorted(LIERLA_SLOTS):
        weight = sine[slot] if slot < 12 else 1.5 if slot == 12 else sine[11 - (slot - 13)]
        expected[f"unet_block{slot}"] = pytest.approx(1e-4 * weight)
    assert rates == expected


def test_block_weight_zero_or_below_threshold_creates_no_module(sd1):
    net = network(sd1, down_lr_weight="0,0,0,0,0,0.05,1,1,1,1,1,1", up_lr_weight="zeros+1", block_lr_zero_threshold=0.1)
    slots = {lora.block for lora in net.unet_loras}
    assert slots == LIERLA_SLOTS - {1, 2, 4, 5}
    assert set(lr_by_description(net)) == {"textencoder"} | {f"unet_block{slot}" for slot in slots}


def test_a_single_number_weights_all_twelve_blocks_and_an_empty_item_is_zero(sd1):
    rates = lr_by_description(network(sd1, down_lr_weight="0.5", up_lr_weight="1,1,1,1,1,1,1,1,1,1,1,"))
    assert rates["unet_block1"] == pytest.approx(0.5e-4) and rates["unet_block8"] == pytest.approx(0.5e-4)
    assert "unet_block24" not in rates and rates["unet_block23"] == pytest.approx(1e-4)


def test_learning_rate_fallbacks_and_zero_rates():
    model = tiny_model_pair(ModelFamily.SD1)[0]
    net = network(model)
    assert lr_by_description(net, None, None, 2e-6) == {"textencoder": 2e-6, "unet": 2e-6}
    assert lr_by_description(net, [3e-5, 1e-5], 0, 2e-6) == {"textencoder": 3e-5}  # lr 0: the group is left out


def test_loraplus_puts_up_weights_in_their_own_group(sd1):
    net = network(sd1, loraplus_lr_ratio="4", loraplus_unet_lr_ratio="16", loraplus_text_encoder_lr_ratio="0")
    groups, descriptions = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    by_description = dict(zip(descriptions, groups))
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert by_description["textencoder plus"]["lr"] == pytest.approx(4e-5)  # a ratio of 0 counts as unset
    assert by_description["unet plus"]["lr"] == pytest.approx(1.6e-3)
    up_weights = {id(lora.lora_up.weight) for lora in net.unet_loras}
    assert {id(p) for p in by_description["unet plus"]["params"]} == up_weights
    assert not up_weights & {id(p) for p in by_description["unet"]["params"]}


def test_block_dims_and_alphas_set_each_blocks_rank(sd1):
    dims = list(range(1, 26))
    net = network(
        sd1,
        block_dims=",".join(map(str, dims)),
        block_alphas=",".join(str(d / 2) for d in dims),
        conv_block_dims=",".join(["2"] * 12 + ["0"] + ["3"] * 12),
    )
    for lora in net.unet_loras:
        if lora.uses_conv_rank:
            assert (lora.lora_dim, float(lora.alpha)) == ((2, 1.0) if lora.block < 12 else (3, 1.0))
        else:
            assert (lora.lora_dim, lora.scale) == (dims[lora.block], 0.5)
    conv_slots = {lora.block for lora in net.unet_loras if lora.uses_conv_rank}
    assert 12 not in conv_slots and {3, 6, 9, 15} <= conv_slots  # rank 0 in MID: no 3x3 module there


def test_conv_dim_alone_gives_c3lier_with_conv_alpha_default_one(sd1):
    net = network(sd1, dim=8, alpha=8, conv_dim="4")
    convs = [lora for lora in net.unet_loras if lora.uses_conv_rank]
    assert convs and {(lora.lora_dim, lora.scale) for lora in convs} == {(4, 0.25)}
    assert {lora.scale for lora in net.unet_loras if not lora.uses_conv_rank} == {1.0}


def test_dropout_arguments_reach_every_module(sd1):
    net = create_network(
        1.0,
        4,
        1,
        None,
        sd1.text_encoders[0],
        sd1.unet,
        neuron_dropout=None,
        dropout="0.1",
        rank_dropout="0.2",
        module_dropout="0.3",
    )
    assert {(lora.dropout, lora.rank_dropout, lora.module_dropout) for lora in net.unet_loras} == {(0.1, 0.2, 0.3)}
    with pytest.raises(UserError, match="--network_dropout 0.2 and --network_args dropout=0.1 disagree"):
        create_network(1.0, 4, 1, None, sd1.text_encoders[0], sd1.unet, neuron_dropout=0.2, dropout="0.1")


@pytest.mark.parametrize(
    ("network_args", "message"),
    [
        ({"block_dims": "4,4,4"}, r"block_dims has 3 values; it takes 25, one per U-Net block"),
        ({"down_lr_weight": "1,1,1"}, r"down_lr_weight has 3 values; it takes 12"),
        ({"mid_lr_weight": "1,2"}, r"mid_lr_weight has 2 values; it takes 1"),
        ({"conv_dim": "four"}, r"conv_dim=four is not a number"),
        ({"conv_dim": "2.5"}, r"conv_dim=2.5 must be a whole number"),
        ({"up_lr_weight": "sinus"}, r"up_lr_weight=sinus is neither a number.*preset \(sine, cosine"),
        ({"conv_alhpa": "1"}, r"unknown argument 'conv_alhpa'"),
        ({"block_alphas": ",".join(["1"] * 24 + ["x"])}, r"block_alphas=x is not a number"),
        ({"rank_dropout": "1"}, r"rank_dropout=1.0 is a dropout probability; it must be at least 0 and below 1"),
        ({"conv_dim": "-2"}, r"conv_dim=-2 must not be negative"),
        ({"conv_dim": "nan"}, r"conv_dim=nan is not a finite number"),
    ],
)
def test_each_mistake_is_one_error_naming_the_argument(sd1, network_args, message):
    with pytest.raises(UserError, match=message):
        network(sd1, **network_args)


def test_a_rank_below_one_is_refused(sd1):
    with pytest.raises(UserError, match="--network_dim 0: the rank must be at least 1"):
        network(sd1, dim=0)


def test_block_alphas_apply_without_block_dims(sd1):
    net = network(sd1, dim=8, block_alphas=",".join(["2"] * 12 + ["4"] * 13))
    assert {(lora.block < 12, lora.lora_dim, lora.scale) for lora in net.unet_loras} == {
        (True, 8, 0.25),
        (False, 8, 0.5),
    }


def test_sdxl_block_wise_arguments_follow_its_23_slots():
    model = tiny_model_pair(ModelFamily.SDXL)[0]
    dims = list(range(1, 24))
    net = create_network(
        1.0,
        4,
        1,
        None,
        model.text_encoders,
        model.unet,
        block_dims=",".join(map(str, dims)),
        conv_dim="2",
        down_lr_weight="0.5",
        mid_lr_weight="1,0,1",
        up_lr_weight=",".join(["2"] * 9),
    )
    for lora in net.unet_loras:
        assert lora.block not in (0, 11, 22)  # no layers in the edge slots; the middle transformer (MID1) has weight 0
        if not lora.uses_conv_rank:
            assert lora.lora_dim == dims[lora.block]
    groups, descriptions = net.prepare_optimizer_params(None, 1e-3, 1e-3)
    rates = dict(zip(descriptions, (group["lr"] for group in groups)))
    assert (
        rates["unet_block2"] == pytest.approx(5e-4)
        and rates["unet_block13"] == pytest.approx(2e-3)
        and rates["unet_block10"] == 1e-3
    )
    with pytest.raises(
        UserError,
        match=r"block_dims has 25 values; it takes 23, one per U-Net block \(time embedding, IN00-IN08, MID0-MID2",
    ):
        create_network(1.0, 4, 1, None, model.text_encoders, model.unet, block_dims=",".join(["4"] * 25))
    with pytest.raises(UserError, match="mid_lr_weight has 2 values; it takes 3"):
        create_network(1.0, 4, 1, None, model.text_encoders, model.unet, mid_lr_weight="1,1")


def test_sdxl_text_encoders_get_a_learning_rate_each_from_two_values():
    model = tiny_model_pair(ModelFamily.SDXL)[0]
    net = create_network(1.0, 4, 1, None, model.text_encoders, model.unet)
    groups, descriptions = net.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    rates = dict(zip(descriptions, (group["lr"] for group in groups)))
    assert rates == {"textencoder1": 1e-5, "textencoder2": 2e-5, "unet": 1e-4}
    te2 = {id(lora.lora_down.weight) for lora in net.text_encoder_loras if lora.lora_name.startswith("lora_te2_")}
    assert {id(p) for p in groups[descriptions.index("textencoder2")]["params"]} >= te2
    single, names = net.prepare_optimizer_params([1e-5], 1e-4, 1e-3)
    assert names == ["textencoder", "unet"] and single[0]["lr"] == 1e-5
    with pytest.raises(UserError, match="--text_encoder_lr has 3 values"):
        net.prepare_optimizer_params([1e-5, 1e-5, 1e-5], 1e-4, 1e-3)


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SDXL], ids=lambda family: family.value)
def test_block_slots_from_module_names_equal_those_from_the_checkpoint_key_map(family):
    """Training takes a layer's block from its LDM path (the key map); the merge tools see only module names.
    Both routes must name the same block for every C3Lier module."""
    model = tiny_model_pair(family)[0]
    sdxl = family is ModelFamily.SDXL
    targets = unet_targets(model.unet, with_conv_containers=True)
    assert targets and all(block_layout(sdxl).slot(*ldm_block(target.name, sdxl)) == target.block for target in targets)
