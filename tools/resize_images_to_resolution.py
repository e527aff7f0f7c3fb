"""Shrink every image of a folder to at most the pixel count of each given resolution (aspect kept, never
upscaled), crop to a multiple of --divisible_by, and save one copy per resolution as sd-scripts'
tools/resize_images_to_resolution.py does.

    python tools/resize_images_to_resolution.py images/ resized/ --max_resolution 512x512,384x384 --divisible_by 8

`cat.png` becomes `cat+512x512.jpg` and `cat+384x384.jpg`; other files are copied unchanged.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from library.dataset.config import IMAGE_SUFFIXES
from library.dataset.images import load_image
from library.dataset.resize import center_crop, resize_image
from library.errors import UserError, run_cli
from library.file_io import atomic_output, check_output_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_img_folder", help="folder of images to resize (not searched recursively)")
    parser.add_argument("dst_img_folder", help="folder to write the resized images to (created if missing)")
    parser.add_argument(
        "--max_resolution",
        default="512x512,384x384,256x256,128x128",
        help="comma-separated WxH list; each output has at most W*H pixels (default: %(default)s)",
    )
    parser.add_argument("--divisible_by", type=int, default=1, help="crop each side down to a multiple of this")
    parser.add_argument(
        "--interpolation",
        choices=["area", "cubic", "lanczos4", "nearest", "linear", "box"],
        default=None,
        help="resampling filter (default: area)",
    )
    parser.add_argument("--save_as_png", action="store_true", help="save PNG instead of JPEG (quality 100)")
    parser.add_argument(
        "--copy_associated_files",
        action="store_true",
        help="also copy files named like the image (cat.txt, cat.caption) once per resolution",
    )
    return parser


def parse_resolutions(text: str) -> list[tuple[str, int]]:
    """'512x512, 384x384' -> [('512x512', 262144), ('384x384', 147456)]: the name and the pixel budget."""
    resolutions = []
    for item in (part.strip() for part in text.split(",")):
        sides = item.split("x")
        if len(sides) != 2 or not all(side.isdigit() and int(side) > 0 for side in sides):
            raise UserError(
                f"--max_resolution item {item!r} is not WIDTHxHEIGHT; write e.g. --max_resolution 512x512,384x384."
            )
        resolutions.append((item, int(sides[0]) * int(sides[1])))
    return resolutions


def fit_size(width: int, height: int, max_pixels: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized size, cropped size): shrink to at most max_pixels keeping the aspect, then floor to the multiple."""
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return (width, height), (width // divisible_by * divisible_by, height // divisible_by * divisible_by)


def copy_file(source: Path, destination: Path) -> None:
    with atomic_output(destination) as temporary:
        shutil.copyfile(source, temporary)


def resize_one(
    path: Path, destination: Path, resolutions: list[tuple[str, int]], args: argparse.Namespace, associated: list[Path]
) -> int:
    """Write every resolution of one image (and its associated files); returns the number of images saved."""
    image = load_image(path, with_alpha=False, remedy="re-export it or move it out of the folder")
    suffix, image_format = (".png", "PNG") if args.save_as_png else (".jpg", "JPEG")
    for name, max_pixels in resolutions:
        resized_size, cropped_size = fit_size(image.width, image.height, max_pixels, args.divisible_by)
        if 0 in cropped_size:
            raise UserError(
                f"{path}: at {name} the image is {resized_size[0]}x{resized_size[1]}, smaller than "
                f"--divisible_by {args.divisible_by}; lower --divisible_by or drop the image."
            )
        output = image if resized_size == image.size else resize_image(image, resized_size, args.interpolation)
        output = center_crop(output, cropped_size)
        output_path = destination / f"{path.stem}+{name}{suffix}"
        with atomic_output(output_path) as temporary:
            output.save(temporary, format=image_format, **({"quality": 100} if image_format == "JPEG" else {}))
        print(f"{path.name} {image.width}x{image.height} -> {output_path.name} {output.width}x{output.height}")
        for file in associated:
            copy_file(file, destination / f"{path.stem}+{name}{file.suffix}")
    return len(resolutions)


def main() -> None:
    args = build_parser().parse_args()
    resolutions = parse_resolutions(args.max_resolution)
    if args.divisible_by < 1:
        raise UserError(f"--divisible_by {args.divisible_by} must be 1 or more.")
    source, destination = Path(args.src_img_folder), Path(args.dst_img_folder)
    if not source.is_dir():
        raise UserError(f"{source}: source folder not found; pass an existing folder of images as the first argument.")
    if destination.is_dir() and destination.samefile(source):
        raise UserError(
            f"{destination}: the destination is the source folder, where the resized copies would join the originals"
            " (and be trained on); give another destination folder."
        )
    check_output_folder(destination, "the destination folder")
    destination.mkdir(parents=True, exist_ok=True)

    entries = sorted(source.iterdir())
    files = [entry for entry in entries if entry.is_file()]
    images = [file for file in files if file.suffix.lower() in IMAGE_SUFFIXES]
    others = [file for file in files if file.suffix.lower() not in IMAGE_SUFFIXES]
    for folder in (entry for entry in entries if entry.is_dir()):
        print(f"note: skipped sub-folder {folder.name} (folders are not searched recursively)")
    for file in others:
        copy_file(file, destination / file.name)

    saved, failed = 0, 0
    for path in images:
        associated = [file for file in others if file.stem == path.stem] if args.copy_associated_files else []
        try:
            saved += resize_one(path, destination, resolutions, args, associated)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
    print(
        f"saved {saved} images from {len(images) - failed} source images and copied {len(others)} other files into"
        f" {destination}"
    )
    if failed:
        raise UserError(f"{failed} of {len(images)} images could not be processed; see the errors above.")


if __name__ == "__main__":
    run_cli(main)
