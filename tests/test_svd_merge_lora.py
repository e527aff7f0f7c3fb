"""library/lora/low_rank.py and networks/svd_merge_lora.py: factors of a dense delta and of a sum of LoRA deltas checked
against torch.linalg.svd of the dense matrices (exact at full rank, the Eckart-Young error below it), sd-scripts'
signed-quantile clamp, and merges of tiny SD1 and SDXL LoRA files that are the exact weighted sum of the inputs' deltas,
or its optimal truncation, module by module."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from conftest import run_script

from library.errors import UserError
from library.lora.block_weights import block_slot, parse_block_weights
from library.lora.factors import compose, lora_scale
from library.lora.files import read_lora_file, save_lora_file, split_modules
from library.lora.low_rank import NewRanks, Term, factors_from_delta, factors_of_sum, signed_quantile, svd_of_sum
from library.model_files.containers import open_checkpoint
from library.model_files.family import ModelFamily
from library.tiny_models import make_tiny_model
from lora_helpers import fill_randomly, text_encoder_argument
from networks import lora
from networks.svd_merge_lora import SvdMergeOptions, build_parser, options_from_flags, svd_merge

SVD_MERGE = "networks/svd_merge_lora.py"
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV_3X3 = "lora_unet_down_blocks_0_resnets_0_conv1"


def random_low_rank(shape, rank, seed=0):
    """A delta of exactly `rank` shaped like a layer's weight."""
    generator = torch.Generator().manual_seed(seed)
    columns = torch.randn(shape[0], rank, generator=generator)
    rows = torch.randn(rank, torch.Size(shape[1:]).numel(), generator=generator)
    return (columns @ rows).reshape(shape)


def optimal_error_squared(matrix, rank):
    """sum of the squared singular values a rank-`rank` truncation leaves out, by torch.linalg.svd."""
    singular_values = torch.linalg.svdvals(matrix.reshape(matrix.shape[0], -1).double())
    return float(singular_values[rank:].square().sum())


def flat(tensor):
    return tensor.reshape(tensor.shape[0], -1).double()


# ---------------------------------------------------------------- factors of one delta


@pytest.mark.parametrize("shape", [(40, 30), (12, 10, 1, 1), (16, 8, 3, 3)], ids=["linear", "conv1x1", "conv3x3"])
def test_factors_of_a_low_rank_delta_are_exact_and_shaped_like_a_lora_module(shape):
    delta = random_low_rank(shape, 3)
    for rank in (3, 5):
        factors = factors_from_delta(delta, rank)
        assert factors.down.shape == (rank, *shape[1:])
        assert factors.up.shape == ((shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank))
        torch.testing.assert_close(compose(factors.up, factors.down, shape), delta, atol=2e-4, rtol=1e-5)
    assert factors.singular_values.shape == (min(shape[0], torch.Size(shape[1:]).numel()),)
    assert torch.all(factors.singular_values[:-1] >= factors.singular_values[1:])
    assert factors_from_delta(delta, 1000).down.shape[0] == min(shape[0], torch.Size(shape[1:]).numel())


@pytest.mark.parametrize("shape", [(40, 30), (16, 8, 3, 3)], ids=["linear", "conv3x3"])
def test_a_truncation_leaves_exactly_the_eckart_young_error(shape):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for rank in (1, 4, 9):
        factors = factors_from_delta(delta, rank)
        error = float(flat(delta - compose(factors.up, factors.down, shape)).square().sum())
        assert error == pytest.approx(optimal_error_squared(delta, rank), rel=1e-4)


def test_the_clamp_is_sd_scripts_signed_quantile_of_both_factors():
    delta = torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) ** 3  # heavy tails, so the clamp bites
    clamped = factors_from_delta(delta, 8, clamp_quantile=0.99)
    # sd-scripts' code path, written out: U S and Vh truncated, the 0.99 quantile of their signed entries together
    u, s, vh = torch.linalg.svd(delta)
    up, down = u[:, :8] @ torch.diag(s[:8]), vh[:8]
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    torch.testing.assert_close(
        clamped.up.abs(), up.clamp(-limit, limit).abs(), atol=1e-4, rtol=1e-4
    )  # SVD signs are free
    assert float(clamped.up.abs().max()) == pytest.approx(float(limit), rel=1e-5)
    assert float(limit) < float(torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), 0.99))
    values = torch.randn(1001, generator=torch.Generator().manual_seed(3))
    for quantile in (0.0, 0.5, 0.99, 0.999, 1.0):
        assert float(signed_quantile(values, quantile)) == pytest.approx(
            float(torch.quantile(values, quantile)), rel=1e-6
        )
    with pytest.raises(UserError, match=r"--clamp_quantile 1.5: a quantile must be between 0 and 1"):
        factors_from_delta(delta, 8, clamp_quantile=1.5)


