"""Validation loss: validation_split holds out a deterministic share of each subset that never overlaps the training
images; the loss is evaluated at fixed timesteps with fixed noise (the same weights give the same number), logged to
TensorBoard and shown in the summary, and evaluating it changes nothing in the training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from library.dataset.plan import prepare_datasets
from library.errors import UserError
from library.tiny_models import make_tiny_dataset
from library.training import validation
from library.training.trainer import train
from library.training.validation import validation_timesteps
from training_helpers import training_arguments


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eight")
    make_tiny_dataset(folder, images=8, repeats=2)
    return folder


def split(folder, seed, **keys):
    plans, _ = prepare_datasets(None, {"resolution": "64", **keys}, train_data_dir=str(folder), split_seed=seed)
    (plan,) = plans
    return (
        [sample.image.path for sample in plan.samples],
        [sample.image.path for sample in plan.validation_samples],
        plan,
    )


def test_the_split_is_deterministic_and_never_overlaps(eight_images):
    train_images, held_out, plan = split(eight_images, 3, validation_split=0.25)
    assert len(held_out) == 8 - 6 and not set(train_images) & set(held_out)  # ceil(8 x 0.75) = 6 train
    assert sorted(train_images + held_out) == sorted(path for path in eight_images.rglob("*.png"))
    assert split(eight_images, 3, validation_split=0.25)[1] == held_out
    assert {sample.repeats for sample in plan.validation_samples} == {1} and plan.num_train_images == 6 * 2
    # validation_seed wins over the run's seed
    assert (
        split(eight_images, 3, validation_split=0.25, validation_seed=11)[1]
        == split(eight_images, 99, validation_split=0.25, validation_seed=11)[1]
    )
    assert any(split(eight_images, seed, validation_split=0.25)[1] != held_out for seed in range(4, 10))


def test_the_validation_timesteps_are_the_interior_of_six_points():
    assert validation_timesteps(None, None) == [200, 400, 600, 800]
    assert validation_timesteps(100, 600) == [200, 300, 400, 500]


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_a_split_outside_0_to_1_is_one_sentence(tiny_sd1, eight_images, tmp_path, value):
    with pytest.raises(UserError, match=f"validation_split is {float(value):g}; it is the fraction") as error:
        train(training_arguments(tiny_sd1, eight_images, tmp_path, "--validation_split", value))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_validation_is_logged_comparable_and_leaves_the_training_alone(
    tiny_sd1, eight_images, tmp_path, monkeypatch, capsys
):
    common = ["--max_train_steps", "6", "--learning_rate", "1e-2", "--network_dropout", "0.2", "--cache_latents"]
    common += ["--validation_split", "0.25", "--output_name", "v"]
    evaluations = []
    evaluate = validation.validation_loss

    def twice(run):
        first, second = evaluate(run), evaluate(run)
        assert first == second  # fixed timesteps and noise: the same weights give the same number
        evaluations.append(first)
        return first

    monkeypatch.setattr("library.training.trainer.validation_loss", twice)
    logs = tmp_path / "logs"
    every_step = train(
        training_arguments(
            tiny_sd1, eight_images, tmp_path / "a", *common, "--validate_every_n_steps", "2", "--logging_dir", str(logs)
        )
    )
    printed = capsys.readouterr().out
    assert (
        "validation: 2 held-out images, every 2 steps and at the end of every epoch, at timesteps 200, 400, 600, 800"
        in printed
    )
    (run_folder,) = logs.iterdir()
    events = EventAccumulator(str(run_folder / "network_train"))
    events.Reload()
    scalars = {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["loss/validation/step_average"] == [2, 4, 6] and scalars["loss/validation/step_divergence"] == [
        2,
        4,
        6,
    ]
    assert scalars["loss/validation/epoch_average"] == [1]  # 12 training samples: 6 steps are one epoch
    assert len(evaluations) == 4 and len(set(evaluations)) > 1  # the weights changed between evaluations

    epoch_only = train(training_arguments(tiny_sd1, eight_images, tmp_path / "b", *common))
    expected, tensors = load_file(epoch_only), load_file(every_step)
    for key in expected:  # dropout draws from the global RNG: validation must leave it as it was
        torch.testing.assert_close(tensors[key], expected[key], rtol=0, atol=0, msg=key)
