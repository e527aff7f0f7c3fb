# Sourced by demo.sh and test.sh. `install_project [pip arguments...]` creates ./.venv if needed, activates it and
# installs the project into it. torch goes first and pinned: on this CPU-only machine the pin resolves to a local
# CPU build; on a CUDA machine the same pin gives PyPI's CUDA build. Override with TORCH_SPEC="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

install_project() {
    local torch_spec="${TORCH_SPEC:-torch==2.13.0}"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    python -m pip install --quiet --upgrade "pip>=23" "setuptools>=77"
    python -c "import torch" 2>/dev/null || python -m pip install --quiet "$torch_spec"
    python -m pip install --quiet -r requirements.txt "$@"
    python -m pip install --quiet --no-deps --no-build-isolation -e .
}
