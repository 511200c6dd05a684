"""Exceptions raised by the emulated controller (re-exported from ``agent.emulated.controller``)."""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every error the emulated controller raises on purpose."""


class WrongStateError(ControllerError):
    """The call is not allowed in the controller's current VFIO state."""


class NotRunningError(WrongStateError):
    """Guest I/O while the controller is not RUNNING or PRE_COPY (it is suspended or resuming)."""


class ControllerGoneError(ControllerError):
    """The controller was released (sanitized) or closed; it cannot be used any more."""


class StateFormatError(ControllerError):
    """A controller-state blob is malformed, of an unsupported version, or for another controller."""


class LbaOutOfRangeError(ControllerError):
    """An LBA or byte range lies outside the namespace."""
