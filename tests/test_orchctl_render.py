"""Tests for orchctl.render: real migration_pb2 messages in, rendered text checked."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from rich.console import Console, RenderableType

from orchctl import render
from proto.v1 import migration_pb2

T0 = 1_700_000_000.0
GIB = 1024**3
MIB = 1024**2

# Contiguous phases of a completed job: (phase, duration_ms, bytes, rounds, note).
COMPLETED_PHASES = [
    (migration_pb2.PENDING, 10.0, 0, 0, ""),
    (migration_pb2.PREPARING, 40.0, 0, 0, "destination node-b"),
    (migration_pb2.PRECOPY, 1500.0, 4 * GIB, 0, ""),
    (migration_pb2.DIRTY_ITERATION, 750.0, 300 * MIB, 5, "converged"),
    (migration_pb2.STOP_AND_COPY, 3.0, 2 * MIB, 0, ""),
    (migration_pb2.COMMIT, 2.0, 0, 0, ""),
    (migration_pb2.RESUMING, 5.0, 0, 0, ""),
    (migration_pb2.COMPLETED, 0.0, 0, 0, ""),
]


def make_migration(
    phases: Sequence[tuple[migration_pb2.Phase, float, int, int, str]] = COMPLETED_PHASES,
    *,
    phase: int = migration_pb2.COMPLETED,
    **fields: object,
) -> migration_pb2.Migration:
    records = []
    started = T0
    for ph, duration_ms, nbytes, rounds, note in phases:
        records.append(
            migration_pb2.PhaseRecord(
                phase=ph, started_at=started, duration_ms=duration_ms, bytes=nbytes, rounds=rounds, note=note
            )
        )
        started += duration_ms / 1000.0
    values: dict[str, object] = {
        "id": "mig-0001",
        "controller_id": "ctrl-a",
        "source_node": "node-a",
        "destination_node": "node-b",
        "phase": phase,
        "phases": records,
        "bytes_transferred": 4 * GIB + 302 * MIB,
        "namespace_bytes": 4 * GIB,
        "rounds": 5,
        "throttle_percent": 20,
        "dirty_rate_bytes_per_s": 12 * MIB,
        "created_at": T0,
        "updated_at": started,
        "epoch": 3,
        "source_digest": "sha256:abc",
        "destination_digest": "sha256:abc",
        "downtime_ms": 4.2,
        "reason": "completed in 5 rounds",
    }
    values.update(fields)
    return migration_pb2.Migration(**values)  # type: ignore[arg-type]


def text_of(renderable: RenderableType, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * MIB, "5.0 MiB"),
        (3 * GIB, "3.0 GiB"),
        (GIB - 1, "1.0 GiB"),  # rounds up into the next unit instead of "1024.0 MiB"
        (2 * 1024**4, "2.0 TiB"),
    ],
)
def test_human_bytes(n: int, expected: str) -> None:
    assert render.human_bytes(n) == expected


@pytest.mark.parametrize(
    ("ms", "expected"),
    [
        (0.4, "0.4 ms"),
        (35, "35 ms"),
        (999, "999 ms"),
        (1200, "1.2 s"),
        (59_000, "59.0 s"),
        (125_000, "2m 05s"),
        (3_720_000, "1h 02m"),
        (3 * 86_400_000 + 4 * 3_600_000, "3d 04h"),
    ],
)
def test_human_duration(ms: float, expected: str) -> None:
    assert render.human_duration_ms(ms) == expected


def test_human_rate() -> None:
    assert render.human_rate(12 * MIB) == "12.0 MiB/s"


def test_phase_colours_distinguish_outcomes() -> None:
    assert "green" in render.phase_style(migration_pb2.COMPLETED)
    assert "red" in render.phase_style(migration_pb2.FAILED)
    assert render.phase_text(migration_pb2.ROLLED_BACK).plain == "ROLLED_BACK"
    # An enum value from a newer server does not crash the CLI.
    assert render.phase_name(99) == "PHASE_99"


def test_timeline_has_every_phase_with_sizes_and_durations() -> None:
    m = make_migration()
    rows = render.timeline_rows(m)
    assert [row[0] for row in rows] == [migration_pb2.Phase.Name(p[0]) for p in COMPLETED_PHASES]
    precopy = rows[2]
    assert precopy[2] == "1.5 s"
    assert precopy[3] == "4.0 GiB"
    dirty = rows[3]
    assert dirty[2:5] == ["750 ms", "300.0 MiB", "5"]
    assert dirty[5] == "converged"

    text = text_of(render.timeline_table(m))
    for name in ("PENDING", "PREPARING", "PRECOPY", "DIRTY_ITERATION", "STOP_AND_COPY", "COMMIT"):
        assert name in text
    assert "RESUMING" in text and "COMPLETED" in text
    assert "destination node-b" in text


def test_timeline_marks_the_running_phase() -> None:
    phases = [*COMPLETED_PHASES[:3], (migration_pb2.DIRTY_ITERATION, 0.0, 0, 2, "")]
    m = make_migration(phases, phase=migration_pb2.DIRTY_ITERATION)
    assert render.timeline_rows(m)[-1][2] == "running"
    started = m.phases[-1].started_at
    assert render.timeline_rows(m, now=started + 2.0)[-1][2] == "2.0 s (running)"


def test_detail_view_shows_fields_reason_digests_downtime() -> None:
    m = make_migration()
    text = text_of(render.migration_detail(m, now=T0 + 60))
    assert "mig-0001" in text and "ctrl-a" in text
    assert "node-a -> node-b" in text
    assert "completed in 5 rounds" in text
    assert "sha256:abc" in text and "match" in text
    assert "4.2 ms" in text  # downtime
    assert "Phase timeline" in text
    assert "DIRTY_ITERATION" in text


def test_detail_view_flags_digest_mismatch_and_keeps_brackets() -> None:
    m = make_migration(destination_digest="sha256:def", reason="checksum [lba 42] differs")
    text = text_of(render.migration_detail(m, now=T0))
    assert "MISMATCH" in text
    assert "checksum [lba 42] differs" in text  # not swallowed as rich markup


def test_policy_text_names_defaults() -> None:
    policy = migration_pb2.ConvergencePolicy(bandwidth_bytes_per_s=100 * MIB, on_no_convergence=migration_pb2.FORCE)
    text = render.policy_text(policy)
    assert "max downtime default" in text
    assert "100.0 MiB/s" in text
    assert "force" in text


def test_migrations_table_truncates_reason() -> None:
    long_reason = "destination lost during precopy; " * 5
    jobs = [
        make_migration(id="mig-0002", created_at=T0 + 10, reason=long_reason, phase=migration_pb2.FAILED),
        make_migration(),
    ]
    text = text_of(render.migrations_table(jobs, now=T0 + 100))
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["ID", "CONTROLLER", "SOURCE", "DEST", "PHASE"]
    assert "mig-0001" in lines[1] and "mig-0002" in lines[2]  # oldest first
    assert "4.3 GiB" in lines[1]
    assert "…" in lines[2]
    assert long_reason.strip() not in text


def test_nodes_and_controllers_tables() -> None:
    nodes = [
        migration_pb2.Node(
            name="node-a",
            address="10.0.0.1:7000",
            live=True,
            capacity_bytes=100 * GIB,
            allocated_bytes=25 * GIB,
            controllers=["c1", "c2", "c3", "c4"],
        ),
        migration_pb2.Node(name="node-b", address="10.0.0.2:7000", live=False, cordoned=True),
    ]
    text = text_of(render.nodes_table(nodes))
    assert "100.0 GiB" in text and "25.0 GiB (25%)" in text
    assert "c1, c2, c3 (+1)" in text
    row_b = next(line for line in text.splitlines() if line.startswith("node-b"))
    assert row_b.split()[2:4] == ["no", "yes"]

    controllers = [migration_pb2.Controller(id="c1", node="node-a", namespace_bytes=GIB, state="RUNNING")]
    text = text_of(render.controllers_table(controllers))
    assert "c1" in text and "node-a" in text and "1.0 GiB" in text and "RUNNING" in text


def test_watch_view_shows_progress_and_convergence() -> None:
    m = make_migration(
        COMPLETED_PHASES[:4],
        phase=migration_pb2.DIRTY_ITERATION,
        bytes_transferred=2 * GIB,
        reason="",
    )
    text = text_of(render.watch_view(m, now=T0 + 3))
    assert "DIRTY_ITERATION" in text
    assert "2.0 GiB sent of 4.0 GiB namespace (50%)" in text
    assert "round 5" in text and "throttle 20%" in text and "12.0 MiB/s" in text


def test_final_line() -> None:
    text = render.final_line(make_migration(phase=migration_pb2.ROLLED_BACK, reason="no convergence")).plain
    assert text.startswith("migration mig-0001 ROLLED_BACK after ")
    assert text.endswith(": no convergence")


def test_message_to_dict_is_snake_case_with_enum_names_and_zero_fields() -> None:
    data = render.message_to_dict(migration_pb2.Migration(id="m", phase=migration_pb2.PRECOPY))
    assert data["phase"] == "PRECOPY"
    assert data["bytes_transferred"] == "0"  # present at zero; int64 as a string per proto3 JSON
    assert "controller_id" in data and "controllerId" not in data


def _bar(line: str) -> str:
    return line.split("|")[1]


def test_waterfall_bars_are_proportional_and_abut() -> None:
    phases = [
        (migration_pb2.PRECOPY, 100.0, 0, 0, ""),
        (migration_pb2.DIRTY_ITERATION, 200.0, 0, 0, ""),
        (migration_pb2.STOP_AND_COPY, 400.0, 0, 0, ""),
        (migration_pb2.COMPLETED, 0.0, 0, 0, ""),
    ]
    lines = render.phase_waterfall(make_migration(phases), width=70)
    assert len(lines) == 4
    bars = [_bar(line) for line in lines]
    assert all(len(bar) == 70 for bar in bars)
    assert [bar.count(render.WATERFALL_DONE) for bar in bars[:3]] == [10, 20, 40]
    # Each bar starts where the previous one ended, like spans in a trace waterfall.
    assert [len(bar) - len(bar.lstrip()) for bar in bars] == [0, 10, 30, 69]
    assert bars[3].strip() == render.WATERFALL_INSTANT
    assert lines[0].startswith("PRECOPY ") and lines[1].rstrip().endswith("200 ms")


def test_waterfall_every_phase_and_tiny_phases_stay_visible() -> None:
    lines = render.phase_waterfall(make_migration(), width=40)
    assert [line.split()[0] for line in lines] == [migration_pb2.Phase.Name(p[0]) for p in COMPLETED_PHASES]
    counts = [_bar(line).count(render.WATERFALL_DONE) for line in lines]
    assert counts[2] > counts[3] > 0  # 1.5 s precopy longer than 750 ms dirty iteration
    assert counts[4] == 1  # a 3 ms stop-and-copy still gets one column
    assert sum(counts) <= 40 + 4  # at most one extra column per tiny phase


def test_waterfall_without_timestamps_lays_phases_end_to_end() -> None:
    m = migration_pb2.Migration(
        phase=migration_pb2.PRECOPY,
        phases=[
            migration_pb2.PhaseRecord(phase=migration_pb2.PREPARING, duration_ms=300),
            migration_pb2.PhaseRecord(phase=migration_pb2.PRECOPY, duration_ms=100),
        ],
    )
    bars = [_bar(line) for line in render.phase_waterfall(m, width=40)]
    assert bars[0].count(render.WATERFALL_DONE) == 30
    assert bars[1].index(render.WATERFALL_DONE) == 30 and bars[1].count(render.WATERFALL_DONE) == 10


def test_waterfall_running_phase_uses_now() -> None:
    phases = [(migration_pb2.PREPARING, 1000.0, 0, 0, ""), (migration_pb2.PRECOPY, 0.0, 0, 0, "")]
    m = make_migration(phases, phase=migration_pb2.PRECOPY)
    lines = render.phase_waterfall(m, width=20, now=T0 + 2.0)
    assert _bar(lines[0]).count(render.WATERFALL_DONE) == 10
    assert _bar(lines[1]).count(render.WATERFALL_RUNNING) == 10
    assert lines[1].rstrip().endswith("1.0 s+")
    assert render.phase_waterfall(migration_pb2.Migration(), width=20) == []
    with pytest.raises(ValueError):
        render.phase_waterfall(m, width=0)
