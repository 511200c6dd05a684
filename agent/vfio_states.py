"""The VFIO migration state machine (Linux uAPI v2), as pure functions.

Every backend (emulated, nvme-passthru, vfio) is driven through these states, so the legal
moves live in one place.  The numbers are those of ``enum vfio_device_mig_state`` in
``include/uapi/linux/vfio.h``; the transition table is a transcription of
``vfio_mig_get_next_state()`` in ``drivers/vfio/vfio_main.c``, including its rule for optional
features: a state that needs a feature the device lacks is skipped over when it appears as an
intermediate step, and is invalid as a source or a target.
"""

from __future__ import annotations

from enum import IntEnum


class VfioState(IntEnum):
    """``enum vfio_device_mig_state``; the values are ABI and must not change."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


FEATURE_P2P = "P2P"
FEATURE_PRE_COPY = "PRE_COPY"
KNOWN_FEATURES: frozenset[str] = frozenset({FEATURE_P2P, FEATURE_PRE_COPY})
# What the emulated controller advertises: pre-copy (dirty tracking) but no peer-to-peer quiesce.
DEFAULT_FEATURES: frozenset[str] = frozenset({FEATURE_PRE_COPY})


class IllegalTransition(ValueError):
    """A requested state change that the VFIO state machine refuses (the kernel's -EINVAL)."""


_S = VfioState

# vfio_from_fsm_table[cur][new] -> next state on the way from cur to new.  Kept as in the kernel
# (rows and columns in the same order) so that it can be compared with the source line by line.
_NEXT: dict[VfioState, dict[VfioState, VfioState]] = {
    _S.STOP: {
        _S.STOP: _S.STOP,
        _S.RUNNING: _S.RUNNING_P2P,
        _S.PRE_COPY: _S.RUNNING_P2P,
        _S.PRE_COPY_P2P: _S.RUNNING_P2P,
        _S.STOP_COPY: _S.STOP_COPY,
        _S.RESUMING: _S.RESUMING,
        _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.ERROR: _S.ERROR,
    },
    _S.RUNNING: {
        _S.STOP: _S.RUNNING_P2P,
        _S.RUNNING: _S.RUNNING,
        _S.PRE_COPY: _S.PRE_COPY,
        _S.PRE_COPY_P2P: _S.RUNNING_P2P,
        _S.STOP_COPY: _S.RUNNING_P2P,
        _S.RESUMING: _S.RUNNING_P2P,
        _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.ERROR: _S.ERROR,
    },
    _S.PRE_COPY: {
        _S.STOP: _S.RUNNING,
        _S.RUNNING: _S.RUNNING,
        _S.PRE_COPY: _S.PRE_COPY,
        _S.PRE_COPY_P2P: _S.PRE_COPY_P2P,
        _S.STOP_COPY: _S.PRE_COPY_P2P,
        _S.RESUMING: _S.RUNNING,
        _S.RUNNING_P2P: _S.RUNNING,
        _S.ERROR: _S.ERROR,
    },
    _S.PRE_COPY_P2P: {
        _S.STOP: _S.RUNNING_P2P,
        _S.RUNNING: _S.RUNNING_P2P,
        _S.PRE_COPY: _S.PRE_COPY,
        _S.PRE_COPY_P2P: _S.PRE_COPY_P2P,
        _S.STOP_COPY: _S.STOP_COPY,
        _S.RESUMING: _S.RUNNING_P2P,
        _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.ERROR: _S.ERROR,
    },
    _S.STOP_COPY: {
        _S.STOP: _S.STOP,
        _S.RUNNING: _S.STOP,
        _S.PRE_COPY: _S.ERROR,
        _S.PRE_COPY_P2P: _S.ERROR,
        _S.STOP_COPY: _S.STOP_COPY,
        _S.RESUMING: _S.STOP,
        _S.RUNNING_P2P: _S.STOP,
        _S.ERROR: _S.ERROR,
    },
    _S.RESUMING: {
        _S.STOP: _S.STOP,
        _S.RUNNING: _S.STOP,
        _S.PRE_COPY: _S.STOP,
        _S.PRE_COPY_P2P: _S.STOP,
        _S.STOP_COPY: _S.STOP,
        _S.RESUMING: _S.RESUMING,
        _S.RUNNING_P2P: _S.STOP,
        _S.ERROR: _S.ERROR,
    },
    _S.RUNNING_P2P: {
        _S.STOP: _S.STOP,
        _S.RUNNING: _S.RUNNING,
        _S.PRE_COPY: _S.RUNNING,
        _S.PRE_COPY_P2P: _S.PRE_COPY_P2P,
        _S.STOP_COPY: _S.STOP,
        _S.RESUMING: _S.STOP,
        _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.ERROR: _S.ERROR,
    },
    _S.ERROR: {target: _S.ERROR for target in _S},
}

# state_flags_table: the features a state needs.  STOP_COPY support is mandatory in the uAPI, so
# it is implied here rather than spelled as a feature.  ERROR needs "everything" (~0U in the
# kernel), which makes it invalid both as a source and as a target.
_NEEDS: dict[VfioState, frozenset[str]] = {
    _S.STOP: frozenset(),
    _S.RUNNING: frozenset(),
    _S.STOP_COPY: frozenset(),
    _S.RESUMING: frozenset(),
    _S.RUNNING_P2P: frozenset({FEATURE_P2P}),
    _S.PRE_COPY: frozenset({FEATURE_PRE_COPY}),
    _S.PRE_COPY_P2P: frozenset({FEATURE_P2P, FEATURE_PRE_COPY}),
}


def _check_features(features: frozenset[str]) -> None:
    unknown = set(features) - KNOWN_FEATURES
    if unknown:
        raise ValueError(
            f"unknown migration feature(s) {sorted(unknown)}; known features are {sorted(KNOWN_FEATURES)}"
        )


def is_supported(state: VfioState, features: frozenset[str]) -> bool:
    """Whether a device with ``features`` can be in ``state`` (ERROR is never requestable)."""
    _check_features(features)
    needs = _NEEDS.get(VfioState(state))
    return needs is not None and needs <= features


def supported_states(features: frozenset[str]) -> list[VfioState]:
    """The states a device with ``features`` can be asked to enter, in numeric order."""
    return [s for s in VfioState if is_supported(s, features)]


def _describe(features: frozenset[str]) -> str:
    return "{" + ", ".join(sorted(features)) + "}"


def next_step(cur: VfioState, new: VfioState, features: frozenset[str]) -> VfioState:
    """The kernel's next state on the way from ``cur`` to ``new`` (``cur`` itself when equal)."""
    cur, new = VfioState(cur), VfioState(new)
    for role, state in (("current", cur), ("target", new)):
        if not is_supported(state, features):
            if state is VfioState.ERROR:
                hint = "ERROR cannot be entered or left by request; reset the device instead"
            else:
                hint = f"a device with features {_describe(features)} has no {state.name} state"
            raise IllegalTransition(f"cannot move from {cur.name} to {new.name}: {role} state {hint}")
    step = _NEXT[cur][new]
    # Arcs touching unsupported optional states are skipped: the driver sees one arc from the
    # original state to the next supported state on the way.
    while not is_supported(step, features) and step is not VfioState.ERROR:
        step = _NEXT[step][new]
    if step is VfioState.ERROR:
        raise IllegalTransition(
            f"cannot move from {cur.name} to {new.name}: the VFIO state machine has no such path "
            f"(features {_describe(features)})"
        )
    return step


def path(cur: VfioState, new: VfioState, features: frozenset[str]) -> list[VfioState]:
    """The states visited after ``cur`` on the way to ``new``, ending with ``new``.

    Each consecutive pair (starting with ``cur``) is one arc the driver must implement.  The
    list is empty when ``cur == new``.
    """
    cur, new = VfioState(cur), VfioState(new)
    steps: list[VfioState] = []
    state = cur
    # Validate even a no-op request, as the kernel does.
    next_step(cur, new, features)
    while state is not new:
        state = next_step(state, new, features)
        steps.append(state)
        if len(steps) > len(VfioState):
            raise AssertionError(f"transition table loops between {cur.name} and {new.name}")
    return steps
