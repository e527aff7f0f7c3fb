"""networks/resize_lora.py: each module keeps the largest singular values of its delta (the composed delta equals the
truncated SVD computed independently), keeps its scale alpha / rank, gets the rank the dynamic method's criterion asks
for (without sd-scripts' extra singular value), reports what it kept, and the file carries updated metadata."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script

from library.errors import UserError
from library.lora.factors import compose, lora_scale
from library.lora.files import read_lora_file, save_lora_file, split_modules
from library.lora.low_rank import NewRanks, chosen_rank, dynamic_rank
from library.model_files.containers import open_checkpoint
from library.model_files.family import ModelFamily
from library.tiny_models import make_tiny_model
from lora_helpers import fill_randomly
from networks import lora
from networks.resize_lora import ResizeOptions, build_parser, options_from_flags, resize

RESIZE = "networks/resize_lora.py"
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV_3X3 = "lora_unet_down_blocks_0_resnets_0_conv1"
SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])


def modules_of(path):
    return split_modules(read_lora_file(path)[0], str(path))


def delta(factors):
    """alpha / rank * up @ down as a 2-D float64 matrix."""
    shape = (factors.up.shape[0], *factors.down.shape[1:])
    return (
        (lora_scale(factors.alpha_value, factors.rank) * compose(factors.up, factors.down, shape))
        .reshape(shape[0], -1)
        .double()
    )


def truncated_by_torch(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.fixture(scope="module")
def c3lier(tmp_path_factory):
    """A tiny SD1 C3Lier file: rank 6 / alpha 3, conv rank 4 / alpha 2."""
    folder = tmp_path_factory.mktemp("resize")
    model = make_tiny_model(ModelFamily.SD1)
    network = lora.create_network(1.0, 6, 3, None, model.text_encoders[0], model.unet, conv_dim=4, conv_alpha=2)
    fill_randomly(network, seed=5)
    network.save_weights(folder / "big.safetensors", metadata={"ss_training_comment": "trained on shapes"})
    return folder / "big.safetensors"


def test_a_resized_module_is_the_truncated_svd_of_its_delta_with_the_same_scale(c3lier, tmp_path):
    out = tmp_path / "small.safetensors"
    resized = resize(ResizeOptions(c3lier, out, ranks=NewRanks(3, 2)))
    before, after = modules_of(c3lier), modules_of(out)
    assert before.keys() == after.keys() == resized.keys()
    for name, original in before.items():
        rank = 2 if original.down.shape[2:] == (3, 3) else 3
        factors = after[name]
        assert factors.rank == rank
        assert factors.alpha.dim() == 0 and factors.alpha.dtype == torch.float32
        assert factors.alpha_value / rank == pytest.approx(original.alpha_value / original.rank)  # the scale stays
        torch.testing.assert_close(
            delta(factors),
            truncated_by_torch(delta(original), rank),
            atol=1e-5,
            rtol=1e-4,
            msg=lambda m, name=name: f"{name}: {m}",
        )
        assert factors.down.dim() == original.down.dim() and factors.down.shape[1:] == original.down.shape[1:]
    assert resized[CONV_3X3].kept.frobenius_share < 1 and resized[LINEAR].old_rank == 6


def test_a_new_rank_above_the_old_one_keeps_the_module_as_it_is(c3lier, tmp_path):
    out = tmp_path / "same.pt"
    resize(ResizeOptions(c3lier, out, ranks=NewRanks(16)))
    before, after = modules_of(c3lier), modules_of(out)
    for name, original in before.items():
        assert after[name].rank == original.rank  # no zero singular values are kept (sd-scripts keeps them)
        torch.testing.assert_close(delta(after[name]), delta(original), atol=1e-5, rtol=1e-4)


def test_the_metadata_says_what_was_resized(c3lier, tmp_path):
    out = tmp_path / "small.safetensors"
    resize(ResizeOptions(c3lier, out, ranks=NewRanks(3, 2)))
    metadata = open_checkpoint(out).metadata
    assert metadata["ss_training_comment"] == "dimension is resized from 6 to 3 (conv: 2); trained on shapes"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("3", "1.5")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert metadata["modelspec.title"] == "small" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["sshs_model_hash"] != open_checkpoint(c3lier).metadata["sshs_model_hash"]
    resize(ResizeOptions(c3lier, out, ranks=NewRanks(6), dynamic_method="sv_fro", dynamic_param=0.5))
    metadata = open_checkpoint(out).metadata
    assert metadata["ss_training_comment"] == "Dynamic resize with sv_fro: 0.5 from 6; trained on shapes"


# ---------------------------------------------------------------- dynamic ranks


@pytest.mark.parametrize(
    ("method", "parameter", "rank"),
    [
        ("sv_ratio", 5.0, 3),  # 8, 4, 2 are above 8 / 5
        ("sv_ratio", 1.0, 1),
        ("sv_cumulative", 0.9, 4),  # 8+4+2+1 = 15 of 15.75 (0.952); 14 is 0.889
        ("sv_cumulative", 0.5, 1),  # 8 of 15.75
        ("sv_fro", 0.95, 2),  # (64+16) / 85.3 = 0.938 >= 0.95^2 = 0.9025
        ("sv_fro", 0.99, 3),  # 84 / 85.3 = 0.985 >= 0.99^2 = 0.9801
    ],
)
def test_each_dynamic_method_keeps_the_smallest_rank_that_meets_its_target(method, parameter, rank):
    assert dynamic_rank(SPECTRUM, method, parameter) == rank


def test_the_chosen_rank_is_capped_by_new_rank_and_is_one_for_a_zero_delta():
    assert chosen_rank(SPECTRUM, 2, "sv_cumulative", 0.9) == 2
    assert chosen_rank(SPECTRUM, 5) == 5 and chosen_rank(SPECTRUM, 9) == 6
    assert chosen_rank(torch.zeros(4), 3, "sv_fro", 0.9) == 1 and chosen_rank(torch.zeros(4), 3) == 1


def spectrum_module(out, into, singular_values, seed):
    """up, down with up @ down = Q1 diag(S) Q2^T: a delta whose singular values are S."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(out, len(singular_values), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(into, len(singular_values), generator=generator))
    return left * singular_values, right.T.contiguous()


