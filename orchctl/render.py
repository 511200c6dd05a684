"""Pure rendering for orchctl: protobuf messages in, rich renderables or plain data out.

Nothing here talks to the network, reads the clock or prints; functions that need "now" take it
as an argument. That keeps every view testable by rendering into a recording rich Console, and
lets `orchctl trace` reuse the waterfall without the rest of the CLI.

User data (ids, node names, reasons, notes) always goes into rich `Text` objects, never into
markup strings, so a reason containing "[...]" is shown as written instead of being eaten as
a style tag.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cluster import io_limits
from proto.v1 import migration_pb2

Phase = migration_pb2.Phase

TERMINAL_PHASES: frozenset[int] = frozenset(
    {migration_pb2.COMPLETED, migration_pb2.ROLLED_BACK, migration_pb2.FAILED, migration_pb2.CANCELLED}
)

# Colours follow the meaning of the phase for an operator: in-flight work in calm colours, the
# guest-visible switchover (STOP_AND_COPY .. RESUMING) in yellow/magenta, outcomes in traffic-light
# colours. ROLLED_BACK is yellow, not red: the guest is fine, it just did not move.
_PHASE_STYLES: dict[int, str] = {
    migration_pb2.PHASE_UNSPECIFIED: "dim",
    migration_pb2.PENDING: "dim",
    migration_pb2.PREPARING: "cyan",
    migration_pb2.PRECOPY: "blue",
    migration_pb2.DIRTY_ITERATION: "blue",
    migration_pb2.STOP_AND_COPY: "magenta",
    migration_pb2.COMMIT: "yellow",
    migration_pb2.RESUMING: "yellow",
    migration_pb2.COMPLETED: "bold green",
    migration_pb2.ROLLED_BACK: "bold yellow",
    migration_pb2.FAILED: "bold red",
    migration_pb2.CANCELLED: "bold magenta",
}

_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


# ---------------------------------------------------------------------------------------------
# Scalars


def human_bytes(n: float) -> str:
    """Binary sizes: 512 B, 1.5 KiB, 4.0 GiB (one decimal once past bytes)."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in _BYTE_UNITS:
        value /= 1024.0
        # Switch unit before printing "1024.0 KiB": round first, then compare.
        if round(value, 1) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_rate(bytes_per_s: float) -> str:
    """A data rate, e.g. 12.0 MiB/s."""
    return f"{human_bytes(bytes_per_s)}/s"


def human_duration_ms(ms: float) -> str:
    """Durations in the unit an operator reads fastest: 0.4 ms, 35 ms, 1.2 s, 2m 05s, 1h 02m, 3d 04h."""
    if ms < 0:
        ms = 0.0
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000.0
    if seconds < 60:
        return f"{seconds:.1f} s"
    total_s = round(seconds)
    if total_s < 3600:
        return f"{total_s // 60}m {total_s % 60:02d}s"
    if total_s < 86400:
        return f"{total_s // 3600}h {(total_s % 3600) // 60:02d}m"
    return f"{total_s // 86400}d {(total_s % 86400) // 3600:02d}h"


def human_duration_s(seconds: float) -> str:
    return human_duration_ms(seconds * 1000.0)


