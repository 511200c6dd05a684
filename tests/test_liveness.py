"""When a node counts as lost (orchestrator.liveness): the grace window, then a ping."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from orchestrator.liveness import Liveness, default_grace_s, judge_node


class Row(NamedTuple):
    registered: bool
    missing_for_s: float
    last_address: str
    answered: bool | None
    verdict: Liveness


GRACE_S = 4.0
ADDRESS = "127.0.0.1:4000"

ROWS = {
    "registered: live, whatever else": Row(True, 100.0, "", False, Liveness.REGISTERED),
    "registered just now, never missing": Row(True, 0.0, ADDRESS, None, Liveness.REGISTERED),
    "just seen missing: in grace": Row(False, 0.0, ADDRESS, None, Liveness.IN_GRACE),
    "missing a little less than the grace window": Row(False, GRACE_S - 0.01, ADDRESS, None, Liveness.IN_GRACE),
    "in grace even with no address known (a new leader): waited for": Row(False, 1.0, "", None, Liveness.IN_GRACE),
    "in grace, a failed ping does not matter yet": Row(False, 1.0, ADDRESS, False, Liveness.IN_GRACE),
    "grace over: ping before deciding": Row(False, GRACE_S, ADDRESS, None, Liveness.ASK),
    "grace over, answers the ping: alive": Row(False, GRACE_S + 60.0, ADDRESS, True, Liveness.ANSWERS),
    "grace over, silent: lost": Row(False, GRACE_S + 0.5, ADDRESS, False, Liveness.LOST),
    "grace over, no address ever known: lost": Row(False, GRACE_S + 0.5, "", None, Liveness.LOST),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_judge_node(row: Row) -> None:
    assert judge_node(registered=row.registered, missing_for_s=row.missing_for_s, grace_s=GRACE_S,
                      last_address=row.last_address, answered=row.answered) is row.verdict


@pytest.mark.parametrize("missing_for_s", [0.0, 0.5, 3.0, 6.99])
def test_never_lost_within_the_default_grace_whatever_the_ping(missing_for_s: float) -> None:
    grace_s = default_grace_s(5)
    for answered in (None, True, False):
        for address in ("", ADDRESS):
            assert judge_node(registered=False, missing_for_s=missing_for_s, grace_s=grace_s,
                              last_address=address, answered=answered) is Liveness.IN_GRACE


def test_default_grace_outlasts_the_lease_ttl() -> None:
    assert default_grace_s(5) == 7.0
    assert default_grace_s(2) > 2


def test_lost_only_when_missing_past_grace_and_silent() -> None:
    for registered in (True, False):
        for missing_for_s in (0.0, GRACE_S - 1, GRACE_S, GRACE_S + 10):
            for address in ("", ADDRESS):
                for answered in (None, True, False):
                    verdict = judge_node(registered=registered, missing_for_s=missing_for_s, grace_s=GRACE_S,
                                         last_address=address, answered=answered)
                    lost = verdict is Liveness.LOST
                    assert lost == (not registered and missing_for_s >= GRACE_S
                                    and (not address or answered is False)), (registered, missing_for_s, address,
                                                                             answered, verdict)
