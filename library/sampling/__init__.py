"""Sample images: prompt files, sampler names, and drawing, naming and saving one image. Used by the trainer's
`--sample_prompts` and by gen_img_diffusers.py."""

from library.sampling.generate import GeneratedImage, generate_image, png_metadata, sample_file_name, save_sample_image
from library.sampling.prompts import SamplePrompt, parse_prompt_line, read_sample_prompts
from library.sampling.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES, check_sampler, make_scheduler

__all__ = [
    "DEFAULT_SAMPLER",
    "SAMPLER_NAMES",
    "GeneratedImage",
    "SamplePrompt",
    "check_sampler",
    "generate_image",
    "make_scheduler",
    "parse_prompt_line",
    "png_metadata",
    "read_sample_prompts",
    "sample_file_name",
    "save_sample_image",
]
