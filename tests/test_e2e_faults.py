"""The quick subset of the e2e fault matrix (`python -m e2e.fault_matrix --quick`), run in CI.

Each cell is a fresh multi-host cluster (etcd, two orchestrators, four agents on their own
network namespaces, or 127.0.0.x without root), a live migration with a guest writing, one
fault injected when the job reaches the cell's phase, and all five invariants of DESIGN.md
checked afterwards. The cells are ones the product is designed to handle; the whole matrix is
`python -m e2e.fault_matrix --full`.

Also here: the e2e cluster itself (own addresses, partitions, teardown), which the matrix
relies on to mean what it says.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from e2e.fault_matrix import EXPECTED, FAULTS, PHASES, QUICK, parse_cells, render_details, run_cell
from e2e.multihost import ETCD, MultiHostCluster, MultiHostConfig
from orchctl.localcluster import wait_for

MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd is not installed (apt-get install etcd-server)")


@pytest.mark.parametrize(("fault", "phase"), QUICK, ids=[f"{f}@{p}" for f, p in QUICK])
def test_fault_cell_keeps_every_invariant(fault: str, phase: str) -> None:
    cell = run_cell(fault, phase)
    report = render_details([cell])
    assert not cell.error, report
    assert cell.injected_in, report
    assert len(cell.invariants) == 5, report
    assert not cell.failed_invariants, report
    assert cell.end_phase in EXPECTED[(fault, phase)], report
    assert not cell.expectation_problems, report
    if fault == "kill-leader":
        i4 = cell.invariants[3]
        assert any("taken over by the new leader" in d for d in i4.detail), report


def _netns_of(pid: int) -> str:
    done = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def test_agents_get_their_own_addresses_partitions_cut_them_off_and_nothing_is_left_behind() -> None:
    bed = MultiHostCluster(config=MultiHostConfig(orchestrators=1, agents=2, quiet=True))
    with bed:
        assert bed.fabric is not None
        hosts = {name: bed.fabric.host_of(name) for name in bed.agent_names}
        assert len(set(hosts.values())) == 2
        for name in bed.agent_names:
            assert bed.agent_addresses[name].rpartition(":")[0] == hosts[name]
        pids = [p.popen.pid for p in bed.c.procs]
        namespaces = {}
        if bed.mode == "netns":
            namespaces = dict(bed.fabric.namespaces)  # type: ignore[union-attr]
            for name in bed.agent_names:
                assert _netns_of(bed.agent_proc(name).popen.pid) == namespaces[name]
            assert _netns_of(bed.c.orchestrators[0].popen.pid) == ""  # the root namespace

        # a cut-off agent's lease runs out: it leaves etcd, and comes back once healed
        bed.partition_agent("n2")
        wait_for("n2 to drop out of etcd", lambda: bed.c.node("n2") is None, 30)
        assert bed.c.node("n1") is not None
        bed.heal()
        wait_for("n2 to register again", lambda: bed.c.node("n2") is not None, 30)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    if namespaces:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert not any(ns in listed for ns in namespaces.values())
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert f"nvb{bed.fabric.tag}" not in links  # type: ignore[union-attr]
    assert not bed.workdir.exists()


def test_every_cell_has_an_expectation_and_the_new_rows_parse() -> None:
    assert {(f, p) for f in FAULTS for p in PHASES} == set(EXPECTED)
    assert set(QUICK) <= set(EXPECTED)
    assert parse_cells("freeze-etcd@COMMIT,garbage-ports") == [("freeze-etcd", "COMMIT")] + [
        ("garbage-ports", p) for p in PHASES]
    for fault in ("overload-source", "disk-full-destination", "disk-full-source", "freeze-source", "clock-forward",
                  "garbage-ports"):
        assert any(f == fault for f, _ in QUICK), fault
    assert all("FAILED" not in EXPECTED[(f, p)] for f in FAULTS if f.startswith(("freeze-", "disk-full-", "clock-"))
               for p in PHASES)


def _proc_state(pid: int) -> str:
    """R, S, T (stopped), ... from /proc/PID/stat; "" once the process is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="tmpfs data dirs need root")
def test_the_bed_fills_disks_freezes_overloads_steps_clocks_finds_ports_and_leaves_nothing_behind() -> None:
    bed = MultiHostCluster(config=MultiHostConfig(orchestrators=1, agents=2, quiet=True, data_tmpfs_bytes=24 * MiB,
                                                  orchestrator_faketime=True))
    with bed:
        data_dirs = [bed.c.agent_data_dir(n) for n in bed.agent_names]
        assert all(os.path.ismount(d) for d in data_dirs)

        # disk full: that node's tmpfs only, until healed; a ballast first leaves a little to fill
        bed.ballast_disk("n2", 4 * MiB)
        assert 3 * MiB < shutil.disk_usage(data_dirs[1]).free <= 4 * MiB
        bed.fill_disk("n2")
        assert shutil.disk_usage(data_dirs[1]).free < 64 * 1024
        assert shutil.disk_usage(data_dirs[0]).free > 8 * MiB
        assert any("disk of n2 freed" in h for h in bed.heal())
        assert shutil.disk_usage(data_dirs[1]).free > 8 * MiB

        # freeze: stopped, then continued by the bed's timer
        agent_pid = bed.agent_proc("n1").popen.pid
        bed.freeze("n1", 1.0)
        # a signal lands when the kernel next schedules the process: wait for it, briefly
        wait_for("n1 to stop", lambda: _proc_state(agent_pid) == "T", 5)
        wait_for("n1 to be continued by its timer", lambda: _proc_state(agent_pid) not in ("T", ""), 15)
        assert "n1" not in bed.frozen
        # ... or early, by heal
        etcd_pid = bed.c.etcd_process.popen.pid
        bed.freeze(ETCD, 600.0)
        wait_for("etcd to stop", lambda: _proc_state(etcd_pid) == "T", 5)
        assert f"SIGCONT {ETCD} (before its timer)" in bed.heal()
        assert _proc_state(etcd_pid) not in ("T", "")

        # overload: hogs run until healed
        bed.overload("n1", 2)
        hogs = [h.pid for h in bed.cpu_hogs]
        assert len(hogs) == 2 and all(_proc_state(pid) in ("R", "S") for pid in hogs)
        assert "2 CPU hogs stopped" in bed.heal()
        assert all(_proc_state(pid) in ("", "Z") for pid in hogs)

        # garbage targets: every gRPC address known, and more ports than those (data plane, NBD, HTTP)
        targets, _ = bed.garbage_targets()
        grpc_addresses = {f"{t.host}:{t.port}" for t in targets if t.grpc_method}
        assert grpc_addresses == set(bed.agent_addresses.values()) | set(bed.orchestrator_addresses().values())
        for name in [*bed.agent_names, "orch-1"]:
            assert len([t for t in targets if t.owner == name]) >= 2, (name, targets)

        # clock: the orchestrator runs under libfaketime, reading the bed's offset file
        orchestrator_pid = bed.c.orchestrators[0].popen.pid
        environ = open(f"/proc/{orchestrator_pid}/environ", "rb").read().split(b"\0")
        assert any(e.startswith(b"LD_PRELOAD=") and b"libfaketime" in e for e in environ)
        assert bed.clock_file is not None
        bed.step_orchestrator_clocks(120)
        assert bed.clock_file.read_text().strip() == "+120"

        # a process frozen at close does not hold close up, nor outlive it
        bed.freeze("n2", 600.0)
        pids = [p.popen.pid for p in bed.c.procs]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(os.path.ismount(d) for d in data_dirs)
    assert not bed.workdir.exists()
