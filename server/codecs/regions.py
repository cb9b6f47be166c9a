"""The shared memory parameters of an input or a requested output, as both codecs read them.

`shared_memory_region` (a string), `shared_memory_byte_size` (an integer, required with a region)
and `shared_memory_offset` (an integer, 0 when left out). Their ranges are checked against the
region itself when the request is resolved (server/shared_memory.py), before anything is read.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgument
from ..types import RegionRef

REGION, SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


def region_ref(kind: str, name: str, params: dict[str, Any]) -> RegionRef | None:
    """The region `params` names for the `kind` ("input" or "output") `name`, or None."""
    region = params.get(REGION)
    if region is None:
        for key in (SIZE, OFFSET):
            if key in params:
                raise InvalidArgument(f"'{key}' can not be specified without '{REGION}' parameter for {kind} "
                                      f"'{name}'")
        return None
    if type(region) is not str:
        raise InvalidArgument(f"invalid value type for '{REGION}' parameter for {kind} '{name}', expected a string")
    if SIZE not in params:
        raise InvalidArgument(f"'{SIZE}' must be specified along with '{REGION}' parameter for {kind} '{name}'")
    if kind == "output" and params.get("classification"):
        raise InvalidArgument("Output can't set both 'shared_memory_region' and 'classification'")
    size, offset = params[SIZE], params.get(OFFSET, 0)
    for key, value in ((SIZE, size), (OFFSET, offset)):
        if type(value) is not int:
            raise InvalidArgument(f"invalid value type for '{key}' parameter for {kind} '{name}', expected an "
                                  f"integer")
    return RegionRef(region, offset, size)