def format_time(unix_s: float, *, with_date: bool = False) -> str:
    """Local wall-clock time of a unix timestamp; '-' when unset (0)."""
    if unix_s <= 0:
        return "-"
    when = _dt.datetime.fromtimestamp(unix_s).astimezone()
    if with_date:
        return when.strftime("%Y-%m-%d %H:%M:%S %Z")
    return when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def truncate(text: str, limit: int) -> str:
    """One line, at most `limit` characters, with an ellipsis when cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "…"


def phase_name(phase: int) -> str:
    try:
        return migration_pb2.Phase.Name(phase)  # type: ignore[arg-type]
    except ValueError:
        # A newer orchestrator may send a phase this orchctl does not know yet.
        return f"PHASE_{phase}"


def phase_style(phase: int) -> str:
    return _PHASE_STYLES.get(phase, "")


def phase_text(phase: int) -> Text:
    return Text(phase_name(phase), style=phase_style(phase))


def is_terminal(phase: int) -> bool:
    return phase in TERMINAL_PHASES


def no_convergence_name(action: int) -> str:
    if action == migration_pb2.NO_CONVERGENCE_ACTION_UNSPECIFIED:
        return "default (throttle)"
    try:
        return migration_pb2.NoConvergenceAction.Name(action).lower()  # type: ignore[arg-type]
    except ValueError:
        return f"action_{action}"


def message_to_dict(message: Message) -> dict[str, Any]:
    """The JSON form scripts get: snake_case keys, enum names, and every field present even at
    its zero value (so `.bytes_transferred` exists on a fresh job). int64 values are strings, as
    the proto3 JSON mapping says (and as grpcurl prints them)."""
    kwargs: dict[str, Any] = {"preserving_proto_field_name": True}
    try:
        return json_format.MessageToDict(message, always_print_fields_with_no_presence=True, **kwargs)
    except TypeError:
        # protobuf < 5.26 named the option differently.
        return json_format.MessageToDict(message, including_default_value_fields=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# Migrations


def migration_elapsed_s(m: migration_pb2.Migration, now: float) -> float:
    """Time from acceptance to the end (terminal) or to `now` (still running)."""
    if m.created_at <= 0:
        return 0.0
    end = m.updated_at if is_terminal(m.phase) and m.updated_at > 0 else now
    return max(end - m.created_at, 0.0)


def route(m: migration_pb2.Migration) -> Text:
    """'src -> dst'; the destination is blank until the scheduler has chosen one."""
    dest = m.destination_node or "(scheduler picks)"
    return Text(f"{m.source_node or '?'} -> {dest}")


def migration_summary_table(m: migration_pb2.Migration) -> Table:
    """The short view printed after `migrate` and `cancel`: id, controller, route, phase."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "CONTROLLER", "FROM -> TO", "PHASE"):
        table.add_column(column, no_wrap=column != "FROM -> TO")
    table.add_row(Text(m.id), Text(m.controller_id), route(m), phase_text(m.phase))
    return table


def timeline_rows(m: migration_pb2.Migration, now: float | None = None) -> list[list[str]]:
    """Plain rows for the phase timeline: phase, started, duration, bytes, rounds, note."""
    rows: list[list[str]] = []
    for rec in m.phases:
        if rec.duration_ms > 0:
            duration = human_duration_ms(rec.duration_ms)
        elif rec.phase == m.phase and not is_terminal(m.phase):
            # The current phase has no duration yet (the server writes it when the phase ends).
            if now is not None and rec.started_at > 0:
                duration = f"{human_duration_s(max(now - rec.started_at, 0.0))} (running)"
            else:
                duration = "running"
        else:
            duration = "-"
        rows.append(
            [
                phase_name(rec.phase),
                format_time(rec.started_at),
                duration,
                human_bytes(rec.bytes) if rec.bytes else "-",
                str(rec.rounds) if rec.rounds else "-",
                " ".join(rec.note.split()),
            ]
        )
    return rows


def timeline_table(m: migration_pb2.Migration, now: float | None = None) -> Table:
    table = Table(title="Phase timeline", title_justify="left", header_style="bold")
    table.add_column("PHASE", no_wrap=True)
    table.add_column("STARTED", no_wrap=True)
    table.add_column("DURATION", justify="right", no_wrap=True)
    table.add_column("BYTES", justify="right", no_wrap=True)
    table.add_column("ROUNDS", justify="right", no_wrap=True)
    table.add_column("NOTE")
    for rec, row in zip(m.phases, timeline_rows(m, now), strict=True):
        table.add_row(Text(row[0], style=phase_style(rec.phase)), *(Text(cell) for cell in row[1:]))
    return table


