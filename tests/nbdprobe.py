"""What the NBD tests share: a two-agent cluster, controller and export calls, qemu-io, and a raw
NBD client written from the protocol document (independent of agent/nbd)."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from orchctl.localcluster import LocalCluster
from proto.v1 import agent_pb2, migration_pb2

MiB = 1 << 20


def two_agents() -> Iterator[LocalCluster]:
    """etcd, an orchestrator and agents n1, n2, for a module-scoped fixture; stopped by pid after."""
    with LocalCluster() as c:
        c.start_etcd()
        c.start_orchestrator()
        c.start_agents(["n1", "n2"])
        yield c


def create(cluster: LocalCluster, cid: str, namespace_bytes: int = 16 * MiB, node: str = "n1") -> None:
    channel, stub = cluster.agent_stub(node)
    with channel:
        stub.CreateController(agent_pb2.CreateControllerRequest(controller_id=cid, namespace_bytes=namespace_bytes),
                              timeout=30)


def export(cluster: LocalCluster, cid: str) -> migration_pb2.ControllerExport:
    channel, api = cluster.migration_stub()
    with channel:
        return api.ExportController(migration_pb2.ExportControllerRequest(controller_id=cid), timeout=15)


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def host_port_name(uri: str) -> tuple[str, int, str]:
    """nbd:// or nbds:// HOST:PORT/NAME, split."""
    host_port, _, name = uri.split("://", 1)[1].partition("/")
    host, _, port = host_port.rpartition(":")
    return host, int(port), name


def qemu_x509_dir(pki: Path, stem: str, into: Path) -> Path:
    """A directory as qemu's tls-creds-x509 (endpoint=client) and libnbd's tls-certificates
    want it, made of links to `orchctl certs` files: the CA and identity `stem`'s certificate."""
    into.mkdir(parents=True, exist_ok=True)
    for link, target in (("ca-cert.pem", "ca.pem"), ("client-cert.pem", f"{stem}.pem"),
                         ("client-key.pem", f"{stem}.key")):
        (into / link).symlink_to(pki / target)
    return into


def qemu_io_tls(uri: str, x509_dir: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    """qemu-io over TLS: qemu takes no nbds:// URI, so the export is given as block options."""
    host, port, name = host_port_name(uri)
    argv = ["qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={x509_dir},endpoint=client", "--image-opts",
            f"driver=nbd,host={host},port={port},export={name},tls-creds=tls0"]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


class RawNbd:
    """A minimal NBD client written from the protocol document (independent of agent/nbd)."""

    def __init__(self, uri: str) -> None:
        host, port, _ = host_port_name(uri)
        self.host = host
        self.sock: socket.socket = socket.create_connection((host, port), timeout=10)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (0x4E42444D41474943, 0x49484156454F5054) and flags & 1
        self.sock.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
        self.cookie = 0

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"server closed the connection after {len(data)} of {n} bytes")
            data += chunk
        return data

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Replies up to and including the final ACK or error."""
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, option, len(data)) + data)
        replies = []
        while True:
            magic, _opt, kind, length = struct.unpack(">QIII", self.recv(20))
            assert magic == 0x3E889045565A9
            replies.append((kind, self.recv(length)))
            if kind == 1 or kind & (1 << 31):
                return replies

    def start_tls(self, context: ssl.SSLContext) -> None:
        """NBD_OPT_STARTTLS, then the handshake (ssl.SSLError when the server refuses it)."""
        ((kind, _),) = self.option(5)
        assert kind == 1, f"NBD_OPT_STARTTLS answered {kind:#x}"
        self.sock = context.wrap_socket(self.sock, server_hostname=self.host)

    def go(self, name: str) -> list[tuple[int, bytes]]:
        raw = name.encode()
        return self.option(7, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))

    def request(self, command: int, offset: int, length: int, payload: bytes = b"", flags: int = 0
                ) -> tuple[int, bytes]:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, flags, command, self.cookie, offset, length) + payload)
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698 and cookie == self.cookie
        data = self.recv(length) if command == 0 and error == 0 else b""
        return error, data

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLEOFError):
            return True
