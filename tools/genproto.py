"""Generates the Python stubs for proto/v1/*.proto: the one command that makes them.

Run from anywhere: `python tools/genproto.py`. With `--check` it regenerates into a temporary
folder and exits 1 when the committed stubs differ (CI and a test run it).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_root: Path) -> list[Path]:
    sources = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(s.relative_to(ROOT)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return [p for p in (out_root / "proto" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed stubs drift")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        if args.check:
            drifted = [
                p.name for p in produced
                if not (PROTO_DIR / p.name).exists() or not filecmp.cmp(p, PROTO_DIR / p.name, shallow=False)
            ]
            if drifted:
                print(f"generated stubs drift from the .proto files: {', '.join(sorted(drifted))}; "
                      "run `python tools/genproto.py` and commit", file=sys.stderr)
                return 1
            print("generated stubs match the .proto files")
            return 0
        for p in produced:
            shutil.copyfile(p, PROTO_DIR / p.name)
        print(f"wrote {len(produced)} files to {PROTO_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
