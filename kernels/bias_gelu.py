"""Bias add + GELU (the exact, erf form BERT uses): the encoder's feed-forward activation.

    out = gelu(x + bias) = 0.5 * y * (1 + erf(y / sqrt(2))),  y = x + bias

`x` is [..., H], `bias` [H]. Elementwise over blocks of the flattened tensor; fp32 inside.
"""

from __future__ import annotations

import functools

import torch

from ._launch import check_float, check_same_device, output, use_triton


def reference(x: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    y = x.to(torch.float32) + bias.to(torch.float32)
    return torch.nn.functional.gelu(y, approximate="none").to(out_dtype or x.dtype)


@functools.cache
def _kernel():  # compiled (or wrapped for the interpreter) on first use
    import triton
    import triton.language as tl

    @triton.jit
    def bias_gelu_kernel(x_ptr, b_ptr, o_ptr, N, H, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        y = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y += tl.load(b_ptr + offs % H, mask=ok, other=0.0).to(tl.float32)
        tl.store(o_ptr + offs, 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476)), mask=ok)

    return bias_gelu_kernel


BLOCK = 1024


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, out: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, force_triton: bool | None = None) -> torch.Tensor:
    """x [..., H] float, bias [H] float -> gelu(x + bias), shaped like x."""
    check_float("x", x)
    check_float("bias", bias)
    if x.dim() < 1 or bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x [..., H] and bias [H], got {list(x.shape)} and {list(bias.shape)}")
    check_same_device(x=x, bias=bias)
    dtype = out_dtype or x.dtype
    result = output(out, tuple(x.shape), dtype, x.device)
    if x.numel() == 0:
        return result
    if not use_triton(x, bias, force=force_triton):
        result.copy_(reference(x, bias, dtype))
        return result
    n = x.numel()
    _kernel()[((n + BLOCK - 1) // BLOCK,)](x.contiguous(), bias.contiguous(), result, n, x.shape[-1], BLOCK=BLOCK)
    return result
