#!/usr/bin/env bash
# The test suite: generated stubs in sync, lint, types, then every test (unit and integration,
# the integration tests start real etcd, orchestrator and agent processes).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 tools/genproto.py --check
ruff check .
mypy .
python3 -m pytest -q -p no:cacheprovider "$@"
