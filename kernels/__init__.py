"""Fused kernels in OpenAI Triton for the serving path (one op per module; see issue 6).

Nothing here yet: the serving core runs without kernels, and `triton` is imported lazily by each
kernel module once they exist, so a CPU-only install never needs it.
"""
