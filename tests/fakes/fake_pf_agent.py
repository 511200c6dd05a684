"""A FAKE-backed agent for tests: the real agent (agent.main) with ``--backend nvme-passthru`` over a
FAKE PF, for what cannot run here (a TP4159 PF with SR-IOV VFs).

    python -m tests.fakes.fake_pf_agent --fake-vfs 2 --fake-namespace 4M --name n1 --data-dir D ...

Takes the normal agent flags plus its own (``--fake-*``).  It builds an emulated NVMe subsystem
(the device): an anonymous VF per ``--fake-vfs``, each with its own namespace in a file under
``<data dir>/fake-pf/`` (kept across restarts, as media are), each VF enabled with I/O queues as
its VM's NVMe driver would have done at boot.  A ``FakeNvmePf`` stands for the PF's character
device and the admin passthrough ioctl; the agent gets it through ``main``'s ``DeviceAccess``
seam, together with ``--backend nvme-passthru --device <the fake's node>`` and one
``--slot CNTLID:NSID:PATH`` per VF.  Nothing else differs from a production agent.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from agent import main as agent_main
from agent.backends.hosting import DeviceAccess
from agent.emulated.controller import power_on_guest_driver
from agent.emulated.model.namespace import NamespaceStore
from agent.emulated.model.structures import MAX_NAMESPACES
from agent.emulated.model.subsystem import PRIMARY_CNTLID, NvmeSubsystemModel
from tests.fakes.fake_nvme_pf import FakeNvmePf

_SET_BY_THE_FAKE = ("--backend", "--device", "--slot")


@dataclass(frozen=True)
class FakePfAccess(DeviceAccess):
    """The fake's ioctl, and its node (a memfd under /proc/self/fd) counted as the PF's device node."""

    pf_node: Path = Path()

    def is_device_node(self, path: Path) -> bool:
        return path == self.pf_node or super().is_device_node(path)


def build_pf(data_dir: Path, vfs: int, namespace_bytes: int) -> tuple[FakeNvmePf, list[str]]:
    """The fake PF over a new subsystem, and the ``--slot`` value of each VF."""
    model = NvmeSubsystemModel("FAKEPF")
    media = data_dir / "fake-pf"
    media.mkdir(parents=True, exist_ok=True)
    slots = []
    for nsid in range(1, vfs + 1):
        path = media / f"vf{nsid}.ns"
        store = NamespaceStore(path, namespace_bytes, create=not path.exists(), lock=model.lock, label=f"VF {nsid}")
        cntlid = model.add_secondary("")  # anonymous, as a real device's VFs are
        model.attach_namespace(nsid, store, (PRIMARY_CNTLID, cntlid))
        power_on_guest_driver(model, cntlid)
        slots.append(f"{cntlid}:{nsid}:{path}")
    return FakeNvmePf(model), slots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_pf_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--fake-vfs", type=int, default=2, help=f"VFs of the fake PF (1..{MAX_NAMESPACES})")
    parser.add_argument("--fake-namespace", type=agent_main.parse_size, default=agent_main.parse_size("4M"),
                        help="namespace size of each VF, e.g. 4M")
    parser.add_argument("--data-dir", required=True, help="the agent's --data-dir; the VFs' media go beneath it")
    ours, rest = parser.parse_known_args(argv)
    if not 1 <= ours.fake_vfs <= MAX_NAMESPACES:
        parser.error(f"--fake-vfs must be 1..{MAX_NAMESPACES}, got {ours.fake_vfs}")
    taken = [flag for flag in rest if flag.split("=")[0] in _SET_BY_THE_FAKE]
    if taken:
        parser.error(f"{', '.join(taken)}: the fake PF agent sets the backend, device and slots itself")
    data_dir = Path(ours.data_dir)
    pf, slots = build_pf(data_dir, ours.fake_vfs, ours.fake_namespace)
    agent_argv = [*rest, "--data-dir", str(data_dir), "--backend", "nvme-passthru", "--device", str(pf.node)]
    for slot in slots:
        agent_argv += ["--slot", slot]
    try:
        return agent_main.main(agent_argv, access=FakePfAccess(ioctl=pf.ioctl, pf_node=pf.node))
    finally:
        pf.close()


if __name__ == "__main__":
    sys.exit(main())
