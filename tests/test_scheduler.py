"""Destination choice: live, not the source, not cordoned or excluded, with room; most room wins."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.records import NodeRecord
from orchestrator.scheduler import Placement, choose_destination, node_problem


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


# ---- properties (hypothesis): any fleet, any source, any cordons and exclusions ---------------

NAMES = ("n1", "n2", "n3", "n4", "n5", "n6")
FREE_BYTES = (-250, 0, 250, 500, 750, 1000)  # few values, so ties on free space are common


@dataclass(frozen=True)
class Case:
    nodes: list[NodeRecord]
    source: str
    namespace_bytes: int
    cordoned: frozenset[str]
    excluded: frozenset[str]

    def choose(self, nodes: list[NodeRecord] | None = None) -> Placement:
        return choose_destination(self.nodes if nodes is None else nodes, source=self.source,
                                  namespace_bytes=self.namespace_bytes, cordoned=self.cordoned,
                                  excluded=self.excluded)

    def problem(self, n: NodeRecord | None, name: str) -> str | None:
        return node_problem(n, name, source=self.source, namespace_bytes=self.namespace_bytes,
                            cordoned=self.cordoned)

    def fits(self) -> list[NodeRecord]:
        """Written out from the rules, independently of the scheduler."""
        return [n for n in self.nodes if n.name != self.source and n.name not in self.cordoned
                and n.name not in self.excluded and n.free_bytes >= self.namespace_bytes]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    nodes = [node(name, draw(st.sampled_from(FREE_BYTES)), draw(st.integers(0, 3))) for name in names]
    return Case(
        nodes=nodes,
        source=draw(st.sampled_from(NAMES)),  # sometimes not in the fleet: its node died
        namespace_bytes=draw(st.one_of(st.sampled_from([b for b in FREE_BYTES if b > 0]), st.integers(1, 1100))),
        cordoned=frozenset(draw(st.sets(st.sampled_from(NAMES), max_size=3))),
        excluded=frozenset(draw(st.sets(st.sampled_from(NAMES), max_size=3))),
    )


@given(cases())
def test_never_the_source_a_cordoned_an_excluded_or_a_too_small_node(case: Case) -> None:
    chosen = case.choose().node
    if chosen is not None:
        assert chosen in case.nodes
        assert chosen.name != case.source
        assert chosen.name not in case.cordoned and chosen.name not in case.excluded
        assert chosen.free_bytes >= case.namespace_bytes


@settings(max_examples=300)
@given(cases())
def test_the_node_with_most_free_bytes_is_chosen_or_the_reason_names_the_considered_ones(case: Case) -> None:
    fits = case.fits()
    placement = case.choose()
    if fits:
        assert placement.node is not None, placement.reason
        most_free = max(n.free_bytes for n in fits)
        roomiest = [n for n in fits if n.free_bytes == most_free]
        fewest = min(len(n.controllers) for n in roomiest)
        expected = min((n for n in roomiest if len(n.controllers) == fewest), key=lambda n: n.name)
        assert placement.node == expected
        assert placement.reason.startswith(f"{expected.name}: ")
    else:
        assert placement.node is None
        assert repr(case.source) in placement.reason and str(case.namespace_bytes) in placement.reason
        considered = placement.reason.rpartition("(considered: ")[2].removesuffix(")")
        others = sorted(n.name for n in case.nodes if n.name != case.source)
        assert considered.split(", ") == (others or ["none"])


@given(cases())
def test_node_problem_and_choose_destination_agree(case: Case) -> None:
    chosen = case.choose().node
    if chosen is not None:
        assert case.problem(chosen, chosen.name) is None
    for n in case.nodes:
        problem = case.problem(n, n.name)
        alone = case.choose([n]).node
        if n.name in case.excluded:
            assert alone is None
        else:
            # a node the operator names (--to) is refused exactly when the scheduler would skip it
            assert (problem is None) == (alone == n), problem
        if problem is not None:
            assert repr(n.name) in problem
    for name in NAMES:  # a node that is not a live agent is never acceptable, whatever else holds
        if name not in {n.name for n in case.nodes}:
            assert case.problem(None, name) is not None


# ---- the disk's own free space (agents report statvfs of their data dir) -----------------------

MiB = 1 << 20


def disk_node(name: str, declared_free: int, disk_free: int | None) -> NodeRecord:
    return NodeRecord(name=name, address="a", data_address="d", capacity_bytes=1 << 30,
                      allocated_bytes=(1 << 30) - declared_free, data_dir_free_bytes=disk_free)


def test_the_smaller_of_declared_and_disk_free_space_decides() -> None:
    nodes = [disk_node("n2", 900 * MiB, 12 * MiB), disk_node("n3", 100 * MiB, 500 * MiB)]
    placement = choose_destination(nodes, source="n1", namespace_bytes=16 * MiB)
    assert placement.node is not None and placement.node.name == "n3"  # 100 MiB beats n2's 12 MiB on disk
    assert placement.reason.startswith("n3: 100 MiB free, 0 controllers")
    assert placement.rejected == ("n2: 12 MiB free on its data dir (900 MiB by its declared capacity), needs 16 MiB",)


def test_a_node_whose_disk_is_fuller_than_declared_is_refused_naming_both_numbers() -> None:
    full = disk_node("n2", 900 * MiB, 12 * MiB)
    problem = node_problem(full, "n2", source="n1", namespace_bytes=16 * MiB, cordoned=())
    assert problem == ("destination node 'n2' has 12 MiB free on its data dir (900 MiB by its declared capacity), "
                       "needs 16 MiB; choose another node or free space there")
    placement = choose_destination([full], source="n1", namespace_bytes=16 * MiB)
    assert placement.node is None
    assert "n2: 12 MiB free on its data dir (900 MiB by its declared capacity), needs 16 MiB" in placement.reason


def test_a_declared_capacity_smaller_than_the_disk_still_binds() -> None:
    node_ = disk_node("n2", 8 * MiB, 500 * MiB)
    problem = node_problem(node_, "n2", source="n1", namespace_bytes=16 * MiB, cordoned=())
    assert problem is not None and "8 MiB free by its declared capacity, 500 MiB on its data dir, needs 16 MiB" \
        in problem


def test_an_older_record_without_disk_free_space_uses_the_declared_capacity() -> None:
    raw = b'{"name": "n2", "address": "a", "data_address": "d", "capacity_bytes": 1000, "allocated_bytes": 200}'
    old = NodeRecord.from_bytes(raw)
    assert old.data_dir_free_bytes is None and old.free_bytes == 800
    assert node_problem(old, "n2", source="n1", namespace_bytes=800, cordoned=()) is None
    newer = NodeRecord.from_bytes(raw[:-1] + b', "data_dir_free_bytes": 100, "from_a_later_agent": 1}')
    assert newer.free_bytes == 100


def test_the_reason_for_no_destination_says_why_each_node_was_refused() -> None:
    nodes = [disk_node("n2", 900 * MiB, 12 * MiB), disk_node("n3", 900 * MiB, 900 * MiB),
             disk_node("n4", 900 * MiB, 900 * MiB)]
    placement = choose_destination(nodes, source="n1", namespace_bytes=16 * MiB, cordoned={"n3"}, excluded={"n4"})
    assert placement.node is None
    assert placement.reason == (
        f"no live node other than 'n1' can take the controller's {16 * MiB} bytes: n2: 12 MiB free on its data "
        "dir (900 MiB by its declared capacity), needs 16 MiB; n3: cordoned; n4: tried already "
        "(considered: n2, n3, n4)")


def test_a_sparse_namespace_needs_its_data_on_the_disk_and_its_size_within_the_declared_capacity() -> None:
    GiB = 1 << 30
    roomy_declared = NodeRecord(name="n2", address="a", data_address="d", capacity_bytes=256 * GiB,
                                allocated_bytes=0, data_dir_free_bytes=77 * GiB)
    # 200 GiB namespace holding 1 GiB of data: the disk needs 1 GiB, the declared capacity 200 GiB.
    assert node_problem(roomy_declared, "n2", source="n1", namespace_bytes=200 * GiB, cordoned=(),
                        stored_bytes=1 * GiB) is None
    # Without knowing what it holds, the whole size is asked of the disk too.
    assert "77 GiB free on its data dir" in str(node_problem(roomy_declared, "n2", source="n1",
                                                             namespace_bytes=200 * GiB, cordoned=()))
    # Data beyond the disk's free space is refused, saying what the namespace holds.
    problem = node_problem(roomy_declared, "n2", source="n1", namespace_bytes=200 * GiB, cordoned=(),
                           stored_bytes=80 * GiB)
    assert problem is not None and "needs 80 GiB (the data its 200 GiB namespace holds)" in problem
    # The declared capacity still bounds the namespace's size, whatever it holds.
    small = NodeRecord(name="n3", address="a", data_address="d", capacity_bytes=100 * GiB, allocated_bytes=0,
                       data_dir_free_bytes=500 * GiB)
    placement = choose_destination([roomy_declared, small], source="n1", namespace_bytes=200 * GiB,
                                   stored_bytes=1 * GiB)
    assert placement.node is not None and placement.node.name == "n2"
    assert "n3: 100 GiB free by its declared capacity" in choose_destination(
        [small], source="n1", namespace_bytes=200 * GiB, stored_bytes=1 * GiB).reason


# ---- compatibility: the state format must match the source's; a backend that cannot host is out ---

def versioned(name: str, free: int, fmt: int = 1, backend: str = "emulated") -> NodeRecord:
    return NodeRecord(name=name, address="a", data_address="d", capacity_bytes=1000, allocated_bytes=1000 - free,
                      state_format_version=fmt, backend=backend)


def test_an_incompatible_node_is_never_chosen_and_the_explanation_says_why() -> None:
    # n3 has the most room but speaks another controller-state format; n4's backend cannot host.
    nodes = [versioned("n1", 900), versioned("n2", 300), versioned("n3", 900, fmt=2),
             versioned("n4", 900, backend="vfio"), versioned("n5", 100)]
    placement = choose_destination(nodes, source="n1", namespace_bytes=200, cordoned={"n5"})
    assert placement.node is not None and placement.node.name == "n2"
    assert "n3: state format 2, source needs 1" in placement.rejected
    assert "n4: backend vfio cannot host a controller yet" in placement.rejected
    assert "n5: cordoned" in placement.rejected
    assert "n3: state format 2, source needs 1" in placement.reason
    # every node but the source and the chosen one is accounted for
    assert sorted(r.split(":")[0] for r in placement.rejected) == ["n3", "n4", "n5"]


def test_no_compatible_node_names_each_reason() -> None:
    nodes = [versioned("n1", 900), versioned("n2", 900, fmt=2)]
    placement = choose_destination(nodes, source="n1", namespace_bytes=200)
    assert placement.node is None
    assert "n2: state format 2, source needs 1" in placement.reason


def test_node_problem_refuses_an_incompatible_destination() -> None:
    problem = node_problem(versioned("n2", 900, fmt=2), "n2", source="n1", namespace_bytes=1, cordoned=(),
                           source_record=versioned("n1", 900))
    assert problem is not None and "state format 2, source needs 1" in problem


def test_unavailable_nodes_are_passed_over_with_their_reason() -> None:
    nodes = [versioned("n1", 900), versioned("n2", 900), versioned("n3", 500)]
    placement = choose_destination(nodes, source="n1", namespace_bytes=200,
                                   unavailable={"n2": "inbound limit 2 reached"})
    assert placement.node is not None and placement.node.name == "n3"
    assert placement.rejected == ("n2: inbound limit 2 reached",)


def test_another_backend_kind_or_an_unsaid_one_is_not_refused_for_it() -> None:
    # an emulated controller moves to a passthru VF and back (tests/test_passthru_migration.py)
    for backend in ("", "nvme-passthru"):
        nodes = [versioned("n1", 900), versioned("n2", 900, backend=backend)]
        assert choose_destination(nodes, source="n1", namespace_bytes=1).node is not None


def test_a_node_whose_drive_predicts_a_failure_is_never_a_destination_and_the_reason_says_why() -> None:
    from cluster.records import DriveHealth
    worn = NodeRecord(name="n2", address="a", data_address="d", capacity_bytes=1000, allocated_bytes=0,
                      health=DriveHealth(percentage_used=120))
    fine = NodeRecord(name="n3", address="a", data_address="d", capacity_bytes=1000, allocated_bytes=500,
                      health=DriveHealth())
    placement = choose_destination([worn, fine], source="n1", namespace_bytes=100)
    assert placement.node is not None and placement.node.name == "n3"  # n2 has more room, but its drive is failing
    assert "n2: drive predicts a failure (120% of its rated endurance used (limit 100%))" in placement.reason
    problem = node_problem(worn, "n2", source="n1", namespace_bytes=100, cordoned=())
    assert problem is not None and "drive predicts a failure" in problem
