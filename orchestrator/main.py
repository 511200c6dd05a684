"""The orchestrator process: serves MigrationService and, while it holds the leader lease, drives
the jobs. Every replica answers the API; only the leader runs jobs.

    nvmigrate-orchestrator --etcd 127.0.0.1:2379 --listen 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster import etcd_config, grpc_tls, logs, telemetry
from cluster.grpc_tls import TlsFiles
from cluster.identity import Role
from cluster.malformed_grpc import MalformedRequests
from cluster.node_cache import NodeCache
from cluster.ratelimited_log import malformed_input
from cluster.store import DEFAULT_PREFIX, EtcdError, EtcdStore, keep_lease_alive, prefix_problem
from cluster.store_thread import StoreThread
from orchestrator import web
from orchestrator.agent_calls import AgentCalls
from orchestrator.api import MigrationApi
from orchestrator.dispatcher import JobDispatcher
from orchestrator.evacuation import Evacuation, EvacuationState, Limits
from orchestrator.evacuator import Evacuator
from orchestrator.health_policy import HealthPolicy
from orchestrator.job_collector import JobCollector
from orchestrator.job_retention import DEFAULT_KEEP_COUNT, DEFAULT_RETENTION_S, Retention
from orchestrator.jobs import Job
from orchestrator.kube import EvacuationRequest, KubeEvacuations, KubeNodes
from orchestrator.liveness import GRACE_OVER_LEASE_TTL_S, default_grace_s
from orchestrator.progress_watch import DEFAULT_PROGRESS_TIMEOUT_S
from orchestrator.reconciler import Reconciler
from orchestrator.runner import RunnerSettings
from orchestrator.switchover_model import SwitchoverModel
from orchestrator.verifier import Verifier
from proto.v1 import migration_pb2, migration_pb2_grpc

log = logging.getLogger("orchestrator")
CAMPAIGN_POLL_S = 0.2
LEASE_THREAD_STOP_S = 5.0


class Orchestrator:
    def __init__(self, store: EtcdStore, name: str, lease_ttl_s: int, max_concurrent: int,
                 settings: RunnerSettings | None = None, node_grace_s: float | None = None,
                 evacuation_limits: Limits | None = None, health_policy: HealthPolicy | None = None,
                 kube_nodes: KubeNodes | None = None, retention: Retention | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.kube_nodes = kube_nodes  # None: Kubernetes Nodes are not watched
        self.settings = settings or RunnerSettings()
        self.health_policy = health_policy  # None: drives predicting a failure start no evacuation
        self.retention = retention or Retention()
        self.store = store
        self.name = name
        self.lease_ttl_s = lease_ttl_s
        self.max_concurrent = max_concurrent
        # Every replica answers the API, so every replica follows the nodes (started in `serve`).
        self.nodes = NodeCache(store)
        self.agents = AgentCalls(store, node_grace_s=default_grace_s(lease_ttl_s) if node_grace_s is None
                                 else node_grace_s, tls=tls, nodes=self.nodes)
        # The leader lease is refreshed from a thread of its own: a loop busy with many jobs must
        # not let it expire (a needless step-down and takeover).
        self.lease_thread = StoreThread(store.config, store.prefix, f"leader-lease-{name}")
        self.dispatcher: JobDispatcher | None = None
        # What switchovers cost here, kept across leadership terms of this process.
        self.switchover_model = SwitchoverModel()
        self.evacuation_limits = evacuation_limits or Limits()
        self.evacuator: Evacuator | None = None
        self.api = MigrationApi(store, self.agents, on_job_created=self._poke, evacuation_limits=self.evacuation_limits,
                                on_evacuation_created=self._poke_evacuator, live_job=self.live_job, nodes=self.nodes)

    def _poke(self, job_id: str | None = None) -> None:
        if self.dispatcher is not None:
            self.dispatcher.poke(job_id)

    def live_job(self, job_id: str, revision: int) -> Job | None:
        """A running job's progress not yet written to etcd, while this orchestrator leads and drives it."""
        return self.dispatcher.live_job(job_id, revision) if self.dispatcher is not None else None

    def _poke_evacuator(self) -> None:
        if self.evacuator is not None:
            self.evacuator.poke()

    async def lead_forever(self) -> None:
        """Campaigns for the leader key; while held, a dispatcher drives the jobs."""
        while True:
            try:
                # A standby only reads while someone leads (cheap), so it can look often and take
                # over within the lease TTL plus a poll once the old leader's lease expires.
                if await self.store.leader() is not None:
                    await asyncio.sleep(CAMPAIGN_POLL_S)
                    continue
                lease_id = await self.store.grant_lease(self.lease_ttl_s)
                term = await self.store.try_become_leader(self.name, lease_id)
                if term is None:
                    await self.store.revoke_lease(lease_id)
                    continue
            except EtcdError as exc:
                log.warning("etcd unavailable while campaigning: %s", exc)
                await asyncio.sleep(1.0)
                continue
            log.info("%s leads with epoch %d", self.name, term)
            lost = asyncio.Event()
            self.lease_thread.start()
            keeper = self.lease_thread.submit(functools.partial(
                keep_lease_alive, lease_id=lease_id, ttl_s=self.lease_ttl_s,
                on_lost=functools.partial(_set_from_thread, asyncio.get_running_loop(), lost)))
            verifier = Verifier(self.store, self.agents, term)
            self.dispatcher = JobDispatcher(self.store, self.agents, term, self.max_concurrent, self.settings,
                                            verifier, self.switchover_model, on_job_ended=self._poke_evacuator,
                                            nodes=self.nodes)
            self.dispatcher.start()
            reconciling = asyncio.create_task(Reconciler(self.store, self.agents, self.nodes).run_forever(),
                                              name="reconcile")
            verifying = asyncio.create_task(verifier.run_forever(), name="verify")
            self.evacuator = Evacuator(self.store, term, self.evacuation_limits, on_job_created=self._poke,
                                       health=self.health_policy, nodes=self.nodes)
            evacuating = asyncio.create_task(self.evacuator.run_forever(), name="evacuate")
            collecting = asyncio.create_task(JobCollector(self.store, term, self.retention).run_forever(),
                                             name="collect-jobs")
            background = [reconciling, verifying, evacuating, collecting]
            if self.kube_nodes is not None:
                kube = KubeEvacuations(self.kube_nodes, self._evacuate_for_kube, self._evacuation_progress)
                background.append(asyncio.create_task(kube.run_forever(), name="kube-nodes"))
            try:
                await lost.wait()
                log.error("%s lost the leader lease; stopping job runners", self.name)
            finally:
                await self.dispatcher.stop()
                self.dispatcher = None
                self.evacuator = None
                keeper.cancel()
                for task in background:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task


    async def _evacuate_for_kube(self, request: EvacuationRequest) -> None:
        reason = migration_pb2.PREDICTED_FAILURE if request.predicted_failure else migration_pb2.MANUAL
        why_not = await self.api.start_evacuation(migration_pb2.EvacuateNodeRequest(
            node=request.node, reason=reason, note=request.reason))
        if why_not:
            log.warning("evacuation asked by Kubernetes node %s not started: %s", request.kube_node, why_not)
        if self.evacuator is not None:
            self.evacuator.poke()

    async def _evacuation_progress(self, node: str) -> tuple[str, bool, bool] | None:
        got = await self.store.get_evacuation(node)
        if got is None:
            return None
        ev = Evacuation.from_bytes(got.value)
        counts = ev.counts()
        text = f"{ev.state.value}: {counts['moved']} of {counts['total']} controllers moved"
        if ev.failure:
            text += f"; {ev.failure}"
        return text, ev.ended, ev.state is not EvacuationState.DONE and ev.ended