def policy_text(policy: migration_pb2.ConvergencePolicy) -> str:
    """The convergence policy as one line; unset fields say the server default applies."""
    parts = [
        f"max downtime {policy.max_downtime_ms} ms" if policy.HasField("max_downtime_ms") else "max downtime default",
        f"max rounds {policy.max_rounds}" if policy.HasField("max_rounds") else "max rounds default",
        f"bandwidth {human_rate(policy.bandwidth_bytes_per_s)}"
        if policy.HasField("bandwidth_bytes_per_s")
        else "bandwidth unlimited",
        f"on no convergence {no_convergence_name(policy.on_no_convergence)}",
    ]
    return ", ".join(parts)


_VERIFICATION_STYLE = {
    migration_pb2.VERIFICATION_PENDING: ("pending: hashing both copies; the source copy is kept meanwhile", "yellow"),
    migration_pb2.VERIFICATION_PASSED: ("passed: the source copy was released", "green"),
    migration_pb2.VERIFICATION_FAILED: ("FAILED: the source copy is kept for an operator", "bold red"),
}


def verification_text(m: migration_pb2.Migration) -> Text:
    words, style = _VERIFICATION_STYLE.get(m.verification, ("-", ""))
    text = Text(words, style=style)
    if m.verification_note:
        text.append(f" ({m.verification_note})")
    return text


def digest_text(m: migration_pb2.Migration) -> Text:
    src, dst = m.source_digest, m.destination_digest
    if not src and not dst:
        return Text("-")
    text = Text(f"source {src or '-'}\ndest   {dst or '-'}\n")
    if src and dst:
        if src == dst:
            text.append("match", style="green")
        else:
            text.append("MISMATCH", style="bold red")
    else:
        text.append("incomplete", style="dim")
    return text


def progress_text(m: migration_pb2.Migration) -> str:
    sent = human_bytes(m.bytes_transferred)
    if m.namespace_bytes <= 0:
        return f"{sent} sent"
    pct = 100.0 * m.bytes_transferred / m.namespace_bytes
    # Dirty rounds resend changed blocks, so "sent" can pass 100% of the namespace.
    return f"{sent} sent of {human_bytes(m.namespace_bytes)} namespace ({pct:.0f}%)"


