"""NBD over TLS: an agent with the cluster's certificates serves its exports in the protocol's
TLS-required mode. Real clients (qemu-io with tls-creds-x509, nbdinfo and nbdcopy with nbds://)
against a real agent started with TLS; a raw client from the protocol document for the option
phase's rules; the rules themselves and `orchctl certs` hosts as pure tests."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.nbd import protocol as p
from agent.nbd.server import NbdServer
from agent.nbd.tls_policy import Action, TlsStage, Verdict, certificate_hosts, certificate_names_host, option_verdict
from cluster.grpc_tls import TlsFiles
from cluster.identity import Identity, Role, nbd_refusal
from cluster.ratelimited_log import LogWindows, malformed_input
from orchctl import certs
from orchctl.localcluster import LocalCluster
from tests.conftest import etcdctl, unique_prefix
from tests.nbdprobe import RawNbd, create, export, qemu_io, qemu_io_tls, qemu_x509_dir

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
KiB = 1 << 10
needs_clients = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("qemu-io", "nbdcopy", "nbdinfo")),
    reason="needs qemu-utils and libnbd-bin (scripts/setup.sh installs them)")
TLS_REQD = p.REP_ERR_TLS_REQD


# ---- the rules (pure) ---------------------------------------------------------------------------

REFUSED = "viewer/v may not use NBD exports"


@pytest.mark.parametrize(("stage", "option", "length", "refusal", "expected"), [
    # no TLS configured: as before
    (TlsStage.OFF, p.OPT_STARTTLS, 0, None, Verdict(Action.REPLY, p.REP_ERR_POLICY, "this server does not offer TLS")),
    (TlsStage.OFF, p.OPT_GO, 10, None, Verdict(Action.HANDLE)),
    (TlsStage.OFF, p.OPT_EXPORT_NAME, 2, None, Verdict(Action.HANDLE)),
    # TLS required, not negotiated
    (TlsStage.REQUIRED, p.OPT_STARTTLS, 0, None, Verdict(Action.START_TLS)),
    (TlsStage.REQUIRED, p.OPT_STARTTLS, 4, None, Verdict(Action.REPLY, p.REP_ERR_INVALID,
                                                         "NBD_OPT_STARTTLS takes no data")),
    (TlsStage.REQUIRED, p.OPT_ABORT, 0, None, Verdict(Action.HANDLE)),
    (TlsStage.REQUIRED, p.OPT_EXPORT_NAME, 2, None, Verdict(Action.HANG_UP)),
    *((TlsStage.REQUIRED, option, 0, None, "tls-required")
      for option in (p.OPT_LIST, p.OPT_INFO, p.OPT_GO, 8, 10, 999)),
    # TLS on, an identity that may use exports
    (TlsStage.ON, p.OPT_GO, 10, None, Verdict(Action.HANDLE)),
    (TlsStage.ON, p.OPT_LIST, 0, None, Verdict(Action.HANDLE)),
    (TlsStage.ON, p.OPT_EXPORT_NAME, 2, None, Verdict(Action.HANDLE)),
    (TlsStage.ON, p.OPT_STARTTLS, 0, None, Verdict(Action.REPLY, p.REP_ERR_INVALID,
                                                   "TLS is already on for this connection")),
    # TLS on, an identity that may not
    (TlsStage.ON, p.OPT_GO, 10, REFUSED, Verdict(Action.REPLY_AND_CLOSE, p.REP_ERR_POLICY, REFUSED)),
    (TlsStage.ON, p.OPT_INFO, 10, REFUSED, Verdict(Action.REPLY, p.REP_ERR_POLICY, REFUSED)),
    (TlsStage.ON, 8, 0, REFUSED, Verdict(Action.REPLY, p.REP_ERR_POLICY, REFUSED)),  # STRUCTURED_REPLY
    (TlsStage.ON, p.OPT_LIST, 0, REFUSED, Verdict(Action.REPLY, p.REP_ERR_POLICY, REFUSED)),
    (TlsStage.ON, p.OPT_STARTTLS, 0, REFUSED, Verdict(Action.REPLY, p.REP_ERR_POLICY, REFUSED)),
    (TlsStage.ON, p.OPT_EXPORT_NAME, 2, REFUSED, Verdict(Action.HANG_UP)),
    (TlsStage.ON, p.OPT_ABORT, 0, REFUSED, Verdict(Action.HANDLE)),
])
def test_option_verdicts(stage: TlsStage, option: int, length: int, refusal: str | None,
                         expected: Verdict | str) -> None:
    verdict = option_verdict(stage, option, length, refusal)
    if expected == "tls-required":
        assert verdict.action is Action.REPLY and verdict.reply == TLS_REQD
        assert "requires TLS" in verdict.message and "nbds://" in verdict.message
    else:
        assert verdict == expected


def test_who_may_use_exports() -> None:
    assert nbd_refusal(Identity(Role.OPERATOR, "a")) is None
    assert nbd_refusal(Identity(Role.ORCHESTRATOR, "orchestrator")) is None
    for identity in (Identity(Role.VIEWER, "v"), Identity(Role.AGENT, "n1")):
        assert f"{identity} may not use NBD exports: it needs the role operator or orchestrator" == \
            nbd_refusal(identity)
    assert "need a client certificate whose identity has the role operator or orchestrator" in str(nbd_refusal(None))


def test_certs_init_names_the_hosts_given_for_a_node(tmp_path: Path) -> None:
    certs.init_cluster(tmp_path, ["n1=127.0.0.1,n1.example.com", "n2"], [], ["admin"], [])
    n1 = (tmp_path / "agent-n1.pem").read_bytes()
    assert certificate_hosts(n1) == ({"n1", "n1.example.com"}, {"127.0.0.1"})
    assert certificate_names_host(n1, "127.0.0.1") and certificate_names_host(n1, "N1.example.com.")
    assert not certificate_names_host(n1, "127.0.0.2")
    n2 = (tmp_path / "agent-n2.pem").read_bytes()
    assert certificate_hosts(n2) == ({"n2"}, set()) and not certificate_names_host(n2, "127.0.0.1")


@pytest.mark.parametrize(("spec", "named"), [
    ("n1=", "no empty host"),
    ("n1=10.0.0.1,", "no empty host"),
    ("n1=bad host", "'bad host' is neither an IP address nor a DNS name"),
    ("n1=a_b", "'a_b' is neither"),
    ("N1=10.0.0.1", "node name 'N1' is malformed"),
])
def test_a_bad_node_spec_is_refused_before_anything_is_written(tmp_path: Path, spec: str, named: str) -> None:
    with pytest.raises(certs.CertsError) as caught:
        certs.init_cluster(tmp_path / "pki", [spec], [], ["admin"], [])
    assert named in str(caught.value) and repr(spec) in str(caught.value)
    assert not (tmp_path / "pki").exists()


def test_orchctl_certs_takes_agent_hosts(tmp_path: Path) -> None:
    def orchctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchctl.cli", "certs", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})

    made = orchctl("init", str(tmp_path / "pki"), "--node", "n1=10.0.0.1")
    assert made.returncode == 0, made.stderr
    assert certificate_names_host((tmp_path / "pki" / "agent-n1.pem").read_bytes(), "10.0.0.1")
    issued = orchctl("issue", str(tmp_path / "pki"), "--role", "agent", "--name", "n2", "--host", "10.0.0.2")
    assert issued.returncode == 0, issued.stderr
    assert certificate_names_host((tmp_path / "pki" / "agent-n2.pem").read_bytes(), "10.0.0.2")
    bad = orchctl("init", str(tmp_path / "other"), "--node", "n1=10.0.0.1,")
    assert bad.returncode == 2 and "no empty host" in bad.stderr and "Traceback" not in bad.stderr


# ---- the server in this process -------------------------------------------------------------------


def _tls_files(pki: Path, stem: str) -> TlsFiles:
    return TlsFiles((pki / "ca.pem").read_bytes(), (pki / f"{stem}.pem").read_bytes(),
                    (pki / f"{stem}.key").read_bytes(), cert_file=pki / f"{stem}.pem", key_file=pki / f"{stem}.key")


async def test_without_tls_starttls_is_refused_as_before() -> None:
    server = NbdServer("127.0.0.1", 0, "127.0.0.1", lambda _: None)
    await server.start()
    try:
        assert server.uri("x").startswith("nbd://127.0.0.1:")

        def starttls() -> list[tuple[int, bytes]]:
            client = RawNbd(server.uri("x"))
            try:
                return client.option(p.OPT_STARTTLS)
            finally:
                client.sock.close()
        ((kind, message),) = await asyncio.to_thread(starttls)
        assert kind == p.REP_ERR_POLICY and b"does not offer TLS" in message
    finally:
        await server.close()


@pytest.mark.parametrize(("node", "warned"), [("n1", True), ("n1=127.0.0.1", False)])
async def test_the_agent_warns_when_its_certificate_does_not_name_the_host_of_its_uris(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, node: str, warned: bool) -> None:
    certs.init_cluster(tmp_path, [node], [], ["admin"], [])
    with caplog.at_level(logging.WARNING, logger="agent.nbd.server"):
        server = NbdServer("127.0.0.1", 0, "127.0.0.1", lambda _: None, tls=_tls_files(tmp_path, "agent-n1"))
    try:
        assert server.uri("c1").startswith("nbds://127.0.0.1:")
        warnings = [r.getMessage() for r in caplog.records if r.name == "agent.nbd.server"]
        if warned:
            (warning,) = warnings
            assert "does not name 127.0.0.1" in warning and "tls-hostname=n1" in warning
            assert "orchctl certs issue DIR --role agent --name n1 --host 127.0.0.1" in warning
        else:
            assert warnings == []
    finally:
        await server.close()


@pytest.mark.parametrize("stem", ["viewer-viewer", None])
async def test_a_refused_client_is_told_why_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch, stem: str | None) -> None:

    certs.init_cluster(tmp_path, ["n1=127.0.0.1"], [], [], ["viewer"])
    # a window of its own: what other tests of this process logged must not hide this line
    monkeypatch.setattr(malformed_input, "windows", LogWindows())
    server = NbdServer("127.0.0.1", 0, "127.0.0.1", lambda _: None, tls=_tls_files(tmp_path, "agent-n1"))
    await server.start()

    def negotiate() -> list[list[tuple[int, bytes]]]:
        client = RawNbd(server.uri("c1"))
        try:
            client.start_tls(client_context(tmp_path, stem))
            replies = [client.option(p.OPT_LIST), client.option(8), client.go("c1")]
            assert client.closed_by_server()  # after the GO
            return replies
        finally:
            client.sock.close()
    try:
        with caplog.at_level(logging.WARNING, logger="nvmigrate.malformed"):
            if stem is None:
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await asyncio.to_thread(negotiate)
            else:
                for replies in await asyncio.to_thread(negotiate):
                    ((kind, message),) = replies
                    assert kind == p.REP_ERR_POLICY
                    assert message == b"viewer/viewer may not use NBD exports: it needs the role operator or " \
                                      b"orchestrator"
    finally:
        await server.close()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "nvmigrate.malformed"]
    assert ("viewer/viewer may not use NBD exports" if stem else "failed the TLS handshake") in line, line


# ---- a real agent with TLS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    # the agent advertises 127.0.0.1, the host of its nbds:// URIs: its certificate names it
    certs.init_cluster(directory, ["n1=127.0.0.1"], [], ["admin"], ["viewer"])
    return directory


@pytest.fixture(scope="module")
def tls_cluster(pki: Path, shared_etcd: str, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    prefix = unique_prefix(f"{request.module.__name__}-nbd-tls")
    try:
        with LocalCluster(tls_dir=pki) as c:
            c.use_etcd(shared_etcd, prefix)
            c.start_with_agents(["n1"])
            yield c
    finally:
        etcdctl(shared_etcd, "del", "--prefix", prefix)


@pytest.fixture(scope="module")
def x509(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu / libnbd certificate directories, by `orchctl certs` file stem."""
    base = tmp_path_factory.mktemp("x509")
    return {stem: qemu_x509_dir(pki, stem, base / stem) for stem in ("operator-admin", "viewer-viewer", "agent-n1")}


