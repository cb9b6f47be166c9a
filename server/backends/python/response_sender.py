"""`InferenceRequest.get_response_sender()` for decoupled Python models: Triton's response sender.

A decoupled model answers a request by `sender.send(response, flags)`, zero or more times, from
`execute` or from any thread after `execute` has returned, the last time with
`flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL` (a flag-only final: `send(flags=FINAL)`). An error
response ends the request. `send` may wait while the client is slow to read (server/sink.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import pb_utils


class InferenceResponseSender:
    __slots__ = ("_convert", "_respond", "_is_cancelled", "_closed")

    def __init__(self, convert: Callable[[Any], Any], respond: Callable[[Any, bool], None],
                 is_cancelled: Callable[[], bool]) -> None:
        self._convert = convert  # InferenceResponse -> outputs dict, or the exception that fails it
        self._respond = respond
        self._is_cancelled = is_cancelled
        self._closed = False

    def send(self, response: pb_utils.InferenceResponse | None = None, flags: int = 0) -> None:
        if self._closed:
            raise pb_utils.TritonModelException("Unable to send response. Response sender has been closed.")
        final = bool(flags & pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None:
            if not final:
                raise pb_utils.TritonModelException(
                    "Inference Response object must be provided when the response flags is not set to "
                    "TRITONSERVER_RESPONSE_COMPLETE_FINAL.")
            result = None
        elif not isinstance(response, pb_utils.InferenceResponse):
            raise pb_utils.TritonModelException(
                f"send() expects a pb_utils.InferenceResponse, got {type(response).__name__}")
        else:
            result = self._convert(response)
        if final or isinstance(result, Exception):
            self._closed = True  # an error response ends the request, as the final flag does
        self._respond(result, final or isinstance(result, Exception))

    def is_cancelled(self) -> bool:
        return bool(self._is_cancelled())
