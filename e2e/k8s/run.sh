#!/usr/bin/env bash
# One live migration on a real Kubernetes cluster, through the Helm chart: build the image, load it
# into kind (or push it), install charts/nvmigrate, wait for the rollout, create a controller with a
# running guest, migrate it with orchctl through a port-forward, print the job, then uninstall.
# Not run in CI (no cluster there); e2e/k8s/README.md says how to run it.
#
#   e2e/k8s/run.sh --kind nvmigrate                 # a kind cluster named nvmigrate (kind.yaml)
#   e2e/k8s/run.sh --push registry.example:5000     # any cluster that pulls from that registry
#   e2e/k8s/run.sh --image nvmigrate:dev --no-build --kind nvmigrate -f my-values.yaml --keep
#
# Exit status: 0 when the migration COMPLETED and its verification PASSED, 1 when it did not,
# 2 for a usage or environment problem.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="$ROOT/charts/nvmigrate"
RUN_ID="$(date +%s)"
IMAGE="nvmigrate:e2e-$RUN_ID"
KIND_CLUSTER=""
REGISTRY=""
BUILD=1
KEEP=0
NAMESPACE="nvmigrate-e2e"
RELEASE="nvm-e2e"
LOCAL_PORT=50551
TIMEOUT_S=300
VALUES_ARGS=()

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'

Options:
  --kind NAME        load the image into kind cluster NAME (kind load docker-image)
  --push REGISTRY    tag the image REGISTRY/nvmigrate:TAG and push it there
  --image NAME:TAG   the image to build (or, with --no-build, to use); default nvmigrate:e2e-<time>
  --no-build         do not build: the image exists already
  -f, --values FILE  more chart values (repeatable)
  --set KEY=VALUE    one chart value (repeatable)
  --namespace NS     default nvmigrate-e2e (created, and deleted afterwards unless --keep)
  --release NAME     default nvm-e2e
  --port PORT        local port of the port-forward to the orchestrator's gRPC (default 50551)
  --timeout SECONDS  for each wait (default 300)
  --keep             leave the release installed (to look around); uninstall it yourself later
USAGE
}

die() {
  echo "error: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --kind) KIND_CLUSTER="${2:?--kind needs a cluster name}"; shift 2 ;;
    --push) REGISTRY="${2:?--push needs a registry}"; shift 2 ;;
    --image) IMAGE="${2:?--image needs NAME:TAG}"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -f|--values) [ -f "${2:-}" ] || die "values file '${2:-}' does not exist"; VALUES_ARGS+=(-f "$2"); shift 2 ;;
    --set) VALUES_ARGS+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --namespace) NAMESPACE="${2:?--namespace needs a name}"; shift 2 ;;
    --release) RELEASE="${2:?--release needs a name}"; shift 2 ;;
    --port) LOCAL_PORT="${2:?--port needs a number}"; shift 2 ;;
    --timeout) TIMEOUT_S="${2:?--timeout needs seconds}"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[ -n "$KIND_CLUSTER" ] && [ -n "$REGISTRY" ] && die "choose one of --kind and --push"
[ -z "$KIND_CLUSTER" ] && [ -z "$REGISTRY" ] && [ "$BUILD" = 1 ] &&
  die "the cluster must get the image: pass --kind NAME or --push REGISTRY (or --no-build with an image it can pull)"

# The tools: helm and orchctl from the project's virtual environment (scripts/setup.sh) when there.
PATH="$ROOT/.venv/bin:$PATH"
need=(kubectl helm orchctl python3)
[ "$BUILD" = 1 ] && need+=(docker)
[ -n "$KIND_CLUSTER" ] && need+=(kind)
for tool in "${need[@]}"; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH (helm and orchctl: bash scripts/setup.sh puts them in .venv/bin)"
done
kubectl cluster-info >/dev/null 2>&1 || die "kubectl reaches no cluster: check the current context (kubectl config current-context)"

step() { printf '\n==> %s\n' "$*"; }

# ---- the image ----------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  step "building $IMAGE"
  docker build -t "$IMAGE" "$ROOT"
fi
if [ -n "$KIND_CLUSTER" ]; then
  step "loading $IMAGE into kind cluster $KIND_CLUSTER"
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
elif [ -n "$REGISTRY" ]; then
  pushed="$REGISTRY/${IMAGE##*/}"
  step "pushing $pushed"
  docker tag "$IMAGE" "$pushed"
  docker push "$pushed"
  IMAGE="$pushed"
fi
REPOSITORY="${IMAGE%:*}"
TAG="${IMAGE##*:}"

# ---- install --------------------------------------------------------------------------------------
FULLNAME="$RELEASE-nvmigrate"
[[ "$RELEASE" == *nvmigrate* ]] && FULLNAME="$RELEASE"
PF_PID=""
CREATED_NAMESPACE=0

