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

from e2e.fault_matrix import EXPECTED, QUICK, render_details, run_cell
from e2e.multihost import MultiHostCluster, MultiHostConfig
from orchctl.localcluster import wait_for

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
