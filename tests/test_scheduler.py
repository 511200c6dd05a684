"""Destination choice: live, not the source, not cordoned or excluded, with room; most room wins."""

from __future__ import annotations

from cluster.records import NodeRecord
from orchestrator.scheduler import choose_destination, node_problem


def node(name: str, free: int, controllers: int = 0) -> NodeRecord:
    return NodeRecord(name=name, address="a", data_address="d", capacity_bytes=1000, allocated_bytes=1000 - free,
                      controllers=tuple(f"x{i}" for i in range(controllers)))


def test_most_free_space_wins_then_fewest_controllers_then_name() -> None:
    nodes = [node("n1", 900), node("n2", 500), node("n3", 700, 2), node("n4", 700, 1)]
    assert choose_destination(nodes, source="n1", namespace_bytes=100).node.name == "n4"  # type: ignore[union-attr]


def test_source_cordoned_excluded_and_full_nodes_are_skipped_with_a_reason() -> None:
    nodes = [node("n1", 900), node("n2", 50), node("n3", 900), node("n4", 900)]
    placement = choose_destination(nodes, source="n1", namespace_bytes=100, cordoned={"n3"}, excluded={"n4"})
    assert placement.node is None
    assert "'n1'" in placement.reason and "n2, n3, n4" in placement.reason


def test_node_problem_names_the_node_and_what_to_do() -> None:
    assert "source" in node_problem(node("n1", 900), "n1", source="n1", namespace_bytes=1, cordoned=())  # type: ignore[operator]
    assert "not a live" in node_problem(None, "n9", source="n1", namespace_bytes=1, cordoned=())  # type: ignore[operator]
    assert "cordoned" in node_problem(node("n2", 900), "n2", source="n1", namespace_bytes=1, cordoned={"n2"})  # type: ignore[operator]
    assert "50 bytes free" in node_problem(node("n2", 50), "n2", source="n1", namespace_bytes=100, cordoned=())  # type: ignore[operator]
    assert node_problem(node("n2", 900), "n2", source="n1", namespace_bytes=100, cordoned=()) is None
