"""Choosing a backend: the start-up check, open_backend, and the agent process refusing a missing device
or bad nvme-passthru flags with one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.backends import (
    BACKEND_KINDS,
    DeviceUnavailableError,
    HostingError,
    device_problem,
    open_backend,
    open_hosting,
)
from agent.emulated.controller import EmulatedController


def test_kinds_and_the_emulated_default() -> None:
    assert BACKEND_KINDS == ("emulated", "nvme-passthru", "vfio")
    assert device_problem("emulated", None) is None
    with pytest.raises(ValueError, match="backend 'spdk' is unknown; choose one of emulated, nvme-passthru, vfio"):
        device_problem("spdk", None)


@pytest.mark.parametrize(
    ("kind", "device", "message"),
    [
        ("nvme-passthru", "/dev/nvme9",
         "device /dev/nvme9 does not exist: is the NVMe PF bound to the nvme driver (ls /dev/nvme*)? pass --device"),
        ("vfio", "/dev/vfio/devices/vfio77",
         "device /dev/vfio/devices/vfio77 does not exist: is the VF bound to a vfio-pci migration driver"),
        ("nvme-passthru", None, "backend nvme-passthru needs --device: the NVMe PF's character device"),
        ("vfio", "/etc/hostname", "device /etc/hostname is not a character device; backend vfio needs"),
        ("emulated", "/dev/nvme0", "--device /dev/nvme0 is for the nvme-passthru and vfio backends"),
    ],
)
def test_device_problems_name_the_path_and_what_to_do(kind: str, device: str | None, message: str) -> None:
    problem = device_problem(kind, device)
    assert problem is not None and problem.startswith(message)


def test_a_character_device_passes_the_check() -> None:
    assert device_problem("nvme-passthru", "/dev/null") is None


def test_hosting_refuses_vfio_and_flags_of_another_backend(tmp_path: Path) -> None:
    with pytest.raises(HostingError, match=r"backend vfio can migrate a VF .* but cannot host controllers yet"):
        open_hosting("vfio", tmp_path, device=Path("/dev/null"))
    with pytest.raises(HostingError, match="--slot is for the nvme-passthru backend"):
        open_hosting("emulated", tmp_path, slots=["1:1:/dev/null"])
    with pytest.raises(HostingError, match="--capacity is for the emulated backend"):
        open_hosting("nvme-passthru", tmp_path, capacity_bytes=1 << 30, device=Path("/dev/null"), slots=["1:1:x"])


def test_open_backend_emulated_and_missing_devices(tmp_path: Path) -> None:
    ctrl = open_backend("emulated", "c1", namespace_path=tmp_path / "c1.ns", namespace_bytes=1 << 20, create=True)
    assert isinstance(ctrl, EmulatedController) and ctrl.namespace_bytes == 1 << 20
    ctrl.close()
    with pytest.raises(DeviceUnavailableError, match="device /dev/nvme9 does not exist: is the NVMe PF bound"):
        open_backend("nvme-passthru", "c1", namespace_path=tmp_path / "x", device=Path("/dev/nvme9"), cntlid=2)
    with pytest.raises(DeviceUnavailableError, match="VFIO device cdev /dev/vfio/devices/vfio77 does not exist"):
        open_backend("vfio", "c1", namespace_path=tmp_path / "x", device=Path("/dev/vfio/devices/vfio77"))
    with pytest.raises(ValueError, match="VFIO group /dev/vfio/12 needs pci_address"):
        open_backend("vfio", "c1", namespace_path=tmp_path / "x", device=Path("/dev/vfio/12"))


def _agent(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # The etcd address is never reached: the backend check runs before anything connects.
    return subprocess.run(
        [sys.executable, "-m", "agent.main", "--name", "n1", "--etcd", "127.0.0.1:1", "--data-dir", str(tmp_path),
         *args],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_agent_exits_2_naming_the_missing_device(tmp_path: Path) -> None:
    done = _agent("--backend", "nvme-passthru", "--device", "/dev/nvme9", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "error: device /dev/nvme9 does not exist: is the NVMe PF bound to the nvme driver (ls /dev/nvme*)? "
        "pass --device"
    )
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_agent_refuses_to_host_on_vfio(tmp_path: Path) -> None:
    done = _agent("--backend", "vfio", "--device", "/dev/null", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: backend vfio can migrate a VF (agent.backends.vfio) but cannot host "
                                  "controllers yet") and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    ([], "error: backend nvme-passthru needs at least one --slot CNTLID:NSID:PATH"),
    (["--slot", "3:/dev/nvme0n3"], "error: --slot '3:/dev/nvme0n3' is not CNTLID:NSID:PATH"),
    (["--slot", "x:1:/dev/nvme0n1"], "error: --slot 'x:1:/dev/nvme0n1': CNTLID and NSID must be numbers"),
    (["--slot", "0:1:/dev/nvme0n1"], "error: --slot '0:1:/dev/nvme0n1': CNTLID 0 is not a VF's controller id"),
    (["--slot", "1:1:/nonexistent/ns1"], "error: slot CNTLID 1: namespace device /nonexistent/ns1 does not exist"),
    (["--slot", "1:1:/a", "--slot", "1:2:/b"], "error: --slot names CNTLID 1 more than once"),
    (["--slot", "1:1:{ns}", "--capacity", "1G"], "error: --capacity is for the emulated backend"),
    # /dev/null is a character device but no NVMe controller: the Identify ioctl fails.
    (["--slot", "1:1:{ns}"], "error: device /dev/null does not answer as an NVMe controller: Identify Controller on "
                             "/dev/null: the kernel refused the ioctl"),
])
def test_agent_refuses_bad_passthru_flags_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    namespace = tmp_path / "ns1"
    namespace.write_bytes(bytes(1 << 20))
    done = _agent("--backend", "nvme-passthru", "--device", "/dev/null",
                  *(a.format(ns=namespace) for a in args), tmp_path=tmp_path / "data")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_agent_rejects_an_unknown_backend(tmp_path: Path) -> None:
    done = _agent("--backend", "spdk", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "invalid choice: 'spdk'" in done.stderr and "Traceback" not in done.stderr
