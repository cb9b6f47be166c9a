"""Embedding lookup + sum + LayerNorm: the encoder's first step (BERT/MiniLM embeddings).

    out[b, s] = LayerNorm(word[ids[b, s]] + position[s] + token_type[types[b, s]]) * weight + bias

`ids`, `types` are [B, S] integers (types may be None: all zeros); the tables are [V, H], [P, H],
[T, H] float. Ids are checked against the table sizes before launch (an out-of-range id is a
ValueError, not a stray read). One program per token (H fits one block); fp32 inside.
"""

from __future__ import annotations

import functools

import torch

from ._launch import check_float, check_same_device, next_pow2, output, use_triton


def reference(ids: torch.Tensor, types: torch.Tensor | None, word: torch.Tensor, position: torch.Tensor,
              token_type: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    S = ids.shape[1]
    t = types if types is not None else torch.zeros_like(ids)
    y = word.float()[ids] + position.float()[:S].unsqueeze(0) + token_type.float()[t]
    out = torch.nn.functional.layer_norm(y, (y.shape[-1],), weight.float(), bias.float(), eps)
    return out.to(out_dtype or word.dtype)


@functools.cache
def _kernel():  # compiled (or wrapped for the interpreter) on first use
    import triton
    import triton.language as tl

    @triton.jit
    def embed_layernorm_kernel(ids_ptr, types_ptr, w_ptr, p_ptr, t_ptr, g_ptr, b_ptr, o_ptr, S, H, eps,
                               HAS_TYPES: tl.constexpr, BLOCK_H: tl.constexpr):
        tok = tl.program_id(0)
        s = tok % S
        cols = tl.arange(0, BLOCK_H)
        ok = cols < H
        wid = tl.load(ids_ptr + tok).to(tl.int64)
        y = tl.load(w_ptr + wid * H + cols, mask=ok, other=0.0).to(tl.float32)
        y += tl.load(p_ptr + s * H + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_TYPES:  # noqa: SIM108 (a compile-time branch of the kernel)
            tid = tl.load(types_ptr + tok).to(tl.int64)
        else:
            tid = 0
        y += tl.load(t_ptr + tid * H + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(y, axis=0) / H
        d = tl.where(ok, y - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / H + eps)
        g = tl.load(g_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(o_ptr + tok * H + cols, d * rstd * g + b, mask=ok)

    return embed_layernorm_kernel


_INT = (torch.int32, torch.int64)


def _check_ids(name: str, t: torch.Tensor, limit: int) -> None:
    if t.dtype not in _INT:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
        raise ValueError(f"{name} must lie in [0, {limit}), got values in [{int(t.min())}, {int(t.max())}]")


def embed_layernorm(ids: torch.Tensor, types: torch.Tensor | None, word: torch.Tensor, position: torch.Tensor,
                    token_type: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12, *,
                    out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                    force_triton: bool | None = None) -> torch.Tensor:
    """ids/types [B, S] -> [B, S, H] = LayerNorm(word[ids] + position[:S] + token_type[types])."""
    for name, t in (("word", word), ("position", position), ("token_type", token_type), ("weight", weight),
                    ("bias", bias)):
        check_float(name, t)
    if ids.dim() != 2 or (types is not None and types.shape != ids.shape):
        raise ValueError(f"expected ids and types [B, S], got {list(ids.shape)} and "
                         f"{None if types is None else list(types.shape)}")
    H = word.shape[-1]
    if word.dim() != 2 or position.dim() != 2 or token_type.dim() != 2 or position.shape[1] != H \
            or token_type.shape[1] != H or weight.shape != (H,) or bias.shape != (H,):
        raise ValueError("expected tables word [V, H], position [P, H], token_type [T, H] and weight, bias [H]")
    B, S = ids.shape
    if position.shape[0] < S:
        raise ValueError(f"sequence of {S} tokens exceeds the {position.shape[0]} positions of the table")
    _check_ids("ids", ids, word.shape[0])
    if types is not None:
        _check_ids("types", types, token_type.shape[0])
    check_same_device(ids=ids, word=word, position=position, token_type=token_type, weight=weight, bias=bias)
    dtype = out_dtype or word.dtype
    result = output(out, (B, S, H), dtype, word.device)
    if B * S == 0:
        return result
    if not use_triton(ids, word, force=force_triton):
        result.copy_(reference(ids, types, word, position, token_type, weight, bias, eps, dtype))
        return result
    ids_c = ids.contiguous()
    types_c = types.contiguous() if types is not None else ids_c
    _kernel()[(B * S,)](ids_c, types_c, word.contiguous(), position.contiguous(), token_type.contiguous(),
                        weight.contiguous(), bias.contiguous(), result, S, H, float(eps),
                        HAS_TYPES=types is not None, BLOCK_H=next_pow2(H))
    return result
