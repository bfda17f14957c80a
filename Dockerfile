# syntax=docker/dockerfile:1.7
# Runwarden controller image:
#   docker build -t ghcr.io/runwarden/runwarden:0.1.0 .
# Stage 1 builds wheels for the project and its pinned runtime dependencies. The final stage
# installs only those wheels: no compiler, no build tools, no source tree, no test tools.
# tests/deploy/test_dockerfile.py lints this file and builds/installs the same wheel in a clean
# venv to run what the image runs.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY controller/ controller/
COPY cloudrun_emulator/ cloudrun_emulator/
# The lock pins the whole tree (test tools included); as constraints it fixes the versions of the
# runtime dependencies without pulling the test tools in.
RUN pip wheel --wheel-dir /wheels --constraint requirements.lock .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="runwarden" \
      org.opencontainers.image.description="Keeps Cloud Run services' env vars, invokers and settings as declared in Orchestrator resources" \
      org.opencontainers.image.source="https://github.com/runwarden/runwarden" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# Read-only root filesystem: never write bytecode or caches next to the code; HOME points at
# /tmp, the one writable mount (an emptyDir in manifests/controller/deployment.yaml).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# Bytecode is compiled here, at install time, so nothing needs writing at run time. pip,
# setuptools and wheel are not needed at run time: remove them to shrink the attack surface.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels runwarden \
 && pip uninstall --yes setuptools wheel pip
USER 65532:65532
# `python -m` puts the working directory on sys.path: keep it one nobody can write to.
WORKDIR /
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "controller"]
CMD ["--all-namespaces", "--standalone", "--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9090", "--log-format=json", "--leader-election", "--leader-election-namespace=runwarden-system", "--namespace-binding=required"]
