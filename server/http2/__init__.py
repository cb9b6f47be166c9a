"""A sans-IO HTTP/2 server core (RFC 9113): bytes in, events out, bytes to send. No asyncio here.

    frames.py      frame types, flags, codes, the frame header, HPACK literals for our replies
    windows.py     the receive window we grant and when to refill it
    stream.py      one stream's state, as an explicit (state, input) -> next state table
    connection.py  H2Connection: parses frames, enforces the limits, queues what to send

The gRPC layer above it (`frontends/grpc_server.py`) moves bytes between a socket and this core
and applies backpressure. The split follows python-hyper/h2 (`connection.py`, `stream.py`,
`windows.py`), which is the reference; this core is smaller (server side only, no push, no
priority) and built for the hot path (one write per unary call).
"""
