"""fio as an NBD guest: builds fio command lines for a controller's nbd:// URI (fio's `nbd`
engine, libnbd underneath) and reads fio's JSON report.

Used by `orchctl demo --workload fio`, `e2e/perf_matrix.py` and the NBD tests. Data checks use
fio's own verification: a writer with `--verify=crc32c` stamps every block with a header and a
checksum; the same job with `--verify_only` later re-reads those blocks (anywhere the controller
runs by then) and fails on any block that is not what that writer wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

P99 = "99.000000"


class FioError(Exception):
    """fio is missing, or did not produce a report."""


@dataclass(frozen=True)
class FioJob:
    """One fio job over NBD; `argv()` is its command line."""

    uri: str
    size_bytes: int
    rw: str = "randwrite"
    block_bytes: int = 4096
    offset_bytes: int = 0
    iodepth: int = 1
    numjobs: int = 1
    verify: str = "crc32c"  # "" for none
    verify_only: bool = False
    do_verify: bool = True  # read back and check right after writing
    runtime_s: float = 0.0  # > 0: time based, for this long
    ramp_s: float = 0.0
    rate_iops: int = 0
    number_ios: int = 0  # > 0: stop after this many I/Os (with verify_only: check that many writes)
    name: str = "nbd"

    def argv(self) -> list[str]:
        args = [
            find_fio(), f"--name={self.name}", "--ioengine=nbd", f"--uri={self.uri}", f"--rw={self.rw}",
            f"--bs={self.block_bytes}", f"--size={self.size_bytes}", f"--offset={self.offset_bytes}",
            f"--iodepth={self.iodepth}", f"--numjobs={self.numjobs}", "--group_reporting", "--output-format=json",
        ]
        if self.verify:
            args += [f"--verify={self.verify}", f"--do_verify={int(self.do_verify)}"]
        if self.verify_only:
            args.append("--verify_only")
        if self.runtime_s > 0:
            args += ["--time_based", f"--runtime={self.runtime_s:g}s"]
        if self.ramp_s > 0:
            args.append(f"--ramp_time={self.ramp_s:g}s")
        if self.rate_iops:
            args.append(f"--rate_iops={self.rate_iops}")
        if self.number_ios:
            args.append(f"--number_ios={self.number_ios}")
        return args


@dataclass(frozen=True)
class FioIo:
    """One direction (read or write) of a report; latencies in microseconds."""

    ios: int  # issued, a failed one included
    ok_bytes: int  # completed without error
    iops: float
    bw_bytes_per_s: float
    lat_mean_us: float
    clat_p99_us: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FioIo:
        percentiles = data.get("clat_ns", {}).get("percentile", {})
        return cls(ios=int(data.get("total_ios", 0)), ok_bytes=int(data.get("io_bytes", 0)),
                   iops=float(data.get("iops", 0.0)),
                   bw_bytes_per_s=float(data.get("bw_bytes", 0.0)),
                   lat_mean_us=float(data.get("lat_ns", {}).get("mean", 0.0)) / 1000.0,
                   clat_p99_us=float(percentiles.get(P99, 0.0)) / 1000.0)


@dataclass(frozen=True)
class FioResult:
    returncode: int
    error: int  # errno of the first failure fio recorded (0: none); 84 (EILSEQ) is a verify failure
    read: FioIo
    write: FioIo
    cpu_usr_percent: float  # fio's own CPU use, of one core
    cpu_sys_percent: float
    messages: str  # fio's stderr and non-JSON stdout: verify failures, connection errors

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error == 0


def find_fio() -> str:
    path = shutil.which("fio")
    if path is None:
        raise FioError("fio is not installed: `apt-get install fio` (Debian) provides it")
    return path


def parse_report(returncode: int, stdout: str, stderr: str) -> FioResult:
    """fio prints notices ("fio: connected to NBD server") before its JSON on stdout."""
    start = stdout.find("{")
    if start < 0:
        raise FioError(f"fio exited with {returncode} and no report: {(stderr or stdout).strip()[-400:]}")
    report = json.loads(stdout[start:])
    job = report["jobs"][0]  # one entry per run: every job uses --group_reporting
    return FioResult(returncode=returncode, error=int(job.get("error", 0)),
                     read=FioIo.from_json(job.get("read", {})), write=FioIo.from_json(job.get("write", {})),
                     cpu_usr_percent=float(job.get("usr_cpu", 0.0)), cpu_sys_percent=float(job.get("sys_cpu", 0.0)),
                     messages=(stdout[:start] + stderr).strip())


def run(job: FioJob, timeout_s: float) -> FioResult:
    done = subprocess.run(job.argv(), capture_output=True, text=True, timeout=timeout_s, check=False)
    return parse_report(done.returncode, done.stdout, done.stderr)


def start(job: FioJob) -> subprocess.Popen[str]:
    """fio in the background; `finish()` collects it."""
    return subprocess.Popen(job.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[str], timeout_s: float) -> FioResult:
    stdout, stderr = proc.communicate(timeout=timeout_s)
    return parse_report(proc.returncode, stdout, stderr)

