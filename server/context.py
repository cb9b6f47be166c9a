"""CallContext: what the transport knew about one call, handed to every handler.

Both transports build one per call (HTTP/1.1 per request, gRPC per stream) and the handlers take
it with the request: the access check (`server/access.py`) reads its headers, and a handler that
needs the peer or the client's deadline finds them here rather than asking the transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class CallContext:
    protocol: str  # "http" or "grpc"
    # HTTP headers or gRPC metadata (custom metadata included), names lower-case
    headers: Mapping[str, str]
    peer: str = ""  # "host:port" of the client, "" when unknown
    # the event loop's time (loop.time()) by which the client wants an answer; None when it set none
    deadline: float | None = None
