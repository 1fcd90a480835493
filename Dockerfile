# syntax=docker/dockerfile:1
#
# zimage-server on an NVIDIA GPU. Build and run (see docs/deploy.md):
#   docker build -t zimage-server .
#   docker run --gpus all -p 8000:8000 -v "$PWD/models:/models" -v "$PWD/outputs:/outputs" zimage-server
#
# The pattern is astral-sh/uv-docker-example (standalone.Dockerfile): a builder stage syncs the
# locked dependencies into /app/.venv with a uv-managed Python in /python, and the final stage
# copies both to the same paths, so the venv's interpreter links stay valid without uv in the image.
#
# Matching torch to CUDA: the pytorch CUDA wheel index cannot be reached where uv.lock is made,
# so the lock takes torch from PyPI, whose Linux wheel is a CUDA build. torch 2.14.1 in uv.lock
# (the release CI tests) requires cuda-toolkit==13.0.3.0 (nvidia-cuda-runtime 13.0.96,
# nvidia-cudnn-cu13, ...), that is CUDA 13.0, so both stages use nvidia/cuda:13.0.0. The "base"
# flavour is enough, and deliberate: torch loads cuBLAS, cuDNN, NCCL, ... from those wheels in the
# venv, and the "runtime" flavour would add a second copy of them (gigabytes) that nothing loads.
# What the image contributes is NVIDIA_REQUIRE_CUDA=cuda>=13.0, which makes the NVIDIA container
# toolkit refuse a host driver too old for CUDA 13.0 with a clear message at `docker run` instead
# of a CUDA error inside Python. When torch in uv.lock moves to another CUDA release, change this
# tag with it: `grep -A1 'name = "cuda-toolkit"' uv.lock`.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${CUDA_IMAGE} AS builder
COPY --from=uv /uv /uvx /bin/

# Bytecode compiled at build time so a container starts without writing .pyc files; copy
# instead of hard-linking because the uv cache is a mount that does not reach the final image.
# 3.11 is the Python CI tests on; uv.lock covers it (requires-python >= 3.11).
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON=3.11 \
    UV_PYTHON_INSTALL_DIR=/python \
    UV_PYTHON_PREFERENCE=only-managed

RUN uv python install 3.11

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when uv.lock or pyproject.toml
# change, not on every source edit (torch and the CUDA wheels are several GB).
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --locked --no-install-project --no-dev

# Only what building the package needs, so edits to docs, tests or deploy/ keep the cache.
# --no-editable installs the package into the venv, so the final stage needs no source tree.
COPY pyproject.toml uv.lock README.md /app/
COPY src /app/src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable


FROM ${CUDA_IMAGE}

# tini as PID 1 forwards SIGTERM to the server (so it drains its queue) and reaps zombies.
# apt versions are not pinned: the CUDA tag pins the Ubuntu release, and tini's package there
# only takes security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with uid 1000, the uid a single-user Linux host usually has, so a bind-mounted
# ./models is writable for `zimage-server download` without chown. Ubuntu 24.04 images ship an
# "ubuntu" user with that uid; it goes first.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 zimage \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin zimage \
    && mkdir /models /outputs \
    && chown zimage:zimage /models /outputs

# Owned by root: the server has no reason to modify its own code or interpreter.
COPY --from=builder /python /python
COPY --from=builder /app/.venv /app/.venv

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    MODELS_DIR=/models \
    Z_IMAGE_STORE=/outputs

# The weights (tens of GB) live outside the image: mount a host folder or a volume here.
VOLUME /models
# The kept images and their SQLite index (docs/storage.md), in a volume of their own so they
# outlive the container; mount a host folder to keep them across images, or set Z_IMAGE_STORE
# to s3://... (with Z_IMAGE_DATABASE_URL) to keep them elsewhere.
VOLUME /outputs
EXPOSE 8000
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000
WORKDIR /home/zimage

# Liveness only: /health answers while the process runs, including while weights download or
# load (/ready says when it can serve). Python, because the image has no curl. start-period
# covers a cold model load; a download at first start can take longer, and that only shows as
# "unhealthy" in `docker ps`, nothing restarts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["zimage-server", "serve", "--host", "0.0.0.0", "--port", "8000"]
