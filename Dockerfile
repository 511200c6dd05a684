# syntax=docker/dockerfile:1
# The nvmigrate image: one image, three entry points (nvmigrate-orchestrator, nvmigrate-agent,
# orchctl), as the Helm chart (charts/nvmigrate) runs them.
#
#   docker build -t nvmigrate:0.1.0 .
#
# The builder installs the project and its dependencies into a virtual environment; the final
# image is python:3.11-slim with that environment and nothing to build with.

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/nvmigrate
WORKDIR /src
# The dependencies first, from pyproject.toml alone, so a source change reuses this layer.
COPY pyproject.toml ./
RUN /opt/nvmigrate/bin/python -c 'import subprocess, sys, tomllib; \
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
subprocess.run([sys.executable, "-m", "pip", "install", *deps], check=True)'
COPY proto ./proto
COPY cluster ./cluster
COPY orchestrator ./orchestrator
COPY agent ./agent
COPY orchctl ./orchctl
# A regular (non-editable) install: the venv holds the code, /src is not copied on.
RUN /opt/nvmigrate/bin/pip install --no-deps . \
 && /opt/nvmigrate/bin/orchctl version \
 && /opt/nvmigrate/bin/nvmigrate-orchestrator --help >/dev/null \
 && /opt/nvmigrate/bin/nvmigrate-agent --help >/dev/null

FROM python:3.11-slim
LABEL org.opencontainers.image.title="nvmigrate" \
      org.opencontainers.image.description="Live migration of NVMe controllers between hosts: orchestrator, agent, orchctl"
# USER: the image runs as an unprivileged user (10001), which is all the orchestrator, orchctl and
# an agent on the emulated backend need (the chart also sets runAsNonRoot for them). An agent on a
# real backend (nvme-passthru, vfio) issues NVMe admin passthrough and VFIO ioctls on host devices:
# the chart runs that one as root, privileged, with the devices mounted.
RUN groupadd --system --gid 10001 nvmigrate \
 && useradd --system --uid 10001 --gid nvmigrate --home-dir /var/lib/nvmigrate --no-create-home \
      --shell /usr/sbin/nologin nvmigrate \
 && install -d -o nvmigrate -g nvmigrate -m 0700 /var/lib/nvmigrate
COPY --from=builder /opt/nvmigrate /opt/nvmigrate
ENV PATH=/opt/nvmigrate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/nvmigrate
# The orchestrator's gRPC and HTTP; the agent's gRPC, data plane and HTTP (the chart's ports).
EXPOSE 50051 9464 50052 50053 9465
# No ENTRYPOINT: the command names the process (the chart sets it), e.g.
#   docker run --rm nvmigrate:0.1.0 nvmigrate-orchestrator --etcd etcd:2379 --listen 0.0.0.0:50051
CMD ["orchctl", "--help"]