# ---------------------------------------------------------------- factors of a sum


def test_the_qr_route_gives_the_sums_singular_values_and_its_optimal_truncation():
    generator = torch.Generator().manual_seed(4)
    terms = [
        Term(
            torch.randn(20, rank, 1, 1, generator=generator),
            torch.randn(rank, 6, 3, 3, generator=generator),
            coefficient,
        )
        for rank, coefficient in ((3, 0.7), (5, -1.3), (2, 0.25))
    ]
    dense = sum(term.coefficient * compose(term.up, term.down, (20, 6, 3, 3)) for term in terms)
    svd = svd_of_sum(terms)
    assert svd.singular_values.shape == (10,)
    torch.testing.assert_close(
        svd.singular_values, torch.linalg.svdvals(flat(dense)).float()[:10], atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(svd.left.T @ svd.left, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(svd.right @ svd.right.T, torch.eye(10), atol=1e-5, rtol=0)
    exact = factors_of_sum(terms, 10, dense.shape)
    torch.testing.assert_close(compose(exact.up, exact.down, dense.shape), dense, atol=1e-4, rtol=1e-5)
    truncated = factors_of_sum(terms, 4, dense.shape)
    assert truncated.up.shape == (20, 4, 1, 1) and truncated.down.shape == (4, 6, 3, 3)
    error = float(flat(dense - compose(truncated.up, truncated.down, dense.shape)).square().sum())
    assert error == pytest.approx(optimal_error_squared(dense, 4), rel=1e-4)


# ---------------------------------------------------------------- merging files


def deltas_of(path):
    """module -> alpha / rank * up @ down of a LoRA file, as a 2-D float64 matrix."""
    modules = split_modules(read_lora_file(path)[0], str(path))
    return {
        name: flat(lora_scale(f.alpha_value, f.rank) * compose(f.up, f.down, (f.up.shape[0], *f.down.shape[1:])))
        for name, f in modules.items()
    }


def expected_sum(files_and_ratios):
    """module -> sum of ratio * delta over the files that have the module."""
    total = {}
    for path, ratio in files_and_ratios:
        for name, delta in deltas_of(path).items():
            total[name] = total.get(name, 0) + ratio * delta
    return total


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """a: C3Lier rank 4 / alpha 2, conv rank 2 / alpha 1, without text-encoder modules; b: LierLa rank 3 / alpha 3 with
    its proj_in factors stored 2-D (as SD2 files may have them). Only a has the 3x3 convs, only b the text encoder."""
    folder = tmp_path_factory.mktemp("svd_merge")
    model = make_tiny_model(ModelFamily.SD1)
    a = lora.create_network(1.0, 4, 2, None, model.text_encoders[0], model.unet, conv_dim=2, conv_alpha=1)
    fill_randomly(a, seed=1)
    a.save_weights(folder / "a.safetensors", metadata={"modelspec.title": "Alpha"})
    weights, metadata = read_lora_file(folder / "a.safetensors")
    save_lora_file(
        folder / "a.safetensors", {k: v for k, v in weights.items() if not k.startswith("lora_te")}, metadata
    )
    b = lora.create_network(1.0, 3, 3, None, model.text_encoders[0], model.unet)
    fill_randomly(b, seed=2)
    weights = dict(b.state_dict())
    for part in ("lora_down.weight", "lora_up.weight"):
        weights[f"{PROJ_IN}.{part}"] = weights[f"{PROJ_IN}.{part}"].squeeze()
    save_lora_file(folder / "b.safetensors", weights, b.metadata("b"))
    return folder


def merged_file(folder, name, ratios, **options):
    models = (folder / "a.safetensors", folder / "b.safetensors")
    merged = svd_merge(SvdMergeOptions(models, ratios, folder / name, **options))
    return folder / name, merged


def test_with_enough_rank_the_merge_is_the_exact_weighted_sum(sd1_files):
    path, merged = merged_file(sd1_files, "exact.safetensors", (0.7, -0.4), ranks=NewRanks(7, 3))
    expected = expected_sum([(sd1_files / "a.safetensors", 0.7), (sd1_files / "b.safetensors", -0.4)])
    got = deltas_of(path)
    assert got.keys() == expected.keys()
    assert any(name.startswith("lora_te") for name in got) and CONV_3X3 in got  # modules of only one input
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    tensors = read_lora_file(path)[0]
    ranks = {name: tensors[f"{name}.lora_down.weight"].shape[0] for name in got}
    assert (
        ranks[CONV_3X3] == 2 and ranks[PROJ_IN] == 7 and ranks["lora_te_text_model_encoder_layers_0_mlp_fc1"] == 3
    )  # never above the sum's rank
    assert tensors[f"{PROJ_IN}.lora_down.weight"].dim() == 4  # the first file's form of the 1x1 layer
    for name, rank in ranks.items():
        alpha = tensors[f"{name}.alpha"]
        assert alpha.dim() == 0 and alpha.dtype == torch.float32 and float(alpha) == rank
    assert all(module.exact and module.frobenius_share == pytest.approx(1.0) for module in merged.values())


def test_with_a_smaller_rank_each_module_is_the_optimal_truncation_of_the_sum(sd1_files):
    path, merged = merged_file(sd1_files, "small.safetensors", (1.0, 0.5), ranks=NewRanks(2, 1))
    expected = expected_sum([(sd1_files / "a.safetensors", 1.0), (sd1_files / "b.safetensors", 0.5)])
    got = deltas_of(path)
    kxk = {
        name
        for name, f in split_modules(read_lora_file(sd1_files / "a.safetensors")[0], "a").items()
        if f.down.shape[2:] == (3, 3)
    }
    assert CONV_3X3 in kxk
    for name, delta in expected.items():
        rank = 1 if name in kxk else 2
        error = float((got[name] - delta).square().sum())
        assert error == pytest.approx(optimal_error_squared(delta, rank), rel=1e-3, abs=1e-9), name
        assert merged[name].frobenius_share == pytest.approx((1 - error / float(delta.square().sum())) ** 0.5, rel=1e-4)


def test_the_metadata_is_fresh(sd1_files):
    path, _ = merged_file(sd1_files, "meta.safetensors", (0.5, 0.5), ranks=NewRanks(2, 1))
    metadata = open_checkpoint(path).metadata
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "networks.lora",
        "2",
        "2.0",
    )
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1.0"}
    assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == ("False", "sd_v1")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["modelspec.title"] == "meta"
    assert metadata["modelspec.merged_from"] == "Alpha, b"
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_length :]).hexdigest()
    plain, _ = merged_file(
        sd1_files, "plain.safetensors", (0.5, 0.5), ranks=NewRanks(2), modelspec=False, save_precision=torch.float16
    )
    metadata = open_checkpoint(plain).metadata
    assert (
        not any(key.startswith("modelspec.") for key in metadata) and "ss_network_args" in metadata
    )  # conv rank 2 = new_rank
    assert {tensor.dtype for tensor in read_lora_file(plain)[0].values()} == {torch.float16}


