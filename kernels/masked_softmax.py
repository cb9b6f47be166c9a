"""Softmax over the last dim with a key mask: attention's normalisation.

    out[b, r, c] = exp(x[b, r, c] - max) / sum over unmasked c   where mask[b, c] != 0
                 = 0                                             where mask[b, c] == 0

`x` is [B, ..., C] (for attention scores [B, heads, queries, keys]); `mask` is [B, C], the same for
every row of a batch item. A row whose keys are all masked returns all zeros (documented choice:
torch's softmax of all -inf gives NaN; zeros keep a padded batch item from poisoning what follows).
One program per row of C (C fits one block); fp32 inside.
"""

from __future__ import annotations

import functools

import torch

from ._launch import check_float, check_same_device, next_pow2, output, use_triton


def reference(x: torch.Tensor, mask: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    keep = (mask != 0).reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
    scores = x.to(torch.float32).masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    return probs.masked_fill(~keep, 0.0).to(out_dtype or x.dtype)


@functools.cache
def _kernel():  # compiled (or wrapped for the interpreter) on first use
    import triton
    import triton.language as tl

    @triton.jit
    def masked_softmax_kernel(x_ptr, m_ptr, o_ptr, C, rows_per_batch, stride_mb, BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        b = r // rows_per_batch
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        keep = (tl.load(m_ptr + b * stride_mb + cols, mask=ok, other=0) != 0) & ok
        x = tl.load(x_ptr + r * C + cols, mask=keep, other=0.0).to(tl.float32)
        x = tl.where(keep, x, float("-inf"))
        top = tl.max(x, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)  # all masked: avoid inf - inf
        e = tl.where(keep, tl.exp(x - top), 0.0)
        total = tl.sum(e, axis=0)
        tl.store(o_ptr + r * C + cols, e / tl.where(total > 0, total, 1.0), mask=ok)

    return masked_softmax_kernel




def masked_softmax(x: torch.Tensor, mask: torch.Tensor, *, out: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None, force_triton: bool | None = None) -> torch.Tensor:
    """x [B, ..., C] float, mask [B, C] (nonzero = keep) -> softmax over C, zeros where masked."""
    check_float("x", x)
    if x.dim() < 2 or mask.dim() != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] != x.shape[-1]:
        raise ValueError(f"expected x [B, ..., C] and mask [B, C], got {list(x.shape)} and {list(mask.shape)}")
    check_same_device(x=x, mask=mask)
    dtype = out_dtype or x.dtype
    result = output(out, tuple(x.shape), dtype, x.device)
    if x.numel() == 0:
        return result
    if not use_triton(x, mask, force=force_triton):
        result.copy_(reference(x, mask, dtype))
        return result
    C = x.shape[-1]
    xc = x.contiguous()
    m = (mask.to(torch.int32) if mask.dtype == torch.bool else mask).contiguous()
    rows = x.numel() // C
    _kernel()[(rows,)](xc, m, result, C, rows // x.shape[0], m.stride(0), BLOCK_C=next_pow2(C))
    return result



