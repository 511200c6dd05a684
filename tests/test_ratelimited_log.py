"""The rate-limited log of malformed input: one line per kind per window, the dropped counted."""

from __future__ import annotations

import logging

import pytest

from cluster.ratelimited_log import LogWindows, RateLimitedLog, Verdict


def test_first_event_of_a_kind_is_logged_the_rest_of_its_window_counted() -> None:
    windows = LogWindows(10.0)
    assert windows.event("grpc", 100.0) == Verdict(True)
    assert [windows.event("grpc", 100.0 + i * 0.5).log for i in range(1, 19)] == [False] * 18
    assert windows.event("grpc", 110.0) == Verdict(True, dropped=18, window_s=10.0)
    assert windows.event("grpc", 110.1) == Verdict(False)


def test_kinds_have_windows_of_their_own() -> None:
    windows = LogWindows(10.0)
    assert windows.event("grpc", 0.0).log
    assert windows.event("nbd", 1.0).log
    assert not windows.event("grpc", 2.0).log
    assert windows.event("http", 3.0).log
    assert windows.event("nbd", 11.0) == Verdict(True, dropped=0, window_s=10.0)


def test_a_quiet_spell_longer_than_the_window_reports_the_count_over_the_time_it_covers() -> None:
    windows = LogWindows(10.0)
    windows.event("grpc", 0.0)
    windows.event("grpc", 1.0)
    assert windows.event("grpc", 60.0) == Verdict(True, dropped=1, window_s=60.0)


def test_pending_counts_are_read_once() -> None:
    windows = LogWindows(10.0)
    windows.event("grpc", 0.0)
    windows.event("grpc", 1.0)
    windows.event("nbd", 1.0)
    assert windows.pending() == {"grpc": 1}
    assert windows.pending() == {}
    assert windows.event("grpc", 12.0) == Verdict(True, dropped=0, window_s=12.0)


@pytest.mark.parametrize("window_s", [0.0, -1.0])
def test_a_window_must_be_positive(window_s: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        LogWindows(window_s)


def test_lines_say_how_many_were_dropped(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("test.malformed"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.malformed"):
        for i in range(313):
            now[0] = i * 0.01
            log.malformed("grpc", "malformed gRPC request from %s", f"peer{i}")
        now[0] = 10.5
        assert log.malformed("grpc", "malformed gRPC request from %s", "late")
        log.malformed("grpc", "malformed gRPC request from %s", "dropped")
        log.flush()
    assert caplog.messages == [
        "malformed gRPC request from peer0",
        "malformed gRPC request from late (dropped 312 malformed requests from grpc in the last 10 s)",
        "dropped 1 malformed requests from grpc since the last report",
    ]
