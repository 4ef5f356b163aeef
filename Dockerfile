# syntax=docker/dockerfile:1
# The spleen segmentation service: FastAPI + ONNX Runtime on CPU (see book/service.md).
#
#   docker build -t spleen-seg-service .
#   docker run --rm -p 8000:8000 -v "$PWD/outputs/runs/quick/model.onnx:/models/model.onnx:ro" spleen-seg-service
#
# or bake a model into the image (BuildKit builds only the stages the target needs):
#   docker build --target baked --build-arg MODEL=outputs/runs/quick/model.onnx -t spleen-seg-service:baked .

FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the service imports, pinned as in pyproject.toml, in ONE pip command so that torch is
# the CPU wheel from PyTorch's CPU index (an unpinned torch from PyPI brings several GB of CUDA).
# The Predictor's transforms and the ONNX backend's tensors need torch; the largest-connected-
# component step needs scikit-image. No onnx, matplotlib or Jupyter: the service does not use them.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        torch==2.13.0+cpu \
        monai==1.6.1 \
        nibabel==5.4.2 \
        numpy==2.4.6 \
        scipy==1.17.1 \
        scikit-image==0.26.0 \
        onnxruntime==1.32.0 \
        fastapi==0.165.0 \
        uvicorn==0.54.0 \
        python-multipart==0.0.34

COPY pyproject.toml README.md ./
COPY spleen_utils ./spleen_utils
# the package itself, without resolving its dependencies again (they are installed above)
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spleen \
    && mkdir -p /models

ENV SPLEEN_MODEL=/models/model.onnx \
    SPLEEN_MAX_UPLOAD_MB=512 \
    SPLEEN_MAX_CONCURRENCY=1 \
    SPLEEN_MAX_QUEUE=4

EXPOSE 8000

# /health is 200 only once the model is loaded; urllib raises on 503, so the check fails then
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

USER spleen

# the same start command the tests run; `uvicorn --factory spleen_utils.service:create_app
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
