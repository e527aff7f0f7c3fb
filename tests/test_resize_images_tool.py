"""tools/resize_images_to_resolution.py as a user runs it: sizes computed by hand, names, formats, copied files,
and bad input that ends in one `error:` sentence; plus the shared resize helper's filter choice and crop."""

from __future__ import annotations

from unittest import mock

import pytest
from conftest import ROOT, run_script
from PIL import Image

from library.dataset.resize import INTERPOLATIONS, center_crop, resize_image
from library.errors import UserError

TOOL = "tools/resize_images_to_resolution.py"


def make_image(path, size, color=(200, 40, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def sizes(folder):
    return {path.name: Image.open(path).size for path in folder.iterdir() if path.suffix in (".jpg", ".png")}


def test_non_square_image_keeps_its_aspect_and_is_cropped_to_the_multiple(tmp_path):
    make_image(tmp_path / "src" / "wide.png", (2000, 1000))
    result = run_script(
        TOOL,
        str(tmp_path / "src"),
        str(tmp_path / "dst"),
        "--max_resolution",
        "512x512, 384x384",
        "--divisible_by",
        "8",
    )
    assert result.returncode == 0, result.stderr
    # 512x512: f = sqrt(262144 / 2e6) = 0.36204 -> 724x362 -> multiples of 8: 720x360
    # 384x384: f = sqrt(147456 / 2e6) = 0.27153 -> 543x271 -> 536x264
    assert sizes(tmp_path / "dst") == {"wide+512x512.jpg": (720, 360), "wide+384x384.jpg": (536, 264)}
    assert "wide.png 2000x1000 -> wide+512x512.jpg 720x360" in result.stdout


def test_each_resolution_is_computed_from_the_original_in_any_order(tmp_path):
    make_image(tmp_path / "src" / "wide.jpg", (2000, 1000))
    result = run_script(TOOL, str(tmp_path / "src"), str(tmp_path / "dst"), "--max_resolution", "256x256,512x512")
    assert result.returncode == 0, result.stderr
    # 256x256: f = sqrt(65536 / 2e6) = 0.18102 -> 362x181; 512x512 as above -> 724x362 (not 362x181 again)
    assert sizes(tmp_path / "dst") == {"wide+256x256.jpg": (362, 181), "wide+512x512.jpg": (724, 362)}


def test_small_image_is_never_upscaled_only_cropped(tmp_path):
    make_image(tmp_path / "src" / "small.png", (300, 200))
    result = run_script(
        TOOL,
        str(tmp_path / "src"),
        str(tmp_path / "dst"),
        "--max_resolution",
        "512x512,128x128",
        "--divisible_by",
        "64",
    )
    assert result.returncode == 0, result.stderr
    # 512x512: 60000 px <= 262144 -> kept 300x200 -> 256x192;
    # 128x128: f = sqrt(16384 / 60000) = 0.52256 -> 156x104 -> 128x64
    assert sizes(tmp_path / "dst") == {"small+512x512.jpg": (256, 192), "small+128x128.jpg": (128, 64)}


def test_png_output_and_upper_case_extension(tmp_path):
    make_image(tmp_path / "src" / "photo.JPG", (100, 100))
    result = run_script(
        TOOL, str(tmp_path / "src"), str(tmp_path / "dst"), "--max_resolution", "64x64", "--save_as_png"
    )
    assert result.returncode == 0, result.stderr
    assert [path.name for path in (tmp_path / "dst").iterdir()] == ["photo+64x64.png"]
    with Image.open(tmp_path / "dst" / "photo+64x64.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 64))


def test_jpeg_output_by_default(tmp_path):
    make_image(tmp_path / "src" / "photo.webp", (100, 100))
    assert run_script(TOOL, str(tmp_path / "src"), str(tmp_path / "dst"), "--max_resolution", "64x64").returncode == 0
    with Image.open(tmp_path / "dst" / "photo+64x64.jpg") as image:
        assert image.format == "JPEG"


def test_other_files_are_copied_and_associated_files_once_per_resolution(tmp_path):
    source = tmp_path / "src"
    make_image(source / "cat.png", (100, 100))
    (source / "cat.txt").write_text("a cat")
    (source / "cat.caption").write_text("a cat, sitting")
    (source / "notes.md").write_text("notes")
    (source / "sub").mkdir()
    result = run_script(
        TOOL, str(source), str(tmp_path / "dst"), "--max_resolution", "64x64,32x32", "--copy_associated_files"
    )
    assert result.returncode == 0, result.stderr
    assert "sub" in result.stdout
    names = sorted(path.name for path in (tmp_path / "dst").iterdir())
    assert names == sorted(
        [
            "cat.txt",
            "cat.caption",
            "notes.md",
            "cat+64x64.jpg",
            "cat+32x32.jpg",
            "cat+64x64.txt",
            "cat+32x32.txt",
            "cat+64x64.caption",
            "cat+32x32.caption",
        ]
    )
    assert (tmp_path / "dst" / "cat+32x32.caption").read_text() == "a cat, sitting"


def test_relative_source_folder_with_associated_files(tmp_path):
    make_image(tmp_path / "src" / "dog.bmp", (100, 100))
    (tmp_path / "src" / "dog.txt").write_text("a dog")
    result = run_script(
        str(ROOT / TOOL), "src", "dst", "--max_resolution", "64x64", "--copy_associated_files", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "dst").iterdir()) == ["dog+64x64.jpg", "dog+64x64.txt", "dog.txt"]


@pytest.mark.parametrize("resolution", ["512", "ax512", "512x512,"])
def test_bad_resolution_is_one_sentence(tmp_path, resolution):
    make_image(tmp_path / "src" / "cat.png", (100, 100))
    result = run_script(TOOL, str(tmp_path / "src"), str(tmp_path / "dst"), "--max_resolution", resolution)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --max_resolution item") and "Traceback" not in result.stderr
    assert not (tmp_path / "dst").exists()


def test_missing_source_folder(tmp_path):
    result = run_script(TOOL, str(tmp_path / "nowhere"), str(tmp_path / "dst"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_truncated_image_is_named_and_the_others_are_written(tmp_path):
    source = tmp_path / "src"
    make_image(source / "a.png", (100, 100))
    make_image(source / "broken.jpg", (100, 100))
    make_image(source / "c.png", (100, 100))
    data = (source / "broken.jpg").read_bytes()
    (source / "broken.jpg").write_bytes(data[: len(data) // 2])
    result = run_script(TOOL, str(source), str(tmp_path / "dst"), "--max_resolution", "64x64")
    assert result.returncode == 2
    assert "broken.jpg" in result.stderr and "1 of 3 images" in result.stderr and "Traceback" not in result.stderr
    assert sorted(path.name for path in (tmp_path / "dst").iterdir()) == ["a+64x64.jpg", "c+64x64.jpg"]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((50, 25), INTERPOLATIONS["area"]),
        ((200, 25), INTERPOLATIONS["lanczos"]),
        ((200, 100), INTERPOLATIONS["lanczos"]),
    ],
)
def test_default_filter_is_area_only_when_both_sides_shrink(size, expected):
    image = Image.new("RGB", (100, 50))
    with mock.patch.object(Image.Image, "resize", autospec=True, return_value=image) as resize:
        resize_image(image, size)
    assert resize.call_args.args[2] == expected


def test_unknown_interpolation_names_the_value():
    with pytest.raises(UserError, match="'cubical'.*area"):
        resize_image(Image.new("RGB", (8, 8)), (4, 4), "cubical")


def test_center_crop_offsets():
    image = Image.new("RGB", (10, 5))
    image.putdata([(x, y, 0) for y in range(5) for x in range(10)])
    cropped = center_crop(image, (7, 2))
    # left = (10 - 7) // 2 = 1, top = (5 - 2) // 2 = 1
    assert cropped.size == (7, 2) and cropped.getpixel((0, 0))[:2] == (1, 1)


def test_the_source_folder_as_destination_is_refused(tmp_path):
    make_image(tmp_path / "src" / "cat.png", (100, 100))
    result = run_script(TOOL, str(tmp_path / "src"), str(tmp_path / "src" / "."), "--max_resolution", "64x64")
    assert result.returncode == 2 and "the destination is the source folder" in result.stderr
    assert [path.name for path in (tmp_path / "src").iterdir()] == ["cat.png"]