def migration_fields(m: migration_pb2.Migration, now: float) -> Table:
    """The key/value part of `orchctl get`."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    elapsed = human_duration_s(migration_elapsed_s(m, now))
    rows: list[tuple[str, Text]] = [
        ("id", Text(m.id)),
        ("controller", Text(m.controller_id)),
        ("route", route(m)),
        ("phase", phase_text(m.phase) + (Text("  (cancel requested)") if m.cancel_requested else "")),
        ("created", Text(format_time(m.created_at, with_date=True))),
        ("updated", Text(format_time(m.updated_at, with_date=True))),
        ("elapsed" if not is_terminal(m.phase) else "took", Text(elapsed)),
        ("transferred", Text(progress_text(m))),
        ("rounds", Text(str(m.rounds))),
        ("throttle", Text(f"{m.throttle_percent}%")),
        ("dirty rate", Text(human_rate(m.dirty_rate_bytes_per_s))),
        ("downtime", downtime_text(m)),
        ("policy", Text(policy_text(m.policy))),
        ("epoch", Text(str(m.epoch))),
        ("verification", verification_text(m)),
        ("digests", digest_text(m)),
        ("reason", Text(m.reason or "-")),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def migration_detail(m: migration_pb2.Migration, now: float) -> Group:
    """`orchctl get`: the fields, then the phase timeline."""
    parts: list[RenderableType] = [migration_fields(m, now), Text("")]
    if m.phases:
        parts.append(timeline_table(m, now))
    else:
        parts.append(Text("no phases recorded yet", style="dim"))
    return Group(*parts)


def migrations_table(migrations: Iterable[migration_pb2.Migration], now: float) -> Table:
    """`orchctl list`: one row per job, oldest first so the newest sits next to the prompt."""
    table = Table(header_style="bold", box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    table.add_column("CONTROLLER", no_wrap=True)
    table.add_column("SOURCE", no_wrap=True)
    table.add_column("DEST", no_wrap=True)
    table.add_column("PHASE", no_wrap=True)
    table.add_column("BYTES", justify="right", no_wrap=True)
    table.add_column("AGE", justify="right", no_wrap=True)
    table.add_column("DURATION", justify="right", no_wrap=True)
    table.add_column("REASON", overflow="ellipsis", no_wrap=True, max_width=40)
    for m in sorted(migrations, key=lambda job: (job.created_at, job.id)):
        age = human_duration_s(max(now - m.created_at, 0.0)) if m.created_at > 0 else "-"
        # Duration only means something once the job has ended; for live jobs AGE is the elapsed.
        duration = human_duration_s(migration_elapsed_s(m, now)) if is_terminal(m.phase) else "-"
        table.add_row(
            Text(m.id),
            Text(m.controller_id),
            Text(m.source_node or "-"),
            Text(m.destination_node or "-"),
            phase_text(m.phase),
            Text(human_bytes(m.bytes_transferred)),
            Text(age),
            Text(duration),
            Text(truncate(m.reason, 40) if m.reason else ""),
        )
    return table


def watch_view(m: migration_pb2.Migration, now: float, bar_width: int = 40) -> Group:
    """The live display of `orchctl watch`: phase, a progress bar over the namespace, and the
    convergence numbers (rounds, throttle, dirty rate)."""
    header = Text.assemble(
        ("migration ", "dim"),
        (m.id, "bold"),
        ("  controller ", "dim"),
        m.controller_id,
        "  ",
        route(m),
        "  ",
        phase_text(m.phase),
    )
    if m.cancel_requested and not is_terminal(m.phase):
        header.append("  cancel requested", style="yellow")
    if m.namespace_bytes > 0:
        bar = ProgressBar(
            total=float(m.namespace_bytes),
            completed=float(min(m.bytes_transferred, m.namespace_bytes)),
            width=bar_width,
        )
    else:
        # Size not known yet (PENDING/PREPARING): a pulsing bar says "working" without lying.
        bar = ProgressBar(total=None, width=bar_width, pulse=not is_terminal(m.phase))
    progress = Table.grid(padding=(0, 1))
    progress.add_column(no_wrap=True)
    progress.add_column(no_wrap=True)
    progress.add_row(bar, Text(progress_text(m)))
    stats = Text.assemble(
        ("round ", "dim"),
        str(m.rounds),
        (f"/{m.policy.max_rounds}" if m.policy.HasField("max_rounds") else "", "dim"),
        ("   throttle ", "dim"),
        f"{m.throttle_percent}%",
        ("   dirty rate ", "dim"),
        human_rate(m.dirty_rate_bytes_per_s),
        ("   elapsed ", "dim"),
        human_duration_s(migration_elapsed_s(m, now)),
    )
    if m.downtime_ms > 0:
        stats.append("   downtime ", style="dim")
        stats.append(human_duration_ms(m.downtime_ms))
    parts: list[RenderableType] = [header, progress, stats]
    if m.reason:
        parts.append(Text.assemble(("reason ", "dim"), m.reason))
    return Group(*parts)


def phase_change_line(m: migration_pb2.Migration) -> Text:
    """One line per phase change, for `watch` when stdout is not a terminal (logs, CI)."""
    line = Text.assemble(
        (format_time(m.updated_at or m.created_at), "dim"), " ", phase_text(m.phase), "  ", progress_text(m)
    )
    if m.rounds:
        line.append(f"  round {m.rounds}")
    if m.throttle_percent:
        line.append(f"  throttle {m.throttle_percent}%")
    return line


def budget_ms(m: migration_pb2.Migration) -> int:
    return m.policy.max_downtime_ms if m.policy.HasField("max_downtime_ms") else 50


def downtime_text(m: migration_pb2.Migration) -> Text:
    """The measured switchover beside its budget and prediction; red when over the budget."""
    if m.downtime_ms <= 0:
        return Text("-")
    text = Text(human_duration_ms(m.downtime_ms), style="red" if m.downtime_budget_exceeded else "")
    detail = [f"budget {budget_ms(m)} ms"]
    if m.predicted_downtime_ms > 0:
        detail.append(f"predicted {human_duration_ms(m.predicted_downtime_ms)}")
    text.append(f"  ({', '.join(detail)})", style="dim")
    if m.downtime_budget_exceeded:
        text.append("  over budget", style="bold red")
    return text


def budget_warning(m: migration_pb2.Migration) -> Text | None:
    """What `orchctl` says on stderr when a completed job's switchover broke its budget."""
    if not m.downtime_budget_exceeded:
        return None
    measured = f"switchover {human_duration_ms(m.downtime_ms)}"
    if m.guest_blackout_ms > 0:
        measured += f", guest blackout {human_duration_ms(m.guest_blackout_ms)}"
    predicted = f" (predicted {human_duration_ms(m.predicted_downtime_ms)})" if m.predicted_downtime_ms > 0 else ""
    return Text(f"warning: migration {m.id}: {measured}: over its downtime budget of {budget_ms(m)} ms{predicted}",
                style="yellow")


