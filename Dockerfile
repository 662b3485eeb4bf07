# syntax=docker/dockerfile:1
# streamgen serve on an NVIDIA GPU: CUDA torch + streamgen[gpu] (flash-attn, xformers), non-root, HEALTHCHECK.
#
#   docker build -t streamgen:gpu .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 streamgen:gpu               # the committed default model
#   docker run --gpus all -p 50051:50051 -v $PWD/checkpoints:/models:ro streamgen:gpu \
#       --preset default --transformer /models/transformer.safetensors --vae /models/vae.safetensors
#
# CPU-only image: Dockerfile.cpu. Not built in CI (the dev machines have no Docker engine); see docs/serving.md.
# Two stages: flash-attn compiles against the CUDA toolkit of the -devel image; the runtime image gets
# only the finished virtualenv.

ARG CUDA_VERSION=12.6.3
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS build
ARG TORCH_VERSION=2.13.0
# The PyTorch wheel index for this CUDA (cu126 matches CUDA_VERSION 12.6).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# flash-attn's build needs several GB of RAM per job; lower this on small builders.
ARG MAX_JOBS=4
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the CUDA index: streamgen's "torch>=2.13,<2.14" then admits it as installed.
RUN pip install --upgrade pip setuptools wheel packaging ninja \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY protos ./protos
COPY streamgen ./streamgen
COPY clients ./clients
# The package build (setup.py) generates the gRPC stubs into the wheel with grpcio-tools. Without build
# isolation (flash-attn compiles against the torch installed above) that build requirement is installed
# first, at the pin of pyproject.toml's [build-system]. The check runs outside /src, so it imports the
# installed package, not the source tree.
RUN pip install "grpcio-tools==1.85.4"
RUN MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation ".[gpu]" \
 && cd / && python -c "import streamgen.api.v1, streamgen.server.app, clients.stream" && streamgen --version

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin streamgen
COPY --from=build /opt/venv /opt/venv
# The default model's serving weights (student + VAE, ~21 MB); `streamgen serve` finds them through
# $STREAMGEN_CHECKPOINTS. The teacher and the evaluation classifier stay out of the image.
COPY checkpoints/student_default.safetensors checkpoints/vae_default.safetensors /opt/streamgen/checkpoints/
# The same model as a model directory (`streamgen serve --model /opt/streamgen/checkpoints/default`).
COPY checkpoints/default/model.json /opt/streamgen/checkpoints/default/
# The prompt encoder's weights ship inside its package: no hub access at run time.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    STREAMGEN_CHECKPOINTS=/opt/streamgen/checkpoints
USER streamgen
WORKDIR /home/streamgen
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
# grpc.health.v1 probe in Python (no grpc_health_probe download). With TLS, override it and add --tls.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "streamgen.server.health", "--address", "127.0.0.1:50051", "--quiet"]
# SIGTERM drains (health NOT_SERVING, running streams end with REASON_SERVER_SHUTDOWN after
# --drain-timeout-s, exit 0): give the container a stop timeout above it, e.g. `docker stop -t 30`.
# --device auto: cuda:0 when the container sees a GPU (docker run --gpus ...), with dtype auto = bf16 there;
# the device and dtype chosen are logged at start. Without a GPU it serves on the CPU, saying so.
ENTRYPOINT ["streamgen", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--device", "auto"]
# The committed default model (baked in above); pass --transformer/--vae (e.g. from a mounted volume) to serve another.
CMD ["--preset", "default"]
