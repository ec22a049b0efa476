# syntax=docker/dockerfile:1
#
# Model server image: serving dependencies only (no torch), non-root, the bundled models/ baked in
# at /models (mount another repository over it to serve other models).
#
#   docker build -t model-serving:cpu .                # default target: cpu (python:slim, onnxruntime)
#   docker build -t model-serving:gpu --target gpu .   # CUDA + cuDNN runtime, onnxruntime-gpu
#   docker run --rm -p 8001:8001 -p 8002:8002 model-serving:cpu
#
# The install steps are the ones ./scripts/serve.sh runs (a venv, pip upgraded, then `pip install`
# of this project, with the `gpu` extra for the CUDA target); tests/test_deploy_files.py checks
# that both stay the same. Settings come from SERVING_* env vars (README, "Serve the models").

ARG PYTHON_VERSION=3.12
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- CUDA variant (built only with --target gpu) ---------------------------------------------------

FROM ${CUDA_IMAGE} AS build-gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml ./
COPY service ./service
RUN /opt/venv/bin/python -m pip install --upgrade pip \
 && /opt/venv/bin/python -m pip install ".[gpu]" \
 && /opt/venv/bin/python -m pip uninstall -y onnxruntime \
 && /opt/venv/bin/python -m pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.20"
# (onnxruntime, a base dependency, and onnxruntime-gpu both install the `onnxruntime` package
# folder; removing the CPU build and reinstalling the GPU build leaves the GPU one in place.)

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 serving \
 && useradd --system --uid 10001 --gid serving --create-home --home-dir /home/serving --shell /usr/sbin/nologin serving \
 && mkdir /output && chown serving:serving /output
COPY --from=build-gpu /opt/venv /opt/venv
COPY models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVING_HOST=0.0.0.0 \
    SERVING_PORT=8001 \
    SERVING_METRICS_PORT=8002 \
    SERVING_MODEL_REPOSITORY=/models \
    SERVING_PROVIDER=cuda
USER 10001:10001
WORKDIR /home/serving
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]

# ---- CPU (default target) --------------------------------------------------------------------------

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml ./
COPY service ./service
RUN /opt/venv/bin/python -m pip install --upgrade pip \
 && /opt/venv/bin/python -m pip install .

FROM python:${PYTHON_VERSION}-slim AS cpu
RUN groupadd --system --gid 10001 serving \
 && useradd --system --uid 10001 --gid serving --create-home --home-dir /home/serving --shell /usr/sbin/nologin serving \
 && mkdir /output && chown serving:serving /output
COPY --from=build /opt/venv /opt/venv
COPY models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVING_HOST=0.0.0.0 \
    SERVING_PORT=8001 \
    SERVING_METRICS_PORT=8002 \
    SERVING_MODEL_REPOSITORY=/models
USER 10001:10001
WORKDIR /home/serving
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
