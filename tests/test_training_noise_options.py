"""The noise and loss options of train_network.py against the spec's formulas (specs/training.md 5.2-5.4, 1.5, 7.6):
offset strength, pyramid noise, input perturbation, zero terminal SNR, the element-wise losses and their threshold
schedules, the SNR-based weights, the option checks, and short trainer runs with the options on and off."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.model_files.containers import open_checkpoint
from library.model_files.stable_diffusion import load_stable_diffusion
from library.training import diffusion
from library.training.diffusion import LossSettings, NoiseSettings
from library.training.options import training_options
from library.training.trainer import train
from networks.lora import create_network_from_weights
from training_helpers import training_arguments, training_flags


def spec_alphas_cumprod() -> torch.Tensor:
    """beta_t = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, abar_t = prod(1 - beta), in float64."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def zero_terminal_snr_reference() -> torch.Tensor:
    """abar after Algorithm 1 of "Common Diffusion Noise Schedules are Flawed": shift sqrt(abar) so that its last value
    is 0, scale it so that its first value is unchanged."""
    root = spec_alphas_cumprod().sqrt()
    return ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2


# noise


def test_offset_strength_is_random_and_adaptive_as_the_spec_says():
    latents = torch.zeros(2, 2, 4, 4)
    latents[0, 0] = 0.5
    latents[1, 1] = -2.0  # channel means 0.5 and -2; the others 0
    assert diffusion.offset_strength(latents, 0.1) == 0.1
    adaptive = diffusion.offset_strength(latents, 0.1, adaptive_scale=0.1)
    assert torch.allclose(adaptive.view(2, 2), torch.tensor([[0.15, 0.1], [0.1, 0.3]]))
    negative = diffusion.offset_strength(latents, 0.1, adaptive_scale=-1.0)
    assert torch.allclose(negative.view(2, 2), torch.tensor([[0.0, 0.1], [0.1, 0.0]]))  # clamped at 0
    random = diffusion.offset_strength(latents, 0.1, random_strength=True, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(random, 0.1 * torch.rand(1, generator=torch.Generator().manual_seed(7)))


def test_pyramid_noise_has_the_shape_unit_std_and_more_low_frequencies():
    noise = torch.randn(16, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    pyramid = diffusion.multires_noise(noise, 6, 0.8, torch.Generator().manual_seed(1))
    assert pyramid.shape == noise.shape
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    # plain N(0, 1) over 32 x 32 has channel means of std 1/32; the coarse levels make them much larger
    assert pyramid.mean(dim=(2, 3)).std() > 3 * noise.mean(dim=(2, 3)).std()
    tiny = diffusion.multires_noise(torch.randn(1, 1, 2, 2), 10, 0.3, torch.Generator().manual_seed(1))
    assert tiny.shape == (1, 1, 2, 2) and torch.isfinite(tiny).all()  # stops once a side reaches 1


def test_new_draws_come_from_the_batch_generator_only():
    settings = NoiseSettings(
        noise_offset=0.1,
        noise_offset_random_strength=True,
        adaptive_noise_scale=0.05,
        multires_noise_iterations=3,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
    )
    latents = torch.randn(2, 4, 8, 8)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        noise = diffusion.make_noise(latents, settings, generator)
        return noise, diffusion.input_perturbation(noise, settings, generator)

    global_state = torch.get_rng_state()
    first, again, other = draw(3), draw(3), draw(4)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_input_perturbation_changes_the_noisy_input_but_not_the_target():
    latents, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    timesteps = torch.tensor([0, 500, 999])
    abar = spec_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
    assert diffusion.input_perturbation(noise, NoiseSettings(), torch.Generator()) is None
    perturbation = diffusion.input_perturbation(
        noise, NoiseSettings(ip_noise_gamma=0.1), torch.Generator().manual_seed(0)
    )
    assert perturbation.std().item() == pytest.approx(0.1, rel=0.1)
    for v_prediction in (False, True):
        scheduler = diffusion.training_scheduler(v_prediction)
        noisy, target = diffusion.noisy_latents_and_target(scheduler, latents, noise, timesteps, perturbation)
        _, plain_target = diffusion.noisy_latents_and_target(scheduler, latents, noise, timesteps)
        assert torch.allclose(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * (noise + perturbation), atol=1e-5)
        assert torch.equal(target, plain_target)
    weaker = diffusion.input_perturbation(
        noise, NoiseSettings(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), torch.Generator().manual_seed(0)
    )
    assert 0 < weaker.std().item() < perturbation.std().item()


# zero terminal SNR


def test_zero_terminal_snr_follows_algorithm_1():
    plain, rescaled = diffusion.training_scheduler(False), diffusion.training_scheduler(False, zero_terminal_snr=True)
    abar = rescaled.alphas_cumprod
    assert abar[-1].item() == 0.0
    assert abar[0].sqrt().item() == pytest.approx(plain.alphas_cumprod[0].sqrt().item(), rel=1e-6)
    assert torch.allclose(abar.double(), zero_terminal_snr_reference(), rtol=1e-4, atol=1e-7)
    assert (abar[1:] < abar[:-1]).all()
    last = torch.tensor([999])
    assert diffusion.snr(rescaled, last).item() == 0.0  # the SNR of the rescaled schedule, not sd-scripts' stale table

    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    noisy, target = diffusion.noisy_latents_and_target(
        diffusion.training_scheduler(True, zero_terminal_snr=True), latents, noise, last
    )
    assert torch.allclose(noisy, noise) and torch.allclose(target, -latents)  # pure noise in, v = -x_0


def test_the_weights_stay_finite_where_zero_terminal_snr_makes_snr_zero():
    scheduler = diffusion.training_scheduler(False, zero_terminal_snr=True)
    last = torch.tensor([999])
    snr = diffusion.snr(scheduler, last)
    settings = LossSettings(min_snr_gamma=5.0, v_pred_like_loss=0.1, debiased_estimation_loss=True)
    assert diffusion.min_snr_weight(snr, 5.0, False).item() == 1.0  # min(SNR, gamma) / SNR -> 1 as SNR -> 0
    assert torch.isfinite(diffusion.snr_weighted_loss(torch.ones(1), snr, settings, False)).all()
    assert diffusion.debiased_weight(snr, False).item() == pytest.approx(1 / math.sqrt(1e-3))  # SNR clamped at 1/1000
    assert diffusion.huber_threshold("snr", 0.1, 1.0, last, scheduler).item() == pytest.approx(0.1)  # sigma = inf


# loss


def test_elementwise_losses_on_exact_cases():
    # d = prediction - target; thresholds 1.5 and 0.6 make sqrt(d^2 + c^2) exact: sqrt(2^2 + 1.5^2) = 2.5,
    # sqrt(0.8^2 + 0.6^2) = 1
    prediction = torch.tensor([2.0, -2.0, 0.0, 0.8, -0.8, 0.0]).view(2, 1, 1, 3)
    target = torch.zeros_like(prediction)
    threshold = torch.tensor([1.5, 0.6])
    assert diffusion.elementwise_loss("l2", prediction, target).flatten().tolist() == pytest.approx(
        [4, 4, 0, 0.64, 0.64, 0]
    )
    assert diffusion.elementwise_loss("l1", prediction, target).flatten().tolist() == pytest.approx(
        [2, 2, 0, 0.8, 0.8, 0]
    )
    # huber 2c(sqrt(d^2 + c^2) - c), smooth_l1 2(sqrt(d^2 + c^2) - c)
    assert diffusion.elementwise_loss("huber", prediction, target, threshold).flatten().tolist() == pytest.approx(
        [3, 3, 0, 0.48, 0.48, 0]
    )
    assert diffusion.elementwise_loss("smooth_l1", prediction, target, threshold).flatten().tolist() == pytest.approx(
        [2, 2, 0, 0.8, 0.8, 0]
    )
    per_sample = diffusion.per_sample_loss(
        prediction, target, torch.tensor([1.0, 0.5]), kind="huber", threshold=threshold
    )
    assert per_sample.tolist() == pytest.approx([2.0, 0.16])  # mean over C, H, W, times the loss weight


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    c = torch.tensor([1.0])
    small = diffusion.elementwise_loss("huber", torch.full((1, 1, 1, 1), 0.05), torch.zeros(1, 1, 1, 1), c)
    assert small.item() == pytest.approx(0.05**2, rel=2e-3)  # d^2
    c = torch.tensor([0.1])
    large = diffusion.elementwise_loss("huber", torch.full((1, 1, 1, 1), 1e3), torch.zeros(1, 1, 1, 1), c)
    assert large.item() == pytest.approx(2 * 0.1 * 1e3, rel=1e-3)  # 2c|d|


def test_huber_threshold_schedules():
    scheduler = diffusion.training_scheduler(False)
    timesteps = torch.tensor([0, 500, 1000])
    assert diffusion.huber_threshold("constant", 0.1, 2.0, timesteps, scheduler).tolist() == pytest.approx([0.2] * 3)
    exponential = diffusion.huber_threshold("exponential", 0.1, 2.0, timesteps, scheduler)
    assert exponential.tolist() == pytest.approx(
        [2.0, 2.0 * math.sqrt(0.1), 0.2]
    )  # huber_scale at t = 0, huber_c * huber_scale at t = 1000
    some = torch.tensor([0, 250, 999])
    abar = spec_alphas_cumprod()[some]
    sigma = ((1 - abar) / abar).sqrt()
    expected = (1 - 0.1) / (1 + sigma) ** 2 + 0.1  # huber_scale is not applied
    assert torch.allclose(diffusion.huber_threshold("snr", 0.1, 2.0, some, scheduler).double(), expected, rtol=1e-5)


def test_only_huber_and_smooth_l1_have_a_threshold():
    scheduler, timesteps = diffusion.training_scheduler(False), torch.tensor([0, 999])
    assert LossSettings().threshold(timesteps, scheduler) is None
    assert LossSettings(loss_type="l1").threshold(timesteps, scheduler) is None
    threshold = LossSettings(loss_type="smooth_l1", huber_schedule="constant", huber_c=0.3).threshold(
        timesteps, scheduler
    )
    assert threshold.tolist() == pytest.approx([0.3, 0.3])


def test_snr_weights_on_given_snrs():
    snr = torch.tensor([0.0, 0.25, 4.0, 1e6])
    # SNR clamped to [1/1000, 1000] where the weight divides by it
    assert diffusion.v_prediction_scale(snr).tolist() == pytest.approx([1e-3 / 1.001, 0.2, 0.8, 1000 / 1001])
    assert diffusion.debiased_weight(snr, False).tolist() == pytest.approx(
        [1 / math.sqrt(1e-3), 2.0, 0.5, 1 / math.sqrt(1000)]
    )
    assert diffusion.debiased_weight(snr, True).tolist() == pytest.approx([1 / 1.001, 0.8, 0.2, 1 / 1001])
    assert diffusion.min_snr_weight(snr, 5.0, False).tolist() == pytest.approx([1.0, 1.0, 1.0, 5e-6])
    assert diffusion.min_snr_weight(snr, 5.0, True).tolist() == pytest.approx([0.0, 0.2, 0.8, 5 / (1e6 + 1)])

    two = torch.tensor([0.25, 4.0])
    like = diffusion.snr_weighted_loss(torch.ones(2), two, LossSettings(v_pred_like_loss=0.5), False)
    assert like.tolist() == pytest.approx([1 + 0.5 * 1.25 / 0.25, 1 + 0.5 * 5 / 4])  # loss + v * loss * (SNR + 1) / SNR
    in_order = diffusion.snr_weighted_loss(
        torch.ones(2), torch.tensor([4.0, 100.0]), LossSettings(min_snr_gamma=5, debiased_estimation_loss=True), False
    )
    assert in_order.tolist() == pytest.approx([1.0 * 0.5, 0.05 * 0.1])  # Min-SNR, then debiased
    v_settings = LossSettings(scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True)
    scaled = diffusion.snr_weighted_loss(torch.ones(1), torch.tensor([4.0]), v_settings, True)
    assert scaled.item() == pytest.approx(0.8 * 0.2)


# options


def parsed(*extra):
    return training_flags("model.safetensors", "data", "out", *extra)


def notes_of(*extra):
    return training_options(parsed(*extra)).notes


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adaptive_noise_scale", "0.1"], "give --noise_offset too"),
        (["--scale_v_pred_loss_like_noise_pred"], "needs --v_parameterization"),
        (["--v_pred_like_loss", "0.2", "--v_parameterization"], "leave it out with --v_parameterization"),
        (["--loss_type", "huber", "--huber_c", "0"], "threshold must be above 0"),
        (["--multires_noise_iterations", "-1"], "use 1 or more"),
    ],
)
def test_conflicting_noise_and_loss_options_are_one_sentence(extra, message):
    with pytest.raises(UserError, match=message) as error:
        training_options(parsed(*extra))
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_zero_terminal_snr_without_v_prediction_gives_a_note():
    assert any("--zero_terminal_snr without --v_parameterization" in note for note in notes_of("--zero_terminal_snr"))
    assert not any("zero_terminal_snr" in note for note in notes_of("--zero_terminal_snr", "--v_parameterization"))
    notes_of("--huber_c", "0")  # no error: l2 has no threshold to check


