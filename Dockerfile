# syntax=docker/dockerfile:1.7
#
# MedServe inference image (also runs `medserve train` and `medserve export`).
#
#   docker build -t medserve:gpu .                              # CUDA 13.0 + PyTorch 2.14.1+cu130 (default)
#   docker build --build-arg VARIANT=cpu -t medserve:cpu .      # no GPU: PyTorch CPU build on plain Ubuntu
#   docker run --gpus all -p 8000:8000 -v "$PWD/checkpoints:/models:ro" medserve:gpu
#
# Models are not part of the image: mount a folder of checkpoints (*.pt) at /models, read-only.
# Air-gapped sites may bake theirs in by overriding the `models` stage with a named build context:
#   docker build --build-context models=./checkpoints -t medserve:gpu-baked .
#
# Base image choice: torch 2.14.1+cu130 is built against CUDA 13.0 and pins its CUDA user-space libraries as
# wheels (nvidia-cuda-runtime 13.0.96 = CUDA 13.0 Update 2, cuDNN 9, cuBLAS, NCCL). The matching CUDA image is
# therefore nvidia/cuda:13.0.2 in its "base" flavour: the CUDA 13.0.2 runtime (cudart), the forward-compat
# package and the NVIDIA_* settings the container toolkit reads (NVIDIA_REQUIRE_CUDA makes a host whose driver
# is too old, below R580, fail at start with a clear message). The "runtime" flavour would add a second copy
# of cuBLAS/cuSPARSE/NCCL (~3 GB) that the torch wheels never load. Pin by digest for bit-for-bit rebuilds:
#   --build-arg CUDA_IMAGE=nvidia/cuda@sha256:<digest>
# Python 3.11 comes from uv's standalone builds (Ubuntu 24.04 ships 3.12); pinning uv pins the Python patch.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# ---- build: a relocatable Python 3.11 and a virtual environment in /opt ---------------------------------------
FROM ${CPU_IMAGE} AS build
ARG PYTHON_VERSION=3.11
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv

# The project's source: only what the `medserve` package needs (see .dockerignore).
FROM scratch AS src
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY models /src/models
COPY training /src/training

# PyTorch first (large, rarely changes: its own layer), then MedServe and its runtime dependencies (no dev extras).
# torch/torchvision are the versions `make install` pins; an installed torch satisfies the project's range, so
# the second step keeps the CUDA (or CPU) build.
FROM build AS venv-gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
RUN uv pip install --index-url "${TORCH_INDEX}" torch==2.14.1 torchvision==0.29.1
COPY --from=src /src /src
RUN uv pip install /src && rm -rf /src

FROM build AS venv-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN uv pip install --index-url "${TORCH_INDEX}" torch==2.14.1 torchvision==0.29.1
COPY --from=src /src /src
RUN uv pip install /src && rm -rf /src

# Checkpoints baked into the image: empty unless overridden with `--build-context models=DIR`.
FROM scratch AS models
COPY deploy/docker/models-README.md /README.md

# VARIANT picks one of the stages above (hadolint cannot tell a stage name from an image name).
# hadolint ignore=DL3006
FROM venv-${VARIANT} AS venv
FROM ${CUDA_IMAGE} AS base-gpu
FROM ${CPU_IMAGE} AS base-cpu

# ---- runtime ------------------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="MedServe" \
      org.opencontainers.image.description="U-Net segmentation and CNN classification service for medical images" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.medserve.variant="${VARIANT}"
RUN groupadd --system --gid 10001 medserve \
 && useradd --system --uid 10001 --gid medserve --create-home --home-dir /home/medserve \
      --shell /usr/sbin/nologin medserve
COPY --from=venv /opt/python /opt/python
COPY --from=venv /opt/venv /opt/venv
COPY --from=models / /models/
# Caches go to /tmp so that the container also runs with a read-only root file system (Kubernetes manifest).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    MEDSERVE_MODEL_DIR=/models
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/medserve
EXPOSE 8000
# Ready = every checkpoint loaded and warmed up; the start period covers loading large models onto the GPU.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["medserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