async def _set_from_thread(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    """Sets `event`, which belongs to `loop`, from another thread's loop (the lease thread's)."""
    loop.call_soon_threadsafe(event.set)


async def serve(args: argparse.Namespace) -> int:
    store = EtcdStore(args.etcd_config, prefix=args.etcd_prefix)
    await store.connect()
    settings = RunnerSettings(agent_call_budget_s=args.agent_call_budget_s, job_deadline_s=args.job_deadline_s,
                              etcd_check_timeout_s=args.etcd_check_timeout_s,
                              progress_timeout_s=args.progress_timeout_s)
    kube_nodes = None
    if args.kube_api or args.kubeconfig:
        try:
            kube_nodes = await asyncio.to_thread(KubeNodes, "" if args.kube_api == "in-cluster" else args.kube_api,
                                                 args.kubeconfig)
        except Exception as exc:  # a bad kubeconfig, no service account
            print(f"error: cannot use the Kubernetes API ({args.kube_api or args.kubeconfig}): {exc}", file=sys.stderr)
            await store.close()
            return 2
    limits = Limits(cluster=args.evacuation_max_parallel, outbound_per_node=args.evacuation_outbound_per_node,
                    inbound_per_node=args.evacuation_inbound_per_node)
    orchestrator = Orchestrator(store, args.name, args.lease_ttl_s, args.max_concurrent, settings,
                                node_grace_s=args.node_grace_s, evacuation_limits=limits,
                                health_policy=None if args.auto_evacuate_max == 0
                                else HealthPolicy(max_automatic=args.auto_evacuate_max),
                                kube_nodes=kube_nodes,
                                retention=Retention(args.job_retention_s, args.job_retention_count),
                                tls=args.tls)
    # With TLS, calls are authorized first; undecodable requests get INVALID_ARGUMENT
    server = grpc.aio.server(interceptors=[*grpc_tls.server_interceptors(args.tls), MalformedRequests()])
    migration_pb2_grpc.add_MigrationServiceServicer_to_server(orchestrator.api, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (migration_pb2.DESCRIPTOR.services_by_name["MigrationService"].full_name,
                     reflection.SERVICE_NAME, health.SERVICE_NAME)
    reflection.enable_server_reflection(service_names, server)
    try:
        port = grpc_tls.add_port(server, args.listen, args.tls)
    except RuntimeError as exc:
        print(f"error: cannot listen on {args.listen!r}: {exc}", file=sys.stderr)
        return 2
    try:
        http = await web.start(store, args.name, args.http, orchestrator.live_job,  # /metrics and the web page
                               orchestrator.nodes)
    except OSError as exc:
        print(f"error: cannot serve HTTP on {args.http[0]}:{args.http[1]}: {exc}; pass --http", file=sys.stderr)
        return 2
    orchestrator.nodes.start()
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if http is not None:
        http.grpc_serving = True  # /readyz
    host = args.listen.rpartition(":")[0]
    print(f"orchestrator {args.name} serving on {host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    leading = asyncio.create_task(orchestrator.lead_forever(), name="lead")
    await stop.wait()
    leading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leading
    if orchestrator.dispatcher is not None:
        await orchestrator.dispatcher.stop()
    with contextlib.suppress(EtcdError):
        await store.resign(args.name)
    if http is not None:
        http.grpc_serving = False
    await server.stop(grace=1.0)
    if http is not None:
        await http.stop()
    await asyncio.to_thread(orchestrator.lease_thread.stop, LEASE_THREAD_STOP_S)
    await orchestrator.agents.close()
    await orchestrator.nodes.stop()
    await store.close()
    malformed_input.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvmigrate-orchestrator", description="NVMe live-migration orchestrator")
    etcd_config.add_etcd_arguments(parser)
    grpc_tls.add_tls_arguments(parser)
    parser.add_argument("--etcd-prefix", default=os.environ.get("NVMIGRATE_ETCD_PREFIX", DEFAULT_PREFIX),
                        help="every etcd key of this cluster lives under it, so clusters can share an etcd "
                             f"(default: $NVMIGRATE_ETCD_PREFIX, else {DEFAULT_PREFIX})")
    parser.add_argument("--listen", default="127.0.0.1:50051", help="gRPC listen address HOST:PORT")
    parser.add_argument("--name", default=f"orchestrator-{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--lease-ttl-s", type=int, default=5, help="leader lease TTL in seconds")
    parser.add_argument("--max-concurrent", type=int, default=4, help="migrations driven at once")
    parser.add_argument("--agent-call-budget-s", type=float, default=15.0,
                        help="how long an agent may not answer before it is declared lost for a job")
    parser.add_argument("--node-grace-s", type=float, default=None,
                        help="how long a node's record may be missing from etcd (its lease expired) before "
                             "the node counts as lost, if it does not answer a ping either (default: "
                             f"--lease-ttl-s + {GRACE_OVER_LEASE_TTL_S:.0f} s; agents should use the same TTL)")
    parser.add_argument("--job-deadline-s", type=float, default=3600.0,
                        help="a job not committed by then rolls back")
    parser.add_argument("--progress-timeout-s", type=float, default=DEFAULT_PROGRESS_TIMEOUT_S,
                        help="a job whose copy moves no byte for this long rolls back, not waiting for "
                             f"--job-deadline-s (default {DEFAULT_PROGRESS_TIMEOUT_S:.0f})")
    parser.add_argument("--etcd-check-timeout-s", type=float, default=1.0,
                        help="etcd must answer a check this fast right before a guest pauses for stop-and-copy "
                             "and right before COMMIT; otherwise the guest is not paused, or resumes on the source")
    defaults = Limits()
    parser.add_argument("--kube-api", default="", metavar="URL",
                        help="watch this Kubernetes API server's Nodes for evacuation requests (a condition "
                             "NVMeDriveFailurePredicted, the taint or annotation nvmigrate.io/evacuate); "
                             "'in-cluster' uses the pod's service account")
    parser.add_argument("--kubeconfig", default="", help="a kubeconfig file for --kube-api (instead of a URL)")
    parser.add_argument("--auto-evacuate-max", type=int, default=1,
                        help="nodes evacuated automatically at once when their drive predicts a failure (SMART / "
                             "Health log: critical warning, spare, wear, media errors, temperature); 0 turns "
                             "automatic evacuation off")
    parser.add_argument("--evacuation-max-parallel", type=int, default=defaults.cluster,
                        help="evacuation migrations started while this many jobs run in the cluster at most")
    parser.add_argument("--evacuation-outbound-per-node", type=int, default=defaults.outbound_per_node,
                        help="migrations leaving one node at once, at most, for an evacuation to start another")
    parser.add_argument("--evacuation-inbound-per-node", type=int, default=defaults.inbound_per_node,
                        help="migrations arriving at one node at once, at most, for an evacuation to send it another")
    parser.add_argument("--job-retention-s", type=float, default=DEFAULT_RETENTION_S,
                        help="a finished job is deleted from etcd this long after it ended (default 7 days); "
                             "a completed job whose verification is pending or failed is kept")
    parser.add_argument("--job-retention-count", type=int, default=DEFAULT_KEEP_COUNT,
                        help="at most this many finished jobs are kept, the newest (default "
                             f"{DEFAULT_KEEP_COUNT}); a completed job whose verification is pending or failed is kept")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text",
                        help="text, or json: one object per line with job_id and trace_id")
    parser.add_argument("--http", default=web.DEFAULT_HTTP, metavar="HOST:PORT",
                        help=f"serve /metrics and the web page here (default {web.DEFAULT_HTTP}; 'off': not at all)")
    args = parser.parse_args(argv)
    try:
        args.http = web.parse_http_address(args.http)
    except ValueError as exc:
        parser.error(str(exc))
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
    if args.tls is not None and args.tls.identity.role is not Role.ORCHESTRATOR:
        parser.error(f"--tls-cert names {args.tls.identity}, not an orchestrator; give the orchestrator's "
                     "certificate (`orchctl certs` makes it)")
    for flag in ("agent_call_budget_s", "job_deadline_s", "etcd_check_timeout_s", "job_retention_s",
                 "progress_timeout_s"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be greater than 0, got {getattr(args, flag)}")
    if args.node_grace_s is not None and args.node_grace_s < 0:
        parser.error(f"--node-grace-s must be 0 or more, got {args.node_grace_s}")
    if args.auto_evacuate_max < 0:
        parser.error(f"--auto-evacuate-max must be 0 (off) or more, got {args.auto_evacuate_max}")
    for flag in ("evacuation_max_parallel", "evacuation_outbound_per_node", "evacuation_inbound_per_node"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.job_retention_count < 0:
        parser.error(f"--job-retention-count must be 0 or more, got {args.job_retention_count}")
    if args.max_concurrent < 1:
        parser.error(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    if telemetry.config_problem():  # the OTEL_* environment variables
        parser.error(str(telemetry.config_problem()))
    try:
        with telemetry.running("nvmigrate-orchestrator", args.name, f"orchestrator[{args.name}]", args.log_level,
                               args.log_format):
            return asyncio.run(serve(args))
    except EtcdError as exc:
        print(etcd_config.unreachable_message(args.etcd_config, exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
