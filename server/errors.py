"""The error tree. Every error a client can see is one of these.

    ServerError                 500 / INTERNAL          a bug or a backend failure
    ├── InvalidArgument         400 / INVALID_ARGUMENT  the client's request is wrong
    ├── NotFound                404 / NOT_FOUND         unknown model or version
    ├── Unavailable             503 / UNAVAILABLE       not ready, shutting down
    │   └── Rejected                                    queue full, or timed out in the queue
    ├── Unsupported             501 / UNIMPLEMENTED     a protocol feature fuserve lacks
    ├── PermissionDenied        403 / PERMISSION_DENIED a restricted API without the right header
    ├── BackendError            500 / INTERNAL          the model's execution failed
    └── ModelLoadError          400 / INVALID_ARGUMENT  a model could not be loaded

Each class carries its HTTP status and gRPC status code; the frontends map an error to the wire
in exactly one place each (`frontends/rest.py`, `frontends/grpc_service.py`). Exceptions that are
not `ServerError` are turned into `ServerError` (500) there too, so nothing foreign leaks out.
"""

from __future__ import annotations

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


class PermissionDenied(ServerError):
    """The call belongs to a restricted API group (--http-restricted-api, --grpc-restricted-protocol)
    and does not carry the header or metadata that group asks for."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ModelLoadError(ServerError):
    """A model (or one of its versions) could not be loaded; the message names the file and problem."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


def as_server_error(exc: BaseException) -> ServerError:
    """Translate any exception into the tree (foreign ones become a 500 naming their type)."""
    if isinstance(exc, ServerError):
        return exc
    return ServerError(f"internal error: {type(exc).__name__}: {exc}")
