#!/usr/bin/env bash
# The test suite: generated stubs in sync, lint, types, then every test (unit and integration,
# the integration tests start real etcd, orchestrator and agent processes). Runs in the virtual
# environment scripts/setup.sh made.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "error: .venv is missing; run 'bash scripts/setup.sh' first" >&2
  exit 2
fi
export PATH="$PWD/.venv/bin:$PATH"
python tools/genproto.py --check
ruff check .
mypy .
python -m pytest -q -p no:cacheprovider "$@"
