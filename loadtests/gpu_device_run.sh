#!/usr/bin/env bash
# The one prepared GPU check (issue 15), in two halves:
#
#   here (with the package registries):   bash loadtests/gpu_device_run.sh wheels
#       downloads fuserve's runtime and test dependencies, except torch, triton and numpy (the GPU
#       machine's torch environment has those), as wheels for the GPU machine's Python into
#       .gpu_wheels/ (git-ignored; 51 MB, under the device's 64 MiB carry limit; with numpy 68).
#
#   on the GPU machine (no registry):      bash loadtests/gpu_device_run.sh check
#       installs them offline into a venv that sees the machine's torch and triton, generates the
#       two torch models, and runs loadtests/gpu_check.py (kernel tests compiled for the GPU, each
#       kernel against torch eager and its bandwidth floor, MiniLM and the image model with the
#       kernels on and off, the NVML gauges idle and under load, add_sub with 8 frontend workers
#       against one process); the report goes to $OUT/gpu_check.md.
#
# With the device tool: run(command="bash loadtests/gpu_device_run.sh check", carry=[".gpu_wheels"],
# timeout_s=540). Record what it prints in docs/perf.md ("GPU paths").
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${GPU_PYTHON_VERSION:-311}"   # the GPU machine's Python (cp311 unless told otherwise)

case "${1:-}" in
wheels)
    rm -rf .gpu_wheels && mkdir -p .gpu_wheels
    # runtime dependencies (pyproject.toml), the NVML binding, and what the kernel tests and the
    # model builders import; --no-deps keeps numpy out (it is on the GPU machine)
    python -m pip download --dest .gpu_wheels --only-binary=:all: --python-version "$PY_VERSION" --no-deps \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        "onnxruntime>=1.17,<2" "grpcio>=1.60,<2" "hpack>=4,<5" "protobuf>=6.31.1,<8" \
        "httptools>=0.6,<1" "orjson>=3.9,<4" "prometheus-client>=0.19,<1" "uvloop>=0.19,<1" "ml_dtypes>=0.3" \
        "opentelemetry-sdk>=1.25,<2" "opentelemetry-exporter-otlp-proto-http>=1.25,<2" nvidia-ml-py \
        "pytest>=8,<10" "pytest-timeout>=2.2" "onnx>=1.15,<2" setuptools wheel \
        opentelemetry-api opentelemetry-semantic-conventions opentelemetry-exporter-otlp-proto-common \
        opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common \
        opentelemetry-proto googleapis-common-protos requests charset_normalizer idna typing-extensions urllib3 \
        pluggy certifi iniconfig packaging pygments flatbuffers
    du -sh .gpu_wheels
    ;;
check)
    out="${OUT:-.}"
    python3 -m venv --system-site-packages .gpu_venv   # torch and triton come from the machine
    .gpu_venv/bin/pip install --no-index --find-links .gpu_wheels setuptools wheel -q   # to build fuserve itself
    .gpu_venv/bin/pip install --no-index --find-links .gpu_wheels --no-build-isolation -e . -q
    .gpu_venv/bin/pip install --no-index --find-links .gpu_wheels nvidia-ml-py "pytest>=8,<10" pytest-timeout onnx -q
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    .gpu_venv/bin/python model_repo/generate.py --models minilm_torch,image_cnn
    .gpu_venv/bin/python loadtests/gpu_check.py --out "$out/gpu_check.md" --concurrency 64 --seconds 10
    ;;
*)
    echo "usage: $0 wheels|check" >&2
    exit 2
    ;;
esac
