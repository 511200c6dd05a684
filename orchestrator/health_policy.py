"""When a node's drive predicts a failure, and which failing nodes to evacuate now. Pure.

Agents publish their drive's SMART / Health log in their node record (`DriveHealth`). A node is
failing when any threshold of the policy is crossed: a Critical Warning bit, available spare at or
below its threshold (plus a margin), wear past the rated endurance, media errors, or temperature.
Each reason is named, so an operator reads why a node is being emptied.

A storm guard bounds automatic evacuations: at most `max_automatic` nodes evacuate automatically
at once (a bad batch of drives, or a policy set too tight, must not empty the cluster), and the
held-back ones are reported as such; a failing node is never a destination (see `failing`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from agent.nvme.smart import warning_names
from cluster.records import DriveHealth, NodeRecord


@dataclass(frozen=True)
class HealthPolicy:
    spare_margin: int = 0  # failing once available spare <= its threshold + this (percent points)
    max_percentage_used: int = 100  # of rated endurance
    max_media_errors: int = 0  # more than this is failing
    max_temperature_k: int = 358  # 85 °C
    max_automatic: int = 1  # nodes evacuating automatically at once (the storm guard)


def failing_reasons(health: DriveHealth | None, policy: HealthPolicy) -> list[str]:
    """Why this drive predicts a failure; empty when it does not (or its health is not known)."""
    if health is None:
        return []
    reasons = [f"critical warning: {name}" for name in warning_names(health.critical_warning)]
    if health.available_spare <= health.available_spare_threshold + policy.spare_margin:
        margin = f" + {policy.spare_margin}" if policy.spare_margin else ""
        reasons.append(f"available spare {health.available_spare}% at or below its threshold "
                       f"{health.available_spare_threshold}%{margin}")
    if health.percentage_used > policy.max_percentage_used:
        reasons.append(f"{health.percentage_used}% of its rated endurance used (limit {policy.max_percentage_used}%)")
    if health.media_errors > policy.max_media_errors:
        reasons.append(f"{health.media_errors} media errors (limit {policy.max_media_errors})")
    if health.temperature_k > policy.max_temperature_k:
        reasons.append(f"temperature {health.temperature_k} K above {policy.max_temperature_k} K")
    return reasons


def node_failing_reasons(node: NodeRecord, policy: HealthPolicy, predictions: Mapping[str, str]) -> list[str]:
    """The drive's reasons, and an external predictor's mark on the node."""
    marked = [f"predicted by an external predictor: {predictions[node.name]}"] if node.name in predictions else []
    return marked + failing_reasons(node.health, policy)


def failing(nodes: Sequence[NodeRecord], policy: HealthPolicy, predictions: Mapping[str, str] = {}) -> set[str]:
    """Nodes no controller may be moved onto."""
    return {n.name for n in nodes if node_failing_reasons(n, policy, predictions)}


@dataclass(frozen=True)
class Triggers:
    start: list[tuple[str, list[str]]]  # (node, reasons): evacuate now
    held_back: list[tuple[str, list[str]]]  # failing, but the storm guard is full


def automatic_evacuations(nodes: Sequence[NodeRecord], policy: HealthPolicy, *,
                          evacuating_automatically: Collection[str], evacuating: Collection[str],
                          predictions: Mapping[str, str] = {}) -> Triggers:
    """Failing nodes not yet evacuating, up to the storm guard (worst first: most reasons, then name)."""
    candidates = sorted(((n.name, node_failing_reasons(n, policy, predictions)) for n in nodes
                         if n.name not in evacuating), key=lambda c: (-len(c[1]), c[0]))
    candidates = [c for c in candidates if c[1]]
    room = max(0, policy.max_automatic - len(set(evacuating_automatically)))
    return Triggers(start=candidates[:room], held_back=candidates[room:])
