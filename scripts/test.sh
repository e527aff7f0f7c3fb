#!/usr/bin/env bash
# Install into ./.venv (with the test requirements) and run the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
install_project -r requirements-test.txt
python -m pytest -q "$@"