def final_line(m: migration_pb2.Migration) -> Text:
    """The last thing `watch` prints: outcome, how long it took, downtime and the reason."""
    line = Text.assemble("migration ", (m.id, "bold"), " ", phase_text(m.phase))
    took = migration_elapsed_s(m, m.updated_at)
    if took > 0:
        line.append(f" after {human_duration_s(took)}")
    if m.downtime_ms > 0:
        line.append(f", downtime {human_duration_ms(m.downtime_ms)}")
        if m.downtime_budget_exceeded:
            line.append(f" (over its {budget_ms(m)} ms budget)", style="red")
    if m.reason:
        line.append(f": {' '.join(m.reason.split())}")
    return line


# ---------------------------------------------------------------------------------------------
# Nodes and controllers


def _name_list(names: Sequence[str], shown: int = 3) -> str:
    if not names:
        return "-"
    head = ", ".join(names[:shown])
    rest = len(names) - shown
    return f"{head} (+{rest})" if rest > 0 else head


def nodes_table(nodes: Iterable[migration_pb2.Node]) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    table.add_column("NAME", no_wrap=True)
    table.add_column("ADDRESS", no_wrap=True)
    table.add_column("LIVE", no_wrap=True)
    table.add_column("CORDONED", no_wrap=True)
    table.add_column("CAPACITY", justify="right", no_wrap=True)
    table.add_column("ALLOCATED", justify="right", no_wrap=True)
    table.add_column("CONTROLLERS")
    for node in sorted(nodes, key=lambda n: n.name):
        if node.capacity_bytes > 0:
            pct = 100.0 * node.allocated_bytes / node.capacity_bytes
            allocated = f"{human_bytes(node.allocated_bytes)} ({pct:.0f}%)"
        else:
            allocated = human_bytes(node.allocated_bytes)
        table.add_row(
            Text(node.name),
            Text(node.address),
            Text("yes", style="green") if node.live else Text("no", style="bold red"),
            Text("yes", style="yellow") if node.cordoned else Text("no"),
            Text(human_bytes(node.capacity_bytes) if node.capacity_bytes else "-"),
            Text(allocated),
            Text(_name_list(list(node.controllers))),
        )
    return table


def controllers_table(controllers: Iterable[migration_pb2.Controller]) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    table.add_column("NODE", no_wrap=True)
    table.add_column("NAMESPACE", justify="right", no_wrap=True)
    table.add_column("STATE")
    table.add_column("I/O LIMITS")
    for ctrl in sorted(controllers, key=lambda c: c.id):
        limits = io_limits.IoLimits().merged(io_limits.changes_in(ctrl.limits))
        table.add_row(
            Text(ctrl.id),
            Text(ctrl.node or "-"),
            Text(human_bytes(ctrl.namespace_bytes)),
            Text(ctrl.state or "-"),
            Text(limits.shown()),
        )
    return table


