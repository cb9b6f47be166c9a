"""Every kernel against a float64 reference written here, at awkward shapes and in each dtype, run as
Triton (compiled on a GPU, interpreted on CPU) and as the torch fallback. Outputs go into buffers
pre-filled with NaN with guard regions on both sides: the interpreter does not catch an
out-of-bounds write, the guards do, and a NaN left inside the output shows a value never written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GUARD = 67


def guarded(shape, dtype, device):
    """(buffer, out): `out` is a contiguous view in the middle of a NaN-filled buffer."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype, device=device)
    return buf, buf[GUARD:GUARD + n].view(shape)


def check(buf, out, expected: np.ndarray, dtype) -> None:
    assert torch.isnan(buf[:GUARD].float()).all() and torch.isnan(buf[-GUARD:].float()).all(), "wrote outside out"
    got = out.float().cpu().numpy().astype(np.float64)
    assert not np.isnan(got).any(), "an output element was never written"
    tol = TOL[dtype]
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float64)


MODES = [pytest.param(True, id="triton"), pytest.param(False, id="torch")]


@pytest.mark.parametrize("triton", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H", [(1, 1, 1), (3, 7, 13), (2, 130, 5), (4, 9, 384), (0, 5, 8)])
def test_mean_pool_l2norm(device, triton, dtype, B, S, H):
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + H)
    hidden = torch.randn(B, S, H, generator=g).to(dtype).to(device)
    mask = (torch.rand(B, S, generator=g) > 0.4).to(torch.int64)
    if B > 1:
        mask[1] = 0  # an all-padding row pools to zeros
    mask = mask.to(device)
    h, m = f64(hidden), mask.cpu().numpy().astype(np.float64)
    pooled = (h * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1e-9)
    expected = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    buf, out = guarded((B, H), dtype, device)
    kernels.mean_pool_l2norm(hidden, mask, out=out, force_triton=triton)
    check(buf, out, expected, dtype)
    if B > 1:
        assert not out[1].float().abs().any()


@pytest.mark.parametrize("triton", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 5, 33), (0, 4)])
def test_masked_softmax(device, triton, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 4).to(dtype).to(device)
    mask = (torch.rand(shape[0], shape[-1], generator=g) > 0.3).to(torch.int32)
    if shape[0] > 1:
        mask[1] = 0  # every key masked: the rows are zeros (documented)
    if shape[0] and shape[-1]:
        mask[0, 0] = 1  # at least one key
    xs, keep = f64(x), mask.cpu().numpy().astype(bool).reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1])
    z = np.where(keep, xs, -np.inf)
    top = np.max(z, axis=-1, keepdims=True) if shape[-1] else z
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(keep, np.exp(z - top), 0.0)
    total = e.sum(-1, keepdims=True)
    expected = e / np.where(total > 0, total, 1.0)
    buf, out = guarded(shape, dtype, device)
    kernels.masked_softmax(x, mask.to(device), out=out, force_triton=triton)
    check(buf, out, expected, dtype)


@pytest.mark.parametrize("triton", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 1536), (0, 8)])
def test_bias_gelu(device, triton, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(device)
    bias = torch.randn(shape[-1], generator=g).to(dtype).to(device)
    y = f64(x) + f64(bias)
    erf = np.vectorize(math.erf)
    expected = 0.5 * y * (1 + erf(y / math.sqrt(2))) if y.size else y
    buf, out = guarded(shape, dtype, device)
    kernels.bias_gelu(x, bias, out=out, force_triton=triton)
    check(buf, out, expected, dtype)


def layer_norm(y: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = y.mean(-1, keepdims=True)
    var = ((y - mean) ** 2).mean(-1, keepdims=True)
    return (y - mean) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("triton", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 3, 384), (0, 16)])