def namespace(cluster: LocalCluster, cid: str) -> Path:
    (path,) = (cluster.workdir / "n1").glob(f"{cid}*.ns")
    return path


def client_context(pki: Path, stem: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if stem is not None:
        context.load_cert_chain(pki / f"{stem}.pem", pki / f"{stem}.key")
    return context


@needs_clients
def test_an_operator_writes_and_reads_back_with_qemu_io_over_tls(tls_cluster: LocalCluster,
                                                                 x509: dict[str, Path]) -> None:
    create(tls_cluster, "t1")
    uri = export(tls_cluster, "t1").uri
    assert uri.startswith("nbds://127.0.0.1:") and uri.endswith("/t1"), uri
    done = qemu_io_tls(uri, x509["operator-admin"], "write -P 0xab 0 64k", "read -P 0xab 0 64k")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout + done.stderr
    assert "wrote 65536/65536" in done.stdout and "read 65536/65536" in done.stdout
    with namespace(tls_cluster, "t1").open("rb") as ns:
        assert ns.read(64 * KiB) == b"\xab" * (64 * KiB)  # the agent's namespace holds what qemu wrote
    wrong = qemu_io_tls(uri, x509["operator-admin"], "read -P 0xcd 0 64k")
    assert "Pattern verification failed" in wrong.stdout, wrong.stdout


@needs_clients
def test_nbdinfo_and_nbdcopy_over_nbds(tls_cluster: LocalCluster, x509: dict[str, Path], tmp_path: Path) -> None:
    create(tls_cluster, "t2", namespace_bytes=4 * MiB)
    uri = export(tls_cluster, "t2").uri
    with_certs = f"{uri}?tls-certificates={x509['operator-admin']}"
    info = subprocess.run(["nbdinfo", "--json", with_certs], capture_output=True, text=True, timeout=30)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["TLS"] is True and described["exports"][0]["export-size"] == 4 * MiB

    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(4 * MiB))
    subprocess.run(["nbdcopy", str(source), with_certs], check=True, capture_output=True, timeout=60)
    copied = tmp_path / "out.img"
    subprocess.run(["nbdcopy", with_certs, str(copied)], check=True, capture_output=True, timeout=60)
    assert copied.read_bytes() == source.read_bytes() == namespace(tls_cluster, "t2").read_bytes()

    # without certificates libnbd cannot prove who it is: no data either way
    bare = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=30)
    assert bare.returncode != 0, bare.stdout


