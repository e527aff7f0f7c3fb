"""Aspect-ratio buckets against values computed by hand from specs/training.md 3.1, 3.2 and 4.2."""

from __future__ import annotations

import random

import pytest

from library.dataset.buckets import (
    SDXL_STEP_DIVISOR,
    BucketAssigner,
    BucketSettings,
    Placement,
    bucket_resolutions,
    bucket_summary_lines,
    check_bucket_settings,
    crop_ltrb,
    crop_offsets,
    mean_aspect_error,
    normalized,
)

WHERE = "dataset.toml, datasets[0]"
BUCKETED_512 = BucketSettings(resolution=(512, 512), enable_bucket=True)


def test_512_list_is_the_spec_example():
    assert bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip


def test_sides_below_min_size_are_left_out():
    # A = 147456: w=256 -> 576, 320 -> 448, 384 -> 384, 448 -> 320, 512 -> 256, 576 -> 256, 640 -> 192 < 256 (left out)
    assert bucket_resolutions((384, 384), 256, 1024, 64) == [
        (256, 512), (256, 576), (320, 448), (384, 384), (448, 320), (512, 256), (576, 256),
    ]  # fmt: skip


def test_equal_aspect_errors_take_the_first_bucket():
    # resolution 640x512 has (576, 512) (aspect 1.125) and (640, 512) (1.25); 608x512 is 1.1875, 0.0625 from both
    # (exact in binary): the first in sorted order wins; 1.1875 > 1.125 so scale = 512/512 -> resized (608, 512)
    assigner = BucketAssigner(BucketSettings(resolution=(640, 512), enable_bucket=True))
    assert {(576, 512), (640, 512)} <= set(assigner.resolutions)
    assert assigner.place((608, 512)) == Placement((576, 512), (608, 512))


def test_768_list_spot_checks():
    # A = 589824: w=640 -> 921 // 64 * 64 = 896; w=704 -> 837 -> 832; w=960 -> 614 -> 576; w=256..576 -> capped at 1024.
    resolutions = bucket_resolutions((768, 768), 256, 1024, 64)
    assert len(resolutions) == 19
    for size in [(768, 768), (640, 896), (896, 640), (704, 832), (576, 960), (960, 576), (256, 1024), (1024, 576)]:
        assert size in resolutions
    assert (768, 1024) not in resolutions and (512, 512) not in resolutions
    assert resolutions == sorted(resolutions)


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        ((320, 768), (320, 768), (320, 768)),  # exactly a bucket
        # aspect 2.0: (704,320) is 2.2 (error 0.2), (640,384) 1.667 (0.333); 2.0 < 2.2 so scale = 704/1000 = 0.704
        # -> (704, int(352.0 + 0.5)) = (704, 352)
        ((1000, 500), (704, 320), (704, 352)),
        # aspect 1/3: (256,832) is 0.3077 (error 0.0256), (256,960) 0.2667 (0.0667), (320,768) 0.4167 (0.0833);
        # 1/3 > 0.3077 so scale = 832/1800 -> (int(277.33 + 0.5), 832) = (277, 832)
        ((600, 1800), (256, 832), (277, 832)),
        # tiny, upscaled: aspect 1.333; (576,448) is 1.2857 (error 0.048); scale = 448/90 -> (int(597.33 + 0.5), 448)
        ((120, 90), (576, 448), (597, 448)),
        # aspect 1.001 -> (512, 512); scale = 512/1024 = 0.5 exactly: int(512.5 + 0.5) = 513 (round() would give 512)
        ((1025, 1024), (512, 512), (513, 512)),
    ],
)
def test_placement_with_upscaling(image, bucket, resized):
    assert BucketAssigner(BUCKETED_512).place(image) == Placement(bucket, resized)


