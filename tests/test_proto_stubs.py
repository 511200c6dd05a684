"""The generated stubs are exactly what the one generator command makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto_files() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "genproto.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_check_notices_drift(tmp_path: Path) -> None:
    # A stub edited by hand is what the check exists to catch: make one and expect a failure.
    stub = ROOT / "proto" / "v1" / "agent_pb2.pyi"
    original = stub.read_bytes()
    try:
        stub.write_bytes(original + b"\n# edited by hand\n")
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "genproto.py"), "--check"],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 1 and "agent_pb2.pyi" in done.stderr
    finally:
        stub.write_bytes(original)
