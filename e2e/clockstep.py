"""A wall-clock step for chosen processes, without touching the machine's clock: libfaketime
(Debian package `faketime`) preloaded into each process, reading its offset from a file.

A process started with `faketime_env(library, offset_file)` reads the file on every time call
(FAKETIME_NO_CACHE=1), so writing "+120" into it steps that process's wall clock (time.time(),
datetime.now(), log timestamps) 120 s forward at once, as an NTP step would; "-120" steps it
back. CLOCK_MONOTONIC is left alone (FAKETIME_DONT_FAKE_MONOTONIC=1): a real step does not move
it either. The file format is the FAKETIME variable's "relative offset" form: a sign, then
seconds (libfaketime's README, "4d) Using offsets for relative dates").

Known limit of libfaketime 0.9.10 (Debian 12): with the monotonic clock left alone, an absolute
`clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)` is still converted and fails with EINVAL
(wolfcw/libfaketime#426), and Python 3.11's `time.sleep` makes exactly that call. Event waits,
lock and queue timeouts, select and asyncio are unaffected; the orchestrator never calls
`time.sleep`, so it runs unchanged under it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

LIBRARY_NAME = "libfaketime.so.1"
# Debian's multiarch directory first, then what other layouts use
_SEARCH = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
           "/usr/lib64/faketime/libfaketime.so.1", "/usr/local/lib/faketime/libfaketime.so.1")


class FaketimeMissing(Exception):
    pass


def find_libfaketime() -> Path:
    """The libfaketime library to preload; FaketimeMissing says how to install it."""
    for pattern in _SEARCH:
        for found in sorted(glob.glob(pattern)):
            if os.path.isfile(found):
                return Path(found)
    if shutil.which("dpkg"):
        done = subprocess.run(["dpkg", "-L", "libfaketime"], capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            if line.endswith("/" + LIBRARY_NAME) and os.path.isfile(line):
                return Path(line)
    raise FaketimeMissing(f"{LIBRARY_NAME} not found: install the Debian package `faketime` "
                          "(apt-get install faketime) for the clock-step faults")


def offset_text(offset_s: float) -> str:
    """The offset line libfaketime reads: '+120', '-120', '+0', '+1.5' (seconds)."""
    if offset_s != offset_s or offset_s in (float("inf"), float("-inf")):
        raise ValueError(f"clock offset {offset_s!r} is not a number of seconds")
    number = f"{abs(offset_s):.6f}".rstrip("0").rstrip(".")
    return ("-" if offset_s < 0 else "+") + number


def write_offset(path: Path, offset_s: float) -> None:
    """Replaces the offset file in one rename: a process reading it on every time call must never
    see it half written (an empty or partial line would be a different clock)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(offset_text(offset_s) + "\n")
    os.replace(tmp, path)


def faketime_env(library: Path, offset_file: Path) -> dict[str, str]:
    """The environment that puts a process's wall clock under `offset_file`."""
    preload = os.environ.get("LD_PRELOAD", "")
    return {
        "LD_PRELOAD": f"{library} {preload}".strip(),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",  # read the file on every call: the step lands at once
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # an NTP step does not move CLOCK_MONOTONIC
    }