def test_no_upscale_large_image():
    # 1000x700, A = 262144, aspect 1.4286: rw = sqrt(A * 1.4286) = 611.96, rh = A / rw = 428.37.
    # width first: int(612.46) = 612 -> 576; height from it: 576 / 1.4286 = 403.2 -> int(403.7) = 403 -> 384;
    # 576/384 = 1.5
    # height first: int(428.87) = 428 -> 384; width from it: 384 * 1.4286 = 548.6 -> int(549.1) = 549 -> 512;
    # 512/384 = 1.333
    # |1.5 - 1.4286| = 0.071 < |1.333 - 1.4286| = 0.095: width first, resized = (576, int(403.2 + 0.5)) = (576, 403),
    # bucket = (576, 403 - 403 % 64) = (576, 384)
    assigner = BucketAssigner(BucketSettings(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True))
    assert assigner.place((1000, 700)) == Placement((576, 384), (576, 403))
    # 768x1024, aspect 0.75: rw = 443.4, rh = 591.2; width first 443 -> 384, height 512 -> 512, aspect 0.75 (exact);
    # height first 591 -> 576, width 432 -> 384, aspect 0.667; width first wins: (384, int(512.0 + 0.5)) = (384, 512)
    assert assigner.place((768, 1024)) == Placement((384, 512), (384, 512))
    # 1000x800, aspect 1.25: rw = sqrt(327680) = 572.43, rh = 457.95; width first 572 -> 512,
    # height 409.6 -> 410 -> 384, aspect 1.333 (error 0.083); height first 458 -> 448, width 560 -> 512,
    # aspect 1.143 (error 0.107);
    # width first: resized = (512, int(409.6 + 0.5)) = (512, 410)
    assert assigner.place((1000, 800)) == Placement((512, 384), (512, 410))
    # 1370x570, aspect 2.4035: rw = 793.77, rh = 330.25; width first 794 -> 768, height 319.53 -> 320 -> 320;
    # height first 330 -> 320, width 769.12 -> 769 -> 768: both 768/320, an exact tie, which goes to height first:
    # resized = (int(769.12 + 0.5), 320) = (769, 320)
    assert assigner.place((1370, 570)) == Placement((768, 320), (769, 320))


def test_no_upscale_small_image_is_only_cropped():
    # 300 * 200 <= 512 * 512: no resize; bucket = (300 - 44, 200 - 8)
    assigner = BucketAssigner(BucketSettings(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True))
    assert assigner.place((300, 200)) == Placement((256, 192), (300, 200))
    with pytest.raises(ValueError, match="too small"):
        assigner.place((40, 300))


def test_bucketing_disabled_uses_the_resolution():
    assigner = BucketAssigner(BucketSettings(resolution=(512, 768)))
    assert assigner.resolutions == [(512, 768)]
    # aspect 2 > 0.667: scale = 768/500 = 1.536 -> (1536, 768)
    assert assigner.place((1000, 500)) == Placement((512, 768), (1536, 768))
    # aspect 0.25 < 0.667: scale = 512/200 = 2.56 -> (512, 2048)
    assert assigner.place((200, 800)) == Placement((512, 768), (512, 2048))
    assert assigner.place((512, 768)) == Placement((512, 768), (512, 768))


def test_min_max_are_rounded_to_the_step_with_notes():
    settings = BucketSettings(resolution=(512, 512), enable_bucket=True, min_bucket_reso=300, max_bucket_reso=1000)
    adjusted, notes = normalized(settings)
    assert (adjusted.min_bucket_reso, adjusted.max_bucket_reso) == (256, 1024)
    assert len(notes) == 2
    assert "min_bucket_reso 300" in notes[0] and "256" in notes[0]
    assert "max_bucket_reso 1000" in notes[1] and "1024" in notes[1]
    assert normalized(BUCKETED_512) == (BUCKETED_512, [])
    _, notes = normalized(BucketSettings(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True))
    assert len(notes) == 1 and "ignored" in notes[0] and "bucket_no_upscale" in notes[0]


def test_check_accepts_good_settings():
    assert check_bucket_settings(BUCKETED_512, WHERE) == []
    # 1000 is ceiled to 1024 before it is compared with the resolution, as sd-scripts does
    assert check_bucket_settings(BucketSettings((1024, 1024), enable_bucket=True, max_bucket_reso=1000), WHERE) == []
    # min/max do not matter without bucketing or with bucket_no_upscale
    assert check_bucket_settings(BucketSettings((512, 512), min_bucket_reso=768), WHERE) == []
    no_upscale = BucketSettings((512, 512), enable_bucket=True, bucket_no_upscale=True, max_bucket_reso=256)
    assert check_bucket_settings(no_upscale, WHERE) == []


@pytest.mark.parametrize("steps", [32, 0, -64, 96])
def test_check_rejects_steps_not_a_positive_multiple_of_64(steps):
    [problem] = check_bucket_settings(BucketSettings((512, 512), enable_bucket=True, bucket_reso_steps=steps), WHERE)
    assert problem.startswith(WHERE) and f"bucket_reso_steps is {steps}" in problem and "64" in problem
    assert "divisible by 64" in problem


