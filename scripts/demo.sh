#!/usr/bin/env bash
# Install into ./.venv and run the built-in demo on a tiny model and dataset the project makes itself.
# Extra arguments go to tools/demo.py (e.g. --output_dir DIR).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
install_project
python tools/demo.py "$@"
