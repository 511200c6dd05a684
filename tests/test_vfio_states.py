"""Table-driven tests of the VFIO migration state machine against hand-written expected paths.

The expected chains below were written from the arcs the kernel documents in the comment above
``vfio_mig_get_next_state()`` (and its list of multi-step combinations), not generated from the
module's table, so a transcription error in either shows up here.
"""

from __future__ import annotations

import itertools

import pytest

from agent.vfio_states import (
    DEFAULT_FEATURES,
    IllegalTransition,
    VfioState,
    next_step,
    path,
    supported_states,
)

S = VfioState
NONE: frozenset[str] = frozenset()
P2P = frozenset({"P2P"})
PRE = frozenset({"PRE_COPY"})
BOTH = frozenset({"P2P", "PRE_COPY"})

_ABBREV = {
    "STOP": S.STOP,
    "RUN": S.RUNNING,
    "SC": S.STOP_COPY,
    "RES": S.RESUMING,
    "RP2P": S.RUNNING_P2P,
    "PC": S.PRE_COPY,
    "PCP2P": S.PRE_COPY_P2P,
}


def _chain(text: str) -> list[VfioState]:
    return [_ABBREV[name] for name in text.split(">")]


# Each line: "FROM>...>TO" is the full chain of states the kernel walks.  Pairs absent from a
# table (other than FROM == TO) must be refused.
EXPECTED: dict[frozenset[str], list[str]] = {
    NONE: [
        "STOP>RUN", "STOP>SC", "STOP>RES",
        "RUN>STOP", "RUN>STOP>SC", "RUN>STOP>RES",
        "SC>STOP", "SC>STOP>RUN", "SC>STOP>RES",
        "RES>STOP", "RES>STOP>RUN", "RES>STOP>SC",
    ],
    PRE: [
        "STOP>RUN", "STOP>SC", "STOP>RES", "STOP>RUN>PC",
        "RUN>STOP", "RUN>STOP>SC", "RUN>STOP>RES", "RUN>PC",
        "PC>RUN>STOP", "PC>RUN", "PC>SC", "PC>RUN>STOP>RES",
        "SC>STOP", "SC>STOP>RUN", "SC>STOP>RES",
        "RES>STOP", "RES>STOP>RUN", "RES>STOP>RUN>PC", "RES>STOP>SC",
    ],
    P2P: [
        "STOP>RP2P>RUN", "STOP>SC", "STOP>RES", "STOP>RP2P",
        "RUN>RP2P>STOP", "RUN>RP2P>STOP>SC", "RUN>RP2P>STOP>RES", "RUN>RP2P",
        "SC>STOP", "SC>STOP>RP2P>RUN", "SC>STOP>RES", "SC>STOP>RP2P",
        "RES>STOP", "RES>STOP>RP2P>RUN", "RES>STOP>SC", "RES>STOP>RP2P",
        "RP2P>STOP", "RP2P>RUN", "RP2P>STOP>SC", "RP2P>STOP>RES",
    ],
    BOTH: [
        "STOP>RP2P>RUN", "STOP>SC", "STOP>RES", "STOP>RP2P", "STOP>RP2P>RUN>PC", "STOP>RP2P>PCP2P",
        "RUN>RP2P>STOP", "RUN>RP2P>STOP>SC", "RUN>RP2P>STOP>RES", "RUN>RP2P", "RUN>PC",
        "RUN>RP2P>PCP2P",
        "PC>RUN>RP2P>STOP", "PC>RUN", "PC>PCP2P>SC", "PC>RUN>RP2P>STOP>RES", "PC>RUN>RP2P",
        "PC>PCP2P",
        "PCP2P>RP2P>STOP", "PCP2P>RP2P>RUN", "PCP2P>PC", "PCP2P>SC", "PCP2P>RP2P>STOP>RES",
        "PCP2P>RP2P",
        "SC>STOP", "SC>STOP>RP2P>RUN", "SC>STOP>RES", "SC>STOP>RP2P",
        "RES>STOP", "RES>STOP>RP2P>RUN", "RES>STOP>RP2P>RUN>PC", "RES>STOP>RP2P>PCP2P",
        "RES>STOP>SC", "RES>STOP>RP2P",
        "RP2P>STOP", "RP2P>RUN", "RP2P>RUN>PC", "RP2P>PCP2P", "RP2P>STOP>SC", "RP2P>STOP>RES",
    ],
}

