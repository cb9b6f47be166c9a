# fuserve, CPU image (a CUDA variant: --build-arg VARIANT=cuda). Models at /models:
#   podman build -t fuserve .            (here: podman build --isolation chroot ...)
#   podman run -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/model_repo:/models fuserve
#   podman run ... fuserve serve --model-repository /models --http-port 9000   (as with tritonserver's)
# Any base with python3 (3.10+) and its venv module builds it: an official Python slim image by
# default, or Debian's own (`--build-arg BASE_IMAGE=localhost/debian:bookworm-min`; deploy/test-image.sh).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# ---- build: a venv with fuserve and its dependencies (wheels only) ---------------------------------
FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
# Where pip finds a CA bundle, for a network that needs its own (deploy/test-image.sh mounts the
# host's): pip reads PIP_CERT; unset, pip uses its own. Build stage only.
ARG PIP_CERT
# A base without python3 or its venv module (Debian's minbase) gets Debian's.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/fuserve
ENV PATH=/opt/fuserve/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
# cpu: onnxruntime, no torch (the bundled models need torch only to be generated, not served).
# cuda: onnxruntime-gpu, NVML and torch's CUDA build.
RUN pip install --no-cache-dir --only-binary=:all: . \
    && if [ "$VARIANT" = cuda ]; then \
        pip uninstall -y onnxruntime \
        && pip install --no-cache-dir --only-binary=:all: "onnxruntime-gpu>=1.17,<2" "nvidia-ml-py>=12" torch==2.13.0; \
    fi \
    && pip uninstall -y pip \
    && find /opt/fuserve -name __pycache__ -prune -exec rm -rf {} +

# ---- the image: the base, its python3, the venv; no build tools --------------------------------------
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/fuserve /opt/fuserve
ENV PATH=/opt/fuserve/bin:$PATH \
    FUSERVE_ADDRESS=0.0.0.0 \
    PYTHONUNBUFFERED=1
WORKDIR /models
EXPOSE 8000 8001 8002
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
# Exec form: fuserve is PID 1 and gets SIGTERM itself (readiness off, requests in flight drain).
ENTRYPOINT ["fuserve"]
CMD ["serve", "--model-repository", "/models"]
