# syntax=docker/dockerfile:1
# The spleen segmentation service: FastAPI + ONNX Runtime on CPU (see book/service.md).
#
#   docker build -t spleen-seg-service .
#   docker run --rm -p 8000:8000 -v "$PWD/outputs/runs/quick/model.onnx:/models/model.onnx:ro" spleen-seg-service
#
# or bake a model into the image (BuildKit builds only the stages the target needs):
#   docker build --target baked --build-arg MODEL=outputs/runs/quick/model.onnx -t spleen-seg-service:baked .

# The base image is named by its tag: its digest could not be looked up where this file was
# written (no registry client, no network to Docker Hub). Pin it before a release with
#   docker buildx imagetools inspect python:3.11-slim --format '{{json .Manifest.Digest}}'
# and write the digest into the FROM line below: FROM python:3.11-slim@sha256:<digest> AS base
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the service imports, pinned as in pyproject.toml and hash-locked with everything they
# pull in (requirements-docker.txt): torch is the CPU wheel from PyTorch's CPU index (an unpinned
# torch from PyPI brings several GB of CUDA). The Predictor's transforms and the ONNX backend's
# tensors need torch; the largest-connected-component step needs scikit-image. No onnx,
# matplotlib or Jupyter: the service does not use them. A changed or substituted wheel fails
# the build (--require-hashes); --no-deps: the file lists every package itself.
COPY requirements-docker.txt ./
RUN pip install --require-hashes --no-deps -r requirements-docker.txt

COPY pyproject.toml README.md ./
COPY spleen_utils ./spleen_utils
# the package itself, without resolving its dependencies again (they are installed above)
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spleen \
    && mkdir -p /models

ENV SPLEEN_MODEL=/models/model.onnx \
    SPLEEN_MAX_UPLOAD_MB=512 \
    SPLEEN_MAX_CONCURRENCY=1 \
    SPLEEN_MAX_QUEUE=4 \
    SPLEEN_HEARTBEAT_FILE=/tmp/spleen-heartbeat.json

EXPOSE 8000

# Healthy = the heartbeat file says "ready" and is fresh. The event loop rewrites it every 5 s
# once the model is loaded, so the check fails while loading, when the loop stalls, or when the
# process is gone; and it opens no connection, so a flood of half-open connections (which fails
# an HTTP probe once the connection cap is reached) cannot mark a working service unhealthy.
# GET /health stays the probe for a load balancer or a reverse proxy (see book/service.md).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys; from spleen_utils.serve import check_heartbeat; ok, msg = check_heartbeat(os.environ['SPLEEN_HEARTBEAT_FILE']); print(msg); sys.exit(0 if ok else 1)"]

USER spleen

# the same start command the tests run; `uvicorn --factory spleen_utils.serve:create_app
# --host 0.0.0.0 --port 8000` works too (settings from the SPLEEN_* variables above)
CMD ["spleen-seg", "serve", "--host", "0.0.0.0", "--port", "8000"]


# a model baked into the image: docker build --target baked --build-arg MODEL=<path in the build context>
FROM base AS baked
ARG MODEL=outputs/runs/quick/model.onnx
USER root
COPY ${MODEL} /models/model.onnx
RUN chmod 0444 /models/model.onnx
USER spleen


# the default target (last stage): the model is mounted at /models/model.onnx at run time
FROM base AS service
