"""The clock step of the e2e matrix: the offset file libfaketime reads, and a real process under
libfaketime whose wall clock steps when the file changes while its monotonic clock does not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.clockstep import FaketimeMissing, faketime_env, find_libfaketime, offset_text, write_offset


def test_offset_text_is_a_signed_number_of_seconds() -> None:
    assert offset_text(120) == "+120"
    assert offset_text(-120) == "-120"
    assert offset_text(0) == "+0"
    assert offset_text(1.5) == "+1.5"
    assert offset_text(-0.25) == "-0.25"
    with pytest.raises(ValueError, match="not a number"):
        offset_text(float("nan"))
    with pytest.raises(ValueError, match="not a number"):
        offset_text(float("inf"))


def test_write_offset_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "clock"
    write_offset(path, 120)
    assert path.read_text() == "+120\n"
    write_offset(path, -120)
    assert path.read_text() == "-120\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clock"]  # no temporary left behind


def test_faketime_env_preloads_the_library_and_leaves_the_monotonic_clock(tmp_path: Path) -> None:
    env = faketime_env(Path("/lib/libfaketime.so.1"), tmp_path / "clock")
    assert env["LD_PRELOAD"].split()[0] == "/lib/libfaketime.so.1"
    assert env["FAKETIME_TIMESTAMP_FILE"] == str(tmp_path / "clock")
    assert env["FAKETIME_NO_CACHE"] == "1"
    assert env["FAKETIME_DONT_FAKE_MONOTONIC"] == "1"


# A child that answers each line on stdin with its wall and monotonic clocks.
_CLOCKS = "import sys, time\nfor _ in sys.stdin:\n    print(time.time(), time.monotonic(), flush=True)\n"


def test_a_process_under_faketime_steps_its_wall_clock_and_not_its_monotonic_clock(tmp_path: Path) -> None:
    try:
        library = find_libfaketime()
    except FaketimeMissing as exc:
        pytest.skip(str(exc))
    clock = tmp_path / "clock"
    write_offset(clock, 0)
    child = subprocess.Popen([sys.executable, "-c", _CLOCKS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, **faketime_env(library, clock)})
    assert child.stdin is not None and child.stdout is not None

    def ask() -> tuple[float, float, float]:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("?\n")
        child.stdin.flush()
        wall, mono = (float(x) for x in child.stdout.readline().split())
        return wall, mono, time.time()

    try:
        wall0, mono0, real0 = ask()
        assert abs(wall0 - real0) < 5
        write_offset(clock, 120)
        wall1, mono1, real1 = ask()
        assert 115 < wall1 - real1 < 125
        assert 0 <= mono1 - mono0 < 5
        write_offset(clock, -120)
        wall2, mono2, real2 = ask()
        assert -125 < wall2 - real2 < -115
        assert 0 <= mono2 - mono1 < 5
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert child.returncode == 0