def parse(*arguments):
    return options_from_flags(build_parser().parse_args(list(arguments)))


def test_bad_flags_are_one_sentence_naming_the_files(sd1_files, tmp_path):
    a, b = str(sd1_files / "a.safetensors"), str(sd1_files / "b.safetensors")
    with pytest.raises(
        UserError,
        match=r"--ratios gives 1 value\(s\) but --models names 2 file\(s\) \(.*a\.safetensors, .*b\.safetensors\)",
    ):
        svd_merge(parse("--models", a, b, "--ratios", "1", "--save_to", str(tmp_path / "out.safetensors")))
    with pytest.raises(UserError, match=r"--new_rank 0: a rank must be at least 1"):
        parse("--models", a, "--ratios", "1", "--new_rank", "0", "--save_to", str(tmp_path / "out.safetensors"))
    with pytest.raises(UserError, match=r"out\.bin2: unknown LoRA file type"):
        parse("--models", a, "--ratios", "1", "--save_to", str(tmp_path / "out.bin2"))
    weights, metadata = read_lora_file(b)
    weights[f"{PROJ_IN}.lora_down.weight"] = torch.zeros(3, 7)  # a layer of another width
    save_lora_file(tmp_path / "other.safetensors", weights, metadata)
    with pytest.raises(
        UserError,
        match=(
            rf"a\.safetensors and .*other\.safetensors: module '{PROJ_IN}' adapts a layer of shape 32 -> 32"
            r" in the first but 7 -> 32"
        ),
    ):
        svd_merge(
            SvdMergeOptions(
                (sd1_files / "a.safetensors", tmp_path / "other.safetensors"), (1, 1), tmp_path / "out.safetensors"
            )
        )
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------- block-wise ratios