# Single arcs a driver implements, per the kernel comment (mandatory, P2P, PRE_COPY, both, none).
ARCS: dict[frozenset[str], set[tuple[VfioState, VfioState]]] = {}
_MANDATORY = {(S.RESUMING, S.STOP), (S.STOP, S.RESUMING), (S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP)}
_P2P_ARCS = {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING), (S.RUNNING_P2P, S.STOP),
             (S.STOP, S.RUNNING_P2P)}
_NO_P2P_ARCS = {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
_PRE_ARCS = {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING)}
ARCS[NONE] = _MANDATORY | _NO_P2P_ARCS
ARCS[P2P] = _MANDATORY | _P2P_ARCS
ARCS[PRE] = _MANDATORY | _NO_P2P_ARCS | _PRE_ARCS | {(S.PRE_COPY, S.STOP_COPY)}
ARCS[BOTH] = _MANDATORY | _P2P_ARCS | _PRE_ARCS | {
    (S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY), (S.PRE_COPY_P2P, S.RUNNING_P2P),
    (S.PRE_COPY_P2P, S.STOP_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P),
}

CASES = [
    pytest.param(features, cur, new, id=f"{'+'.join(sorted(features)) or 'none'}:{cur.name}->{new.name}")
    for features in EXPECTED
    for cur, new in itertools.product(S, S)
]


def _expected_chain(features: frozenset[str], cur: VfioState, new: VfioState) -> list[VfioState] | None:
    for text in EXPECTED[features]:
        chain = _chain(text)
        if chain[0] is cur and chain[-1] is new:
            return chain
    return None


def test_expected_tables_have_one_chain_per_pair() -> None:
    for features, lines in EXPECTED.items():
        ends = [(_chain(t)[0], _chain(t)[-1]) for t in lines]
        assert len(ends) == len(set(ends)), f"duplicate pair in the {sorted(features)} table"


@pytest.mark.parametrize(("features", "cur", "new"), CASES)
def test_every_pair(features: frozenset[str], cur: VfioState, new: VfioState) -> None:
    states = set(supported_states(features))
    chain = _expected_chain(features, cur, new)
    if cur in states and new in states and cur is new:
        assert path(cur, new, features) == []
        assert next_step(cur, new, features) is cur
    elif chain is not None:
        assert path(cur, new, features) == chain[1:]
        assert next_step(cur, new, features) is chain[1]
        for a, b in itertools.pairwise(chain):
            assert (a, b) in ARCS[features], f"{a.name}->{b.name} is not an arc the driver implements"
    else:
        with pytest.raises(IllegalTransition) as info:
            path(cur, new, features)
        assert cur.name in str(info.value)
        assert new.name in str(info.value)
        with pytest.raises(IllegalTransition):
            next_step(cur, new, features)


def test_supported_states() -> None:
    assert supported_states(NONE) == [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING]
    assert supported_states(PRE) == [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY]
    assert supported_states(P2P) == [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P]
    assert S.ERROR not in supported_states(BOTH)
    assert len(supported_states(BOTH)) == 7
    assert DEFAULT_FEATURES == PRE


def test_messages_say_why() -> None:
    with pytest.raises(IllegalTransition, match="ERROR cannot be entered"):
        path(S.RUNNING, S.ERROR, BOTH)
    with pytest.raises(IllegalTransition, match="has no RUNNING_P2P state"):
        path(S.RUNNING, S.RUNNING_P2P, PRE)
    with pytest.raises(IllegalTransition, match="no such path"):
        path(S.STOP_COPY, S.PRE_COPY, PRE)


def test_unknown_feature_is_refused() -> None:
    with pytest.raises(ValueError, match="'DIRTY'"):
        path(S.STOP, S.RUNNING, frozenset({"DIRTY"}))


def test_numbers_match_the_uapi() -> None:
    assert [int(s) for s in (S.ERROR, S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P,
                             S.PRE_COPY, S.PRE_COPY_P2P)] == list(range(8))
