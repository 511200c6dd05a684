"""Choosing a node for a controller: a migration's destination, or the home of a new controller.
Pure: node facts in, a choice or a reason out.

A node has room for what both bounds allow: its declared capacity (--capacity) less what it
holds, and the free space of its data dir's filesystem when the agent reports it (a disk that
other data filled, or sparse namespaces that grew). The first bounds the namespace's size; the
disk bounds the data the copy will store, which for a sparse namespace is what it holds, not its
size. A rejection names both numbers.

A node must also be compatible with the source: the same controller-state format version (a
destination refuses a version it does not know) and the same backend kind, when both nodes say
which. The explanation of a choice lists why every other node was passed over.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from cluster.records import NodeRecord
from orchestrator.health_policy import HealthPolicy, failing_reasons

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class Placement:
    node: NodeRecord | None
    reason: str  # why this node, or why none
    # One line per node passed over, "n3: state format 2, source needs 1", sorted by name.
    rejected: tuple[str, ...] = ()


# Backends that cannot take a controller at all yet (agent/backends: vfio hosting is refused).
_HOSTS_NOTHING = {"vfio": "backend vfio cannot host a controller yet"}


def compatibility_problem(node: NodeRecord, source: NodeRecord | None) -> str | None:
    """'state format 2, source needs 1' when `node` cannot resume a controller from `source`, or
    None. Backends of different kinds interoperate (an emulated controller moves to a passthru VF
    and back: the controller-state format is what they share); one that cannot host is refused.
    An unknown source (not registered) or backend is no problem."""
    if node.backend in _HOSTS_NOTHING:
        return _HOSTS_NOTHING[node.backend]
    if source is None:
        return None
    if node.state_format_version != source.state_format_version:
        return f"state format {node.state_format_version}, source needs {source.state_format_version}"
    return None


def size_text(n: int) -> str:
    """Bytes as an operator reads them: '16 MiB', '1.5 GiB', '512 bytes'."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if abs(n) >= unit:
            value = n / unit
            return f"{value:.0f} {name}" if n % unit == 0 else f"{value:.1f} {name}"
    return f"{n} bytes"


def room_problem(node: NodeRecord, namespace_bytes: int, stored_bytes: int | None = None) -> str | None:
    """'12 MiB free on its data dir, needs 16 MiB' (the bound that binds), or None when it fits.
    The declared capacity bounds the namespace's size; the disk bounds what the copy stores,
    `stored_bytes` (the namespace's data, less than its size when it is sparse; default its size)."""
    stored = namespace_bytes if stored_bytes is None else stored_bytes
    declared = node.declared_free_bytes
    disk = node.data_dir_free_bytes
    if disk is not None and disk < stored:
        held = f" (the data its {size_text(namespace_bytes)} namespace holds)" if stored != namespace_bytes else ""
        return (f"{size_text(disk)} free on its data dir ({size_text(declared)} by its declared capacity), "
                f"needs {size_text(stored)}{held}")
    if declared < namespace_bytes:
        on_disk = f", {size_text(disk)} on its data dir" if disk is not None else ""
        return f"{size_text(declared)} free by its declared capacity{on_disk}, needs {size_text(namespace_bytes)}"
    return None


def node_problem(node: NodeRecord | None, name: str, *, source: str, namespace_bytes: int,
                 cordoned: Collection[str], stored_bytes: int | None = None,
                 source_record: NodeRecord | None = None) -> str | None:
    """Why `name` cannot take the controller, or None when it can."""
    if name == source:
        return f"destination node {name!r} is the controller's source; choose another node"
    if node is None:
        return f"destination node {name!r} is not a live registered agent; check `orchctl nodes`"
    if name in cordoned:
        return f"destination node {name!r} is cordoned; choose another or uncordon it"
    incompatible = compatibility_problem(node, source_record)
    if incompatible:
        return f"destination node {name!r} is incompatible ({incompatible}); choose another node"
    failing = health_problem(node)
    if failing:
        return f"destination node {name!r} {failing}; choose another node"
    room = room_problem(node, namespace_bytes, stored_bytes)
    if room:
        return f"destination node {name!r} has {room}; choose another node or free space there"
    return None


def _rejection(node: NodeRecord, *, namespace_bytes: int, stored_bytes: int | None, cordoned: Collection[str],
               excluded: Collection[str], unavailable: Mapping[str, str],
               source_record: NodeRecord | None) -> str | None:
    """Why `node` is passed over ("tried already", "cordoned", ...), or None when it fits."""
    if node.name in excluded:
        return "tried already"
    if node.name in unavailable:
        return unavailable[node.name]
    if node.name in cordoned:
        return "cordoned"
    return (compatibility_problem(node, source_record) or health_problem(node)
            or room_problem(node, namespace_bytes, stored_bytes))


