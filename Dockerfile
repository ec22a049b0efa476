# syntax=docker/dockerfile:1
#
# Model server image: serving dependencies only (no torch), non-root, runs on a read-only root
# filesystem, the bundled models/ baked in at /models (mount another repository over it to serve
# other models).
#
#   docker build -t model-serving:cpu .                # default target: cpu (python:slim, onnxruntime)
#   docker build -t model-serving:gpu --target gpu .   # CUDA + cuDNN runtime, onnxruntime-gpu
#   docker run --rm --read-only -p 8001:8001 -p 8002:8002 model-serving:cpu
#
# Both targets run the same steps, deploy/docker/image-steps.sh (the install of ./scripts/serve.sh,
# split into a dependency layer and a project layer, then the runtime user); they differ only in the
# base image and the extra: `cpu` (onnxruntime) or `gpu` (onnxruntime-gpu), never both. tests/test_deploy_files.py checks that; scripts/container-test.sh
# builds the cpu target and runs it (docs/deployment.md). BASE_IMAGE replaces python:slim by another
# Debian-like image that has python3 >= 3.11 with venv (the container check builds on one made with
# debootstrap where no image registry is reachable). Settings come from SERVING_* env vars.
# SERVING_STRICT_MODEL_LOADING=true: a model that fails to load stops the container (exit 1)
# instead of a server that quietly serves less (docs/serving.md#strict-model-loading).

ARG PYTHON_VERSION=3.12
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- CUDA variant (built only with --target gpu) ---------------------------------------------------

# The interpreter of both GPU stages: Ubuntu's python3 on the CUDA runtime image.
FROM ${CUDA_IMAGE} AS gpu-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS build-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY deploy/docker/image-steps.sh /usr/local/bin/
COPY pyproject.toml ./
RUN image-steps.sh deps gpu
COPY service ./service
RUN image-steps.sh project

FROM gpu-base AS gpu
RUN --mount=type=bind,source=deploy/docker/image-steps.sh,target=/usr/local/bin/image-steps.sh \
    image-steps.sh runtime
COPY --from=build-gpu /opt/venv /opt/venv
COPY models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVING_HOST=0.0.0.0 \
    SERVING_PORT=8001 \
    SERVING_HTTP_PORT=8000 \
    SERVING_METRICS_PORT=8002 \
    SERVING_MODEL_REPOSITORY=/models \
    SERVING_STRICT_MODEL_LOADING=true \
    SERVING_PROVIDER=cuda
USER 10001:10001
WORKDIR /home/serving
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]

# ---- CPU (default target) --------------------------------------------------------------------------

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/docker/image-steps.sh /usr/local/bin/
COPY pyproject.toml ./
RUN image-steps.sh deps cpu
COPY service ./service
RUN image-steps.sh project

FROM ${BASE_IMAGE} AS cpu
RUN --mount=type=bind,source=deploy/docker/image-steps.sh,target=/usr/local/bin/image-steps.sh \
    image-steps.sh runtime
COPY --from=build /opt/venv /opt/venv
COPY models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVING_HOST=0.0.0.0 \
    SERVING_PORT=8001 \
    SERVING_HTTP_PORT=8000 \
    SERVING_METRICS_PORT=8002 \
    SERVING_MODEL_REPOSITORY=/models \
    SERVING_STRICT_MODEL_LOADING=true
USER 10001:10001
WORKDIR /home/serving
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
