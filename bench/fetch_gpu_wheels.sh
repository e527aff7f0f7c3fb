#!/usr/bin/env bash
# What bench/gpu_session.sh needs on a GPU machine that cannot download: the wheels of this project's packages that
# the machine's image lacks (.whl/ours) and of sd-scripts' pinned versions (.whl/sd-scripts), and a copy of
# sd-scripts' code (.sds, from a checkout given as SD_SCRIPTS_CHECKOUT). All three folders are git-ignored through
# .git/info/exclude and travel with `carry`. Run from the repository root on a machine with a package index.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT="${SD_SCRIPTS_CHECKOUT:?set SD_SCRIPTS_CHECKOUT to a kohya-ss/sd-scripts checkout}"
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"  # the versions tested here
for ignored in /.whl/ /.sds/; do grep -qxF "$ignored" .git/info/exclude || echo "$ignored" >>.git/info/exclude; done

download() {  # folder, requirement...
    local folder="$1"
    shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$folder" "$@"
}
rm -rf .whl .sds
# The image has torch, transformers 5, accelerate, safetensors, numpy, pillow, tqdm, psutil, einops, opencv.
download .whl/ours "diffusers==$("$PYTHON" -c 'import diffusers; print(diffusers.__version__)')" toml==0.10.2
# sd-scripts' pins that differ from the image (its requirements.txt), and what they need.
download .whl/sd-scripts transformers==4.54.1 tokenizers==0.21.4 huggingface-hub==0.34.3 diffusers==0.32.1 \
    toml==0.10.2 voluptuous==0.15.2 imagesize==1.4.1 ftfy==6.3.1 wcwidth==0.2.13
mkdir -p .sds
(cd "$CHECKOUT" && find . -path ./.venv -prune -o -path ./.git -prune -o -name '*.py' -print -o -name '*.toml' -print \
    -o -name '*.json' -print -o -name 'COMMIT' -print) | (cd "$CHECKOUT" && tar -cf - -T -) | tar -xf - -C .sds
if [[ ! -f .sds/COMMIT ]]; then git -C "$CHECKOUT" rev-parse HEAD >.sds/COMMIT; fi
du -sh .whl .sds
