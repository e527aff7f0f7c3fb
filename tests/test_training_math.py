"""The pieces of a training step and run against the spec's formulas (specs/training.md 5.2-5.4, 6.2-6.3, 7.3):
the noise schedule, targets, loss weighting, optimizer and schedule options, and the saved files' names."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import UserError
from library.training import diffusion
from library.training.optimizers import (
    ScheduleSettings,
    make_lr_scheduler,
    make_optimizer,
    optimizer_name,
    parse_key_values,
    warmup_steps,
)
from library.training.saving import epoch_file, epoch_file_to_remove, final_file, step_file, step_file_to_remove


def spec_alphas_cumprod() -> torch.Tensor:
    """beta_t = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, abar_t = prod(1 - beta)."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_schedule_noisy_input_and_targets_follow_the_spec():
    abar = spec_alphas_cumprod()
    latents, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    timesteps = torch.tensor([0, 500, 999])
    a = abar[timesteps].sqrt().view(-1, 1, 1, 1)
    s = (1 - abar[timesteps]).sqrt().view(-1, 1, 1, 1)
    for v_prediction in (False, True):
        scheduler = diffusion.training_scheduler(v_prediction)
        assert torch.allclose(scheduler.alphas_cumprod.double(), abar, rtol=1e-5)
        noisy, target = diffusion.noisy_latents_and_target(scheduler, latents, noise, timesteps)
        assert torch.allclose(noisy, a * latents + s * noise, atol=1e-5)
        expected_target = a * noise - s * latents if v_prediction else noise
        assert torch.allclose(target, expected_target, atol=1e-5)


def test_timesteps_stay_in_range_and_collapse_when_min_reaches_max():
    drawn = diffusion.sample_timesteps(10_000, 200, 300, "cpu", torch.Generator().manual_seed(0))
    assert drawn.min() == 200 and drawn.max() == 299
    assert diffusion.sample_timesteps(4, 700, 700, "cpu").tolist() == [700] * 4
    full = diffusion.sample_timesteps(10_000, None, None, "cpu", torch.Generator().manual_seed(0))
    assert full.min() == 0 and full.max() == 999


def test_noise_offset_adds_one_value_per_sample_and_channel():
    latents = torch.zeros(2, 4, 16, 16)
    plain = diffusion.make_noise(latents, diffusion.NoiseSettings(), torch.Generator().manual_seed(5))
    offset = diffusion.make_noise(latents, diffusion.NoiseSettings(noise_offset=0.1), torch.Generator().manual_seed(5))
    difference = offset - plain
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))  # constant over H, W
    assert torch.equal(plain, torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)))


def test_per_sample_loss_weights_and_masks():
    prediction, target = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)
    weights = torch.tensor([1.0, 0.5])
    assert diffusion.per_sample_loss(prediction, target, weights).tolist() == [1.0, 0.5]
    mask = torch.zeros(2, 8, 8)
    mask[:, :, :4] = 1  # left half of the image: area-resized to the left half of the latent
    assert diffusion.per_sample_loss(prediction, target, weights, mask).tolist() == [0.5, 0.25]


