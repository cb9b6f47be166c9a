#!/usr/bin/env bash
# Build fuserve's CPU image and check it serves: ready, add_sub over HTTP and gRPC with
# tritonclient, metrics, and SIGTERM with requests in flight (all answered, exit 0). Prints the
# image's size and the time from `podman run` to ready.
#
#   bash deploy/test-image.sh          (after `pip install -e '.[test]'` and `python model_repo/generate.py`)
#
# Podman as on these machines (docs/deploy.md): builds with --isolation chroot, runs with runc,
# host networking and a containers.conf without default ulimits or a pids limit. No image registry
# is reachable, so the base image is Debian bookworm made here with debootstrap (minbase) and
# imported as localhost/debian:bookworm-min (once; kept for later runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
IMAGE=${IMAGE:-localhost/fuserve:test}
BASE=localhost/debian:bookworm-min
work=$(mktemp -d)
name="fuserve-test-$$"
cleanup() {
    podman --runtime runc rm -f "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/containers.conf" <<'CONF'
[containers]
default_ulimits = []
pids_limit = 0
CONF
export CONTAINERS_CONF="$work/containers.conf"

if ! podman image exists "$BASE"; then
    echo "== base image: debootstrap --variant=minbase bookworm"
    debootstrap --variant=minbase bookworm "$work/rootfs" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
    tar -C "$work/rootfs" -c . | podman import - "$BASE" >/dev/null
    rm -rf "$work/rootfs"
fi

echo "== build $IMAGE (FROM $BASE)"
start=$(date +%s)
ca=()
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then  # this network's CA bundle, for pip inside the build
    ca=(--volume "$PIP_CERT:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
fi
podman build --isolation chroot --build-arg BASE_IMAGE="$BASE" "${ca[@]}" -t "$IMAGE" -f Dockerfile . \
    >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; exit 1; }
echo "   built in $(( $(date +%s) - start )) s"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")

# The models: add_sub (ONNX) and a Python model that takes a second (requests in flight at SIGTERM)
repo="$work/models"
mkdir -p "$repo/slow/1"
cp -r model_repo/add_sub "$repo/"
cat > "$repo/slow/config.pbtxt" <<'CONF'
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
instance_group [ { count: 4, kind: KIND_CPU } ]
CONF
cat > "$repo/slow/1/model.py" <<'PY'
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(1.0)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN")
                                                           .as_numpy())]) for r in requests]
PY
chmod -R a+rX "$repo"

ports=$("$PYTHON" -c "
import socket
s = [socket.socket() for _ in range(3)]
[x.bind(('127.0.0.1', 0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")
read -r http grpc metrics <<<"$ports"

echo "== run (serve on $http / $grpc / $metrics)"
t0=$("$PYTHON" -c 'import time; print(time.time())')
podman --runtime runc run -d --network host --name "$name" -v "$repo:/models:ro" "$IMAGE" \
    serve --model-repository /models --http-port "$http" --grpc-port "$grpc" --metrics-port "$metrics" \
    --exit-timeout-secs 20 >/dev/null

FUSERVE_HTTP=$http FUSERVE_GRPC=$grpc FUSERVE_METRICS=$metrics FUSERVE_T0=$t0 FUSERVE_CONTAINER=$name \
    FUSERVE_IMAGE_SIZE=$size "$PYTHON" deploy/check_image.py || { podman logs "$name" | tail -30; exit 1; }
