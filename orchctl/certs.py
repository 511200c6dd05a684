"""`orchctl certs`: a cluster's certificate authority and the certificates of its identities.

  orchctl certs init DIR --node n1=10.0.0.1 --node n2 [--host orch.example.com] [--operator alice] [--viewer bob]
  orchctl certs issue DIR --role agent --name n3 [--host 10.0.0.3]

`init` makes DIR/ca.pem (and ca.key), then one certificate and key per identity:
orchestrator.pem (its DNS names and IPs from --host, plus localhost and 127.0.0.1), agent-NODE.pem
per --node (carrying the DNS name NODE, which peers check, and the hosts after `=`: the agent's
--advertise-host, which NBD clients check against its nbds:// URIs), operator-NAME.pem and
viewer-NAME.pem.
Each names its identity as the URI nvmigrate://ROLE/NAME (cluster/identity.py). Keys are ECDSA
P-256, written 0600; an existing file is never overwritten. `issue` adds one more with the same CA.
`orchctl certs request` (orchctl/certs_request.py) asks cert-manager for one instead, with the same names.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import names
from cluster.identity import Identity, Role

CA_DAYS = 3650
LEAF_DAYS = 825
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


class CertsError(Exception):
    """A request `orchctl certs` cannot carry out; the message says what to do."""


@dataclass(frozen=True)
class Issued:
    identity: Identity
    cert: Path
    key: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertsError(f"{path} exists already; certificates are never overwritten: remove it first, "
                         "or use another directory") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def file_stem(identity: Identity) -> str:
    return "orchestrator" if identity.role is Role.ORCHESTRATOR else f"{identity.role}-{identity.name}"


def init_ca(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nvmigrate cluster CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    _write_new(directory / "ca.key", _key_pem(key), 0o600)
    _write_new(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def issue(directory: Path, identity: Identity, hosts: tuple[str, ...] = ()) -> Issued:
    """A certificate for `identity`, signed by DIR's CA, with `hosts` (DNS names or IPs) as
    names a client may check; an agent's always carries its node name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check_names(identity, hosts)
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise CertsError(f"no usable CA in {directory} ({exc}); run `orchctl certs init {directory}` first") from None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName(subject_alt_names(identity, hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    stem = file_stem(identity)
    issued = Issued(identity, directory / f"{stem}.pem", directory / f"{stem}.key")
    _write_new(issued.key, _key_pem(key), 0o600)
    _write_new(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return issued


def check_names(identity: Identity, hosts: tuple[str, ...]) -> None:
    """CertsError naming the value when `identity`'s name or one of `hosts` cannot be in a certificate."""
    problem = names.node_name_problem(identity.name)
    if problem:
        raise CertsError(problem.replace("node name", f"{identity.role} name"))
    for host in hosts:
        problem = host_problem(host)
        if problem:
            raise CertsError(f"--host: {problem}")


def subject_alt_names(identity: Identity, hosts: tuple[str, ...] = ()) -> list[Any]:
    """What a certificate of `identity` names (x509 GeneralNames): the URI nvmigrate://ROLE/NAME,
    an agent's node name as a DNS name (peers check it), then `hosts`, each a DNS name or an IP."""
    from cryptography import x509

    alt: list[Any] = [x509.UniformResourceIdentifier(identity.uri)]
    dns = list(hosts)
    if identity.role is Role.AGENT:
        dns.insert(0, identity.name)
    for host in dict.fromkeys(dns):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    return alt


def host_problem(host: str) -> str | None:
    """Why `host` cannot be a name a certificate is checked against, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host):
        return (f"host {host!r} is neither an IP address nor a DNS name (letters, digits, '-' and '.'); "
                "give the name or IP clients connect to")
    return None


def parse_node(spec: str) -> tuple[str, tuple[str, ...]]:
    """`NAME` or `NAME=HOST[,HOST...]` (--node of `certs init`): the node and the hosts its
    agent serves at besides its name."""
    name, sep, rest = spec.partition("=")
    problem = names.node_name_problem(name)
    if problem:
        raise CertsError(f"--node {spec!r}: {problem}")
    hosts = tuple(h.strip() for h in rest.split(",")) if sep else ()
    if sep and not all(hosts):
        raise CertsError(f"--node {spec!r}: give NAME=HOST[,HOST...] with no empty host, e.g. n1=10.0.0.1")
    for host in hosts:
        problem = host_problem(host)
        if problem:
            raise CertsError(f"--node {spec!r}: {problem}")
    return name, hosts


def init_cluster(directory: Path, nodes: list[str], hosts: list[str], operators: list[str],
                 viewers: list[str]) -> list[Issued]:
    """`nodes`: as `parse_node` reads them (NAME or NAME=HOST,...)."""
    if (directory / "ca.pem").exists():
        raise CertsError(f"{directory} already holds a CA; add identities with `orchctl certs issue {directory}`")
    if not nodes:
        raise CertsError("give the agents' node names, e.g. --node n1 --node n2 (more later with `orchctl certs "
                         "issue`)")
    agents = [parse_node(spec) for spec in nodes]
    for host in hosts:
        problem = host_problem(host)
        if problem:
            raise CertsError(f"--host: {problem}")
    init_ca(directory)
    issued = [issue(directory, Identity(Role.ORCHESTRATOR, "orchestrator"),
                    tuple(dict.fromkeys([*hosts, "localhost", "127.0.0.1"])))]
    issued += [issue(directory, Identity(Role.AGENT, node), node_hosts) for node, node_hosts in agents]
    issued += [issue(directory, Identity(Role.OPERATOR, name)) for name in operators]
    issued += [issue(directory, Identity(Role.VIEWER, name)) for name in viewers]
    return issued
