#!/usr/bin/env bash
# Install into ./.venv (with the test requirements), check the style with ruff, then run the test suite. Extra
# arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
install_project -r requirements-test.txt
python -m ruff check --quiet .
python -m ruff format --check --quiet .
python -m pytest -q "$@"
