"""The TLS rules of the NBD option phase, as the NBD protocol document's "TLS support" section
sets them for a server in TLS-required mode, and who may use an export once TLS is on. Pure:
the server (agent/nbd/server.py) asks `option_verdict` about every option it receives and does
what the verdict says.

  no TLS configured   plaintext, as ever: NBD_OPT_STARTTLS is answered NBD_REP_ERR_POLICY.
  before STARTTLS     only NBD_OPT_STARTTLS (acknowledged, then the TLS handshake) and
                      NBD_OPT_ABORT; any other option gets NBD_REP_ERR_TLS_REQD, and
                      NBD_OPT_EXPORT_NAME (which cannot carry an error) is answered by hanging up.
  after STARTTLS      the client's certificate decides: an identity that may use exports
                      (cluster/identity.py `NBD_ROLES`) negotiates as without TLS (a second
                      STARTTLS is NBD_REP_ERR_INVALID); any other gets NBD_REP_ERR_POLICY, naming
                      its identity and the role needed, for every option, and after its
                      NBD_OPT_GO the connection is closed (clients first try options they can
                      do without, e.g. qemu's NBD_OPT_STRUCTURED_REPLY: closing on those would
                      hide the reason; the GO's error is the one they report).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from agent.nbd import protocol as p


class TlsStage(Enum):
    OFF = "off"  # the server has no TLS configured: plaintext
    REQUIRED = "required"  # TLS configured, not negotiated yet on this connection
    ON = "on"  # negotiated: the client's certificate was verified


class Action(Enum):
    HANDLE = "handle"  # as the server handles the option without TLS
    START_TLS = "start_tls"  # NBD_REP_ACK, then the TLS handshake on the same connection
    REPLY = "reply"  # answer with `reply` and `message`, keep negotiating
    REPLY_AND_CLOSE = "reply_and_close"  # answer with `reply` and `message`, then hang up
    HANG_UP = "hang_up"  # close without a reply


@dataclass(frozen=True)
class Verdict:
    action: Action
    reply: int = 0
    message: str = ""


HANDLE = Verdict(Action.HANDLE)


def option_verdict(stage: TlsStage, option: int, length: int, refusal: str | None = None) -> Verdict:
    """What to do with `option` (carrying `length` bytes of data) at `stage`; `refusal` (after
    STARTTLS): why the client's identity may not use exports, None when it may."""
    if stage is TlsStage.OFF:
        if option == p.OPT_STARTTLS:
            return Verdict(Action.REPLY, p.REP_ERR_POLICY, "this server does not offer TLS")
        return HANDLE
    if stage is TlsStage.REQUIRED:
        if option == p.OPT_STARTTLS:
            if length:
                return Verdict(Action.REPLY, p.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return Verdict(Action.START_TLS)
        if option == p.OPT_ABORT:
            return HANDLE
        if option == p.OPT_EXPORT_NAME:
            return Verdict(Action.HANG_UP)
        return Verdict(Action.REPLY, p.REP_ERR_TLS_REQD,
                       "this server requires TLS: connect with the cluster's certificates (nbds:// URI, or "
                       "qemu's tls-creds) as an operator")
    if refusal is not None:
        if option == p.OPT_EXPORT_NAME:
            return Verdict(Action.HANG_UP)
        if option == p.OPT_ABORT:
            return HANDLE
        return Verdict(Action.REPLY_AND_CLOSE if option == p.OPT_GO else Action.REPLY, p.REP_ERR_POLICY, refusal)
    if option == p.OPT_STARTTLS:
        return Verdict(Action.REPLY, p.REP_ERR_INVALID, "TLS is already on for this connection")
    return HANDLE


def certificate_hosts(cert_pem: bytes) -> tuple[set[str], set[str]]:
    """The DNS names and the IP addresses (normalized) a certificate's subject alternative names
    carry: the names a client may check when it connects to the certificate's owner."""
    from cryptography import x509  # the TLS paths only: plaintext clusters need no cryptography

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    dns = {name.lower() for name in sans.get_values_for_type(x509.DNSName)}
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return dns, ips


def certificate_names_host(cert_pem: bytes, host: str) -> bool:
    """Whether a client connecting to `host` (a DNS name or an IP) finds it in the certificate.
    Wildcards are not considered: `orchctl certs` never makes them."""
    dns, ips = certificate_hosts(cert_pem)
    try:
        return str(ipaddress.ip_address(host)) in ips
    except ValueError:
        return host.lower().rstrip(".") in dns
