# syntax=docker/dockerfile:1
# The runtime image the Helm chart (helm/weightship) runs: weightship with its `serve` extra and
# PyTorch on a CUDA base, as the non-root user 10001 that the chart's securityContext names
# (values.yaml `uid`). tests/deploy/test_k8s_image.py keeps the two in step.
#
#   docker build -t registry.example.com/weightship:0.1.0 .
#   docker build --build-arg EXTRAS=all -t …      # also the deploy tools (helm-python-sdk, …)
#
# PyTorch's Linux wheels from PyPI carry their own CUDA libraries, so the base only needs the
# CUDA driver glue the NVIDIA container runtime mounts; no CUDA toolkit is installed.

ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY weightship ./weightship
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${CUDA_BASE}
ARG EXTRAS=serve
# Same pin as pyproject.toml's serve extra: an unpinned torch pulls whatever CUDA build is newest.
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/weightship \
    PATH=/opt/weightship/bin:$PATH
# gcc, libc6-dev and python3-dev: Triton compiles its kernel launcher (a C extension) the first
# time `serve` compiles the decode step; without them torch.compile fails and decoding runs
# eagerly, several times slower. Its caches go to /cache (the chart's TRITON_CACHE_DIR and
# TORCHINDUCTOR_CACHE_DIR).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/weightship
COPY --from=build /wheels /wheels
RUN pip install "torch==${TORCH_VERSION}" \
    && pip install "$(ls /wheels/weightship-*.whl)[${EXTRAS}]" \
    && rm -rf /wheels
# Fixed non-root uid/gid 10001: the chart runs every container as it (runAsNonRoot), with a
# read-only root filesystem; /models, /tmp and /cache are volumes the chart mounts.
RUN groupadd --gid 10001 weightship \
    && useradd --uid 10001 --gid 10001 --home-dir /home/weightship --create-home \
       --shell /usr/sbin/nologin weightship \
    && mkdir -p /models /cache \
    && chown 10001:10001 /models /cache
USER 10001:10001
ENV HOME=/home/weightship \
    XDG_CACHE_HOME=/cache
WORKDIR /home/weightship
# 8000: the OpenAI-compatible API (weightship serve); 6881: BitTorrent (weightship seed).
EXPOSE 8000 6881
ENTRYPOINT ["weightship"]
CMD ["serve", "/models/weightship-tiny", "--host", "0.0.0.0", "--port", "8000"]
