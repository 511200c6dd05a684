"""The agent process: one per host. Registers in etcd under a lease, serves AgentService, owns
the host's NVMe backends and moves migration data straight to the peer agent.

    nvmigrate-agent --name n1 --etcd 127.0.0.1:2379 --listen 127.0.0.1:0 --data-dir /var/lib/nvmigrate
    nvmigrate-agent --name n2 --data-dir /var/lib/nvmigrate --backend nvme-passthru --device /dev/nvme0 \
        --slot 1:1:/dev/nvme0n1 --slot 2:2:/dev/nvme0n2

``main`` takes a ``DeviceAccess`` (the kernel's ioctl by default): a fake of NVMe hardware passes
its own, so that the real agent runs over it unchanged (tests/fakes/fake_pf_agent.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent import backends
from agent import web as agent_web
from agent.backends.hosting import ControllerHosting, DeviceAccess, HostingError
from agent.host import Host
from agent.node_lease import NodeNameHeld
from agent.service import AgentApi
from cluster import etcd_config, grpc_tls, logs, names, telemetry
from cluster.http_server import parse_http_address
from cluster.identity import Identity, Role
from cluster.malformed_grpc import MalformedRequests
from cluster.ratelimited_log import malformed_input
from cluster.store import DEFAULT_PREFIX, EtcdError, EtcdStore, prefix_problem
from proto.v1 import agent_pb2_grpc

# How long a thread that wants the GIL waits before it makes the holder let go (CPython's default
# is 5 ms). An agent runs the guest's I/O, the data plane's sender, its event loop and hashing in
# threads of one process: at 5 ms, each hand-over could add that much to a paused guest's wait.
GIL_SWITCH_INTERVAL_S = 0.0005

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '20G', '4096' -> bytes (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SUFFIXES and not value[-1:].isdigit() else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number of bytes like 4096, 512M or 20G")
    return int(number) * _SUFFIXES[unit]


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"address {text!r} is not HOST:PORT (port 0 picks a free one)")
    return host, int(port)


async def serve(args: argparse.Namespace, hosting: ControllerHosting) -> int:
    store = EtcdStore(args.etcd_config, prefix=args.etcd_prefix)
    await store.connect()
    # Undecodable requests answered INVALID_ARGUMENT first; with tracing on, a span per call.
    # With TLS, calls are authorized first (only the orchestrator commands an agent).
    server = grpc.aio.server(interceptors=[*grpc_tls.server_interceptors(args.tls), MalformedRequests(),
                                           *telemetry.server_interceptors()])
    listen_host, _ = args.listen
    try:
        port = grpc_tls.add_port(server, f"{listen_host}:{args.listen[1]}", args.tls)
    except RuntimeError as exc:
        print(f"error: cannot listen on {listen_host}:{args.listen[1]}: {exc}", file=sys.stderr)
        return 2
    advertise = args.advertise_host or listen_host
    data_host, data_port = args.data_listen or (listen_host, 0)
    host = Host(args.name, store, Path(args.data_dir), hosting, f"{advertise}:{port}",
                data_host, data_port, args.lease_ttl_s, tls=args.tls,
                migration_yield=args.migration_yield == "on")
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentApi(host, allow_fault_injection=args.allow_fault_injection), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        http = await agent_web.start(host, args.http, advertise)  # /metrics, /healthz, /readyz
    except OSError as exc:
        print(f"error: cannot serve HTTP on {args.http[0]}:{args.http[1]}: {exc}; pass another --http",
              file=sys.stderr)
        await server.stop(grace=None)
        with contextlib.suppress(Exception):
            await store.close()
        return 2
    try:
        await host.await_name_free()  # before serving: the old holder's address may be ours
    except (EtcdError, NodeNameHeld):
        await agent_web.stop(http)
        await server.stop(grace=None)
        with contextlib.suppress(Exception):
            await store.close()
        raise
    await server.start()
    try:
        await host.start()
    except (EtcdError, NodeNameHeld):
        # Tear down what started before main() reports etcd; a server left running would
        # outlive the event loop.
        await agent_web.stop(http)
        await server.stop(grace=None)
        with contextlib.suppress(Exception):
            await host.stop()
        with contextlib.suppress(Exception):
            await store.close()
        raise
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    agent_web.serving(http, True)
    print(f"agent {args.name} serving on {advertise}:{port} data {host.receiver.address}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    agent_web.serving(http, False)
    await server.stop(grace=1.0)
    await host.stop()
    await agent_web.stop(http)
    with contextlib.suppress(Exception):
        await store.close()
    malformed_input.flush()
    return 0


def main(argv: list[str] | None = None, *, access: DeviceAccess | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvmigrate-agent", description="NVMe live-migration agent (one per host)")
    parser.add_argument("--name", required=True, help="node name, e.g. n1")
    etcd_config.add_etcd_arguments(parser)
    grpc_tls.add_tls_arguments(parser)
    parser.add_argument("--etcd-prefix", default=os.environ.get("NVMIGRATE_ETCD_PREFIX", DEFAULT_PREFIX),
                        help="every etcd key of this cluster lives under it, so clusters can share an etcd "
                             f"(default: $NVMIGRATE_ETCD_PREFIX, else {DEFAULT_PREFIX})")
    parser.add_argument("--listen", type=split_host_port, default=("127.0.0.1", 0),
                        help="AgentService address HOST:PORT (port 0: any free port)")
    parser.add_argument("--data-listen", type=split_host_port, default=None,
                        help="data-plane address HOST:PORT (default: the --listen host, any port)")
    parser.add_argument("--advertise-host", default="", help="host name peers use to reach this agent")
    parser.add_argument("--data-dir", required=True, help="where the agent keeps what it hosts: controller "
                                                          "metadata, and the emulated backend's namespaces")
    parser.add_argument("--capacity", type=parse_size, default=None,
                        help="emulated backend: namespace bytes this node may hold, e.g. 20G (default 64G); "
                             "nvme-passthru: the sum of its slots")
    parser.add_argument("--lease-ttl-s", type=int, default=5, help="liveness lease TTL in seconds")
    parser.add_argument("--backend", choices=backends.BACKEND_KINDS, default=backends.EMULATED,
                        help="controller backend: emulated (default), nvme-passthru (a PF) or vfio (a VF)")
    parser.add_argument("--device", default=None, help="device node of a real backend: the PF for "
                                                        "nvme-passthru, e.g. /dev/nvme0")
    parser.add_argument("--slot", action="append", default=[], metavar="CNTLID:NSID:PATH",
                        help="nvme-passthru, repeated: a VF the agent may use for a controller, by its controller "
                             "id, its namespace id and that namespace's block device on the PF, e.g. "
                             "3:3:/dev/nvme0n3; a controller takes a free slot of exactly its size")
    parser.add_argument("--migration-yield", choices=("on", "off"), default="on",
                        help="migration reads from this node back off while its guests' NBD latency rises "
                             "(default on; off: they go as fast as the bandwidth cap allows)")
    parser.add_argument("--allow-fault-injection", action="store_true",
                        help="tests only: take InjectFault calls (corrupt or replay a data-plane frame, stall the "
                             "agent, set the emulated drive's health); without it they are refused")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text",
                        help="text, or json: one object per line with job_id and trace_id")
    parser.add_argument("--http", default=os.environ.get(agent_web.HTTP_ENV, agent_web.DEFAULT_HTTP),
                        metavar="HOST:PORT", help="serve /metrics, /healthz and /readyz here, e.g. 0.0.0.0:9465 "
                        f"(port 0: any free port; default: ${agent_web.HTTP_ENV}, else {agent_web.DEFAULT_HTTP})")
    args = parser.parse_args(argv)
    try:
        args.http = parse_http_address(args.http)
    except ValueError as exc:
        parser.error(f"{exc} (or {agent_web.HTTP_ENV})")
    problem = names.node_name_problem(args.name)
    if problem:
        parser.error(problem)
    if args.lease_ttl_s < 1:
        parser.error(f"--lease-ttl-s must be at least 1, got {args.lease_ttl_s}")
    problem = prefix_problem(args.etcd_prefix)
    if problem:
        parser.error(f"--etcd-prefix (or NVMIGRATE_ETCD_PREFIX): {problem}")
    try:
        args.etcd_config = etcd_config.config_from_args(args)
        args.tls = grpc_tls.tls_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.tls is not None and args.tls.identity != Identity(Role.AGENT, args.name):
        # an agent registers only under the node its certificate names
        parser.error(f"--tls-cert names {args.tls.identity}, but this agent is --name {args.name}: an agent runs "
                     f"only as the node its certificate names; give agent/{args.name}'s certificate")
    if telemetry.config_problem():  # the OTEL_* environment variables
        parser.error(str(telemetry.config_problem()))
    problem = backends.device_problem(args.backend, args.device, access)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        hosting = backends.open_hosting(args.backend, Path(args.data_dir), capacity_bytes=args.capacity,
                                        device=Path(args.device) if args.device else None, slots=args.slot,
                                        access=access)
    except HostingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot use --data-dir {args.data_dir}: {exc}", file=sys.stderr)
        return 2
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        with telemetry.running("nvmigrate-agent", args.name, f"agent[{args.name}]", args.log_level, args.log_format):
            return asyncio.run(serve(args, hosting))
    except EtcdError as exc:
        print(etcd_config.unreachable_message(args.etcd_config, exc), file=sys.stderr)
        return 2
    except NodeNameHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        hosting.close()


if __name__ == "__main__":
    sys.exit(main())