def test_add_layernorm(device, triton, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x, r = (torch.randn(*shape, generator=g).to(dtype).to(device) for _ in range(2))
    w, b = (torch.randn(shape[-1], generator=g).to(dtype).to(device) for _ in range(2))
    expected = layer_norm(f64(x) + f64(r), f64(w), f64(b), 1e-12) if x.numel() else np.zeros(shape)
    if shape[-1] == 1:  # one element: the normalised value is 0, so the output is the bias
        expected = np.broadcast_to(f64(b), shape)
    buf, out = guarded(shape, dtype, device)
    kernels.add_layernorm(x, r, w, b, 1e-12, out=out, force_triton=triton)
    check(buf, out, expected, dtype)


@pytest.mark.parametrize("triton", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,with_types", [(1, 1, 8, True), (3, 7, 37, True), (2, 16, 384, False), (0, 4, 8, True)])
def test_embed_layernorm(device, triton, dtype, B, S, H, with_types):
    g = torch.Generator().manual_seed(B + S + H)
    V, P, T = 50, 16, 2
    word, pos, typ = (torch.randn(n, H, generator=g).to(dtype).to(device) for n in (V, P, T))
    w, b = (torch.randn(H, generator=g).to(dtype).to(device) for _ in range(2))
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[..., -1:] = V - 1  # the last row of the table
    types = torch.randint(0, T, (B, S), generator=g) if with_types else None
    t = types.numpy() if types is not None else np.zeros((B, S), dtype=np.int64)
    y = f64(word)[ids.numpy()] + f64(pos)[:S][None] + f64(typ)[t]
    expected = layer_norm(y, f64(w), f64(b), 1e-12) if y.size else np.zeros((B, S, H))
    buf, out = guarded((B, S, H), dtype, device)
    kernels.embed_layernorm(ids.to(device), types.to(device) if types is not None else None, word, pos, typ, w, b,
                            1e-12, out=out, force_triton=triton)
    check(buf, out, expected, dtype)


@pytest.mark.parametrize("triton", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,W,bgr,crop", [(1, 1, 1, False, None), (2, 7, 9, True, None),
                                           (1, 13, 11, False, (2, 3, 5, 7)), (3, 5, 5, True, (0, 0, 5, 1)),
                                           (0, 4, 4, False, None)])
def test_preprocess_image(device, triton, dtype, N, H, W, bgr, crop):
    g = torch.Generator().manual_seed(N + H + W)
    images = torch.randint(0, 256, (N, H, W, 3), generator=g, dtype=torch.uint8)
    images.view(-1)[:1] = 255  # the extremes
    images.view(-1)[1:2] = 0
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = images.numpy().astype(np.float64)
    if crop is not None:
        top, left, h, w = crop
        x = x[:, top:top + h, left:left + w]
    if bgr:
        x = x[..., ::-1]
    per_channel = (slice(None), None, None)
    expected = (x.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[per_channel]) / np.array(std)[per_channel]
    buf, out = guarded(expected.shape, dtype, device)
    kernels.preprocess_image(images.to(device), mean, std, out_dtype=dtype, bgr_to_rgb=bgr, crop=crop, out=out,
                             force_triton=triton)
    check(buf, out, expected, dtype)


@pytest.mark.parametrize("call,error", [
    (lambda: kernels.mean_pool_l2norm(torch.zeros(2, 3, 4), torch.ones(2, 4)), ValueError),
    (lambda: kernels.mean_pool_l2norm(torch.zeros(2, 3, 4, dtype=torch.int32), torch.ones(2, 3)), TypeError),
    (lambda: kernels.masked_softmax(torch.zeros(2, 5), torch.ones(3, 5)), ValueError),
    (lambda: kernels.bias_gelu(torch.zeros(2, 5), torch.zeros(4)), ValueError),
    (lambda: kernels.add_layernorm(torch.zeros(2, 5), torch.zeros(2, 4), torch.ones(5), torch.zeros(5)), ValueError),
    (lambda: kernels.embed_layernorm(torch.tensor([[0, 50]]), None, torch.zeros(50, 8), torch.zeros(4, 8),
                                     torch.zeros(2, 8), torch.ones(8), torch.zeros(8)), ValueError),
    (lambda: kernels.embed_layernorm(torch.zeros(1, 5, dtype=torch.int64), None, torch.zeros(50, 8),
                                     torch.zeros(4, 8), torch.zeros(2, 8), torch.ones(8), torch.zeros(8)), ValueError),
    (lambda: kernels.preprocess_image(torch.zeros(1, 4, 4, 3)), ValueError),
    (lambda: kernels.preprocess_image(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), crop=(2, 0, 3, 4)), ValueError),
    (lambda: kernels.bias_gelu(torch.zeros(2, 4), torch.zeros(4), out=torch.zeros(2, 5)), ValueError),
])
def test_launchers_refuse_bad_arguments(call, error):
    with pytest.raises(error):
        call()
