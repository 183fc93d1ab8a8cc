# syntax=docker/dockerfile:1
# One image for both console scripts (`streamer`, `trainer`), in two flavours:
#   docker build -t lstm-streamer:cuda .                      # default: CUDA 12.4 runtime + cu124 torch
#   docker build -t lstm-streamer:cpu --build-arg VARIANT=cpu .  # python:3.11-slim + CPU torch
# The flavour picks the base stage (`base-${VARIANT}`) and the torch wheel index; everything
# after that is shared, so the two images cannot drift apart.

ARG VARIANT=cuda

# --- base images: Python 3.11 plus the torch index that matches the hardware -----------------
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS base-cuda
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04 ships Python 3.10; deadsnakes provides 3.11 (with venv/ensurepip).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common gnupg \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124

FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# --- build: a venv with torch, the dependencies, then the project itself ---------------------
FROM base AS build
RUN python -m venv /opt/venv
# torch first, from the index for this flavour, so that `torch>=2.3` in pyproject.toml is
# already satisfied and pip never pulls the default (multi-GB, wrong-CUDA) build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.3"
WORKDIR /src
# Only pyproject.toml (and README.md when there is one) before the dependency install: editing
# code then reuses the cached dependency layers.
COPY pyproject.toml README.md* ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY streamer/ streamer/
COPY trainer/ trainer/
RUN pip install --no-deps .

# --- runtime: the venv and a non-root user, nothing else -------------------------------------
FROM base AS runtime
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home app \
 && mkdir -p /registry \
 && chown app:app /registry
COPY --from=build /opt/venv /opt/venv
# /registry exists and belongs to `app` so that a fresh named volume mounted there inherits
# that owner and the non-root trainer can write versions into it.
WORKDIR /home/app
USER 10001:10001
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=3)"]
ENTRYPOINT ["streamer"]
CMD ["run"]
