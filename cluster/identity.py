"""Who is on the other end of a TLS connection, and what that identity may do.

Every certificate of a cluster (made by `orchctl certs`) names one identity in a URI subject
alternative name, `nvmigrate://ROLE/NAME`:

  viewer        reads: get, list, watch, trace
  operator      a viewer who may also act: migrate, cancel, evacuate, cordon, create and delete
                controllers, mark predicted failures; and use NBD exports (read and write guest data)
  agent         an agent; NAME is its node, and its certificate also carries the DNS name NAME, which
                the orchestrator and peers check when they connect to that node
  orchestrator  the only identity agents take commands from (it may use NBD exports too)

`METHOD_ROLES` lists, per gRPC method, who may call it: a method not listed is refused to all
(a new RPC must be placed here before anyone can use it); `NBD_ROLES` who may use an agent's NBD
exports over TLS. Pure, apart from parsing a PEM.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

URI_SCHEME = "nvmigrate://"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    AGENT = "agent"
    ORCHESTRATOR = "orchestrator"


@dataclass(frozen=True)
class Identity:
    role: Role
    name: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}{self.role}/{self.name}"


class IdentityError(ValueError):
    """A certificate that names no identity of this project, or a malformed one."""


def identity_from_uri(uri: str) -> Identity | None:
    if not uri.startswith(URI_SCHEME):
        return None
    role, _, name = uri[len(URI_SCHEME):].partition("/")
    if role not in Role.__members__.values() or not name or "/" in name:
        return None
    return Identity(Role(role), name)


def identity_from_pem(pem: bytes) -> Identity:
    """The identity a PEM certificate names; IdentityError when it names none or several."""
    from cryptography import x509  # the TLS paths only: plaintext clusters need no cryptography

    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise IdentityError(f"the certificate names no identity ({exc}); make certificates with `orchctl certs`")\
            from None
    found = {i for i in (identity_from_uri(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier))
             if i is not None}
    if len(found) != 1:
        raise IdentityError(f"the certificate must name exactly one identity as a URI {URI_SCHEME}ROLE/NAME, "
                            f"it names {len(found)}; make certificates with `orchctl certs`")
    return found.pop()


_READ = frozenset({Role.VIEWER, Role.OPERATOR})
_ACT = frozenset({Role.OPERATOR})
_CONTROL = frozenset({Role.ORCHESTRATOR})
_HEALTH = frozenset(Role)  # health checks and reflection: any identity of the cluster

_MIGRATION = "/nvmigrate.v1.MigrationService/"
_AGENT = "/nvmigrate.v1.AgentService/"

METHOD_ROLES: dict[str, frozenset[Role]] = {
    **{_MIGRATION + m: _READ for m in ("GetMigration", "ListMigrations", "WatchMigration", "ListNodes",
                                         "ListControllers", "GetEvacuation", "ListEvacuations")},
    **{_MIGRATION + m: _ACT for m in ("CreateMigration", "CancelMigration", "ExportController", "CordonNode",
                                        "UncordonNode", "PredictNodeFailure", "CreateController",
                                        "DeleteController", "SetControllerLimits", "EvacuateNode")},
    # An agent answers its peers' "who are you" (a restarted agent checks that its name is free).
    _AGENT + "GetInfo": frozenset({Role.ORCHESTRATOR, Role.AGENT}),
    **{_AGENT + m: _CONTROL for m in ("CreateController", "GetController", "StartWorkload", "StopWorkload",
                                       "DeleteController", "SetControllerLimits", "Verify", "PrepareDestination",
                                       "ResumeDestination",
                                       "StartPrecopy", "DirtyRound", "StopAndCopy", "ReleaseSource",
                                       "AbortMigration", "GetSession", "ExportController", "UnexportController",
                                       "InjectFault")},
    "/grpc.health.v1.Health/Check": _HEALTH,
    "/grpc.health.v1.Health/Watch": _HEALTH,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _HEALTH,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _HEALTH,
}


def refusal(identity: Identity | None, method: str) -> str | None:
    """Why `identity` may not call `method`, or None when it may."""
    allowed = METHOD_ROLES.get(method)
    short = method.rsplit("/", 1)[-1]
    if allowed is None:
        return f"{short} is not open to any identity"
    if identity is None:
        return f"{short} needs a client certificate naming one of: {', '.join(sorted(allowed))}"
    if identity.role not in allowed:
        return f"{identity} may not call {short}: it needs the role {' or '.join(sorted(allowed))}"
    return None


# The guest's data, read and written: those who may act, not those who only look, and not agents
# (a peer agent has no business with another node's guest I/O).
NBD_ROLES = frozenset({Role.OPERATOR, Role.ORCHESTRATOR})


def nbd_refusal(identity: Identity | None) -> str | None:
    """Why `identity` may not use an NBD export, or None when it may."""
    needed = " or ".join(sorted(NBD_ROLES))
    if identity is None:
        return f"NBD exports need a client certificate whose identity has the role {needed}"
    if identity.role not in NBD_ROLES:
        return f"{identity} may not use NBD exports: it needs the role {needed}"
    return None
