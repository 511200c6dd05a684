"""README.md "Using it" runs as written: its code block, line by line, from an empty etcd.

Lines ending in `&` are started by this test, with the environment the shell has at that point
(each in a session of its own, stopped by pid at the end); after each, the test waits until that
program is ready (what someone typing waits for without noticing). Every other line runs in one
bash session, so `JOB=$(...)` carries over, one command at a time (`a; b` lines are split), and
each must exit 0. The ports and the /tmp dir the README names are moved to free ones in a temp
dir by `relocations`, the one place that rewrites the text; nothing else is changed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchctl.localcluster import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_ACTIVATE = Path(sys.prefix) / "bin" / "activate"
COMMAND_TIMEOUT_S = 300.0  # a migration of 64 MiB on a slow, shared machine, with room to spare
READY_TIMEOUT_S = 60.0


def using_it_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README.md's 'Using it' section has no ```sh block"
    return match.group(1)


def relocations(tmp: Path) -> dict[str, str]:
    """What the README names -> what this test uses instead: tests must not take fixed ports or
    share /tmp/nvmigrate with a person trying the README on the same machine. The venv is this
    interpreter's (its entry points run this checkout, through PYTHONPATH)."""
    return {
        "127.0.0.1:2379": f"127.0.0.1:{free_port()}",  # etcd clients
        "127.0.0.1:2380": f"127.0.0.1:{free_port()}",  # etcd peers
        "127.0.0.1:50051": f"127.0.0.1:{free_port()}",  # orchestrator gRPC (orchctl's default server)
        "127.0.0.1:9464": f"127.0.0.1:{free_port()}",  # orchestrator HTTP
        "/tmp/nvmigrate": str(tmp / "nvmigrate"),
        ". .venv/bin/activate": f". {VENV_ACTIVATE}",
    }


def commands(line: str) -> list[str]:
    """The commands of one README line: its comment dropped, split at top-level `; `."""
    line = re.sub(r"\s+#\s.*$", "", line).strip()
    return [c.strip() for c in line.split("; ") if c.strip()] if line else []


def tcp_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


class Shell:
    """One bash session fed a command at a time; each command's output and exit code in files."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, text=True,
                                     cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.count = 0
        self.send("set -o pipefail")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def run(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S) -> tuple[int, str, str]:
        self.count += 1
        out, err, rc = (self.workdir / f"cmd{self.count}.{kind}" for kind in ("out", "err", "rc"))
        self.send(f"{command} >{out} 2>{err}; echo $? >{rc}.tmp; mv {rc}.tmp {rc}")
        deadline = time.monotonic() + timeout_s
        while not rc.exists():
            assert self.proc.poll() is None, f"the shell exited running {command!r}"
            assert time.monotonic() < deadline, f"{command!r} did not finish within {timeout_s:.0f} s"
            time.sleep(0.1)  # polling a file the shell writes when the command ends
        return int(rc.read_text()), out.read_text(), err.read_text()

    def environment(self) -> dict[str, str]:
        """The shell's exported variables now: what a job it started with `&` would inherit."""
        rc, out, err = self.run("env -0")
        assert rc == 0, err
        return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Background:
    """The processes the README starts with `&`, stopped by pid (their own session each)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"bg{len(self.procs) + 1}.log").open("wb")
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.workdir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((command, proc))
        return proc

    def wait_ready(self, command: str, proc: subprocess.Popen[bytes], etcd: str) -> None:
        argv = shlex.split(command)
        program = os.path.basename(argv[0])

        def option(name: str) -> str:
            return argv[argv.index(name) + 1]

        if program == "etcd":
            ready = lambda: tcp_open(option("--listen-client-urls").removeprefix("http://"))  # noqa: E731
        elif program == "nvmigrate-orchestrator":
            ready = lambda: tcp_open(option("--listen"))  # noqa: E731
        elif program == "nvmigrate-agent":
            key = f"/nvmigrate/nodes/{option('--name')}"
            ready = lambda: bool(subprocess.run(  # noqa: E731
                ["etcdctl", f"--endpoints={etcd}", "get", key, "--keys-only"], capture_output=True, text=True,
                timeout=30, env={"ETCDCTL_API": "3", "PATH": os.environ["PATH"]}).stdout.strip())
        else:
            raise AssertionError(f"the test does not know when {program!r} is ready; teach wait_ready")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():
            log = (self.workdir / f"bg{len(self.procs)}.log").read_text(errors="replace")[-2000:]
            assert proc.poll() is None, f"{command!r} exited ({proc.returncode}):\n{log}"
            assert time.monotonic() < deadline, f"{command!r} not ready within {READY_TIMEOUT_S:.0f} s:\n{log}"
            time.sleep(0.1)  # polling the condition above, with its deadline

    def stop(self) -> None:
        for _, proc in reversed(self.procs):  # agents and orchestrator before etcd
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server etcd-client)")
    if not VENV_ACTIVATE.exists():
        pytest.skip(f"not running from a virtual environment ({VENV_ACTIVATE} is missing)")
    yield tmp_path


def test_every_line_of_using_it_runs_as_written(workdir: Path) -> None:
    text = using_it_block()
    moves = relocations(workdir)
    for named in moves:
        assert named in text, f"README 'Using it' no longer names {named!r}: update relocations()"
    for named, instead in moves.items():
        text = text.replace(named, instead)
    orchestrator = moves["127.0.0.1:50051"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)  # the venv's entry points import this checkout
    # orchctl's default server is the README's 127.0.0.1:50051, moved above: point it there
    # the documented way (ORCHCTL_SERVER) instead of editing every orchctl line.
    env["ORCHCTL_SERVER"] = orchestrator
    env.pop("NVMIGRATE_ETCD", None)
    env.pop("NVMIGRATE_ETCD_PREFIX", None)

    background = Background(workdir)
    shell = Shell(workdir, env)
    ran: list[str] = []
    try:
        for line in text.splitlines():
            for command in commands(line):
                if command.endswith("&"):
                    command = command[:-1].strip()
                    proc = background.start(command, shell.environment())
                    background.wait_ready(command, proc, moves["127.0.0.1:2379"])
                    ran.append(f"{command} &")
                    continue
                rc, out, err = shell.run(command)
                assert rc == 0, f"README line {command!r} exited {rc}\nstdout:\n{out}\nstderr:\n{err}"
                ran.append(command)
        assert any(c.startswith("orchctl migrate c1 --to n2 --wait") for c in ran)
        # What the block claims: the migration completed, the cancelled one rolled back, c1 is gone.
        rc, out, err = shell.run("orchctl list -o json")
        assert rc == 0, err
        phases = [(m["destination_node"], m["phase"]) for m in json.loads(out)["migrations"]]
        assert phases == [("n2", "COMPLETED"), ("n1", "CANCELLED")], phases
        rc, out, err = shell.run("orchctl controllers -o json")
        assert rc == 0 and json.loads(out).get("controllers", []) == [], (out, err)
        assert not list((workdir / "nvmigrate" / "n2").glob("c1*.ns"))
    finally:
        shell.close()
        background.stop()