@pytest.mark.parametrize(
    ("name", "sdxl", "slot"),
    [
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", False, 0),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", False, 2),  # IN01
        ("lora_unet_down_blocks_0_downsamplers_0_conv", False, 4),  # IN03
        ("lora_unet_down_blocks_1_resnets_1_conv1", False, 6),  # IN05
        ("lora_unet_mid_block_attentions_0_proj_in", False, 13),
        ("lora_unet_up_blocks_0_resnets_2_conv1", False, 16),  # OUT02
        ("lora_unet_up_blocks_1_upsamplers_0_conv", False, 19),  # OUT05
        ("lora_unet_up_blocks_3_attentions_2_proj_out", False, 25),  # OUT11
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", True, 0),
        ("lora_unet_input_blocks_4_1_proj_in", True, 5),  # IN04
        ("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q", True, 13),
        ("lora_unet_output_blocks_5_1_proj_out", True, 19),  # OUT05
    ],
)
def test_block_slots_are_the_lbw_extensions(name, sdxl, slot):
    assert block_slot(name, sdxl) == slot


def test_a_short_layout_fills_its_slots_in_order():
    (weights,) = parse_block_weights([json.dumps(list(range(17)))], ["a"])
    expected = [1.0] * 26  # BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03-OUT11
    for value, slot in enumerate((0, 2, 3, 5, 6, 8, 9, 13, *range(17, 26))):
        expected[slot] = value
    assert not weights.sdxl and weights.weights == tuple(expected)
    (xl,) = parse_block_weights([json.dumps([0.5] * 12)], ["a"])
    assert xl.sdxl and [slot for slot, value in enumerate(xl.weights) if value == 0.5] == [
        0,
        5,
        6,
        8,
        9,
        13,
        14,
        15,
        16,
        17,
        18,
        19,
    ]


def test_block_weights_scale_each_inputs_modules(sd1_files, tmp_path):
    a, b = sd1_files / "a.safetensors", sd1_files / "b.safetensors"
    lbw_a = [1.0] * 26
    lbw_a[2], lbw_a[25] = 0.5, 0.0  # IN01, OUT11
    lbw_b = [2.0] + [1.0] * 25  # BASE: the text encoder
    options = parse(
        "--models",
        str(a),
        str(b),
        "--ratios",
        "0.7",
        "-0.4",
        "--lbws",
        json.dumps(lbw_a),
        json.dumps(lbw_b),
        "--new_rank",
        "7",
        "--new_conv_rank",
        "3",
        "--save_to",
        str(tmp_path / "lbw.safetensors"),
    )
    svd_merge(options)
    got, da, db = deltas_of(tmp_path / "lbw.safetensors"), deltas_of(a), deltas_of(b)
    in01, out11 = (
        ("lora_unet_down_blocks_0_attentions_0_", "lora_unet_down_blocks_0_resnets_0_"),
        ("lora_unet_up_blocks_3_attentions_2_", "lora_unet_up_blocks_3_resnets_2_"),
    )
    weight_a = {name: 0.5 if name.startswith(in01) else 0.0 if name.startswith(out11) else 1.0 for name in da}
    weight_b = {name: 2.0 if name.startswith("lora_te_") else 1.0 for name in db}
    assert 0.5 in weight_a.values() and 0.0 in weight_a.values() and 2.0 in weight_b.values()
    for name in got:
        expected = 0.7 * weight_a.get(name, 0) * da.get(name, 0) - 0.4 * weight_b.get(name, 0) * db.get(name, 0)
        torch.testing.assert_close(got[name], expected, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("lbws", "message"),
    [
        (["[1]"], r"--lbws gives 1 list\(s\) for 2 --models"),
        (["[1, 1]", "oops"], r"--lbws oops: each value must be a JSON list of numbers"),
        ([json.dumps([1] * 17), json.dumps([1] * 26)], r"--lbws: the lists have different lengths \(17, 26\)"),
        (
            [json.dumps([1] * 5)] * 2,
            r"--lbws: a list of 5 values names no layout; use 17 or 26 values for SD1/SD2, 12 or 20 for SDXL",
        ),
    ],
)
def test_bad_block_weights_are_one_sentence(sd1_files, lbws, message):
    with pytest.raises(UserError, match=message):
        parse(
            "--models",
            str(sd1_files / "a.safetensors"),
            str(sd1_files / "b.safetensors"),
            "--ratios",
            "1",
            "1",
            "--lbws",
            *lbws,
            "--save_to",
            "out.safetensors",
        )


