"""The service processes refuse bad starts with one clear line and exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchctl.localcluster import free_port


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60,
                          check=False, env=None if env is None else {**os.environ, **env})


def test_agent_without_etcd_says_so_and_exits_2(tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    done = run("agent.main", "--name", "n1", "--etcd", closed, "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert f"cannot reach etcd at {closed}" in done.stderr and "start etcd or pass --etcd" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("module", "args", "named"), [
    ("agent.main", ["--name", "Bad Name", "--data-dir", "/tmp/x"], "'Bad Name'"),
    ("agent.main", ["--name", "n1", "--data-dir", "/tmp/x", "--capacity", "12Q"], "'12Q'"),
    ("agent.main", ["--name", "n1", "--data-dir", "/tmp/x", "--lease-ttl-s", "0"], "got 0"),
    ("agent.main", ["--name", "n1", "--data-dir", "/tmp/x", "--listen", "nowhere"], "'nowhere'"),
    ("orchestrator.main", ["--lease-ttl-s", "0"], "got 0"),
    ("orchestrator.main", ["--agent-call-budget-s", "-1"], "got -1"),
    ("orchestrator.main", ["--max-concurrent", "0"], "got 0"),
    ("orchestrator.main", ["--etcd-prefix", "nvmigrate"], "'nvmigrate' must start and end with '/'"),
    ("agent.main", ["--name", "n1", "--data-dir", "/tmp/x", "--etcd-prefix", "/a b/"], "'/a b/'"),
])
def test_bad_flags_name_the_value(module: str, args: list[str], named: str) -> None:
    done = run(module, *args)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("module", "args"), [
    ("orchestrator.main", []),
    ("agent.main", ["--name", "n1", "--data-dir", "/tmp/x"]),
])
def test_a_bad_etcd_prefix_from_the_environment_is_named(module: str, args: list[str]) -> None:
    done = run(module, *args, env={"NVMIGRATE_ETCD_PREFIX": "/nvmigrate"})
    assert done.returncode == 2, done.stderr
    assert "NVMIGRATE_ETCD_PREFIX" in done.stderr and "'/nvmigrate'" in done.stderr
    assert "Traceback" not in done.stderr
