"""Choosing a destination node for a controller. Pure: node facts in, a choice or a reason out."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cluster.records import NodeRecord


@dataclass(frozen=True)
class Placement:
    node: NodeRecord | None
    reason: str  # why this node, or why none


def node_problem(node: NodeRecord | None, name: str, *, source: str, namespace_bytes: int,
                 cordoned: Collection[str]) -> str | None:
    """Why `name` cannot take the controller, or None when it can."""
    if name == source:
        return f"destination node {name!r} is the controller's source; choose another node"
    if node is None:
        return f"destination node {name!r} is not a live registered agent; check `orchctl nodes`"
    if name in cordoned:
        return f"destination node {name!r} is cordoned; choose another or uncordon it"
    if node.free_bytes < namespace_bytes:
        return (f"destination node {name!r} has {node.free_bytes} bytes free, the controller needs "
                f"{namespace_bytes}; choose another node")
    return None


def choose_destination(nodes: Sequence[NodeRecord], *, source: str, namespace_bytes: int,
                       cordoned: Collection[str] = (), excluded: Collection[str] = ()) -> Placement:
    """The live node with the most free space (fewest controllers on a tie, then by name)."""
    fits = [n for n in nodes
            if n.name not in excluded
            and node_problem(n, n.name, source=source, namespace_bytes=namespace_bytes,
                             cordoned=cordoned) is None]
    if not fits:
        considered = ", ".join(sorted(n.name for n in nodes if n.name != source)) or "none"
        return Placement(None, f"no live node other than {source!r} has {namespace_bytes} bytes free "
                               f"and is not cordoned or excluded (considered: {considered})")
    best = sorted(fits, key=lambda n: (-n.free_bytes, len(n.controllers), n.name))[0]
    return Placement(best, f"{best.name}: {best.free_bytes} bytes free, {len(best.controllers)} controllers")