def test_a_file_with_known_spectra_gets_the_documented_ranks_and_a_report(tmp_path, capsys):
    tensors = {}
    for index, name in enumerate((LINEAR, "lora_te_text_model_encoder_layers_0_mlp_fc1")):
        up, down = spectrum_module(32, 24, SPECTRUM * (index + 1), seed=index)
        tensors.update(
            {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(3.0)}
        )
    save_lora_file(tmp_path / "known.safetensors", tensors, {})
    resized = resize(
        ResizeOptions(
            tmp_path / "known.safetensors",
            tmp_path / "out.safetensors",
            ranks=NewRanks(6),
            dynamic_method="sv_ratio",
            dynamic_param=5,
        ),
        verbose=True,
    )
    assert {module.rank for module in resized.values()} == {3}
    assert {module.alpha for module in resized.values()} == {1.5}  # 3 / 6 * 3
    report = capsys.readouterr().out
    assert (
        f"{LINEAR:75} | sum(S) retained: 88.9%, fro retained: 99.2%, max(S) ratio: 4.0, dynamic | dim: 3, alpha: 1.5"
        in report
    )
    out = modules_of(tmp_path / "out.safetensors")[LINEAR]
    torch.testing.assert_close(torch.linalg.svdvals(delta(out)).float()[:3], SPECTRUM[:3] * 0.5, atol=1e-5, rtol=1e-5)
    metadata = open_checkpoint(tmp_path / "out.safetensors").metadata
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("3", "1.5")
    assert (
        metadata["ss_training_comment"] == "Dynamic resize with sv_ratio: 5 from 6"
    )  # no "; " and old comment when there was none


def parse(*arguments):
    return options_from_flags(
        build_parser().parse_args(["--model", "in.safetensors", "--save_to", "out.safetensors", *arguments])
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dynamic_method", "sv_fro"], r"--dynamic_method sv_fro needs --dynamic_param"),
        (["--dynamic_param", "0.9"], r"--dynamic_param 0.9 is given without --dynamic_method"),
        (
            ["--dynamic_method", "sv_fro", "--dynamic_param", "1.5"],
            r"--dynamic_param 1.5: sv_fro takes the share to keep, more than 0 and at most 1",
        ),
        (
            ["--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"],
            r"--dynamic_param 0.5: sv_ratio keeps the singular values above S_max / p, so p must be at least 1",
        ),
        (["--new_conv_rank", "0"], r"--new_conv_rank 0: a rank must be at least 1"),
    ],
)
def test_bad_flags_are_one_sentence(arguments, message):
    with pytest.raises(UserError, match=message):
        parse(*arguments)


def test_the_script_runs_as_a_user_runs_it(c3lier, tmp_path):
    out = tmp_path / "small.safetensors"
    finished = run_script(
        RESIZE,
        "--model",
        str(c3lier),
        "--save_to",
        str(out),
        "--new_rank",
        "2",
        "--verbose",
        "--save_precision",
        "fp16",
        "--svd_lowrank_niter",
        "0",
    )
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert len(lines) == len(modules_of(c3lier)) + 2
    assert lines[0].split(" | ")[1].startswith("sum(S) retained: ") and "fro retained: " in lines[0]
    assert lines[-2].startswith("Average Frobenius norm retention: ") and lines[-1] == f"saved {out}"
    assert "resizing: 100%" in finished.stderr
    assert {tensor.dtype for tensor in read_lora_file(out)[0].values()} == {torch.float16}