cleanup() {
  local status=$?
  if [ -n "$PF_PID" ]; then
    kill "$PF_PID" 2>/dev/null || true
    wait "$PF_PID" 2>/dev/null || true
  fi
  if [ "$KEEP" = 1 ]; then
    echo "kept: helm -n $NAMESPACE uninstall $RELEASE && kubectl delete namespace $NAMESPACE"
  else
    step "uninstalling"
    helm uninstall "$RELEASE" --namespace "$NAMESPACE" --wait --timeout "${TIMEOUT_S}s" || true
    if [ "$CREATED_NAMESPACE" = 1 ]; then
      kubectl delete namespace "$NAMESPACE" --wait=true --timeout="${TIMEOUT_S}s" || true  # the etcd PVCs too
    fi
  fi
  exit "$status"
}
trap cleanup EXIT

if ! kubectl get namespace "$NAMESPACE" >/dev/null 2>&1; then
  kubectl create namespace "$NAMESPACE" >/dev/null
  CREATED_NAMESPACE=1
fi
step "installing $RELEASE ($IMAGE) in namespace $NAMESPACE"
# Agents keep their data in a hostPath: a directory of this run's own, so a run never reopens
# controllers an earlier run left on the nodes.
helm upgrade --install "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
  --set "image.repository=$REPOSITORY" --set "image.tag=$TAG" --set image.pullPolicy=IfNotPresent \
  --set "agent.dataDir=/var/lib/nvmigrate-e2e/$RUN_ID" \
  "${VALUES_ARGS[@]}" --wait --timeout "${TIMEOUT_S}s"

step "waiting for the rollout"
if kubectl -n "$NAMESPACE" get statefulset "$FULLNAME-etcd" >/dev/null 2>&1; then
  kubectl -n "$NAMESPACE" rollout status statefulset "$FULLNAME-etcd" --timeout "${TIMEOUT_S}s"
fi
kubectl -n "$NAMESPACE" rollout status deployment "$FULLNAME-orchestrator" --timeout "${TIMEOUT_S}s"
kubectl -n "$NAMESPACE" rollout status daemonset "$FULLNAME-agent" --timeout "${TIMEOUT_S}s"
kubectl -n "$NAMESPACE" get pods -o wide

# ---- one migration through a port-forward ------------------------------------------------------
step "port-forwarding 127.0.0.1:$LOCAL_PORT to the orchestrator"
kubectl -n "$NAMESPACE" port-forward "service/$FULLNAME-orchestrator" "$LOCAL_PORT:grpc" >/dev/null &
PF_PID=$!
export ORCHCTL_SERVER="127.0.0.1:$LOCAL_PORT"

# Polls COMMAND until it succeeds, for at most TIMEOUT_S seconds.
wait_until() {
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT_S))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: timed out after ${TIMEOUT_S} s waiting for $what" >&2
      return 1
    fi
    kill -0 "$PF_PID" 2>/dev/null || { echo "error: the port-forward ended" >&2; return 1; }
    sleep 1
  done
}

live_nodes_at_least() {
  orchctl -o json nodes | python3 -c '
import json, sys
nodes = json.load(sys.stdin).get("nodes", [])
sys.exit(0 if sum(1 for n in nodes if n.get("live") and not n.get("cordoned")) >= int(sys.argv[1]) else 1)' "$1"
}

wait_until "the orchestrator to answer through the port-forward" orchctl nodes
wait_until "two live, uncordoned agents (a migration needs a destination)" live_nodes_at_least 2
orchctl nodes

CONTROLLER="e2e-$RUN_ID"
step "creating controller $CONTROLLER (64 MiB, prefilled, its guest writing 100 blocks/s)"
orchctl controllers create "$CONTROLLER" --size 64M --prefill --write-iops 100

step "migrating $CONTROLLER (the scheduler picks the destination)"
migrated=0
orchctl migrate "$CONTROLLER" --wait || migrated=$?
JOB="$(orchctl list -q | tail -n 1)"

verification_done() {
  orchctl -o json get "$JOB" | python3 -c '
import json, sys
sys.exit(0 if json.load(sys.stdin).get("verification") in ("VERIFICATION_PASSED", "VERIFICATION_FAILED") else 1)'
}
if [ "$migrated" = 0 ]; then
  wait_until "the verification of $JOB" verification_done || true
fi

step "result: job $JOB"
orchctl get "$JOB"
orchctl -o json get "$JOB"
verification="$(orchctl -o json get "$JOB" | python3 -c 'import json, sys; print(json.load(sys.stdin).get("verification", ""))')"

step "deleting controller $CONTROLLER"
orchctl controllers delete "$CONTROLLER" || true

if [ "$migrated" != 0 ]; then
  echo "FAILED: the migration of $CONTROLLER did not complete (orchctl migrate exited $migrated)" >&2
  exit 1
fi
if [ "$verification" != "VERIFICATION_PASSED" ]; then
  echo "FAILED: the migration completed but its verification is $verification" >&2
  exit 1
fi
echo "OK: $CONTROLLER migrated live (job $JOB), verification passed"
