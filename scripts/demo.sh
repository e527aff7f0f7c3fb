#!/usr/bin/env bash
# Install into ./.venv and run the built-in demo on a tiny model and dataset the project makes itself.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python tools/demo.py "$@"
