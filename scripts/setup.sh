#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root): the Debian packages the product and its tests use,
# then this project with its development extras.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
# chromium: the web page test drives it headless
for pkg in etcd-server etcd-client fio qemu-utils libnbd-bin chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