def test_a_layout_of_the_other_family_is_refused(sd1_files, tmp_path):
    options = parse(
        "--models",
        str(sd1_files / "a.safetensors"),
        "--ratios",
        "1",
        "--lbws",
        json.dumps([1] * 12),
        "--save_to",
        str(tmp_path / "out.safetensors"),
    )
    with pytest.raises(
        UserError,
        match=(
            r"--lbws: lists of 12 values are a layout for another model family;"
            r" these are SD1\.x LoRAs, so give 17 or 26 values"
        ),
    ):
        svd_merge(options)


# ---------------------------------------------------------------- SDXL and the command line


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svd_merge_sdxl")
    model = make_tiny_model(ModelFamily.SDXL)
    for seed, (name, rank) in enumerate((("x", 4), ("y", 2))):
        network = lora.create_network(1.0, rank, 1, None, text_encoder_argument(model), model.unet, conv_dim=2)
        fill_randomly(network, seed=seed)
        network.save_weights(folder / f"{name}.safetensors")
    return folder


def test_sdxl_files_merge_exactly_and_do_not_mix_with_sd1(sdxl_files, sd1_files):
    x, y, out = sdxl_files / "x.safetensors", sdxl_files / "y.safetensors", sdxl_files / "xy.safetensors"
    svd_merge(SvdMergeOptions((x, y), (0.8, 1.2), out, ranks=NewRanks(6, 4)))
    expected = expected_sum([(x, 0.8), (y, 1.2)])
    got = deltas_of(out)
    assert got.keys() == expected.keys() and {name[:9] for name in got} >= {"lora_te1_", "lora_te2_"}
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    metadata = open_checkpoint(out).metadata
    assert (
        metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        and metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    )
    with pytest.raises(
        UserError,
        match=(
            r"a\.safetensors is an SD1\.x LoRA but .*x\.safetensors is an SDXL LoRA;"
            r" LoRAs for different model families"
        ),
    ):
        svd_merge(SvdMergeOptions((sd1_files / "a.safetensors", x), (1, 1), sdxl_files / "mixed.safetensors"))


def test_the_script_runs_as_a_user_runs_it(sd1_files, tmp_path):
    a, b, out = sd1_files / "a.safetensors", sd1_files / "b.safetensors", tmp_path / "merged.safetensors"
    finished = run_script(
        SVD_MERGE, "--models", str(a), str(b), "--ratios", "0.6", "0.4", "--new_rank", "3", "--save_to", str(out)
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"saved {out}: ") and "% at worst" in finished.stdout
    assert "merging: 100%" in finished.stderr  # the progress bar
    assert {tensor.shape[0] for key, tensor in read_lora_file(out)[0].items() if key.endswith("lora_down.weight")} <= {
        2,
        3,
    }
    refused = run_script(
        SVD_MERGE, "--models", str(a), str(b), "--ratios", "1", "--save_to", str(tmp_path / "no.safetensors")
    )
    assert (
        refused.returncode == 2
        and refused.stderr.count("\n") == 1
        and refused.stderr.startswith("error: --ratios gives 1 value")
    )
