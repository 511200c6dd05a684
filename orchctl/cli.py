"""orchctl: the operator CLI for the NVMe live-migration orchestrator.

    orchctl migrate CONTROLLER [--to NODE] [--bandwidth 100M] [--wait]
    orchctl get JOB | list [--active] [--controller ID] | watch JOB | trace JOB | cancel JOB
    orchctl nodes | controllers | export CONTROLLER | demo ... | version
    orchctl controllers create ID --size 1G [--on NODE] [--prefill] [--write-iops N] [--pattern P] [--seed N]
    orchctl controllers delete ID
    orchctl controllers limit ID [--read-iops-limit N] [--write-bps-limit 10M] ... | --clear
    orchctl evacuate node NAME [--dry-run] [--wait] [--timeout S] [--reason TEXT] | evacuations [NODE]
    orchctl predict-failure NAME --reason TEXT | --clear

Tables for people, `-o json` for scripts (protobuf JSON with snake_case keys and enum names;
`watch -o json` prints one JSON object per line). Global options (--server, -o, --timeout) are
accepted before or after the subcommand.

Exit codes: 0 success; 1 other failures (and `watch` of a job that did not complete);
2 usage errors and INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / ALREADY_EXISTS;
3 orchestrator unreachable (UNAVAILABLE / DEADLINE_EXCEEDED); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from cluster import grpc_tls, io_limits
from cluster.identity import Identity, Role
from cluster.policy_limits import MAX_BANDWIDTH_BYTES_PER_S, MAX_DOWNTIME_MS, MAX_ROUNDS, policy_value_problem
from orchctl import certs, render
from orchctl.client import (
    DEFAULT_TIMEOUT_S,
    ENV_SERVER,
    ClientConfig,
    OrchestratorClient,
    TLSConfig,
    default_server,
)
from proto.v1 import migration_pb2

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
PIPE_WIDTH = 200  # columns for table output when stdout is not a terminal
EXIT_BROKEN_PIPE = 141  # what a shell reports for a SIGPIPE'd command (`orchctl list | head`)

# Status codes that mean "you asked for something wrong", like a usage error.
_USER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# A watch stream that breaks mid-job (orchestrator restart, leader change) is re-opened for this
# long before giving up: a leader failover waits out the old leader's etcd lease, which takes
# seconds to tens of seconds, and `migrate --wait` in a script should ride through it.
WATCH_RECONNECT_WINDOW_S = 60.0
_WATCH_RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

GUEST_PATTERNS = ("random", "sequential", "hot")  # the agent's WorkloadSpec patterns
# The orchestrator gives an agent this long to create a controller, plus this much per byte
# prefilled (orchestrator.api.create_budget_s); orchctl waits as long, and a little more.
CREATE_BUDGET_S = 30.0
CREATE_PREFILL_BYTES_PER_S = 16 << 20
CREATE_MARGIN_S = 5.0

_ON_NO_CONVERGENCE = {
    "throttle": migration_pb2.THROTTLE,
    "abort": migration_pb2.ABORT,
    "force": migration_pb2.FORCE,
}


class CliError(Exception):
    """A failure to report as one `error: ...` line with a given exit code (no traceback)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# Argument types


_SIZE_RE = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)$")


def _size_units() -> dict[str, int]:
    # Same convention as dd/coreutils: K, Ki, KiB are powers of 1024; KB, MB are powers of 1000.
    units = {"": 1, "b": 1}
    for power, letter in enumerate("kmgtp", start=1):
        units[letter] = units[f"{letter}i"] = units[f"{letter}ib"] = 1024**power
        units[f"{letter}b"] = 1000**power
    return units


_SIZE_UNITS = _size_units()


def parse_bandwidth(value: str) -> int:
    """Bytes per second from '1048576', '100M', '1.5G', '500MB', '100MiB/s'."""
    text = value.strip().lower()
    if text.endswith("/s"):
        text = text[:-2].rstrip()
    if text.startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid bandwidth {value!r}: a rate cannot be negative; give e.g. 100M, "
                                         "or no --bandwidth for no limit")
    match = _SIZE_RE.match(text)
    units = match and _SIZE_UNITS.get(match.group("unit"))
    if not match or not units:
        raise argparse.ArgumentTypeError(
            f"invalid bandwidth {value!r}: expected bytes per second as a number with an optional "
            "suffix K, M, G, T (powers of 1024; KB, MB, GB, TB are powers of 1000), e.g. 100M or 1.5G"
        )
    scaled = float(match.group("num")) * units
    if not math.isfinite(scaled):  # more digits than a float holds
        raise argparse.ArgumentTypeError(f"invalid bandwidth {value[:24]!r}: the number is too large; give at "
                                         f"most {MAX_BANDWIDTH_BYTES_PER_S} bytes/s, or no --bandwidth for no limit")
    result = math.floor(scaled)
    problem = policy_value_problem("bandwidth_bytes_per_s", result) if result >= 1 else "must be above 0"
    if problem:
        raise argparse.ArgumentTypeError(f"invalid bandwidth {value!r}: {problem}")
    return result


def parse_size(value: str) -> int:
    """Bytes from '67108864', '64M', '1G', '1GiB' (K/M/G/T powers of 1024; KB/MB/GB powers of 1000)."""
    match = _SIZE_RE.match(value.strip().lower())
    units = match and _SIZE_UNITS.get(match.group("unit"))
    if not match or not units:
        raise argparse.ArgumentTypeError(
            f"invalid size {value!r}: expected bytes as a number with an optional suffix K, M, G, T "
            "(powers of 1024; KB, MB, GB, TB are powers of 1000), e.g. 64M or 1G")
    scaled = float(match.group("num")) * units
    result = math.floor(scaled) if math.isfinite(scaled) else 2**63  # inf: more digits than a float holds
    if result < 1 or result >= 2**63:
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: must be at least 1 byte and below 8 EiB")
    return result


