"""The errors a migratable controller raises on purpose, whatever its backend.

Callers branch on these types (never on message text): the agent maps them to session errors,
the NBD server waits out a ``NotRunningError`` and hangs up on a ``ControllerGoneError``.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every error a controller raises on purpose."""


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


class DeviceCommandError(ControllerError):
    """The device (or the kernel in front of it) refused a command; the message says which and why."""
