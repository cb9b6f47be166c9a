"""The error tree. Every error a client can see is one of these.

    ServerError                 500 / INTERNAL          a bug or a backend failure
    ├── InvalidArgument         400 / INVALID_ARGUMENT  the client's request is wrong
    ├── NotFound                404 / NOT_FOUND         unknown model or version
    ├── Unavailable             503 / UNAVAILABLE       not ready, shutting down
    │   └── Rejected                                    queue full, or timed out in the queue
    ├── Unsupported             501 / UNIMPLEMENTED     a protocol feature fuserve lacks
    ├── PermissionDenied        403 / PERMISSION_DENIED a restricted API without the right header
    ├── BackendError            500 / INTERNAL          the model's execution failed
    ├── ModelError              (the model's code)      a Python model's own TritonError response
    └── ModelLoadError          400 / INVALID_ARGUMENT  a model could not be loaded

Each class carries its HTTP status and gRPC status code; the frontends map an error to the wire
in exactly one place each (`frontends/rest.py`, `frontends/grpc_service.py`). Exceptions that are
not `ServerError` are turned into `ServerError` (500) there too, so nothing foreign leaks out.
"""

from __future__ import annotations

import copy

import grpc


class ServerError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServerError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServerError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServerError):
    http_status = 400
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(ServerError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Rejected(Unavailable):
    """The scheduler refused a request: its queue is full, or it waited past its timeout."""


class BackendError(ServerError):
    """The model's execution failed; the requests of that batch fail with it."""


class Unsupported(ServerError):
    http_status = 501
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class DecoupledUnary(Unsupported):
    """A unary endpoint asked for a decoupled model (one request, many responses); each frontend
    words it as Triton does for that endpoint."""



class PermissionDenied(ServerError):
    """The call belongs to a restricted API group (--http-restricted-api, --grpc-restricted-protocol)
    and does not carry the header or metadata that group asks for."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ModelLoadError(ServerError):
    """A model (or one of its versions) could not be loaded; the message names the file and problem."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelError(ServerError):
    """An error a Python model returned for a request (pb_utils.TritonError): its message exactly,
    with the status of its code, as Triton 2.51 answers it (an error the model chose, not a failure)."""

    # TritonError code -> (HTTP status, gRPC code); Triton's mapping, observed on 2.51
    CODES = {
        0: (400, grpc.StatusCode.UNKNOWN), 1: (500, grpc.StatusCode.INTERNAL), 2: (404, grpc.StatusCode.NOT_FOUND),
        3: (400, grpc.StatusCode.INVALID_ARGUMENT), 4: (503, grpc.StatusCode.UNAVAILABLE),
        5: (501, grpc.StatusCode.UNIMPLEMENTED), 6: (400, grpc.StatusCode.ALREADY_EXISTS),
        7: (400, grpc.StatusCode.CANCELLED),
    }

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.http_status, self.grpc_code = self.CODES.get(code, self.CODES[1])


def with_prefix(exc: ServerError, prefix: str) -> ServerError:
    """The same error (class, status, code) with `prefix` before its message: how an ensemble
    reports its step's error."""
    out = copy.copy(exc)
    out.message = prefix + exc.message
    out.args = (out.message,)
    return out


def as_server_error(exc: BaseException) -> ServerError:
    """Translate any exception into the tree (foreign ones become a 500 naming their type)."""
    if isinstance(exc, ServerError):
        return exc
    return ServerError(f"internal error: {type(exc).__name__}: {exc}")
