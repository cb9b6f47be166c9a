"""server/access.py: restriction specs -> Policy, the check, the gRPC table; and the REST route table
(server/frontends/rest.py) that the router checks by."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pytest

from server import access
from server.__main__ import build_parser, config_from_args
from server._proto import grpc_service_pb2 as pb
from server.context import CallContext
from server.errors import PermissionDenied
from server.frontends.http_messages import HttpRequest, HttpResponse
from server.frontends.routes import ROUTES, Route, Router

SECRET = "s3cr3t-Zq9:with=signs"  # a value holding ':' and '=' (Triton keeps everything after the first '=')


def denied(check, headers: dict[str, str]) -> str:
    with pytest.raises(PermissionDenied) as info:
        check(headers)
    assert SECRET not in info.value.message
    return info.value.message


# ---- parsing -------------------------------------------------------------------------------------


def test_a_spec_restricts_each_of_its_groups_with_one_header():
    policy = access.Policy("http", [f"inference,model-repository:X-Admin-Key={SECRET}", "health:hk=hv"])
    assert policy.restriction("inference").header == "x-admin-key"  # names compared lower-case
    assert policy.restriction("model-repository").header == "x-admin-key"
    assert policy.restriction("health").header == "hk"
    assert policy.restriction("metadata") is None
    assert policy.checker("metadata") is None and policy.checker("statistics") is None
    policy.check("inference", {"x-admin-key": SECRET})
    policy.check("health", {"hk": "hv"})
    assert bool(policy) and not access.Policy("http")


def test_grpc_keys_get_tritons_prefix():
    policy = access.Policy("grpc", [f"inference:admin-key={SECRET}"])
    assert policy.restriction("inference").header == "triton-grpc-protocol-admin-key"
    policy.check("inference", {"triton-grpc-protocol-admin-key": SECRET})
    message = denied(policy.checker("inference"), {"admin-key": SECRET})  # the bare key is not Triton's header
    assert message == ("This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key' "
                       "(the 'inference' protocol group)")


@pytest.mark.parametrize(("spec", "error"), [
    ("bogus:k=v", "unknown restricted api 'bogus'"),
    ("health,,metadata:k=v", "unknown restricted api ''"),
    ("Health:k=v", "unknown restricted api 'Health'"),
    ("health,health:k=v", "restricted api 'health' can not be specified in multiple config groups"),
    ("health-only", "has no ':'"),
    (f"health{SECRET}", "unknown restricted api (not shown: not a name; is '<apis>:' missing?)"),
    (f"x-key={SECRET}", "unknown restricted api (not shown"),
    (f":k={SECRET}", "has no apis before the ':'"),
    (f"health:{SECRET.replace('=', '')}", "has no '=' after the key"),
    (f"health:={SECRET}", "has an empty key"),
    (f"health:bad key={SECRET}", "the key is not a valid header name"),
    ("health:k=", "has an empty value"),
    ("health:k= padded", "surrounding whitespace or control characters"),
    ("health:k=a\r\nb", "surrounding whitespace or control characters"),
])
def test_bad_specs_are_refused_without_echoing_the_value(spec, error):
    with pytest.raises(ValueError) as info:
        access.Policy("http", [spec])
    assert error in str(info.value)
    assert SECRET not in str(info.value) and SECRET.replace("=", "") not in str(info.value)


def test_a_group_in_two_specs_is_refused_and_grpc_says_protocol():
    with pytest.raises(ValueError, match="restricted protocol 'health' can not be specified in multiple"):
        access.Policy("grpc", ["health,metadata:a=1", "inference,health:b=2"])
    with pytest.raises(ValueError, match="unknown restricted protocol 'bogus'"):
        access.Policy("grpc", ["bogus:a=1"])


def test_the_same_group_may_be_restricted_on_both_protocols(tmp_path: Path):
    cfg = config_from_args(build_parser().parse_args([
        "serve", "--model-repository", str(tmp_path),
        "--http-restricted-api", f"inference:x-key={SECRET}", "--http-restricted-api", "health:h=v",
        "--grpc-restricted-protocol", f"inference,health:key={SECRET}"]))
    assert cfg.http_restricted_api.restriction("health").header == "h"
    assert cfg.grpc_restricted_protocol.restriction("health").header == "triton-grpc-protocol-key"
    assert cfg.http_restricted_api.specs() == (f"inference:x-key={SECRET}", "health:h=v")
    assert SECRET not in repr(cfg) and "x-key" in repr(cfg)  # the config's repr names headers, no values
    plain = config_from_args(build_parser().parse_args(["serve", "--model-repository", str(tmp_path)]))
    assert not plain.http_restricted_api and not plain.grpc_restricted_protocol


@pytest.mark.parametrize(("args", "error"), [
    (["--http-restricted-api", "bogus:k=v"], "argument --http-restricted-api: unknown restricted api 'bogus'"),
    (["--http-restricted-api", "health:k=v", "--http-restricted-api", f"metadata,health:k={SECRET}"],
     "argument --http-restricted-api: restricted api 'health' can not be specified in multiple config groups"),
    (["--grpc-restricted-protocol", f"health:{SECRET.replace('=', '')}"],
     "argument --grpc-restricted-protocol: the format is '<protocols>:<key>=<value>'"),
])
def test_the_command_line_fails_at_start_up_with_an_argparse_error(tmp_path, capsys, args, error):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--model-repository", str(tmp_path), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert error in err
    assert SECRET not in err and SECRET.replace("=", "") not in err


# ---- the check -------------------------------------------------------------------------------------


def test_missing_wrong_and_right_values():
    check = access.Policy("http", [f"statistics:x-key={SECRET}"]).checker("statistics")
    assert check is not None
    expected = "This API is restricted, expecting header 'x-key' (the 'statistics' API group)"
    assert denied(check, {}) == expected
    assert denied(check, {"x-key": ""}) == expected
    assert denied(check, {"x-key": SECRET[:-1]}) == expected
    assert denied(check, {"x-key": SECRET + "x"}) == expected
    assert denied(check, {"x-other": SECRET}) == expected
    check({"x-key": SECRET, "x-other": "whatever"})


def test_non_ascii_values_compare_as_the_bytes_on_the_wire():
    value = "clé-ünïcode"
    raw = value.encode()
    http = access.Policy("http", [f"health:k={value}"]).checker("health")
    grpc = access.Policy("grpc", [f"health:k={value}"]).checker("health")
    http({"k": raw.decode("latin-1")})  # the HTTP/1.1 server decodes header bytes as latin-1
    grpc({"triton-grpc-protocol-k": value})  # HPACK decodes them as UTF-8
    denied(http, {"k": value})
    denied(grpc, {"triton-grpc-protocol-k": "\ud800"})  # not encodable: refused, not an error


def test_the_comparison_takes_as_long_wherever_the_values_differ():
    """A plain `==` stops at the first differing byte, so its time tells how much of a guess was
    right. The check compares digests of equal length with hmac.compare_digest: the time depends on
    the length of what was sent, not on where it differs."""
    value = "v" * (256 * 1024)
    check = access.Policy("http", [f"health:k={value}"]).checker("health")
    assert check is not None
    first = {"k": "x" + value[1:]}  # differs in the first byte
    last = {"k": value[:-1] + "x"}  # differs in the last byte

    def timed(headers: dict[str, str]) -> float:
        start = time.perf_counter()
        for _ in range(20):
            with pytest.raises(PermissionDenied):
                check(headers)
        return time.perf_counter() - start

    ratios = [timed(first) / timed(last) for _ in range(5)]
    assert 0.5 < statistics.median(ratios) < 2.0, ratios  # a plain == would be ~1000x apart here


# ---- the gRPC table -----------------------------------------------------------------------------------


def test_every_grpc_method_of_the_service_has_a_group():
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
    assert sorted(methods) == sorted(access.GRPC_GROUPS)
    assert set(access.GRPC_GROUPS.values()) <= set(access.GROUPS)
    assert access.GRPC_GROUPS["ModelStreamInfer"] == access.INFERENCE
    assert access.GRPC_SERVICE_PREFIX == "/inference.GRPCInferenceService/"


def test_grpc_authorize_checks_every_method_of_a_restricted_group():
    assert access.grpc_authorize(access.Policy("grpc")) is None  # nothing restricted: no hook at all
    specs = [f"{','.join(access.GROUPS)}:key={SECRET}"]
    authorize = access.grpc_authorize(access.Policy("grpc", specs))
    assert authorize is not None
    good = CallContext("grpc", {"triton-grpc-protocol-key": SECRET})
    for name, group in access.GRPC_GROUPS.items():
        path = access.GRPC_SERVICE_PREFIX + name
        with pytest.raises(PermissionDenied, match=f"the '{group}' protocol group"):
            authorize(path, CallContext("grpc", {}))
        authorize(path, good)
    authorize("/inference.GRPCInferenceService/NoSuchMethod", CallContext("grpc", {}))  # left to the transport
    authorize("/grpc.health.v1.Health/Check", CallContext("grpc", {}))


def test_only_restricted_groups_are_checked_over_grpc():
    authorize = access.grpc_authorize(access.Policy("grpc", ["inference:key=v"]))
    assert authorize is not None
    authorize(access.GRPC_SERVICE_PREFIX + "ServerLive", CallContext("grpc", {}))
    with pytest.raises(PermissionDenied):
        authorize(access.GRPC_SERVICE_PREFIX + "ModelStreamInfer", CallContext("grpc", {}))


# ---- the REST route table ------------------------------------------------------------------------------

EXAMPLE = {"{model}": "m", "{version}": "3", "{region}": "r0", "{repository}": "repo"}


def example_path(route: Route) -> str:
    return "/".join(EXAMPLE.get(segment, segment) for segment in route.path.split("/"))


def test_every_rest_route_has_a_group_and_a_unique_path():
    assert all(r.group in access.GROUPS for r in ROUTES)
    assert len({r.path for r in ROUTES}) == len(ROUTES)
    assert {r.group for r in ROUTES} == set(access.GROUPS)  # every group names some endpoint
    served = {(r.method, r.path): r.group for r in ROUTES if r.method}
    assert served[("POST", "/v2/models/{model}/infer")] == access.INFERENCE
    assert served[("GET", "/v2/models/{model}/versions/{version}/ready")] == access.HEALTH
    assert served[("POST", "/v2/repository/models/{model}/unload")] == access.MODEL_REPOSITORY


def test_tritons_endpoints_are_all_in_the_table():
    paths = {r.path for r in ROUTES}
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats", "/v2/logging",
                 "/v2/trace/setting", "/v2/models/{model}/trace/setting", "/v2/models/{model}/generate_stream",
                 "/v2/models/{model}/versions/{version}/generate", "/v2/systemsharedmemory/region/{region}/register",
                 "/v2/cudasharedmemory/status", "/v2/repository/{repository}/models/{model}/load"):
        assert path in paths


def _router(policy: access.Policy | None) -> tuple[Router, list]:
    """A router whose handlers record which route answered (plain functions, one per route name)."""
    seen: list = []

    def handler(name: str):
        async def answer(request: HttpRequest, *captures: str) -> HttpResponse:
            seen.append((name, captures))
            return HttpResponse(200, b"")
        return answer

    async def fallback(request: HttpRequest, *captures: str) -> HttpResponse:
        seen.append(("fallback", captures))
        return HttpResponse(404, b"")

    names = {r.handler for r in ROUTES if r.handler}
    return Router({n: handler(n) for n in names}, fallback, policy), seen


def resolve(router: Router, method: str, path: str, headers: dict[str, str] | None = None):
    handler, captures = router.resolve(HttpRequest(method, path, headers or {}, b""))
    return asyncio.run(handler(HttpRequest(method, path, headers or {}, b""), *captures))


def test_every_route_is_reached_by_its_own_path():
    router, seen = _router(None)
    for route in ROUTES:
        bound, captures = router.match(HttpRequest((route.method or "GET").split()[0], example_path(route), {}, b""))
        assert bound.route is route, route.path
        assert len(captures) == route.path.count("{")
        seen.clear()
        resolve(router, (route.method or "POST").split()[0], example_path(route))
        assert seen == [(route.handler or "fallback", captures if route.handler else ())]
    bound, captures = router.match(HttpRequest("GET", "/v2/models/a%2Fb/versions/2/stats", {}, b""))
    assert bound.route.path == "/v2/models/{model}/versions/{version}/stats" and captures == ("a/b", "2")
    assert router.match(HttpRequest("GET", "/v2/models/m/versions/1/trace/setting", {}, b"")) is None
    assert router.match(HttpRequest("GET", "/v3", {}, b"")) is None
    seen.clear()
    assert resolve(router, "POST", "/v2").status == 404  # the old if-chain answered this with a 500 (IndexError)
    assert seen == [("fallback", ())]


def test_the_router_checks_every_route_before_its_handler():
    policy = access.Policy("http", [f"{','.join(access.GROUPS)}:x-key={SECRET}"])
    router, seen = _router(policy)
    for route in ROUTES:
        for method in ("GET", "POST", "DELETE"):  # before the method is looked at, as Triton does
            with pytest.raises(PermissionDenied, match=f"the '{route.group}' API group"):
                router.resolve(HttpRequest(method, example_path(route), {}, b""))
        resolve(router, route.method or "POST", example_path(route), {"x-key": SECRET})
    assert len(seen) == len(ROUTES)
    # the infer fast path (its URL remembered after the first request) is checked too
    for _ in range(3):
        with pytest.raises(PermissionDenied, match="the 'inference' API group"):
            router.resolve(HttpRequest("POST", "/v2/models/m/infer", {"x-key": "nope"}, b""))
    # a path outside the table belongs to no group: answered as unknown, with no check
    assert resolve(router, "GET", "/v2/nothing/here").status == 404
