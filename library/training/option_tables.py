"""Facts about sd-scripts' options that the parser and the typed options both need: which --metadata_* fields
exist, the console log levels, and the options that are known but refused here, with why."""

from __future__ import annotations

from library.unsupported_options import UnsupportedOption

MODELSPEC_FIELDS = (
    "title",
    "author",
    "description",
    "license",
    "tags",
    "trigger_phrase",
    "usage_hint",
    "thumbnail",
    "merged_from",
    "preprocessor",
    "is_negative_embedding",
)  # --metadata_<field> -> modelspec.<field>

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DYNAMO_BACKENDS = (  # --dynamo_backend, as sd-scripts lists them
    "eager",
    "aot_eager",
    "inductor",
    "aot_ts_nvfuser",
    "nvprims_nvfuser",
    "cudagraphs",
    "ofi",
    "fx2trt",
    "onnxrt",
    "tensort",
    "ipex",
    "tvm",
)


DEEPSPEED = "DeepSpeed is not supported; one GPU's memory goes further with --gradient_checkpointing and --fp8_base"
HUB_UPLOAD = "uploading to the Hugging Face Hub is not done here; upload the saved files with huggingface-cli upload"
NOT_YET = "not implemented yet"
UNSUPPORTED_OPTIONS = (
    UnsupportedOption("deepspeed", DEEPSPEED),
    UnsupportedOption("zero_stage", DEEPSPEED, "value", default=2),
    *(
        UnsupportedOption(name, DEEPSPEED, "value")
        for name in (
            "offload_optimizer_device",
            "offload_optimizer_nvme_path",
            "offload_param_device",
            "offload_param_nvme_path",
        )
    ),
    UnsupportedOption("zero3_init_flag", DEEPSPEED),
    UnsupportedOption("zero3_save_16bit_model", DEEPSPEED),
    *(
        UnsupportedOption(name, HUB_UPLOAD, "value")
        for name in (
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
        )
    ),
    UnsupportedOption("save_state_to_huggingface", HUB_UPLOAD),
    UnsupportedOption("resume_from_huggingface", HUB_UPLOAD),
    UnsupportedOption("async_upload", HUB_UPLOAD),
    UnsupportedOption(
        "cpu_offload_checkpointing",
        "it offloads the checkpoints of FLUX/SD3 blocks, which these models do not have; use --gradient_checkpointing",
    ),
    UnsupportedOption(
        "fused_backward_pass",
        "sd-scripts applies it to full fine-tuning only (with Adafactor); a LoRA's optimizer step is small, so leave "
        "it out",
    ),
    UnsupportedOption(
        "fp16_master_weights_and_gradients", "it is a DeepSpeed option; use --full_fp16 for fp16 LoRA weights"
    ),
    UnsupportedOption(
        "conditioning_data_dir",
        "give it per subset in the dataset config ([[datasets.subsets]] conditioning_data_dir = ...), as sd-scripts "
        "reads it",
        "value",
    ),
)
