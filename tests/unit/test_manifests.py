"""The custom-resource manifests in deploy/kubernetes/ against the fields of their published APIs
(kubernetes-validate has no schemas for CRDs; deploy/validate-manifests.sh checks the built-in
kinds), and against each other and the server: ports, names and flags that must agree.

The field sets are those of the published API references: Prometheus Operator's
monitoring.coreos.com/v1 ServiceMonitor, KEDA's keda.sh/v1alpha1 ScaledObject (v2 releases) and
KServe's serving.kserve.io ClusterServingRuntime (v1alpha1) and InferenceService (v1beta1). Like
`kubernetes-validate --strict`, a field that is not in them fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.__main__ import build_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"

# kind -> (apiVersion, the allowed fields by path; "[]" marks a list's items, "*" any key)
FIELDS: dict[str, tuple[str, dict[str, set[str]]]] = {
    "ServiceMonitor": ("monitoring.coreos.com/v1", {
        "spec": {"endpoints", "selector", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                 "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
                 "attachMetadata", "scrapeProtocols", "keepDroppedTargets", "bodySizeLimit", "scrapeClass"},
        "spec.selector": {"matchLabels", "matchExpressions"},
        "spec.endpoints[]": {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
                             "tlsConfig", "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels",
                             "honorTimestamps", "trackTimestampsStaleness", "basicAuth", "oauth2",
                             "metricRelabelings", "relabelings", "proxyUrl", "followRedirects", "enableHttp2",
                             "filterRunning"},
    }),
    "ScaledObject": ("keda.sh/v1alpha1", {
        "spec": {"scaleTargetRef", "pollingInterval", "initialCooldownPeriod", "cooldownPeriod", "idleReplicaCount",
                 "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"},
        "spec.scaleTargetRef": {"name", "apiVersion", "kind", "envSourceContainerName"},
        "spec.triggers[]": {"type", "metadata", "name", "useCachedMetrics", "metricType", "authenticationRef"},
        "spec.triggers[].metadata": {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                                     "customHeaders", "ignoreNullValues", "unsafeSsl", "queryParameters"},
    }),
    "ClusterServingRuntime": ("serving.kserve.io/v1alpha1", {
        "spec": {"supportedModelFormats", "multiModel", "disabled", "protocolVersions", "workerSpec", "containers",
                 "volumes", "nodeSelector", "affinity", "tolerations", "labels", "annotations", "imagePullSecrets",
                 "builtInAdapter", "replicas", "storageHelper", "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint",
                 "hostIPC", "nodeName", "priorityClassName", "schedulerName", "securityContext",
                 "serviceAccountName"},
        "spec.supportedModelFormats[]": {"name", "version", "autoSelect", "priority"},
        "spec.annotations": {"*"},
    }),
    "InferenceService": ("serving.kserve.io/v1beta1", {
        "spec": {"predictor", "explainer", "transformer"},
        "spec.predictor": {"model", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                           "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher",
                           "labels", "annotations", "deploymentStrategy", "serviceAccountName", "nodeSelector",
                           "tolerations", "affinity", "containers", "volumes", "workerSpec"},
        "spec.predictor.model": {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage", "name",
                                 "image", "args", "command", "env", "resources", "ports", "volumeMounts"},
        "spec.predictor.model.modelFormat": {"name", "version"},
    }),
}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}  # KServe's protocolVersions
METRIC_TYPES = {"AverageValue", "Value", "Utilization"}  # KEDA's trigger metricType


def _documents() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in sorted(K8S.rglob("*.yaml")) for doc in yaml.safe_load_all(p.read_text()) if doc]


def _walk(value, path: str, allowed: dict[str, set[str]], where: str) -> None:
    if isinstance(value, list):
        for item in value:
            _walk(item, path + "[]", allowed, where)
        return
    if not isinstance(value, dict) or path not in allowed:
        return
    fields = allowed[path]
    unknown = set(value) - fields if "*" not in fields else set()
    assert not unknown, f"{where}: {path} has fields its API does not: {sorted(unknown)}"
    for key, item in value.items():
        _walk(item, f"{path}.{key}", allowed, where)


def _one(kind: str) -> dict:
    """The one resource of `kind` outside the overlays (which hold patches of the base's)."""
    [doc] = [d for p, d in _documents() if d["kind"] == kind and "overlays" not in p.parts]
    return doc


@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_custom_resources_use_only_their_api_s_fields(kind):
    api, allowed = FIELDS[kind]
    found = [(p, d) for p, d in _documents() if d.get("kind") == kind]
    assert found, f"no {kind} in deploy/kubernetes"
    for path, doc in found:
        assert doc["apiVersion"] == api, f"{path}: {kind} is {api}"
        assert doc["metadata"]["name"]
        _walk(doc["spec"], "spec", allowed, str(path))


def test_the_crd_kinds_are_all_checked():
    builtin = {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "PersistentVolumeClaim",
               "HorizontalPodAutoscaler", "ConfigMap", "Kustomization"}
    kinds = {d["kind"] for _, d in _documents()}
    assert kinds - builtin == set(FIELDS)


def test_the_servicemonitor_scrapes_the_service_s_metrics_port():
    service = _one("Service")
    monitor = _one("ServiceMonitor")
    names = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert names == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert [p.get("appProtocol") for p in service["spec"]["ports"] if p["name"] == "grpc"] == ["grpc"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()


def test_autoscaling_targets_the_deployment_on_queue_time_per_request():
    scaled = _one("ScaledObject")
    hpa = _one("HorizontalPodAutoscaler")
    assert scaled["spec"]["scaleTargetRef"]["name"] == hpa["spec"]["scaleTargetRef"]["name"] == "fuserve"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] in METRIC_TYPES
    query = trigger["metadata"]["query"]
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
    assert float(trigger["metadata"]["threshold"]) > 0
    rules = yaml.safe_load(_one("ConfigMap")["data"]["config.yaml"])["rules"]
    [metric] = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert [r["name"]["as"] for r in rules] == [metric]
    assert "nv_inference_request_success" in rules[0]["metricsQuery"]


def test_the_deployment_drains_within_its_grace_period_and_its_flags_parse():
    spec = _one("Deployment")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    args = build_parser().parse_args([*container["args"]])
    assert spec["terminationGracePeriodSeconds"] > args.exit_timeout_secs
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] >= 10000
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_the_kserve_runtime_serves_what_the_inferenceservice_asks_and_its_flags_parse():
    runtime = _one("ClusterServingRuntime")
    isvc = _one("InferenceService")
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert formats == {"onnx", "pytorch", "triton"}
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"} <= PROTOCOLS
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    [container] = runtime["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.model_repository == ["/mnt/models"] and args.http_port == 8080 and args.grpc_port == 9000
    assert [p["containerPort"] for p in container["ports"]] == [args.http_port]