# ---------------------------------------------------------------------------------------------
# Waterfall

WATERFALL_DONE = "█"
WATERFALL_RUNNING = "░"
WATERFALL_INSTANT = "│"
_LABEL_WIDTH = max(len(name) for name in migration_pb2.Phase.keys())


def phase_waterfall(migration: migration_pb2.Migration, width: int = 40, now: float | None = None) -> list[str]:
    """A text waterfall of the phases, like a trace view: one line per phase record, the bar
    starting at the phase's offset from the first phase and as long as its duration, all scaled
    so the whole job spans `width` columns.

        PRECOPY         |   ████████████                         |    1.2 s

    Finished phases draw with █, the running phase (only when `now` is given) with ░, and
    zero-length phases (the terminal marker) as a single │ at their start.
    """
    if width < 1:
        raise ValueError("width must be at least 1")
    records = list(migration.phases)
    if not records:
        return []

    # Offsets come from started_at when every record has one; otherwise (older or partial
    # records) the phases are laid end to end, which is what they are in practice anyway.
    spans: list[tuple[float, float, bool]] = []  # (offset_ms, duration_ms, running)
    use_clock = all(rec.started_at > 0 for rec in records)
    t0 = min(rec.started_at for rec in records) if use_clock else 0.0
    cursor = 0.0
    for rec in records:
        duration = rec.duration_ms
        running = False
        if (
            duration <= 0
            and now is not None
            and rec.phase == migration.phase
            and not is_terminal(migration.phase)
            and rec.started_at > 0
        ):
            duration = max(now - rec.started_at, 0.0) * 1000.0
            running = True
        offset = (rec.started_at - t0) * 1000.0 if use_clock else cursor
        spans.append((offset, duration, running))
        cursor = offset + duration

    total = max(offset + duration for offset, duration, _ in spans)
    scale = width / total if total > 0 else 0.0

    lines: list[str] = []
    for rec, (offset, duration, running) in zip(records, spans, strict=True):
        # Columns from rounded start and end (not rounded length) so back-to-back phases abut
        # without gaps or overlaps.
        start_col = min(round(offset * scale), width - 1)
        end_col = min(round((offset + duration) * scale), width)
        if duration > 0:
            length = max(end_col - start_col, 1)
            bar = (WATERFALL_RUNNING if running else WATERFALL_DONE) * length
        else:
            bar = WATERFALL_INSTANT
        field = (" " * start_col + bar).ljust(width)[:width]
        if running:
            label = f"{human_duration_ms(duration)}+"
        elif rec.duration_ms > 0:
            label = human_duration_ms(rec.duration_ms)
        else:
            label = "-"
        lines.append(f"{phase_name(rec.phase):<{_LABEL_WIDTH}} |{field}| {label:>9}")
    return lines


def trace_id_text(m: migration_pb2.Migration) -> Text:
    if m.trace_id:
        return Text(m.trace_id)
    return Text("- (tracing was off when the job was created)", style="dim")


