"""Garbage at listening ports: what a port scanner, a confused client or a broken peer sends.

Where: the TCP ports a process listens on, read from /proc (the process's own network
namespace's /proc/PID/net/tcp{,6}, matched to the socket inodes among its /proc/PID/fd), so
every listener counts, also ones no registry names (data plane, NBD, metrics).

What, per port and round: random bytes; an HTTP/2 client preface followed by malformed frames;
and a well-formed gRPC call to a real method whose body is not a decodable protobuf (grpc's
generic `unary_unary` with no serializer sends the raw bytes). A server should drop each with
at most a short log line, never a traceback, and keep serving its real clients.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

TCP_LISTEN = "0A"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
UNDECODABLE_PROTOBUF = b"\xff\xff\xff"  # field number 0x1fffff.., its varint cut short
CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 0.5
GRPC_CALL_TIMEOUT_S = 2.0
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


# ---- where: listening sockets of a process ------------------------------------------------------


def _decode_address(hex_address: str) -> tuple[str, int]:
    """/proc/net/tcp's 'HEXIP:HEXPORT': the IP as 32-bit words in host (little-endian) order."""
    hex_ip, _, hex_port = hex_address.partition(":")
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), int(hex_port, 16)
    return str(ip), int(hex_port, 16)


def listening_sockets(table: str) -> dict[int, tuple[str, int]]:
    """Socket inode -> (ip, port) of every listening socket in a /proc/net/tcp or tcp6 table."""
    found: dict[int, tuple[str, int]] = {}
    for line in table.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or cols[3] != TCP_LISTEN:
            continue
        found[int(cols[9])] = _decode_address(cols[1])
    return found


def socket_inodes(fd_targets: Iterable[str]) -> set[int]:
    """The socket inodes among a process's fd link targets ('socket:[123]', '/dev/null', ...)."""
    return {int(m.group(1)) for t in fd_targets if (m := _SOCKET_LINK.fullmatch(t))}


def listening_addresses(pid: int, proc: Path = Path("/proc")) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on, in its own network namespace."""
    tables: dict[int, tuple[str, int]] = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            tables.update(listening_sockets((proc / str(pid) / "net" / name).read_text()))
    targets = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(proc / str(pid) / "fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(proc / str(pid) / "fd" / fd))
    return sorted({tables[i] for i in socket_inodes(targets) if i in tables})


def reachable_host(bound_ip: str, process_host: str) -> str:
    """Where to connect to a socket bound to `bound_ip` of a process whose address is
    `process_host`: a wildcard bind answers on the process's address."""
    return process_host if bound_ip in ("0.0.0.0", "::") else bound_ip


# ---- what: payloads -----------------------------------------------------------------------------


def h2_frame(frame_type: int, flags: int, stream_id: int, payload: bytes, length: int | None = None) -> bytes:
    """One HTTP/2 frame: 24-bit length (the payload's unless `length` lies), type, flags, 31-bit
    stream id, payload."""
    size = len(payload) if length is None else length
    if not 0 <= size < 1 << 24:
        raise ValueError(f"HTTP/2 frame length {size} does not fit 24 bits")
    return struct.pack(">I", size)[1:] + bytes([frame_type & 0xFF, flags & 0xFF]) + \
        struct.pack(">I", stream_id & 0x7FFFFFFF) + payload


def h2_junk(rng: random.Random) -> bytes:
    """A client preface, then frames a server must reject: SETTINGS of a length that is not a
    multiple of 6, HEADERS with a random header block, DATA on stream 0, a frame of an unknown
    type, and one that claims more bytes than follow."""
    junk = rng.randbytes
    return H2_PREFACE + b"".join((
        h2_frame(0x4, 0, 0, junk(5)),
        h2_frame(0x1, 0x4 | 0x1, 1, junk(rng.randint(1, 64))),
        h2_frame(0x0, 0, 0, junk(16)),
        h2_frame(rng.randint(0x20, 0xFF), rng.randint(0, 255), rng.randint(0, 1 << 31), junk(32)),
        h2_frame(0x0, 0, 3, junk(8), length=1 << 20),
    ))


# ---- the burst ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    owner: str  # the process, e.g. "n1" or "orch-2"
    host: str
    port: int
    grpc_method: str = ""  # a real method of the service there, when it is a gRPC port


@dataclass
class Tally:
    connections: int = 0
    refused: int = 0
    grpc_codes: dict[str, int] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.connections += other.connections
        self.refused += other.refused
        for code, n in other.grpc_codes.items():
            self.grpc_codes[code] = self.grpc_codes.get(code, 0) + n


def _send_raw(host: str, port: int, data: bytes, tally: Tally) -> None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as conn:
            tally.connections += 1
            with contextlib.suppress(OSError):
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                # read until the server closes (or a short while): it has handled the junk by then
                conn.settimeout(READ_TIMEOUT_S)
                while conn.recv(65536):
                    pass
    except OSError:
        tally.refused += 1


def _grpc_garbage(host: str, port: int, method: str, tally: Tally) -> None:
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(UNDECODABLE_PROTOBUF, timeout=GRPC_CALL_TIMEOUT_S)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name  # type: ignore[attr-defined]
    tally.grpc_codes[code] = tally.grpc_codes.get(code, 0) + 1


def throw(target: Target, until_monotonic: float, rng: random.Random, max_rounds: int = 20) -> Tally:
    """Rounds of random bytes, HTTP/2 junk and an undecodable gRPC call at one port until
    `until_monotonic` or `max_rounds`."""
    tally = Tally()
    method = target.grpc_method or "/grpc.health.v1.Health/Check"
    for _ in range(max_rounds):
        if time.monotonic() >= until_monotonic:
            break
        _send_raw(target.host, target.port, rng.randbytes(rng.randint(1, 4096)), tally)
        _send_raw(target.host, target.port, h2_junk(rng), tally)
        _grpc_garbage(target.host, target.port, method, tally)
    return tally


def burst(targets: list[Target], duration_s: float, seed: int = 1) -> dict[str, Tally]:
    """Every target at once, one thread each, for `duration_s`; the tally per owner."""
    until = time.monotonic() + duration_s
    results: dict[Target, Tally] = {}

    def one(index: int, target: Target) -> None:
        results[target] = throw(target, until, random.Random(seed * 1000 + index))

    threads = [threading.Thread(target=one, args=(i, t), name=f"garbage-{t.owner}-{t.port}", daemon=True)
               for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + 60)
    by_owner: dict[str, Tally] = {}
    for target, tally in results.items():
        by_owner.setdefault(target.owner, Tally()).add(tally)
    return by_owner


# ---- the verdict --------------------------------------------------------------------------------


def burst_log_problems(new_lines: dict[str, list[str]], max_lines: int) -> list[str]:
    """What the processes logged while garbage arrived: more than `max_lines` lines, or a
    traceback, is a problem (a log an attacker or a broken client can flood)."""
    problems = []
    for name, lines in sorted(new_lines.items()):
        tracebacks = sum("Traceback" in ln for ln in lines)
        if tracebacks:
            problems.append(f"{name} logged {tracebacks} traceback(s) in {len(lines)} lines during the garbage burst")
        elif len(lines) > max_lines:
            problems.append(f"{name} logged {len(lines)} lines during the garbage burst (at most {max_lines})")
    return problems
