"""Masked mean pooling + L2 normalisation: the tail of every sentence-embedding request.

    out[b] = normalize(sum_s hidden[b, s] * mask[b, s] / max(sum_s mask[b, s], 1e-9))
    normalize(v) = v / max(||v||_2, 1e-12)

exactly sentence-transformers' `Pooling(mean)` + `Normalize` (torch.clamp(min=1e-9) and
F.normalize's eps). A row whose mask is all zeros pools to zeros and stays zeros. One program per
row; the hidden size fits one block, the sequence is walked in blocks; fp32 inside.
"""

from __future__ import annotations

import functools

import torch

from ._launch import check_float, check_same_device, next_pow2, output, use_triton


def reference(hidden: torch.Tensor, mask: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    m = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * m).sum(1)
    pooled = summed / torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1, eps=1e-12).to(out_dtype or hidden.dtype)


@functools.cache
def _kernel():  # compiled (or wrapped for the interpreter) on first use
    import triton
    import triton.language as tl

    @triton.jit
    def mean_pool_l2norm_kernel(h_ptr, m_ptr, o_ptr, S, H, stride_hb, stride_hs, stride_mb,
                                BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
        b = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        col_ok = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        count = tl.zeros([BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            rows = s0 + tl.arange(0, BLOCK_S)
            row_ok = rows < S
            m = tl.load(m_ptr + b * stride_mb + rows, mask=row_ok, other=0).to(tl.float32)
            h = tl.load(h_ptr + b * stride_hb + rows[:, None] * stride_hs + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h * m[:, None], axis=0)
            count += m
        pooled = acc / tl.maximum(tl.sum(count, axis=0), 1e-9)
        norm = tl.sqrt(tl.sum(pooled * pooled, axis=0))
        tl.store(o_ptr + b * H + cols, pooled / tl.maximum(norm, 1e-12), mask=col_ok)

    return mean_pool_l2norm_kernel




def mean_pool_l2norm(hidden: torch.Tensor, mask: torch.Tensor, *, out: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, force_triton: bool | None = None) -> torch.Tensor:
    """hidden [B, S, H] float, mask [B, S] (any numeric or bool; nonzero = a real token) -> [B, H]."""
    check_float("hidden", hidden)
    if hidden.dim() != 3 or mask.dim() != 2 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"expected hidden [B, S, H] and mask [B, S], got {list(hidden.shape)} and {list(mask.shape)}")
    check_same_device(hidden=hidden, mask=mask)
    B, S, H = hidden.shape
    dtype = out_dtype or hidden.dtype
    check_float("out_dtype", torch.empty(0, dtype=dtype))
    result = output(out, (B, H), dtype, hidden.device)
    if B == 0 or H == 0:
        return result
    if not use_triton(hidden, mask, force=force_triton):
        result.copy_(reference(hidden, mask, dtype))
        return result
    h = hidden if hidden.stride(2) == 1 else hidden.contiguous()
    m = (mask.to(torch.int32) if mask.dtype == torch.bool else mask).contiguous()
    block_h = next_pow2(H)
    block_s = max(1, min(next_pow2(S), 4096 // block_h if block_h <= 4096 else 1))
    _kernel()[(B,)](h, m, result, S, H, h.stride(0), h.stride(1), m.stride(0), BLOCK_S=block_s, BLOCK_H=block_h)
    return result