def test_min_snr_weight():
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(diffusion.min_snr_weight(snr, 5.0, False), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(diffusion.min_snr_weight(snr, 5.0, True), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    scheduler = diffusion.training_scheduler(False)
    abar = spec_alphas_cumprod()[torch.tensor([10])]
    assert torch.allclose(diffusion.snr(scheduler, torch.tensor([10])).double(), abar / (1 - abar), rtol=1e-5)


def test_key_value_options_are_python_literals():
    assert parse_key_values(
        ["weight_decay=0.01", "betas=0.9,0.99", "decouple=True", "name=abc"], "--optimizer_args"
    ) == {"weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "name": "abc"}
    with pytest.raises(UserError, match="not key=value"):
        parse_key_values(["weight_decay"], "--optimizer_args")


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("100", 100), ("0.1", 100), ("5%", 50), (None, 0)])
def test_warmup_steps(value, expected):
    assert warmup_steps(value, 1000) == expected


@pytest.mark.parametrize("value", ["1.0", "1.5", "ten"])
def test_warmup_steps_refuses_what_has_no_clear_meaning(value):
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        warmup_steps(value, 1000)


def test_optimizer_choice_and_its_errors():
    assert optimizer_name("", False, False) == "AdamW"
    assert optimizer_name("", True, False) == "AdamW8bit"
    with pytest.raises(UserError, match="--optimizer_type and --use_lion_optimizer"):
        optimizer_name("AdamW", False, True)
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer, text = make_optimizer("SGDNesterov", {}, [{"params": [parameter], "lr": 0.1}], 0.1)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9 and text == "torch.optim.sgd.SGD"
    _, text = make_optimizer("SGDNesterov", {"dampening": 0.0}, [{"params": [parameter], "lr": 0.1}], 0.1)
    assert text == "torch.optim.sgd.SGD(dampening=0.0)"  # sd-scripts' ss_optimizer: arguments only when given
    optimizer, _ = make_optimizer("torch.optim.RMSprop", {"alpha": 0.9}, [{"params": [parameter], "lr": 0.1}], 0.1)
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.defaults["alpha"] == 0.9
    with pytest.raises(UserError, match="no such optimizer"):
        make_optimizer("AdamWW", {}, [{"params": [parameter], "lr": 0.1}], 0.1)
    with pytest.raises(UserError, match="pip install lion-pytorch"):
        make_optimizer("Lion", {}, [{"params": [parameter], "lr": 0.1}], 0.1)
    with pytest.raises(UserError, match="do not fit"):
        make_optimizer("AdamW", {"momentum": 0.9}, [{"params": [parameter], "lr": 0.1}], 0.1)


def test_adafactor_is_transformers_with_sd_scripts_relative_step_handling():
    from transformers.optimization import Adafactor, AdafactorSchedule

    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer, _ = make_optimizer("AdaFactor", {}, [{"params": [parameter], "lr": 0.1}], 0.1)
    assert isinstance(optimizer, Adafactor) and optimizer.defaults["relative_step"] and optimizer.defaults["lr"] is None
    assert (
        "lr" not in optimizer.param_groups[0] or optimizer.param_groups[0]["lr"] is None
    )  # Adafactor finds its own step size
    assert isinstance(
        make_lr_scheduler(ScheduleSettings("cosine"), optimizer, 100, 1, initial_lr=0.1), AdafactorSchedule
    )
    fixed, _ = make_optimizer(
        "Adafactor", {"relative_step": False, "scale_parameter": False}, [{"params": [parameter], "lr": 0.1}], 0.1
    )
    assert fixed.param_groups[0]["lr"] == 0.1
    assert not isinstance(make_lr_scheduler(ScheduleSettings("constant"), fixed, 100, 1, 0.1), AdafactorSchedule)


def schedule_rates(name, warmup=0, total=100, **settings):
    """The learning rate at each of `total` steps of a schedule of a base rate of 1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_lr_scheduler(ScheduleSettings(name, str(warmup), **settings), optimizer, total, 1, 1.0)
    values = []
    for _ in range(total):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_schedules_follow_their_formulas():
    assert schedule_rates("constant") == [1.0] * 100
    assert schedule_rates("constant_with_warmup", 10)[:11] == pytest.approx([step / 10 for step in range(11)])
    assert schedule_rates("linear")[50] == pytest.approx(0.5)
    cosine = schedule_rates("cosine")
    assert cosine[50] == pytest.approx(0.5) and cosine[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    with pytest.raises(UserError, match="constant has no warmup"):
        schedule_rates("constant", 10)


def test_sd_scripts_newer_schedules_follow_their_formulas():
    # inverse_sqrt: 1 / sqrt((step + shift) / timescale) after the warmup, with shift = timescale - warmup
    inverse = schedule_rates("inverse_sqrt", 10)
    assert inverse[10] == pytest.approx(1.0) and inverse[40] == pytest.approx(1 / math.sqrt(40 / 10))
    # cosine_with_min_lr: half a cosine from 1 down to the ratio
    floor = schedule_rates("cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.2)
    assert floor[0] == pytest.approx(1.0) and floor[50] == pytest.approx(0.2 + 0.8 * 0.5) and min(floor) >= 0.2
    # warmup_stable_decay: warm up 10 from the ratio, stay at 1, decay over the last 20 steps to the ratio
    wsd = schedule_rates("warmup_stable_decay", 10, lr_decay_steps="20", lr_scheduler_min_lr_ratio=0.1)
    assert wsd[5] == pytest.approx(0.1 + 0.9 * 0.5) and wsd[10:80] == pytest.approx([1.0] * 70) and wsd[99] < 0.2
    # piecewise_constant: multiplier 1 until step 10, then 0.1
    pieces = schedule_rates("piecewise_constant", lr_scheduler_args={"step_rules": "1:10,0.1"})
    assert pieces[9] == 1.0 and pieces[10:] == pytest.approx([0.1] * 90)
    # a torch.optim.lr_scheduler class with its arguments
    steps = schedule_rates("constant", lr_scheduler_type="StepLR", lr_scheduler_args={"step_size": 30, "gamma": 0.5})
    assert (steps[29], steps[30], steps[60]) == pytest.approx((1.0, 0.5, 0.25))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ScheduleSettings("cosine_annealing"), "--lr_scheduler cosine_annealing: use one of constant"),
        (ScheduleSettings("piecewise_constant"), 'give them with --lr_scheduler_args "step_rules=1:10,0.1"'),
        (ScheduleSettings("adafactor:fast"), "the part after the colon is the initial learning rate"),
    ],
)
def test_schedule_mistakes_are_one_sentence(settings, message):
    with pytest.raises(UserError, match=message):
        settings.check()


def test_file_names_are_sd_scripts_names():
    assert epoch_file("out", "lora", 1, "safetensors").as_posix() == "out/lora-000001.safetensors"
    assert step_file("out", "lora", 500, "safetensors").as_posix() == "out/lora-step00000500.safetensors"
    assert final_file("out", "lora", "ckpt").as_posix() == "out/lora.ckpt"
    assert epoch_file("out", None, 3, "pt").as_posix() == "out/epoch-000003.pt"
    assert step_file("out", None, 7, "safetensors").as_posix() == "out/at-step00000007.safetensors"
    assert final_file("out", None, "safetensors").as_posix() == "out/last.safetensors"


def test_pruning_keeps_the_latest_saves():
    # every 2 epochs, keep 3: saving epoch 8 removes epoch 2 (8, 6, 4 stay)
    assert (
        epoch_file_to_remove(8, 2, 3) == 2
        and epoch_file_to_remove(6, 2, 3) is None
        and epoch_file_to_remove(8, 2, None) is None
    )
    # every 100 steps, keep the last 250 steps: saving 500 removes 200 ((500 - 251) // 100 * 100); 300, 400 stay
    assert step_file_to_remove(500, 100, 250) == 200 and step_file_to_remove(300, 100, 250) is None
