"""How a process reaches etcd: the cluster's endpoints, TLS and user auth, from flags or the
environment. Both the orchestrator and the agent take the same options:

  --etcd HOST:PORT[,HOST:PORT...]  $NVMIGRATE_ETCD        the members; an https:// scheme means TLS
  --etcd-ca FILE                   $NVMIGRATE_ETCD_CA     CA bundle that signed the members' certificates
  --etcd-cert FILE, --etcd-key FILE  $NVMIGRATE_ETCD_CERT, $NVMIGRATE_ETCD_KEY   client certificate
  --etcd-user NAME                 $NVMIGRATE_ETCD_USER   etcd user; its password from
                                   $NVMIGRATE_ETCD_PASSWORD or --etcd-password-file FILE
                                   ($NVMIGRATE_ETCD_PASSWORD_FILE), never from a flag: a flag's value
                                   shows in every process listing

Pure parsing: files are read here (so a missing one is a clear start-up error, not a failure
at the first etcd call), nothing connects.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ENDPOINT = "127.0.0.1:2379"


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]  # HOST:PORT each, tried in this order
    tls: bool = False
    ca_pem: bytes | None = None  # None with tls: the system's roots
    cert_pem: bytes | None = None
    key_pem: bytes | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """For messages: the endpoints as given, with the scheme when TLS is on."""
        scheme = "https://" if self.tls else ""
        return ",".join(scheme + e for e in self.endpoints)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} is malformed: expected HOST:PORT, e.g. {DEFAULT_ENDPOINT}")
    return host, int(port)


def parse_endpoints(text: str) -> tuple[tuple[str, ...], bool]:
    """'a:1,https://b:2' -> (('a:1', 'b:2'), tls). All members take the same scheme: a cluster
    is either TLS or not, and a mix is a typo to report, not to guess about."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"no etcd endpoint in {text!r}: give HOST:PORT, several separated by commas")
    schemes, endpoints = set(), []
    for item in items:
        scheme, sep, rest = item.partition("://")
        if not sep:
            scheme, rest = "", item
        if scheme not in ("", "http", "https"):
            raise ValueError(f"etcd endpoint {item!r}: scheme {scheme!r} is not http or https")
        rest = rest.rstrip("/")
        parse_endpoint(rest)
        schemes.add(scheme == "https")
        endpoints.append(rest)
    if len(schemes) > 1:
        raise ValueError(f"etcd endpoints {text!r} mix https:// and plain ones; a cluster's members all use TLS "
                         "or none do")
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"etcd endpoints {text!r} name a member twice")
    return tuple(endpoints), schemes.pop()


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--etcd", default=env("NVMIGRATE_ETCD", DEFAULT_ENDPOINT), metavar="HOST:PORT[,...]",
                        help="etcd members, comma-separated, tried in order; https:// means TLS "
                             f"(default: $NVMIGRATE_ETCD, else {DEFAULT_ENDPOINT})")
    parser.add_argument("--etcd-ca", default=env("NVMIGRATE_ETCD_CA", ""), metavar="FILE",
                        help="TLS to etcd: the CA bundle its certificates chain to ($NVMIGRATE_ETCD_CA)")
    parser.add_argument("--etcd-cert", default=env("NVMIGRATE_ETCD_CERT", ""), metavar="FILE",
                        help="TLS client certificate for etcd, with --etcd-key ($NVMIGRATE_ETCD_CERT)")
    parser.add_argument("--etcd-key", default=env("NVMIGRATE_ETCD_KEY", ""), metavar="FILE",
                        help="the private key of --etcd-cert ($NVMIGRATE_ETCD_KEY)")
    parser.add_argument("--etcd-user", default=env("NVMIGRATE_ETCD_USER", ""), metavar="NAME",
                        help="etcd user ($NVMIGRATE_ETCD_USER); the password comes from $NVMIGRATE_ETCD_PASSWORD "
                             "or --etcd-password-file")
    parser.add_argument("--etcd-password-file", default=env("NVMIGRATE_ETCD_PASSWORD_FILE", ""), metavar="FILE",
                        help="file holding the etcd user's password ($NVMIGRATE_ETCD_PASSWORD_FILE)")


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror}); give a readable file") from None


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> EtcdConfig:
    """The EtcdConfig the flags describe; ValueError naming the flag when they do not add up."""
    env = os.environ if environ is None else environ
    try:
        endpoints, tls = parse_endpoints(args.etcd)
    except ValueError as exc:
        raise ValueError(f"--etcd (or NVMIGRATE_ETCD): {exc}") from None
    if bool(args.etcd_cert) != bool(args.etcd_key):
        raise ValueError("--etcd-cert and --etcd-key go together: give both (a client certificate and its key) "
                         "or neither")
    ca = _read("--etcd-ca", args.etcd_ca) if args.etcd_ca else None
    cert = _read("--etcd-cert", args.etcd_cert) if args.etcd_cert else None
    key = _read("--etcd-key", args.etcd_key) if args.etcd_key else None
    password = None
    if args.etcd_password_file:
        password = _read("--etcd-password-file", args.etcd_password_file).decode().rstrip("\r\n")
    elif "NVMIGRATE_ETCD_PASSWORD" in env:
        password = env["NVMIGRATE_ETCD_PASSWORD"]
    if args.etcd_user and password is None:
        raise ValueError(f"--etcd-user {args.etcd_user!r} has no password: set NVMIGRATE_ETCD_PASSWORD or give "
                         "--etcd-password-file")
    if password is not None and not args.etcd_user:
        raise ValueError("an etcd password is set (NVMIGRATE_ETCD_PASSWORD or --etcd-password-file) but no "
                         "--etcd-user; give the user too")
    return EtcdConfig(endpoints=endpoints, tls=tls or ca is not None or cert is not None, ca_pem=ca, cert_pem=cert,
                      key_pem=key, user=args.etcd_user or None, password=password)


def plain(endpoints: str) -> EtcdConfig:
    """An EtcdConfig for plain endpoints (tests, tools): 'a:1' or 'a:1,b:2'."""
    parsed, tls = parse_endpoints(endpoints)
    return EtcdConfig(endpoints=parsed, tls=tls)


def unreachable_message(config: EtcdConfig, exc: Exception) -> str:
    """What a process prints when etcd refused or never answered at start-up."""
    what = str(exc) or type(exc).__name__
    if type(exc).__name__ == "UnauthenticatedError":
        return (f"error: etcd at {config.describe()} refused user {config.user!r}: {what}; check --etcd-user and "
                "its password (NVMIGRATE_ETCD_PASSWORD or --etcd-password-file)")
    hint = "start etcd or pass --etcd"
    if config.tls:
        hint += ", and check --etcd-ca, --etcd-cert and --etcd-key match the members' certificates"
    return f"error: cannot reach etcd at {config.describe()}: {what}; {hint}"