def health_problem(node: NodeRecord) -> str | None:
    """'drive predicts a failure (...)' when its SMART / Health log fails the default policy: no
    controller is moved onto a drive about to fail."""
    reasons = failing_reasons(node.health, HealthPolicy())
    return f"drive predicts a failure ({'; '.join(reasons)})" if reasons else None


def choose_destination(nodes: Sequence[NodeRecord], *, source: str, namespace_bytes: int,
                       cordoned: Collection[str] = (), excluded: Collection[str] = (),
                       stored_bytes: int | None = None, unavailable: Mapping[str, str] | None = None,
                       source_record: NodeRecord | None = None) -> Placement:
    """The live compatible node with the most free space (fewest controllers on a tie, then by
    name). `unavailable` maps nodes to why they may not take anything now (being evacuated, at
    their inbound limit); `source_record` defaults to the source's record among `nodes`."""
    unavailable = unavailable or {}
    if source_record is None:
        source_record = next((n for n in nodes if n.name == source), None)
    others = sorted((n for n in nodes if n.name != source), key=lambda n: n.name)
    why_not = {n.name: _rejection(n, namespace_bytes=namespace_bytes, stored_bytes=stored_bytes, cordoned=cordoned,
                                  excluded=excluded, unavailable=unavailable, source_record=source_record)
               for n in others}
    rejected = tuple(f"{name}: {why}" for name, why in why_not.items() if why is not None)
    fits = [n for n in others if why_not[n.name] is None]
    if not fits:
        why = "; ".join(rejected)
        considered = ", ".join(n.name for n in others) or "none"
        return Placement(None, f"no live node other than {source!r} can take the controller's {namespace_bytes} "
                               f"bytes{': ' + why if why else ''} (considered: {considered})", rejected)
    best = sorted(fits, key=lambda n: (-n.free_bytes, len(n.controllers), n.name))[0]
    passed_over = [f"{n.name}: fits, ranked lower ({size_text(n.free_bytes)} free, {len(n.controllers)} controllers)"
                   for n in fits if n is not best]
    explanation = "; ".join((*passed_over, *rejected))
    return Placement(best, f"{best.name}: {size_text(best.free_bytes)} free, {len(best.controllers)} controllers"
                           + (f" (other nodes: {explanation})" if explanation else ""), rejected)


# ---- a new controller ---------------------------------------------------------------------------


def new_controller_problem(node: NodeRecord | None, name: str, *, namespace_bytes: int,
                           cordoned: Collection[str]) -> str | None:
    """Why `name` cannot host a new controller of `namespace_bytes`, or None when it can."""
    if node is None:
        return f"node {name!r} is not a live registered agent; `orchctl nodes` lists them"
    if name in cordoned:
        return f"node {name!r} is cordoned; choose another with --on or uncordon it"
    room = room_problem(node, namespace_bytes)
    if room:
        return f"node {name!r} has {room}; choose another node with --on, or a smaller --size"
    return None


def choose_node_for_new(nodes: Sequence[NodeRecord], *, namespace_bytes: int,
                        cordoned: Collection[str] = ()) -> Placement:
    """The live, uncordoned node with the most free space for a new controller (fewest
    controllers on a tie, then by name), or a reason that names every node's problem."""
    fits = [n for n in nodes
            if new_controller_problem(n, n.name, namespace_bytes=namespace_bytes, cordoned=cordoned) is None]
    if not fits:
        ordered = sorted(nodes, key=lambda n: n.name)
        why = "; ".join(f"{n.name}: {'cordoned' if n.name in cordoned else room_problem(n, namespace_bytes)}"
                        for n in ordered)
        if not why:
            return Placement(None, f"no live node can take a new {size_text(namespace_bytes)} controller: no agent "
                                   "is registered; start one (nvmigrate-agent) and check `orchctl nodes`")
        return Placement(None, f"no live node can take a new {size_text(namespace_bytes)} controller: {why}; "
                               "free space, uncordon a node, or ask for a smaller --size")
    best = sorted(fits, key=lambda n: (-n.free_bytes, len(n.controllers), n.name))[0]
    return Placement(best, f"{best.name}: {size_text(best.free_bytes)} free, {len(best.controllers)} controllers")