@pytest.mark.parametrize(("steps", "valid"), [(32, True), (96, True), (48, False)])
def test_sdxl_bucket_steps_are_multiples_of_32(steps, valid):
    settings = BucketSettings((512, 512), enable_bucket=True, min_bucket_reso=256, bucket_reso_steps=steps)
    problems = check_bucket_settings(settings, WHERE, SDXL_STEP_DIVISOR)
    if valid:
        assert problems == []
    else:
        assert len(problems) == 1 and "divisible by 32" in problems[0]


def test_check_min_and_max_against_the_resolution():
    [problem] = check_bucket_settings(BucketSettings((512, 768), enable_bucket=True, min_bucket_reso=576), WHERE)
    assert problem.startswith(WHERE) and "min_bucket_reso is 576" in problem and "512 or less" in problem
    [problem] = check_bucket_settings(BucketSettings((512, 1280), enable_bucket=True), WHERE)
    assert problem.startswith(WHERE) and "max_bucket_reso is 1024" in problem and "1280 or more" in problem


def test_check_resolution_must_be_positive():
    [problem] = check_bucket_settings(BucketSettings((0, 512), enable_bucket=True), WHERE)
    assert problem.startswith(WHERE) and "resolution is 0x512" in problem
    assert len(check_bucket_settings(BucketSettings((-1, 512)), WHERE)) == 1


def test_crop_offsets_center_and_random():
    assert crop_offsets((704, 352), (704, 320), False, random.Random(0)) == (0, 16)
    assert crop_offsets((277, 832), (256, 832), False, random.Random(0)) == (10, 0)
    for seed in range(50):
        left, top = crop_offsets((300, 200), (256, 192), True, random.Random(seed))
        assert 0 <= left <= 44 and 0 <= top <= 8
    reference = random.Random(7)
    assert crop_offsets((300, 200), (256, 192), True, random.Random(7)) == (
        reference.randint(0, 44),
        reference.randint(0, 8),
    )
    # no draw for a side without excess: the generator's next number is untouched
    rng, untouched = random.Random(3), random.Random(3)
    crop_offsets((256, 192), (256, 192), True, rng)
    assert rng.random() == untouched.random()
    rng = random.Random(0)
    left_values = {crop_offsets((300, 192), (256, 192), True, rng)[0] for _ in range(1000)}
    assert left_values == set(range(45))  # both ends of [0, 44] are reachable


def test_crop_ltrb_landscape_and_portrait():
    # 1000x500 in (704, 320): the bucket (2.2) is wider than 2.0, fit the height: 640x320, left = (704 - 640) // 2
    assert crop_ltrb((1000, 500), (704, 320)) == (32.0, 0.0, 672.0, 320.0)
    # 500x1000 in (320, 704): the bucket (0.4545) is narrower than 0.5, fit the width: 320x640, top = 64 // 2
    assert crop_ltrb((500, 1000), (320, 704)) == (0.0, 32.0, 320.0, 672.0)
    # 1000x700 in (576, 448): fit the width: 576 x 403.2, top = 44.8 // 2 = 22, bottom = 425.2 (fractional)
    assert crop_ltrb((1000, 700), (576, 448)) == pytest.approx((0.0, 22.0, 576.0, 425.2))


def test_mean_aspect_error_and_summary():
    pairs = [(Placement((704, 320), (704, 352)), (1000, 500)), (Placement((256, 832), (277, 832)), (600, 1800))]
    # (|2.2 - 2.0| + |0.307692 - 0.333333|) / 2 = (0.2 + 0.025641) / 2
    assert mean_aspect_error(pairs) == pytest.approx(0.1128205, abs=1e-7)
    assert mean_aspect_error([]) == 0.0
    counts = {(512, 512): 3, (256, 832): 12, (320, 768): 0, (704, 320): 5}
    assert bucket_summary_lines(counts) == [
        "bucket 0: resolution (256, 832), count: 12",
        "bucket 2: resolution (512, 512), count: 3",
        "bucket 3: resolution (704, 320), count: 5",
    ]


def test_a_minimum_below_one_step_is_refused():
    settings = BucketSettings(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128)
    assert check_bucket_settings(settings, "here") == [
        "here: min_bucket_reso is 32, smaller than one bucket_reso_steps (64); set it to 64 or more."
    ]