def test_option_defaults_are_sd_scripts_defaults():
    args = parsed()
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale, args.multires_noise_discount) == (
        "l2",
        "snr",
        0.1,
        1.0,
        0.3,
    )
    diffusion_options = training_options(args).diffusion
    assert diffusion_options.loss == LossSettings() and diffusion_options.noise == NoiseSettings()
    with pytest.raises(SystemExit):
        parsed("--loss_type", "l3")


# training runs


SHORT_RUN = ("--max_train_steps", "3", "--learning_rate", "1e-3", "--network_train_unet_only", "--cache_latents")


def test_training_with_the_new_options_gives_a_loadable_file_and_records_them(tiny_sd1, tiny_dataset, tmp_path):
    v_options = (
        "--v_parameterization",
        "--zero_terminal_snr",
        "--noise_offset",
        "0.05",
        "--noise_offset_random_strength",
        "--adaptive_noise_scale",
        "0.01",
        "--multires_noise_iterations",
        "4",
        "--ip_noise_gamma",
        "0.1",
        "--ip_noise_gamma_random_strength",
        "--loss_type",
        "huber",
        "--min_snr_gamma",
        "5",
        "--scale_v_pred_loss_like_noise_pred",
        "--debiased_estimation_loss",
        "--masked_loss",
    )
    final = train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "v", *SHORT_RUN, *v_options))
    model = load_stable_diffusion(tiny_sd1)
    network, weights = create_network_from_weights(1.0, final, model.vae, model.text_encoders[0], model.unet)
    network.load_state_dict(weights)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    metadata = open_checkpoint(final).metadata
    assert (
        metadata["ss_zero_terminal_snr"] == "True"
        and metadata["ss_multires_noise_iterations"] == "4"
        and metadata["ss_multires_noise_discount"] == "0.3"
    )
    assert (
        metadata["ss_adaptive_noise_scale"] == "0.01"
        and metadata["ss_noise_offset_random_strength"] == "True"
        and metadata["ss_ip_noise_gamma"] == "0.1"
    )
    assert metadata["ss_ip_noise_gamma_random_strength"] == "True" and metadata["ss_debiased_estimation"] == "True"
    assert (
        metadata["ss_loss_type"],
        metadata["ss_huber_schedule"],
        metadata["ss_huber_c"],
        metadata["ss_huber_scale"],
    ) == ("huber", "snr", "0.1", "1.0")

    # epsilon prediction at the last timesteps, where zero terminal SNR takes SNR to 0:
    # the weights' floor keeps it finite
    eps_options = (
        "--zero_terminal_snr",
        "--min_timestep",
        "995",
        "--loss_type",
        "smooth_l1",
        "--huber_schedule",
        "exponential",
        "--huber_scale",
        "2",
        "--v_pred_like_loss",
        "0.1",
        "--debiased_estimation_loss",
        "--min_snr_gamma",
        "5",
    )
    final = train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "eps", *SHORT_RUN, *eps_options))
    assert all(torch.isfinite(tensor).all() for tensor in load_file(final).values())


def test_new_options_at_their_defaults_change_nothing(tiny_sd1, tiny_dataset, tmp_path):
    existing = ("--noise_offset", "0.05", "--min_snr_gamma", "5")
    plain = load_file(train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "plain", *SHORT_RUN, *existing)))
    defaults = (
        "--loss_type",
        "l2",
        "--huber_schedule",
        "snr",
        "--huber_c",
        "0.1",
        "--huber_scale",
        "1.0",
        "--multires_noise_discount",
        "0.3",
        "--multires_noise_iterations",
        "0",
        "--masked_loss",
    )
    explicit = load_file(
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "explicit", *SHORT_RUN, *existing, *defaults))
    )
    assert plain.keys() == explicit.keys() and all(torch.equal(plain[key], explicit[key]) for key in plain)
    changed = load_file(
        train(
            training_arguments(
                tiny_sd1, tiny_dataset, tmp_path / "changed", *SHORT_RUN, *existing, "--ip_noise_gamma", "0.1"
            )
        )
    )
    assert not all(torch.equal(plain[key], changed[key]) for key in plain)  # and the options do reach the training step
