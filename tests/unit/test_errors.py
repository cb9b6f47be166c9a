"""Each error class carries its HTTP status and gRPC code (Triton's mapping)."""

import grpc
import pytest

from server.errors import (
    InvalidArgument,
    ModelLoadError,
    NotFound,
    ServerError,
    Unavailable,
    Unsupported,
    as_server_error,
)


@pytest.mark.parametrize("cls, http, code", [
    (InvalidArgument, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, 404, grpc.StatusCode.NOT_FOUND),
    (Unavailable, 503, grpc.StatusCode.UNAVAILABLE),
    (Unsupported, 501, grpc.StatusCode.UNIMPLEMENTED),
    (ServerError, 500, grpc.StatusCode.INTERNAL),
    (ModelLoadError, 400, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_status_mapping(cls, http, code):
    err = cls("msg")
    assert (err.http_status, err.grpc_code, err.message) == (http, code, "msg")


def test_foreign_exceptions_become_internal_errors():
    err = as_server_error(KeyError("k"))
    assert type(err) is ServerError and err.http_status == 500 and "KeyError" in err.message
    same = NotFound("x")
    assert as_server_error(same) is same
