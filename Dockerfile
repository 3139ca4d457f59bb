# syntax=docker/dockerfile:1
#
# GGA trust service image. Same install steps as the README: torch first (pinned), then
# the project (`pip install .`). Serves the bundled reference MNIST CNN and its detector
# unless GGA_* settings say otherwise (see service/settings.py).
#
# CPU (default):
#   docker build -t gga-trust .
#   docker run -p 8000:8000 -v gga-data:/data gga-trust
#
# CUDA: a CUDA runtime base and a CUDA torch wheel (pick the cuXXX index that
# torch==2.13.0 is published for and that the base image's CUDA matches):
#   docker build -t gga-trust:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     --build-arg TORCH_SPEC=torch==2.13.0 .
#   docker run --gpus all -p 8000:8000 -v gga-data:/data gga-trust:cuda
# GGA_DEVICE=auto (the default) then picks the GPU. The nvidia/cuda images carry no
# Python 3.11+, so the build installs the distribution's python3 (3.12 on Ubuntu 24.04).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# A virtual environment at /opt/venv; install python3 + venv first where the base has
# none (nvidia/cuda bases).
RUN if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --upgrade pip
ENV PATH=/opt/venv/bin:$PATH

# torch first and pinned (its own layer, cached across source changes): an unpinned torch
# from PyPI pulls the CUDA build (gigabytes) even for the CPU image.
RUN python -m pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /app
# Only what `pip install .` needs; the bundled model lives in service/default_model/.
COPY pyproject.toml README.md ./
COPY detectors/ ./detectors/
COPY service/ ./service/
RUN python -m pip install . \
    && cd / && python -c "import torch, service.cli; print('torch', torch.__version__)"

# Non-root user; /data holds fitted detector versions (GGA_ARTIFACT_DIR) and must be
# owned by it before the VOLUME is declared, so a fresh named volume inherits that.
RUN useradd --create-home --uid 10001 --user-group gga \
    && mkdir -p /data/artifacts \
    && chown -R gga:gga /data
USER gga

ENV GGA_HOST=0.0.0.0 \
    GGA_PORT=8000 \
    GGA_ARTIFACT_DIR=/data/artifacts
VOLUME ["/data"]
EXPOSE 8000

# No curl in the slim image: probe /healthz with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GGA_PORT', '8000'), timeout=4)" || exit 1

CMD ["gga-serve"]
