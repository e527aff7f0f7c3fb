#!/usr/bin/env bash
# Install into ./.venv (with the test requirements), check the style with ruff, then run the test suite on every
# core (at most 4 pytest-xdist workers, each with one thread, so that the workers do not compete for cores). Extra
# arguments go to pytest (e.g. -n 0 to run in one process).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
install_project -r requirements-test.txt
python -m ruff check --quiet .
python -m ruff format --check --quiet .
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest -q -n auto --maxprocesses 4 "$@"
