"""`orchctl certs request`: an identity's certificate from cert-manager (the chart's agents' init
container), run as a real process against a FAKE API server with cert-manager behind it
(tests/fakes/fake_cert_manager.py: no cluster runs here) that signs with an `orchctl certs` CA.
The certificates it writes then carry a real mutual-TLS handshake through our own TLS code."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import grpc_tls
from cluster.grpc_tls import identity_of_der
from cluster.identity import Identity, Role
from orchctl import certs
from tests.fakes.fake_cert_manager import FakeCertManager

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "nvmigrate"


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    certs.init_ca(directory)
    return directory


@pytest.fixture
def fake(ca_dir: Path) -> Iterator[FakeCertManager]:
    api = FakeCertManager(ca_dir).start()
    yield api
    api.stop()


def request(api: FakeCertManager, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "orchctl.cli", "-o", "json", "certs", "request", str(out), "--issuer", "nvm-ca",
            "--issuer-kind", "ClusterIssuer", "--namespace", NAMESPACE, "--kube-api", api.url, *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def tls_files(directory: Path) -> grpc_tls.TlsFiles:
    files = grpc_tls.tls_from_args(argparse.Namespace(tls_ca=str(directory / "ca.crt"),
                                                      tls_cert=str(directory / "tls.crt"),
                                                      tls_key=str(directory / "tls.key")))
    assert files is not None
    return files


def test_an_agent_gets_its_node_s_certificate(fake: FakeCertManager, ca_dir: Path, tmp_path: Path) -> None:
    from cryptography import x509

    out = tmp_path / "tls"
    done = request(fake, out, "--role", "agent", "--name", "node-a", "--host", "10.1.2.3", "--duration", "720h")
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert said["identity"] == "agent/node-a"
    # What cert-manager was asked for: the issuer, the lifetime, both TLS usages; then it was deleted.
    (created,) = fake.created
    assert created["metadata"]["namespace"] == NAMESPACE and created["metadata"]["name"] == said["request"]
    assert created["spec"]["issuerRef"] == {"name": "nvm-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert created["spec"]["duration"] == "720h"
    assert {"server auth", "client auth"} <= set(created["spec"]["usages"])
    assert not fake.requests
    # The files our processes read, the key private to its owner; the identity the agent checks.
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
    files = tls_files(out)
    assert files.identity == Identity(Role.AGENT, "node-a")
    sans = x509.load_pem_x509_certificate(files.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node-a"]  # peers check the node's name
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]  # NBD clients, the IP


async def test_requested_certificates_carry_mutual_tls(fake: FakeCertManager, tmp_path: Path) -> None:
    """An agent's and the orchestrator's certificates from cert-manager: the orchestrator connects
    to node-a's data-plane-style TLS port checking the name node-a; each sees the other's identity."""
    for role, name in (("agent", "node-a"), ("orchestrator", "orchestrator")):
        done = request(fake, tmp_path / role, "--role", role, "--name", name)
        assert done.returncode == 0, done.stderr
    agent, orchestrator = tls_files(tmp_path / "agent"), tls_files(tmp_path / "orchestrator")
    seen: list[Identity | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(identity_of_der(writer.get_extra_info("ssl_object").getpeercert(binary_form=True)))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=agent.ssl_context(server=True))
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=orchestrator.ssl_context(server=False), server_hostname="node-a"), 30)
        assert await asyncio.wait_for(reader.read(), 30) == b"ok"
        assert identity_of_der(writer.get_extra_info("ssl_object").getpeercert(binary_form=True)) == \
            Identity(Role.AGENT, "node-a")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [Identity(Role.ORCHESTRATOR, "orchestrator")]


@pytest.mark.parametrize(("decision", "said"), [
    ("deny", "was denied: not allowed by policy"),
    ("no-ca", "gives no CA certificate (status.ca)"),
    ("pending", "not issued within 1.5 s"),
])
def test_a_request_not_issued_is_an_error_naming_it(ca_dir: Path, tmp_path: Path, decision: str, said: str) -> None:
    api = FakeCertManager(ca_dir, decision=decision).start()
    try:
        done = request(api, tmp_path / "tls", "--role", "agent", "--name", "node-a", "--issue-timeout", "1.5")
    finally:
        api.stop()
    assert done.returncode == 1, done.stdout
    (created,) = api.created
    assert f"CertificateRequest {created['metadata']['name']}" in done.stderr and said in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "tls" / "tls.key").exists()  # nothing half-written
    assert not api.requests  # and the request is gone


def test_bad_names_are_refused_before_asking(fake: FakeCertManager, tmp_path: Path) -> None:
    done = request(fake, tmp_path / "tls", "--role", "agent", "--name", "Node_A")
    assert done.returncode == 2 and "agent name" in done.stderr and "Node_A" in done.stderr, done.stderr
    done = request(fake, tmp_path / "tls", "--role", "agent", "--name", "node-a", "--host", "not a host")
    assert done.returncode == 2 and "--host" in done.stderr and "not a host" in done.stderr, done.stderr
    assert not fake.created
