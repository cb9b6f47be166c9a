"""Incoming header blocks: HPACK decoding under the limits, and reuse of decoded blocks.

A gRPC client sends nearly the same header block on every call, and once its table has settled the
block is byte-for-byte the same. Decoding it costs more than the rest of a unary call's framing, so a
decoded block is kept and reused while the decoder's dynamic table has not changed since (every
change is counted by `_VersionedTable`); a block that changed the table is decoded each time, since
decoding it again is what keeps our table in step with the client's.

Limits (docs/security.md): at most two dynamic-table size updates may open a block (RFC 7541 §4.2),
more is COMPRESSION_ERROR; the decoded headers may take twice the block's bytes (HPACK indexes and
compresses; more is a bomb, refused by the decoder); the cache holds at most `cache_limit` bytes and
is emptied when it would pass them.
"""

from __future__ import annotations

from typing import cast

import hpack
import hpack.table

from . import frames as f
from .stream import ConnectionError


class _VersionedTable(hpack.table.HeaderTable):
    """The decoder's dynamic table, counting every change so decoded blocks can be reused safely."""

    generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    def _set_maxsize(self, newmax: int) -> None:
        self.generation += 1
        hpack.table.HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]

    maxsize = property(hpack.table.HeaderTable.maxsize.fget, _set_maxsize)  # type: ignore[attr-defined]


class HeaderDecoder:
    def __init__(self, max_header_block: int, cache_limit: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=2 * max_header_block)
        self.table = self._decoder.header_table = _VersionedTable()
        self.cache_limit = cache_limit
        self._cache: dict[bytes, tuple[int, dict[str, str]]] = {}
        self.cache_bytes = 0

    def decode(self, block: bytes) -> dict[str, str]:
        """The headers of one whole block (always decoded or reused: the table must follow the peer's)."""
        cached = self._cache.get(block)
        if cached is not None and cached[0] == self.table.generation:
            return cached[1]
        table = self.table
        generation = table.generation
        if f.leading_size_updates(block) > 2:
            raise ConnectionError(f.COMPRESSION_ERROR, "more than two dynamic table size updates open the block")
        try:
            headers = cast(dict[str, str], dict(self._decoder.decode(block)))
        except hpack.HPACKError as exc:
            raise ConnectionError(f.COMPRESSION_ERROR, f"cannot decode header block: {exc}") from None
        if table.generation != generation:
            return headers  # the block changed the table: sent again, it must be decoded again
        cost = 2 * len(block) + sum(len(k) + len(v) for k, v in headers.items())
        if self.cache_bytes + cost > self.cache_limit:
            self._cache.clear()
            self.cache_bytes = 0
        if cost <= self.cache_limit:
            self._cache[block] = (table.generation, headers)
            self.cache_bytes += cost
        return headers
