"""Residual add + LayerNorm: after every attention and feed-forward block of the encoder.

    out = (y - mean(y)) / sqrt(var(y) + eps) * weight + bias,   y = x + residual   (over the last dim)

`x` and `residual` are [..., H]; `weight`, `bias` [H]. One program per row (H fits one block);
fp32 inside, biased variance as torch.nn.functional.layer_norm.
"""

from __future__ import annotations

import functools

import torch

from ._launch import check_float, check_same_device, next_pow2, output, use_triton


def reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    y = x.to(torch.float32) + residual.to(torch.float32)
    out = torch.nn.functional.layer_norm(y, (y.shape[-1],), weight.to(torch.float32), bias.to(torch.float32), eps)
    return out.to(out_dtype or x.dtype)


@functools.cache
def _kernel():  # compiled (or wrapped for the interpreter) on first use
    import triton
    import triton.language as tl

    @triton.jit
    def add_layernorm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, o_ptr, H, eps, BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        ok = cols < H
        y = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
        y += tl.load(r_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(y, axis=0) / H
        d = tl.where(ok, y - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * H + cols, d * rstd * w + b, mask=ok)

    return add_layernorm_kernel




def add_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float = 1e-12, *, out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                  force_triton: bool | None = None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim; x, residual [..., H]; weight, bias [H]."""
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        check_float(name, t)
    H = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or residual.shape != x.shape or weight.shape != (H,) or bias.shape != (H,):
        raise ValueError(f"expected x and residual [..., H], weight and bias [H]; got {list(x.shape)}, "
                         f"{list(residual.shape)}, {list(weight.shape)}, {list(bias.shape)}")
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    dtype = out_dtype or x.dtype
    result = output(out, tuple(x.shape), dtype, x.device)
    if x.numel() == 0:
        return result
    if not use_triton(x, residual, weight, bias, force=force_triton):
        result.copy_(reference(x, residual, weight, bias, eps, dtype))
        return result
    rows = x.numel() // H
    _kernel()[(rows,)](x.contiguous(), residual.contiguous(), weight.contiguous(), bias.contiguous(), result, H,
                       float(eps), BLOCK_H=next_pow2(H))
    return result