def _non_negative_int(value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: must be 0 or more")
    return number


# `--read-iops-limit` ... `--trim-bps-limit`: the flag of each I/O limit (cluster/io_limits.py)
LIMIT_FLAGS = {name: "--" + name.replace("_bytes_per_s", "_bps").replace("_", "-") + "-limit"
               for name in io_limits.IoLimits.names()}


def _limit_value(field: str) -> Callable[[str], int]:
    """An argparse type for an I/O limit: IOPS a whole number, bytes/s a size like 10M; 0: none."""
    def parse(value: str) -> int:
        text = value.strip()
        if field.endswith("_iops") or text == "0":
            number = _non_negative_int(text)
        else:
            number = parse_size(text)
        problem = io_limits.value_problem(field, number)
        if problem:
            raise argparse.ArgumentTypeError(f"invalid value {value[:24]!r}: {problem}")
        return number
    return parse


def _add_limit_options(a: argparse.ArgumentParser, changing: bool) -> None:
    for name, flag in LIMIT_FLAGS.items():
        op, _, unit = name.partition("_")
        what = "I/Os a second" if unit == "iops" else "bytes a second, e.g. 10M"
        a.add_argument(flag, metavar="N" if unit == "iops" else "BYTES", type=_limit_value(name), dest=f"limit_{name}",
                       help=f"limit the guest's {op}s to {what}" + (" (0 removes the limit)" if changing else ""))


def _requested_limits(args: argparse.Namespace, message: Any) -> None:
    for name in LIMIT_FLAGS:
        value = getattr(args, f"limit_{name}", None)  # not args.write_iops: that is the guest's rate
        if value is not None:
            setattr(message, name, value)


def _policy_int(field: str) -> Callable[[str], int]:
    """An argparse type for a policy field: a whole number within the bounds the server checks."""
    def parse(value: str) -> int:
        number = _positive_int(value)
        problem = policy_value_problem(field, number)
        if problem:
            raise argparse.ArgumentTypeError(f"invalid value {value[:24]!r}: {problem}")
        return number
    return parse


def _glue_negative_values(argv: list[str]) -> list[str]:
    """`--bandwidth -5M` as `--bandwidth=-5M`: argparse would take '-5M' for an option and say
    "expected one argument"; glued, the option's own check names the bad value. No option of
    orchctl starts with a dash and a digit."""
    glued: list[str] = []
    for token in argv:
        if glued and glued[-1].startswith("--") and "=" not in glued[-1] and re.match(r"^-[\d.]", token):
            glued[-1] = f"{glued[-1]}={token}"
        else:
            glued.append(token)
    return glued


def _positive_int(value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a whole number") from None
    if number <= 0:
        # The server treats set policy fields as "must be > 0"; say so before the round trip.
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: must be greater than 0")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: must be greater than 0")
    return number


def _server_address(value: str) -> str:
    address = value.strip()
    if not address:
        raise argparse.ArgumentTypeError("the orchestrator address must not be empty (HOST:PORT)")
    return address


# ---------------------------------------------------------------------------------------------
# Parser


def _add_global_options(parser: argparse.ArgumentParser, *, top_level: bool, with_timeout: bool = True) -> None:
    # Registered on the top-level parser (with real defaults) and again on every subcommand
    # (with SUPPRESS) so `orchctl list -o json` works as well as `orchctl -o json list`: a
    # suppressed default leaves the top-level value alone when the option is not repeated.
    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        type=_server_address,
        default=default(default_server()),
        help=f"orchestrator address (default: ${ENV_SERVER} or 127.0.0.1:50051)",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=default("table"),
        help="output format (default: table)",
    )
    for flag, what in (("ca", "the cluster's CA certificate"), ("cert", "your certificate (`orchctl certs`)"),
                       ("key", "its private key")):
        variable = f"ORCHCTL_TLS_{flag.upper()}"
        group.add_argument(f"--tls-{flag}", metavar="FILE", default=default(os.environ.get(variable, "")),
                           help=f"mutual TLS to the orchestrator: {what} ($ORCHCTL_TLS_{flag.upper()})")
    group.add_argument("--tls-server-name", metavar="NAME",
                       default=default(os.environ.get("ORCHCTL_TLS_SERVER_NAME", "")),
                       help="the name to check the orchestrator's certificate against, when not the --server host "
                            "(a port-forward)")
    if not with_timeout:
        return
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"deadline for each request; streams have none (default: {DEFAULT_TIMEOUT_S:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchctl",
        description="Operate the NVMe live-migration orchestrator.",
        epilog="Exit codes: 0 ok, 1 failed, 2 bad request, 3 orchestrator unreachable, 130 interrupted.",
        # no prefixes of long options: `orchctl demo --tls` must reach the demo, not be taken for an
        # ambiguous --tls-ca/--tls-cert/--tls-key of orchctl's own
        allow_abbrev=False,
    )
    _add_global_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_global_options(p, top_level=False)
        return p

    p = command("migrate", "start a live migration of a controller")
    p.add_argument("controller", metavar="CONTROLLER", help="controller id")
    p.add_argument("--to", metavar="NODE", default="", help="destination node (default: scheduler picks)")
    p.add_argument("--max-downtime-ms", metavar="N", type=_policy_int("max_downtime_ms"),
                   help=f"downtime budget (ms, at most {MAX_DOWNTIME_MS})")
    p.add_argument("--max-rounds", metavar="N", type=_policy_int("max_rounds"),
                   help=f"dirty rounds before giving up (at most {MAX_ROUNDS})")
    p.add_argument(
        "--bandwidth",
        metavar="BYTES_PER_S",
        type=parse_bandwidth,
        help="copy rate limit, e.g. 100M or 1G (K/M/G/T = powers of 1024; KB/MB/GB = powers of 1000)",
    )
    p.add_argument(
        "--on-no-convergence",
        choices=sorted(_ON_NO_CONVERGENCE),
        help="when the guest dirties faster than we copy: throttle it, abort, or force stop-and-copy",
    )
    p.add_argument("--wait", action="store_true", help="then follow it like `watch` (same exit codes)")
    p.set_defaults(handler=cmd_migrate)

    p = command("get", "show a migration: fields and phase timeline")
    p.add_argument("job", metavar="JOB", help="migration id")
    p.set_defaults(handler=cmd_get)

    p = command("list", "list migrations")
    p.add_argument("--active", action="store_true", help="only jobs not yet in a terminal phase")
    p.add_argument("--controller", metavar="ID", default="", help="only jobs for this controller")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="only the job ids, oldest first, one a line (JOB=$(orchctl list -q | tail -n 1))")
    p.set_defaults(handler=cmd_list)

    p = command(
        "watch",
        "follow a migration until it ends (exit 0 if it COMPLETED, 1 otherwise)",
    )
    p.add_argument("job", metavar="JOB", help="migration id")
    p.set_defaults(handler=cmd_watch)

    p = command("trace", "show a migration's phases as a waterfall, with its trace id")
    p.add_argument("job", metavar="JOB", help="migration id")
    p.add_argument("--width", metavar="COLUMNS", type=_positive_int, default=48, help="waterfall width (default 48)")
    p.set_defaults(handler=cmd_trace)

    p = command("cancel", "cancel a migration before COMMIT (it rolls back to the source)")
    p.add_argument("job", metavar="JOB", help="migration id")
    p.add_argument("--wait", action="store_true",
                   help="then follow it to its end (exit 0 if it ended CANCELLED, 1 otherwise)")
    p.set_defaults(handler=cmd_cancel)

    p = command("nodes", "list nodes")
    p.set_defaults(handler=cmd_nodes)

    # ---- controllers as API objects: `controllers` lists, `controllers create|delete` ----
    p = command("controllers", "list controllers and where they run (create or delete one: see ACTION)")
    p.set_defaults(handler=cmd_controllers)
    actions = p.add_subparsers(dest="controllers_action", metavar="ACTION", required=False)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_text, description=help_text)
        _add_global_options(a, top_level=False)
        return a

    a = action("create", "create a controller (an emulated one gets a built-in guest) on a node")
    a.add_argument("controller", metavar="ID", help="controller id, e.g. c1")
    a.add_argument("--size", metavar="BYTES", type=parse_size, required=True,
                   help="namespace size, a multiple of 4 KiB, e.g. 64M or 1G")
    a.add_argument("--on", metavar="NODE", default="", help="node to create it on (default: scheduler picks)")
    a.add_argument("--prefill", action="store_true", help="write every block once (verifiable) before returning")
    a.add_argument("--write-iops", metavar="N", type=_non_negative_int,
                   help="start the guest writing N 4 KiB blocks per second (0: as fast as it goes)")
    a.add_argument("--pattern", choices=GUEST_PATTERNS, help="where the guest writes (default random; starts it)")
    a.add_argument("--seed", metavar="N", type=_non_negative_int, help="the guest's random seed (starts it)")
    _add_limit_options(a, changing=False)
    a.set_defaults(handler=cmd_controllers_create)

    a = action("limit", "change a controller's guest I/O limits (NBD requests and its built-in guest), at once; "
                        "they move with it in a migration")
    a.add_argument("controller", metavar="ID", help="controller id")
    _add_limit_options(a, changing=True)
    a.add_argument("--clear", action="store_true", help="remove every limit (then apply those given)")
    a.set_defaults(handler=cmd_controllers_limit)

    a = action("delete", "stop a controller's guest and delete it (refused while a migration moves it)")
    a.add_argument("controller", metavar="ID", help="controller id")
    a.set_defaults(handler=cmd_controllers_delete)
    # ---- end controllers ----

    p = command("certs", "make a cluster's CA and the certificates of its identities (mutual TLS)")
    certs_actions = p.add_subparsers(dest="certs_action", metavar="ACTION", required=True)
    a = certs_actions.add_parser("init", help="a new CA in DIR, and certificates for the orchestrator, the agents, "
                                              "operators and viewers")
    a.add_argument("dir", metavar="DIR", type=Path, help="where the files go (made if missing)")
    a.add_argument("--node", action="append", default=[], metavar="NAME[=HOST,...]",
                   help="an agent's node name (repeat); after '=', the names or IPs it is reached at (its "
                        "--advertise-host), which NBD clients check against its nbds:// URIs")
    a.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a name or IP clients reach the orchestrator at (repeat; localhost and 127.0.0.1 always)")
    a.add_argument("--operator", action="append", default=None, metavar="NAME",
                   help="an operator identity (repeat; default: one named admin)")
    a.add_argument("--viewer", action="append", default=None, metavar="NAME",
                   help="a read-only identity (repeat; default: one named viewer)")
    a.set_defaults(handler=cmd_certs_init)
    a = certs_actions.add_parser("issue", help="one more certificate from DIR's CA")
    a.add_argument("dir", metavar="DIR", type=Path, help="the directory `certs init` made")
    a.add_argument("--role", required=True, choices=[r.value for r in Role], help="what the identity may do")
    a.add_argument("--name", required=True, help="its name: for an agent, its node name")
    a.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a name or IP it serves at (orchestrator; agent: its --advertise-host, for NBD "
                        "over TLS; repeat)")
    a.set_defaults(handler=cmd_certs_issue)
    a = certs_actions.add_parser("request", help="one certificate from cert-manager (a CertificateRequest), "
                                                "e.g. in a pod's init container: key and certificate land in DIR")
    a.add_argument("dir", metavar="DIR", type=Path, help="where ca.crt, tls.crt and tls.key go (made if missing)")
    a.add_argument("--role", required=True, choices=[r.value for r in Role], help="what the identity may do")
    a.add_argument("--name", required=True, help="its name: for an agent, its node name")
    a.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a name or IP it serves at (agent: its --advertise-host, for NBD over TLS; repeat)")
    a.add_argument("--issuer", required=True, metavar="NAME", help="the cert-manager issuer that signs")
    a.add_argument("--issuer-kind", default="Issuer", help="Issuer (default) or ClusterIssuer")
    a.add_argument("--issuer-group", default="cert-manager.io", help="the issuer's API group")
    a.add_argument("--namespace", default="", help="where the CertificateRequest goes (default: the pod's)")
    a.add_argument("--duration", default="8760h", help="the certificate's lifetime (default 8760h)")
    a.add_argument("--issue-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="how long cert-manager may take to issue it (default 120)")
    a.add_argument("--kube-api", default="", metavar="URL", help="the Kubernetes API server (default: in-cluster)")
    a.add_argument("--kubeconfig", default="", help="a kubeconfig file instead of the in-cluster service account")
    a.set_defaults(handler=cmd_certs_request)

    for verb, what in (("cordon", "take no new controllers (never chosen as a destination)"),
                       ("uncordon", "take controllers again")):
        p = command(verb, f"mark a node so it will {what}")
        p.add_argument("node", metavar="NODE", help="node name")
        p.set_defaults(handler=cmd_cordon, cordon=verb == "cordon")

    p = command("predict-failure", "mark a node whose hardware an external predictor expects to fail (with "
                "automatic evacuation on, the leader empties it), or clear the mark")
    p.add_argument("node", metavar="NODE", help="node name")
    mark = p.add_mutually_exclusive_group(required=True)
    mark.add_argument("--reason", help="what the predictor saw, kept with the mark")
    mark.add_argument("--clear", action="store_true", help="the prediction no longer stands")
    p.set_defaults(handler=cmd_predict_failure)

    p = command("export", "serve a controller's namespace over NBD from the node that runs it; prints the URI")
    p.add_argument("controller", metavar="CONTROLLER", help="controller id")
    p.set_defaults(handler=cmd_export)

    _add_evacuation_commands(sub)

    # The demo owns its own options (and --help); everything after `demo` is passed through.
    p = sub.add_parser("demo", add_help=False, help="run the local demo (orchctl demo --help)")
    p.set_defaults(handler=cmd_demo)

    p = command("version", "print the orchctl version")
    p.set_defaults(handler=cmd_version)
    return parser


# ---- evacuation commands ----

_EVACUATION_PRIORITIES = {
    "predicted-failure": migration_pb2.PREDICTED_FAILURE,
    "manual": migration_pb2.MANUAL,
    "rebalance": migration_pb2.REBALANCE,
}
EVACUATION_POLL_S = 1.0  # how often `evacuate --wait` reads progress


def _add_evacuation_commands(sub: Any) -> None:
    evacuate = sub.add_parser("evacuate", help="move every controller off a node",
                              description="move every controller off a node")
    _add_global_options(evacuate, top_level=False)
    targets = evacuate.add_subparsers(dest="target", metavar="TARGET", required=True)
    p = targets.add_parser("node", help="cordon a node and migrate all its controllers to other nodes",
                           description="cordon a node and migrate all its controllers to other nodes, within the "
                                       "orchestrator's evacuation limits")
    # --timeout here bounds --wait (and each request), so the global one is left out.
    _add_global_options(p, top_level=False, with_timeout=False)
    p.add_argument("node", metavar="NAME", help="node name")
    p.add_argument("--dry-run", action="store_true", help="print the plan with reasons; cordon and start nothing")
    p.add_argument("--wait", action="store_true",
                   help="then show progress per controller until it ends (exit 0 if DONE, 1 otherwise)")
    p.add_argument("--timeout", metavar="SECONDS", type=_positive_float, dest="wait_timeout_s",
                   help="with --wait: give up waiting after this long (exit 1; the evacuation goes on)")
    p.add_argument("--reason", metavar="TEXT", default="", help="why, kept in the evacuation record")
    p.add_argument("--priority", choices=sorted(_EVACUATION_PRIORITIES), default="manual",
                   help="predicted-failure goes before manual, which goes before rebalance (default manual)")
    p.set_defaults(handler=cmd_evacuate_node)

    p = sub.add_parser("evacuations", help="list node evacuations, or show one",
                       description="list node evacuations, or show one")
    _add_global_options(p, top_level=False)
    p.add_argument("node", metavar="NODE", nargs="?", default="", help="show this node's evacuation per controller")
    p.set_defaults(handler=cmd_evacuations)


# ---------------------------------------------------------------------------------------------
# Running commands


@dataclass
class Context:
    """What a command handler needs: its arguments, where to print, and a lazily opened client
    (so `version` and `demo` never open a channel)."""

    args: argparse.Namespace
    extra: list[str]
    out: Console
    err: Console
    _client: OrchestratorClient | None = field(default=None, init=False)

    @property
    def json(self) -> bool:
        return bool(self.args.output == "json")

    @property
    def server(self) -> str:
        return str(self.args.server)

    def client(self) -> OrchestratorClient:
        if self._client is None:
            self._client = OrchestratorClient(ClientConfig(server=self.server, timeout_s=self.args.timeout,
                                                           tls=self.tls()))
        return self._client

    def tls(self) -> TLSConfig | None:
        # the servers' own check of --tls-*: all three or none, readable, naming an identity
        try:
            files = grpc_tls.tls_from_args(self.args)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if files is None:
            return None
        return TLSConfig(ca_file=Path(self.args.tls_ca), cert_file=files.cert_file, key_file=files.key_file,
                         server_name=self.args.tls_server_name or None)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def print_json(self, data: Any, *, indent: int | None = 2) -> None:
        # Plain json.dumps, not rich: no colour codes and no wrapping for whatever parses this.
        sys.stdout.write(json.dumps(data, indent=indent) + "\n")
        sys.stdout.flush()

    def show(self, renderable: RenderableType) -> None:
        self.out.print(renderable)


def cmd_migrate(ctx: Context) -> int:
    args = ctx.args
    if not args.controller.strip():
        raise CliError("CONTROLLER must not be empty", EXIT_USAGE)
    policy = migration_pb2.ConvergencePolicy()
    # Only set what was given: unset optional fields mean "server default".
    if args.max_downtime_ms is not None:
        policy.max_downtime_ms = args.max_downtime_ms
    if args.max_rounds is not None:
        policy.max_rounds = args.max_rounds
    if args.bandwidth is not None:
        policy.bandwidth_bytes_per_s = args.bandwidth
    if args.on_no_convergence is not None:
        policy.on_no_convergence = _ON_NO_CONVERGENCE[args.on_no_convergence]
    request = migration_pb2.CreateMigrationRequest(
        controller_id=args.controller.strip(), destination_node=args.to.strip(), policy=policy
    )
    client = ctx.client()
    job = client.stub.CreateMigration(request, timeout=client.timeout)
    if ctx.json:
        # With --wait the first watch event repeats the job, so the output stays uniform:
        # one MigrationEvent per line, exactly like `watch -o json`.
        if not args.wait:
            ctx.print_json(render.message_to_dict(job))
    else:
        ctx.show(render.migration_summary_table(job))
        if not args.wait:
            ctx.show(Text(f"follow it with: orchctl watch {job.id}", style="dim"))
    if args.wait:
        return watch_job(ctx, job.id)
    return EXIT_OK


def cmd_get(ctx: Context) -> int:
    client = ctx.client()
    job = client.stub.GetMigration(migration_pb2.GetMigrationRequest(id=ctx.args.job), timeout=client.timeout)
    if ctx.json:
        ctx.print_json(render.message_to_dict(job))
    else:
        ctx.show(render.migration_detail(job, time.time()))
    warning = render.budget_warning(job)
    if warning is not None:
        ctx.err.print(warning)
    return EXIT_OK


def cmd_list(ctx: Context) -> int:
    client = ctx.client()
    request = migration_pb2.ListMigrationsRequest(
        active_only=ctx.args.active, controller_id=ctx.args.controller.strip()
    )
    response = client.stub.ListMigrations(request, timeout=client.timeout)
    if ctx.args.quiet and not ctx.json:
        sys.stdout.write("".join(f"{m.id}\n" for m in response.migrations))
        sys.stdout.flush()
    elif ctx.json:
        ctx.print_json(render.message_to_dict(response))
    elif response.migrations:
        ctx.show(render.migrations_table(response.migrations, time.time()))
    else:
        ctx.err.print("no migrations found")
    return EXIT_OK


def cmd_watch(ctx: Context) -> int:
    return watch_job(ctx, ctx.args.job)


def cmd_trace(ctx: Context) -> int:
    client = ctx.client()
    job = client.stub.GetMigration(migration_pb2.GetMigrationRequest(id=ctx.args.job), timeout=client.timeout)
    now = time.time()
    if ctx.json:
        ctx.print_json(render.trace_dict(job, now))
    else:
        ctx.show(render.trace_view(job, now, width=ctx.args.width))
    return EXIT_OK


def cmd_cancel(ctx: Context) -> int:
    client = ctx.client()
    job = client.stub.CancelMigration(migration_pb2.CancelMigrationRequest(id=ctx.args.job), timeout=client.timeout)
    if ctx.json:
        ctx.print_json(render.message_to_dict(job))
    else:
        ctx.show(render.migration_summary_table(job))
        if not render.is_terminal(job.phase) and not ctx.args.wait:
            ctx.show(Text(f"cancel requested; follow it with: orchctl watch {job.id}", style="dim"))
    if ctx.args.wait:
        last = _follow_stream(ctx, job.id, lambda event: None)
        if ctx.json:
            ctx.print_json(render.message_to_dict(migration_pb2.MigrationEvent(migration=last)), indent=None)
        else:
            ctx.out.print(render.final_line(last))
        return EXIT_OK if last.phase == migration_pb2.CANCELLED else EXIT_FAILURE
    return EXIT_OK


def _show_listing(ctx: Context, response: Any, rows: Any, table: Any, empty: str) -> int:
    """A List* response: JSON as is, else a table of its rows, else one line saying there are none."""
    if ctx.json:
        ctx.print_json(render.message_to_dict(response))
    elif rows:
        ctx.show(table(rows))
    else:
        ctx.err.print(empty)
    return EXIT_OK


def cmd_nodes(ctx: Context) -> int:
    client = ctx.client()
    response = client.stub.ListNodes(migration_pb2.ListNodesRequest(), timeout=client.timeout)
    return _show_listing(ctx, response, response.nodes, render.nodes_table, "no nodes registered")


def cmd_cordon(ctx: Context) -> int:
    client = ctx.client()
    call = client.stub.CordonNode if ctx.args.cordon else client.stub.UncordonNode
    node = call(migration_pb2.CordonNodeRequest(name=ctx.args.node), timeout=client.timeout)
    if ctx.json:
        ctx.print_json(render.message_to_dict(node))
    else:
        ctx.show(f"node {node.name} {'cordoned' if node.cordoned else 'uncordoned'}")
    return EXIT_OK


def cmd_predict_failure(ctx: Context) -> int:
    client = ctx.client()
    node = client.stub.PredictNodeFailure(migration_pb2.PredictNodeFailureRequest(
        name=ctx.args.node, reason=ctx.args.reason or "", clear=ctx.args.clear), timeout=client.timeout)
    if ctx.json:
        ctx.print_json(render.message_to_dict(node))
    elif node.predicted_failure:
        ctx.show(f"node {node.name} marked as predicted to fail: {node.predicted_failure}")
    else:
        ctx.show(f"node {node.name}: failure prediction cleared")
    return EXIT_OK


def cmd_controllers(ctx: Context) -> int:
    client = ctx.client()
    response = client.stub.ListControllers(migration_pb2.ListControllersRequest(), timeout=client.timeout)
    return _show_listing(ctx, response, response.controllers, render.controllers_table, "no controllers registered")


def cmd_controllers_create(ctx: Context) -> int:
    args = ctx.args
    request = migration_pb2.NewControllerRequest(controller_id=args.controller.strip(), namespace_bytes=args.size,
                                                 node=args.on.strip(), prefill=args.prefill)
    if args.write_iops is not None or args.pattern is not None or args.seed is not None:
        request.guest.CopyFrom(migration_pb2.GuestOptions(write_iops=args.write_iops or 0,
                                                          pattern=args.pattern or "", seed=args.seed or 0))
    _requested_limits(args, request.limits)
    client = ctx.client()
    budget_s = CREATE_BUDGET_S + (args.size / CREATE_PREFILL_BYTES_PER_S if args.prefill else 0.0)
    controller = client.stub.CreateController(request, timeout=max(client.timeout, budget_s + CREATE_MARGIN_S))
    if ctx.json:
        ctx.print_json(render.message_to_dict(controller))
    else:
        ctx.show(render.controllers_table([controller]))
    return EXIT_OK


def cmd_controllers_limit(ctx: Context) -> int:
    args = ctx.args
    request = migration_pb2.ControllerLimitsRequest(controller_id=args.controller.strip(), clear=args.clear)
    _requested_limits(args, request.limits)
    if not args.clear and not io_limits.changes_in(request.limits):
        ctx.err.print(f"error: give at least one of {', '.join(LIMIT_FLAGS.values())} (0 removes that limit), "
                      "or --clear")
        return EXIT_USAGE
    client = ctx.client()
    controller = client.stub.SetControllerLimits(request, timeout=client.timeout)
    if ctx.json:
        ctx.print_json(render.message_to_dict(controller))
    else:
        ctx.show(render.controllers_table([controller]))
    return EXIT_OK


def cmd_controllers_delete(ctx: Context) -> int:
    client = ctx.client()
    request = migration_pb2.DeleteControllerRequest(controller_id=ctx.args.controller.strip())
    # The agent stops the guest and sanitizes the namespace: give it the orchestrator's budget.
    controller = client.stub.DeleteController(request, timeout=max(client.timeout, CREATE_BUDGET_S + CREATE_MARGIN_S))
    if ctx.json:
        ctx.print_json(render.message_to_dict(controller))
    else:
        ctx.show(f"controller {controller.id} deleted from node {controller.node}")
    return EXIT_OK


def cmd_export(ctx: Context) -> int:
    client = ctx.client()
    request = migration_pb2.ExportControllerRequest(controller_id=ctx.args.controller.strip())
    export = client.stub.ExportController(request, timeout=client.timeout)
    if ctx.json:
        ctx.print_json(render.message_to_dict(export))
    else:
        # The URI alone on stdout, so `qemu-io -f raw "$(orchctl export c1)"` works; the node is a note.
        sys.stdout.write(export.uri + "\n")
        sys.stdout.flush()
        ctx.err.print(Text(f"served by node {export.node}; after a migration, ask again for the new URI",
                           style="dim"))
    return EXIT_OK


def cmd_demo(ctx: Context) -> int:
    # Imported here, by name: the demo pulls in the whole local cluster (agents, orchestrator),
    # which no other command needs; importlib also keeps type-checking of the CLI independent
    # of the demo's code.
    try:
        demo = importlib.import_module("orchctl.demo")
    except ModuleNotFoundError as exc:
        if exc.name == "orchctl.demo":
            raise CliError("the demo is not available in this build (orchctl.demo is missing)") from None
        raise CliError(f"the demo could not be loaded: {exc}") from None
    run_demo: Callable[[list[str]], int] = demo.run_demo
    return int(run_demo(list(ctx.extra)))


def _version() -> str:
    try:
        return metadata.version("nvmigrate")
    except metadata.PackageNotFoundError:
        return "0+unknown"  # running from a source tree that was never installed


def _print_issued(ctx: Context, issued: list[certs.Issued]) -> None:
    if ctx.json:
        ctx.print_json([{"identity": str(i.identity), "cert": str(i.cert), "key": str(i.key)} for i in issued])
        return
    for i in issued:
        ctx.out.print(f"{i.identity}: {i.cert} {i.key}", markup=False, highlight=False)


def cmd_certs_init(ctx: Context) -> int:
    try:
        issued = certs.init_cluster(ctx.args.dir, ctx.args.node, ctx.args.host,
                                    ctx.args.operator if ctx.args.operator is not None else ["admin"],
                                    ctx.args.viewer if ctx.args.viewer is not None else ["viewer"])
    except (certs.CertsError, OSError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    _print_issued(ctx, issued)
    return EXIT_OK


def cmd_certs_issue(ctx: Context) -> int:
    try:
        issued = certs.issue(ctx.args.dir, Identity(Role(ctx.args.role), ctx.args.name), tuple(ctx.args.host))
    except (certs.CertsError, OSError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    _print_issued(ctx, [issued])
    return EXIT_OK


def cmd_certs_request(ctx: Context) -> int:
    from kubernetes.config import ConfigException

    from orchctl import certs_request

    a = ctx.args
    identity = Identity(Role(a.role), a.name)
    try:
        certs.check_names(identity, tuple(a.host))
    except certs.CertsError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    try:
        requests = certs_request.CertificateRequests(a.namespace or certs_request.default_namespace(), a.kube_api,
                                                     a.kubeconfig)
        written = certs_request.request_certificate(
            a.dir, identity, tuple(a.host),
            certs_request.Issuer(a.issuer, a.issuer_kind, a.issuer_group), requests, duration=a.duration,
            timeout_s=a.issue_timeout)
    except ConfigException as exc:
        raise CliError(f"cannot reach the Kubernetes API ({exc}); in a pod, mount the service account token, "
                       "else give --kubeconfig or --kube-api", EXIT_USAGE) from None
    except (certs.CertsError, OSError) as exc:
        raise CliError(str(exc)) from None
    if ctx.json:
        ctx.print_json({"identity": str(written.identity), "request": written.request, "ca": str(written.ca),
                        "cert": str(written.cert), "key": str(written.key)})
    else:
        ctx.out.print(f"{written.identity}: {written.cert} {written.key} (CertificateRequest {written.request})",
                      markup=False, highlight=False)
    return EXIT_OK


def cmd_version(ctx: Context) -> int:
    api = migration_pb2.DESCRIPTOR.package
    if ctx.json:
        ctx.print_json({"orchctl": _version(), "api": api})
    else:
        ctx.out.print(f"orchctl {_version()} (API {api})", markup=False, highlight=False)
    return EXIT_OK


# ---- evacuation commands ----


def cmd_evacuate_node(ctx: Context) -> int:
    args = ctx.args
    if not args.node.strip():
        raise CliError("NAME must not be empty", EXIT_USAGE)
    if args.dry_run and args.wait:
        raise CliError("--dry-run and --wait do not go together: a dry run starts nothing to wait for", EXIT_USAGE)
    if args.wait_timeout_s is not None and not args.wait:
        raise CliError("--timeout needs --wait: it bounds the wait for the evacuation to end", EXIT_USAGE)
    client = ctx.client()
    request = migration_pb2.EvacuateNodeRequest(node=args.node.strip(), note=args.reason,
                                                reason=_EVACUATION_PRIORITIES[args.priority], dry_run=args.dry_run)
    plan = client.stub.EvacuateNode(request, timeout=client.timeout)
    if ctx.json:
        if not args.wait:
            ctx.print_json(render.message_to_dict(plan))
    else:
        ctx.show(render.evacuation_plan_view(plan))
        if not args.wait and not args.dry_run:
            ctx.show(Text(f"follow it with: orchctl evacuations {plan.evacuation.node}", style="dim"))
    if args.wait:
        return wait_evacuation(ctx, plan.evacuation.node, args.wait_timeout_s)
    return EXIT_OK


def cmd_evacuations(ctx: Context) -> int:
    client = ctx.client()
    if ctx.args.node:
        ev = client.stub.GetEvacuation(migration_pb2.GetEvacuationRequest(node=ctx.args.node.strip()),
                                       timeout=client.timeout)
        if ctx.json:
            ctx.print_json(render.message_to_dict(ev))
        else:
            ctx.show(render.evacuation_progress_view(ev, _evacuation_jobs(ctx, ev), time.time()))
        return EXIT_OK
    response = client.stub.ListEvacuations(migration_pb2.ListEvacuationsRequest(), timeout=client.timeout)
    return _show_listing(ctx, response, response.evacuations,
                         lambda rows: render.evacuations_table(rows, time.time()), "no evacuations")


def _evacuation_jobs(ctx: Context, ev: migration_pb2.Evacuation) -> dict[str, migration_pb2.Migration]:
    """The current job of each controller still moving, for its phase and bytes."""
    client = ctx.client()
    wanted = {m.attempts[-1].job_id for m in ev.controllers if m.attempts and not m.attempts[-1].outcome}
    jobs = {}
    for job_id in sorted(wanted):
        try:
            jobs[job_id] = client.stub.GetMigration(migration_pb2.GetMigrationRequest(id=job_id),
                                                    timeout=client.timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # recorded, not created yet: shown as STARTING
                raise
    return jobs


class _EvacuationView:
    def __init__(self) -> None:
        self.evacuation: migration_pb2.Evacuation | None = None
        self.jobs: dict[str, migration_pb2.Migration] = {}

    def __rich__(self) -> RenderableType:
        if self.evacuation is None:
            return Text("waiting for the orchestrator…", style="dim")
        return render.evacuation_progress_view(self.evacuation, self.jobs, time.time())


def wait_evacuation(ctx: Context, node: str, timeout_s: float | None) -> int:
    """Polls the evacuation until it ends: a live table on a terminal, one line per controller
    change otherwise, one JSON object per change with -o json. Exit 0 if DONE, else 1."""
    client = ctx.client()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    view = _EvacuationView()
    live: Live | None = None
    if not ctx.json and ctx.out.is_terminal:
        live = Live(view, console=ctx.out, refresh_per_second=4, transient=False)
        live.start()
    shown: dict[str, tuple[str, str, str]] = {}
    last_json = ""
    ev: migration_pb2.Evacuation | None = None
    unreachable_since: float | None = None
    try:
        while True:
            try:
                ev = client.stub.GetEvacuation(migration_pb2.GetEvacuationRequest(node=node), timeout=client.timeout)
                jobs = _evacuation_jobs(ctx, ev)
                unreachable_since = None
            except grpc.RpcError as exc:
                # A leader failover or an orchestrator restart: ride through it like `watch` does.
                if exc.code() not in _WATCH_RECONNECT_CODES:
                    raise
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > WATCH_RECONNECT_WINDOW_S:
                    raise
                time.sleep(EVACUATION_POLL_S)
                continue
            if ctx.json:
                body = json.dumps(render.message_to_dict(ev))
                if body != last_json:
                    sys.stdout.write(body + "\n")
                    sys.stdout.flush()
                    last_json = body
            elif live is not None:
                view.evacuation, view.jobs = ev, jobs
                live.refresh()
            else:
                for move in ev.controllers:
                    progress = render.controller_progress(move, jobs)
                    # a new line when the status (phase) changes, not for every byte
                    if shown.get(move.controller_id, ("",))[0] != progress[0]:
                        ctx.out.print(render.controller_progress_line(ev, move, jobs))
                        shown[move.controller_id] = progress
            if ev.state in (migration_pb2.EVACUATION_DONE, migration_pb2.EVACUATION_FAILED,
                            migration_pb2.EVACUATION_CANCELLED):
                break
            if deadline is not None and time.monotonic() >= deadline:
                if not ctx.json:
                    ctx.out.print(render.evacuation_final_line(ev))
                raise CliError(f"the evacuation of {node!r} did not end within {timeout_s:g} s; it goes on: "
                               f"`orchctl evacuations {node}` shows it")
            time.sleep(EVACUATION_POLL_S)  # poll interval of the progress display
    finally:
        if live is not None:
            live.stop()
    if not ctx.json:
        ctx.out.print(render.evacuation_final_line(ev))
    return EXIT_OK if ev.state == migration_pb2.EVACUATION_DONE else EXIT_FAILURE


# ---------------------------------------------------------------------------------------------
# watch


class _LiveView:
    """Re-rendered by rich.Live on every refresh, so the elapsed time ticks between events."""

    def __init__(self) -> None:
        self.migration: migration_pb2.Migration | None = None

    def __rich__(self) -> RenderableType:
        if self.migration is None:
            return Text("waiting for the orchestrator…", style="dim")
        return render.watch_view(self.migration, time.time())


def watch_job(ctx: Context, job_id: str) -> int:
    """Follow WatchMigration to the end; exit 0 if the job COMPLETED, 1 for any other outcome."""
    live_view = _LiveView()
    # A live display only makes sense on a terminal; for logs and CI print one line per phase.
    use_live = not ctx.json and ctx.out.is_terminal
    live: Live | None = None
    if use_live:
        live = Live(live_view, console=ctx.out, refresh_per_second=4, transient=False)
        live.start()
    printed_phase: int | None = None

    def on_event(event: migration_pb2.MigrationEvent) -> None:
        nonlocal printed_phase
        job = event.migration
        if ctx.json:
            ctx.print_json(render.message_to_dict(event), indent=None)
        elif live is not None:
            live_view.migration = job
            live.refresh()
        elif job.phase != printed_phase:
            ctx.out.print(render.phase_change_line(job))
            printed_phase = job.phase

    try:
        last = _follow_stream(ctx, job_id, on_event)
    finally:
        if live is not None:
            live.stop()

    if not ctx.json:
        ctx.out.print(render.final_line(last))
    warning = render.budget_warning(last)
    if warning is not None:
        ctx.err.print(warning)
    return EXIT_OK if last.phase == migration_pb2.COMPLETED else EXIT_FAILURE


def _follow_stream(
    ctx: Context,
    job_id: str,
    on_event: Callable[[migration_pb2.MigrationEvent], None],
) -> migration_pb2.Migration:
    """Read WatchMigration until a terminal phase, re-opening the stream if it breaks after the
    first event (orchestrator restart or leader change). Returns the last state seen."""
    client = ctx.client()
    request = migration_pb2.WatchMigrationRequest(id=job_id)
    last: migration_pb2.Migration | None = None
    broken_since: float | None = None
    backoff = 0.5
    while True:
        call = client.stub.WatchMigration(request)
        problem: str
        try:
            for event in call:
                last = event.migration
                broken_since, backoff = None, 0.5
                on_event(event)
            problem = "the stream ended"
        except grpc.RpcError as exc:
            # A stream torn down after the terminal event lost nothing.
            if last is not None and render.is_terminal(last.phase):
                return last
            # Before the first event an error is the answer (unknown job, nothing listening).
            if last is None or exc.code() not in _WATCH_RECONNECT_CODES:
                raise
            problem = f"the stream broke ({_one_line(exc.details())}, {exc.code().name})"
            if broken_since is None:
                broken_since = time.monotonic()
            if time.monotonic() - broken_since > WATCH_RECONNECT_WINDOW_S:
                raise
        finally:
            call.cancel()
        if last is None:
            raise CliError(f"the orchestrator sent nothing for migration {job_id}")
        if render.is_terminal(last.phase):
            return last
        if broken_since is None:
            broken_since = time.monotonic()
        if time.monotonic() - broken_since > WATCH_RECONNECT_WINDOW_S:
            raise CliError(
                f"watch of migration {job_id} ended before it finished "
                f"(last phase {render.phase_name(last.phase)}); check it with: orchctl get {job_id}"
            )
        ctx.err.print(Text(f"{problem} in phase {render.phase_name(last.phase)}; reconnecting…", style="yellow"))
        time.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


# ---------------------------------------------------------------------------------------------
# Errors and entry point


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def describe_rpc_error(exc: grpc.RpcError, server: str) -> tuple[str, int]:
    """The one-line message and exit code for a failed call."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = _one_line(details_fn() if callable(details_fn) else None) or "no details"
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if code in _UNREACHABLE_CODES:
        message = (
            f"cannot reach the orchestrator at {server}: {details}; is it running? pass --server or set {ENV_SERVER}"
        )
        return f"{message} ({name})", EXIT_UNREACHABLE
    exit_code = EXIT_USAGE if code in _USER_ERROR_CODES else EXIT_FAILURE
    return f"{details} ({name})", exit_code


def _error(message: str) -> None:
    # Plain write, not rich: server messages may contain [brackets] that rich would eat as markup.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _stdout_console() -> Console:
    # Piped into grep/less/a file, rich would assume 80 columns and cut table cells ("SOUR…").
    # Give it room instead; tables only take the width their content needs. An explicit
    # COLUMNS still wins.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_glue_negative_values(sys.argv[1:] if argv is None else argv))
    if args.command != "demo" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    ctx = Context(args=args, extra=extra, out=_stdout_console(), err=Console(stderr=True, highlight=False))
    try:
        handler: Callable[[Context], int] = args.handler
        return handler(ctx)
    except grpc.RpcError as exc:
        message, code = describe_rpc_error(exc, ctx.server)
        _error(message)
        return code
    except CliError as exc:
        _error(str(exc))
        return exc.exit_code
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        return _run(argv)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        _error(str(exc.code))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`orchctl list | head`). Point stdout at devnull so the interpreter's
        # final flush does not raise again and print a traceback.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
