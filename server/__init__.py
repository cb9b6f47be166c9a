"""fuserve: a KServe V2 / Triton-compatible inference server.

The data path, one module per step:
    frontends/ (HTTP, gRPC) -> codecs/ (decode) -> service -> batcher -> instances -> backends/ -> codecs/ (encode)
`app.py` builds the pieces and owns the process lifecycle.
"""

__version__ = "0.1.0"