@needs_clients
def test_qemu_io_without_tls_is_refused_and_changes_nothing(tls_cluster: LocalCluster) -> None:
    create(tls_cluster, "t3", namespace_bytes=1 * MiB)
    uri = export(tls_cluster, "t3").uri
    before = namespace(tls_cluster, "t3").read_bytes()
    done = qemu_io(uri.replace("nbds://", "nbd://", 1), "write -P 0xcd 0 64k")
    assert done.returncode != 0, done.stdout
    assert "TLS negotiation required" in done.stderr and "this server requires TLS" in done.stderr, done.stderr
    assert "wrote" not in done.stdout
    assert namespace(tls_cluster, "t3").read_bytes() == before


@needs_clients
@pytest.mark.parametrize("stem", ["viewer-viewer", "agent-n1"])
def test_a_certificate_without_an_nbd_role_is_refused_and_changes_nothing(
        tls_cluster: LocalCluster, x509: dict[str, Path], stem: str) -> None:
    cid = f"t4-{stem.split('-')[0]}"
    create(tls_cluster, cid, namespace_bytes=1 * MiB)
    uri = export(tls_cluster, cid).uri
    before = namespace(tls_cluster, cid).read_bytes()
    done = qemu_io_tls(uri, x509[stem], "write -P 0xcd 0 64k")
    who = stem.replace("-", "/", 1)
    assert done.returncode != 0, done.stdout
    assert f"{who} may not use NBD exports: it needs the role operator or orchestrator" in done.stderr, done.stderr
    info = subprocess.run(["nbdinfo", f"{uri}?tls-certificates={x509[stem]}"], capture_output=True, text=True,
                          timeout=30)
    assert info.returncode != 0, info.stdout
    assert namespace(tls_cluster, cid).read_bytes() == before


