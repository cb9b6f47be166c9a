#!/usr/bin/env bash
# Validate the Kubernetes and KServe manifests: render each overlay with kustomize (kubectl's),
# check every built-in kind against Kubernetes' schemas (kubernetes-validate, strict: unknown
# fields fail), and the security posture with checkov (zero failed checks; a skip is an inline
# annotation on the resource, with its reason). The CRD kinds (ServiceMonitor, ScaledObject,
# KServe's) are checked against their published fields by tests/unit/test_manifests.py.
set -euo pipefail
cd "$(dirname "$0")/kubernetes"
command -v kubectl >/dev/null || { echo "validate-manifests: kubectl (with its kustomize) is needed" >&2; exit 1; }
# The validators live in a venv of their own: checkov pins versions (packaging<24) that the
# project's test tools do not accept.
tools=../../.venv-tools
if [ ! -x "$tools/bin/checkov" ] || [ ! -x "$tools/bin/kubernetes-validate" ]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet "kubernetes-validate>=1.30" "checkov>=3.2"
fi
PATH="$tools/bin:$PATH"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in overlays/*/; do
    name=$(basename "$overlay")
    kubectl kustomize "$overlay" > "$out/$name.yaml"
done
files=("$out"/*.yaml autoscaling/*.yaml kserve/*.yaml)
kubernetes-validate --strict --quiet "${files[@]}"
args=()
for f in "${files[@]}"; do args+=(-f "$f"); done
checkov --quiet --compact --skip-download --framework kubernetes "${args[@]}"
echo "manifests: valid (kubernetes-validate --strict) and checkov clean"