def trace_view(m: migration_pb2.Migration, now: float, width: int = 40) -> Group:
    """`orchctl trace`: the job's phases as a waterfall, straight from the job record (no tracing
    backend needed), with the trace id to look the same job up in Jaeger or Tempo."""
    header = Text.assemble(("migration ", "dim"), (m.id, "bold"), ("  controller ", "dim"), m.controller_id, "  ",
                           route(m), "  ", phase_text(m.phase))
    parts: list[RenderableType] = [header, Text.assemble(("trace id  ", "dim"), trace_id_text(m)), Text("")]
    if not m.phases:
        parts.append(Text("no phases recorded yet", style="dim"))
        return Group(*parts)
    for rec, line in zip(m.phases, phase_waterfall(m, width=width, now=now), strict=True):
        extra = [human_bytes(rec.bytes) if rec.bytes else "", f"{rec.rounds} rounds" if rec.rounds else ""]
        row = Text(line, style=phase_style(rec.phase))
        shown = "  ".join(e for e in extra if e)
        if shown:
            row.append(f"  {shown}", style="dim")
        parts.append(row)
    totals = Text.assemble(("\ntook ", "dim"), human_duration_s(migration_elapsed_s(m, now)),
                           ("   sent ", "dim"), human_bytes(m.bytes_transferred), ("   rounds ", "dim"), str(m.rounds))
    if m.downtime_ms > 0:
        totals.append_text(Text.assemble(("   downtime ", "dim"), human_duration_ms(m.downtime_ms)))
    if m.guest_blackout_ms > 0:
        totals.append_text(Text.assemble(("   guest blackout ", "dim"), human_duration_ms(m.guest_blackout_ms)))
    parts.append(totals)
    if m.reason:
        parts.append(Text.assemble(("reason ", "dim"), m.reason))
    return Group(*parts)


def trace_dict(m: migration_pb2.Migration, now: float) -> dict[str, Any]:
    """`orchctl trace -o json`: each phase with its offset from the first, for scripts."""
    t0 = min((rec.started_at for rec in m.phases if rec.started_at > 0), default=0.0)
    phases = []
    for rec in m.phases:
        running = rec.duration_ms <= 0 and rec.phase == m.phase and not is_terminal(m.phase) and rec.started_at > 0
        duration = max(now - rec.started_at, 0.0) * 1000.0 if running else rec.duration_ms
        phases.append({"phase": phase_name(rec.phase), "offset_ms": round((rec.started_at - t0) * 1000.0, 3),
                       "duration_ms": round(duration, 3), "running": running, "bytes": rec.bytes,
                       "rounds": rec.rounds, "note": rec.note})
    return {"id": m.id, "trace_id": m.trace_id, "phase": phase_name(m.phase), "phases": phases}


# ---------------------------------------------------------------------------------------------
# Evacuations


def evacuation_state_name(ev: migration_pb2.Evacuation) -> str:
    return migration_pb2.EvacuationState.Name(ev.state).removeprefix("EVACUATION_")


def evacuation_reason_name(ev: migration_pb2.Evacuation) -> str:
    return migration_pb2.EvacuationReason.Name(ev.reason)


_EVACUATION_STYLES = {"PLANNED": "dim", "RUNNING": "cyan", "DONE": "bold green", "FAILED": "bold red",
                      "CANCELLED": "bold magenta"}


def evacuation_state_text(ev: migration_pb2.Evacuation) -> Text:
    name = evacuation_state_name(ev)
    return Text(name, style=_EVACUATION_STYLES.get(name, ""))


def evacuation_counts_text(ev: migration_pb2.Evacuation) -> str:
    return f"{ev.moved}/{ev.total} moved, {ev.in_flight} in flight, {ev.waiting} waiting, {ev.failed} failed"


def evacuation_plan_view(plan: migration_pb2.EvacuationPlan) -> Group:
    """What `evacuate node` will do (or, with --dry-run, would do): per controller, where to and why."""
    ev = plan.evacuation
    head = Text.assemble(("dry run: " if plan.dry_run else ""), "evacuation of ", (ev.node, "bold"), " (",
                         evacuation_reason_name(ev), ") ", evacuation_state_text(ev),
                         f": {ev.total} controller{'s' if ev.total != 1 else ''}")
    table = Table(header_style="bold", box=None, pad_edge=False)
    table.add_column("CONTROLLER", no_wrap=True)
    table.add_column("DESTINATION", no_wrap=True)
    table.add_column("WHEN", no_wrap=True)
    table.add_column("WHY")
    for move in plan.moves:
        table.add_row(Text(move.controller_id), Text(move.destination_node or "-"),
                      Text("now", style="green") if move.starts_now else Text("waits", style="yellow"),
                      Text(move.why))
    parts: list[RenderableType] = [head, table] if plan.moves else [head]
    if plan.dry_run:
        parts.append(Text("nothing was cordoned or started (dry run)", style="dim"))
    return Group(*parts)