def test_the_option_phase_with_a_raw_client(tls_cluster: LocalCluster, pki: Path) -> None:
    create(tls_cluster, "t5", namespace_bytes=1 * MiB)
    uri = export(tls_cluster, "t5").uri

    client = RawNbd(uri)
    for option, data in ((p.OPT_LIST, b""), (p.OPT_GO, struct.pack(">I", 2) + b"t5" + bytes(2)),
                         (p.OPT_INFO, struct.pack(">I", 2) + b"t5" + bytes(2)), (8, b"")):
        ((kind, message),) = client.option(option, data)
        assert kind == TLS_REQD and b"requires TLS" in message, (option, kind)
    ((kind, _),) = client.option(p.OPT_STARTTLS, b"junk")
    assert kind == p.REP_ERR_INVALID
    client.start_tls(client_context(pki, "operator-admin"))  # checks the agent's certificate names 127.0.0.1
    ((kind, _),) = client.option(p.OPT_STARTTLS)
    assert kind == p.REP_ERR_INVALID  # TLS is on already
    assert (p.REP_SERVER, struct.pack(">I", 2) + b"t5") in client.option(p.OPT_LIST)
    assert client.go("t5")[-1][0] == p.REP_ACK
    block = os.urandom(4096)
    assert client.request(p.CMD_WRITE, 8192, 4096, block) == (0, b"")
    assert client.request(p.CMD_READ, 8192, 4096) == (0, block)
    client.sock.close()

    # NBD_OPT_EXPORT_NAME before TLS cannot be answered with an error: the server hangs up
    early = RawNbd(uri)
    early.sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_EXPORT_NAME, 2) + b"t5")
    assert early.closed_by_server()

    # bytes sent after STARTTLS in plaintext must not pass for bytes sent over TLS: hang up
    injected = RawNbd(uri)
    go = struct.pack(">I", 2) + b"t5" + bytes(2)
    injected.sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_STARTTLS, 0)
                          + struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, len(go)) + go)
    magic, option, kind, length = struct.unpack(">QIII", injected.recv(20))
    assert (magic, option, kind, length) == (0x3E889045565A9, p.OPT_STARTTLS, p.REP_ACK, 0)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # the server hung up instead of the handshake
        injected.sock = client_context(pki, "operator-admin").wrap_socket(injected.sock, server_hostname=injected.host)
        injected.recv(20)  # without the hang-up: the injected GO's reply, "over TLS"
    injected.sock.close()

    # a TLS client without a certificate fails the handshake and learns nothing
    anonymous = RawNbd(uri)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        anonymous.start_tls(client_context(pki, None))
        anonymous.option(p.OPT_LIST)
    anonymous.sock.close()


async def test_a_peer_holding_too_many_nbd_connections_is_cut_without_a_greeting() -> None:
    from agent.nbd.server import MAX_CONNECTIONS_PER_PEER
    server = NbdServer("127.0.0.1", 0, "127.0.0.1", lambda _: None)
    await server.start()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(MAX_CONNECTIONS_PER_PEER):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert (await asyncio.wait_for(reader.readexactly(8), 10)) == b"NBDMAGIC"  # served: greeted
            held.append((reader, writer))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            got = await asyncio.wait_for(reader.read(64), 10)
        except ConnectionResetError:
            got = b""
        assert got == b"", "one connection too many was greeted"
        writer.close()
        # a connection let go makes room again
        held.pop()[1].close()
        async def greeted() -> bool:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                return await asyncio.wait_for(r.read(8), 10) == b"NBDMAGIC"
            except ConnectionResetError:
                return False
            finally:
                w.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not await greeted():
            assert asyncio.get_running_loop().time() < deadline, "no room after a connection closed"
            await asyncio.sleep(0.05)
    finally:
        for _, w in held:
            w.close()
        await server.close()
