#!/usr/bin/env bash
# Install everything the tests need, build comm_core, lint, run the test suite.
# The README's test command. Fails when pytest runs no test (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
python -m pip install -q -r requirements.txt -r requirements-test.txt
python -m pip install -q --no-build-isolation -e .
python -m ruff check pipedap models tests examples benchmarks comm_core
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