def evacuations_table(evacuations: Iterable[migration_pb2.Evacuation], now: float) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    for column in ("NODE", "REASON", "STATE", "MOVED", "IN FLIGHT", "WAITING", "FAILED", "AGE", "NOTE"):
        table.add_column(column, no_wrap=column != "NOTE")
    for ev in evacuations:
        end = ev.finished_at or now
        table.add_row(Text(ev.node), Text(evacuation_reason_name(ev)), evacuation_state_text(ev),
                      Text(f"{ev.moved}/{ev.total}"), Text(str(ev.in_flight)), Text(str(ev.waiting)),
                      Text(str(ev.failed)), Text(human_duration_s(max(0.0, end - ev.created_at))),
                      Text(ev.failure or ev.note))
    return table


def controller_progress(move: migration_pb2.ControllerEvacuation,
                        jobs: dict[str, migration_pb2.Migration]) -> tuple[str, str, str]:
    """(status, route, bytes) of one controller of an evacuation: its result once settled, else
    the phase and bytes of its current migration, else 'waiting'."""
    attempt = move.attempts[-1] if move.attempts else None
    job = jobs.get(attempt.job_id) if attempt is not None else None
    route_text = f"-> {attempt.destination_node}" if attempt is not None and attempt.destination_node else ""
    if move.result:
        return move.result, route_text, human_bytes(move.namespace_bytes) if move.result == "MOVED" else ""
    if attempt is None or attempt.outcome:
        return "WAITING", "", ""
    if job is None:
        return "STARTING", route_text, ""
    moved = f"{human_bytes(job.bytes_transferred)} / {human_bytes(job.namespace_bytes)}"
    return phase_name(job.phase), route_text, moved


def evacuation_progress_view(ev: migration_pb2.Evacuation, jobs: dict[str, migration_pb2.Migration],
                             now: float) -> Group:
    """The live view of `evacuate node --wait`: the evacuation's counts and one row per controller."""
    end = ev.finished_at or now
    head = Text.assemble("evacuation of ", (ev.node, "bold"), " ", evacuation_state_text(ev), "  ",
                         evacuation_counts_text(ev), f"  {human_duration_s(max(0.0, end - ev.created_at))}")
    table = Table(header_style="bold", box=None, pad_edge=False)
    for column in ("CONTROLLER", "STATUS", "ROUTE", "BYTES", "ATTEMPTS"):
        table.add_column(column, no_wrap=True)
    for move in ev.controllers:
        status, route_text, moved = controller_progress(move, jobs)
        table.add_row(Text(move.controller_id), Text(status), Text(route_text), Text(moved),
                      Text(str(len(move.attempts))))
    return Group(head, table)


def controller_progress_line(ev: migration_pb2.Evacuation, move: migration_pb2.ControllerEvacuation,
                             jobs: dict[str, migration_pb2.Migration]) -> Text:
    """One line per change of a controller's status, for `evacuate --wait` into a log or pipe."""
    status, route_text, moved = controller_progress(move, jobs)
    return Text(" ".join(part for part in (ev.node, move.controller_id, status, route_text, moved) if part))


def evacuation_final_line(ev: migration_pb2.Evacuation) -> Text:
    line = Text.assemble("evacuation of ", (ev.node, "bold"), " ", evacuation_state_text(ev), ": ",
                         evacuation_counts_text(ev))
    if ev.finished_at:
        line.append(f" after {human_duration_s(max(0.0, ev.finished_at - ev.created_at))}")
    if ev.failure:
        line.append(f"; {' '.join(ev.failure.split())}")
    return line
