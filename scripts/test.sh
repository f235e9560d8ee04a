#!/usr/bin/env bash
# Install (first run) and run the whole test suite. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
