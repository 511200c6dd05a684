"""The e2e garbage thrower's pure parts: which ports a process listens on (from /proc tables),
the HTTP/2 junk it sends, and the verdict on what processes logged meanwhile; and one real
burst at a real socket, to show the thrower connects and sends what it says."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading

import pytest

from e2e.garbage import (
    H2_PREFACE,
    Target,
    burst,
    burst_log_problems,
    h2_frame,
    h2_junk,
    listening_addresses,
    listening_sockets,
    reachable_host,
    socket_inodes,
)


def _row(sl: int, local: str, remote: str, state: str, inode: int) -> str:
    """One line of /proc/net/tcp{,6}, columns as the kernel prints them."""
    return (f"  {sl:3d}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 "
            "0000000068cfb8b0 100 0 0 10 0")


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
ZERO6 = "0" * 32
TCP4 = "\n".join([
    HEADER,
    _row(0, "0100007F:87B3", "00000000:0000", "0A", 31974),
    _row(1, "0B004D0A:0CEA", "00000000:0000", "0A", 40001),
    _row(2, "0100007F:87B3", "0100007F:D3A2", "01", 40002),  # an established connection
    _row(3, "00000000:1F90", "00000000:0000", "0A", 40003),
]) + "\n"
TCP6 = "\n".join([
    HEADER,
    _row(0, "0000000000000000FFFF00000100007F:862D", f"{ZERO6}:0000", "0A", 37016),
    _row(1, "00000000000000000000000001000000:0050", f"{ZERO6}:0000", "0A", 37017),
    _row(2, f"{ZERO6}:01BB", f"{ZERO6}:0000", "0A", 37018),
]) + "\n"


def test_listening_sockets_of_a_tcp_table_decode_little_endian_addresses_and_skip_other_states() -> None:
    assert listening_sockets(TCP4) == {
        31974: ("127.0.0.1", 0x87B3),
        40001: ("10.77.0.11", 3306),
        40003: ("0.0.0.0", 8080),
    }


def test_listening_sockets_of_a_tcp6_table_unmap_ipv4_and_read_ipv6() -> None:
    assert listening_sockets(TCP6) == {
        37016: ("127.0.0.1", 0x862D),
        37017: ("::1", 80),
        37018: ("::", 443),
    }


def test_listening_sockets_ignores_headers_blank_and_short_lines() -> None:
    assert listening_sockets("") == {}
    assert listening_sockets(TCP4.splitlines()[0] + "\n\n   7: garbage\n") == {}


def test_socket_inodes_are_read_from_socket_links_only() -> None:
    links = ["/dev/null", "socket:[31974]", "pipe:[37821]", "socket:[40001]", "anon_inode:[eventpoll]", "socket:[x]"]
    assert socket_inodes(links) == {31974, 40001}


def test_a_wildcard_bind_is_reached_at_the_process_address() -> None:
    assert reachable_host("0.0.0.0", "10.77.0.12") == "10.77.0.12"
    assert reachable_host("::", "10.77.0.12") == "10.77.0.12"
    assert reachable_host("10.77.0.13", "10.77.0.12") == "10.77.0.13"


def test_listening_addresses_of_this_process_finds_a_socket_it_listens_on() -> None:
    import os
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert ("127.0.0.1", port) in listening_addresses(os.getpid())
    assert ("127.0.0.1", port) not in listening_addresses(os.getpid())


def test_h2_frame_header_is_length_type_flags_stream() -> None:
    frame = h2_frame(0x4, 0x1, 3, b"abcde")
    assert frame[:3] == b"\x00\x00\x05"
    assert frame[3:5] == b"\x04\x01"
    assert struct.unpack(">I", frame[5:9])[0] == 3
    assert frame[9:] == b"abcde"
    assert h2_frame(0, 0, 1, b"x", length=1 << 20)[:3] == b"\x10\x00\x00"  # a length that lies
    assert struct.unpack(">I", h2_frame(0, 0, 0xFFFFFFFF, b"")[5:9])[0] == 0x7FFFFFFF  # reserved bit cleared
    with pytest.raises(ValueError, match="24 bits"):
        h2_frame(0, 0, 1, b"", length=1 << 24)


def test_h2_junk_starts_with_the_client_preface_then_a_malformed_settings_frame() -> None:
    junk = h2_junk(random.Random(3))
    assert junk.startswith(H2_PREFACE)
    settings = junk[len(H2_PREFACE):]
    assert settings[3] == 0x4 and int.from_bytes(settings[:3], "big") == 5  # not a multiple of 6
    assert junk != h2_junk(random.Random(4))
    assert junk == h2_junk(random.Random(3))


def test_burst_log_problems_counts_lines_and_flags_tracebacks() -> None:
    quiet = {"n1": ["one line"], "orch-1": []}
    assert burst_log_problems(quiet, max_lines=20) == []
    loud = {"n2": [f"line {i}" for i in range(21)], "orch-2": ["x", "Traceback (most recent call last):", "y"]}
    problems = burst_log_problems(loud, max_lines=20)
    assert problems == ["n2 logged 21 lines during the garbage burst (at most 20)",
                        "orch-2 logged 1 traceback(s) in 3 lines during the garbage burst"]


def test_a_burst_reaches_a_real_listener_with_raw_bytes_and_the_h2_preface() -> None:
    received: list[bytes] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(10)
        port = server.getsockname()[1]
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(2)
                    chunks = []
                    # the gRPC client waits for a server preface that never comes: it times out
                    with contextlib.suppress(OSError):
                        while chunk := conn.recv(65536):
                            chunks.append(chunk)
                    received.append(b"".join(chunks))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        tallies = burst([Target("probe", "127.0.0.1", port)], duration_s=0.5)
        stop.set()
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone would not)
        thread.join(timeout=10)
    assert tallies["probe"].connections >= 2
    assert tallies["probe"].refused == 0
    assert sum(tallies["probe"].grpc_codes.values()) >= 1  # the gRPC call was made, and failed
    assert "OK" not in tallies["probe"].grpc_codes
    assert any(r.startswith(H2_PREFACE) for r in received)
    assert any(r and not r.startswith(H2_PREFACE) for r in received)
