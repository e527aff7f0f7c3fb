#!/usr/bin/env bash
# The GPU comparison with sd-scripts in one go (GitHub issue 16), for a lent GPU machine with PyTorch installed and
# nothing to download: installs the carried wheels, then runs bench/vs_sd_scripts.py for each of the issue's
# settings, both trainers on the same GPU in the same call, and copies the records into $OUT.
#
# Prepare here (network): bash bench/fetch_gpu_wheels.sh      -> .whl/ours, .whl/sd-scripts and .sds/ (ignored)
# Run there:              bash bench/gpu_session.sh            (carry .whl and .sds)
# Try it on the CPU:      bash bench/gpu_session.sh --device cpu   (one small setting, this machine's venvs)
#
# Environment: OUT (default bench/gpu_out), SD_SCRIPTS (default .sds), PYTHON_OURS / PYTHON_SD_SCRIPTS (default: a
# wrapper around python3 with the carried wheels first on its path; on the CPU .venv and <SD_SCRIPTS>/.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="$2"; fi
OUT="${OUT:-$PWD/bench/gpu_out}"
SD_SCRIPTS="${SD_SCRIPTS:-$PWD/.sds}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# A Python that sees one set of carried wheels before the image's own packages.
python_with() {  # name, wheel folder
    local site="/tmp/site-$1" wrapper="/tmp/python-$1"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$2"/*.whl
    printf '#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec python3 "$@"\n' "$site" >"$wrapper"
    chmod +x "$wrapper"
    echo "$wrapper"
}

if [[ "$DEVICE" == "cuda" ]]; then
    PYTHON_OURS="${PYTHON_OURS:-$(python_with ours .whl/ours)}"
    PYTHON_SD_SCRIPTS="${PYTHON_SD_SCRIPTS:-$(python_with sd-scripts .whl/sd-scripts)}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" || true
    SETTINGS=(
        "--model sd15 --resolution 512 --batch_size 1 --network_dim 32 --conv_dim 0 --lengths 20 120"
        "--model sd15 --resolution 512 --batch_size 8 --network_dim 32 --conv_dim 0 --lengths 10 50 --no_warm_up"
        "--model sdxl --resolution 1024 --batch_size 1 --network_dim 32 --conv_dim 0 --lengths 10 40"
    )
    COMMON="--mixed_precision bf16 --device cuda --rounds 1 --workers 2"
else
    PYTHON_OURS="${PYTHON_OURS:-$PWD/.venv/bin/python}"
    PYTHON_SD_SCRIPTS="${PYTHON_SD_SCRIPTS:-$SD_SCRIPTS/.venv/bin/python}"
    SETTINGS=("--model sd15 --resolution 128 --batch_size 2 --network_dim 4 --conv_dim 0 --lengths 1 2")
    COMMON="--mixed_precision no --device cpu --rounds 1 --workers 0"
fi

before=$(wc -l <bench/results.jsonl)
for setting in "${SETTINGS[@]}"; do
    echo "== $setting"
    # shellcheck disable=SC2086  # the settings are word lists
    "$PYTHON_OURS" bench/vs_sd_scripts.py --sd_scripts "$SD_SCRIPTS" --sd_scripts_python "$PYTHON_SD_SCRIPTS" \
        --python "$PYTHON_OURS" $setting $COMMON --note "bench/gpu_session.sh" 2>&1 | tee -a "$OUT/log.txt"
done
tail -n +"$((before + 1))" bench/results.jsonl >"$OUT/results.jsonl"
echo "records in $OUT/results.jsonl"
