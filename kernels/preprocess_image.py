"""uint8 images -> normalised float NCHW: what torchvision's ToTensor + Normalize do, in one pass.

    out[n, c, y, x] = (img[n, top + y, left + x, src(c)] / 255 - mean[c]) / std[c]

`images` is [N, H, W, 3] uint8 (what a client decodes from JPEG/PNG: 4x fewer bytes than fp32
over the wire and over PCIe); `src(c)` is c, or 2 - c with `bgr_to_rgb` (OpenCV's channel order);
`crop` = (top, left, height, width) cuts a window first (a center crop, for example). Output
float32, float16 or bfloat16 [N, 3, height, width]. One program per (image, channel, block of
output pixels); fp32 inside.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ._launch import FLOAT_DTYPES, output, use_triton


def reference(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype,
              bgr_to_rgb: bool = False, crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    x = images
    if crop is not None:
        top, left, h, w = crop
        x = x[:, top:top + h, left:left + w]
    if bgr_to_rgb:
        x = x.flip(-1)
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(out_dtype)


@functools.cache
def _kernel():  # compiled (or wrapped for the interpreter) on first use
    import triton
    import triton.language as tl

    @triton.jit
    def preprocess_image_kernel(img_ptr, o_ptr, m0, m1, m2, s0, s1, s2, H, W, top, left, OH, OW,
                                BGR: tl.constexpr, BLOCK: tl.constexpr):
        nc = tl.program_id(0)
        n = nc // 3
        c = nc % 3
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < OH * OW
        y = offs // OW
        x = offs % OW
        src = 2 - c if BGR else c
        pix = tl.load(img_ptr + ((n * H + top + y) * W + left + x) * 3 + src, mask=ok, other=0).to(tl.float32)
        mean = tl.where(c == 0, m0, tl.where(c == 1, m1, m2))
        inv_std = 1.0 / tl.where(c == 0, s0, tl.where(c == 1, s1, s2))
        tl.store(o_ptr + nc.to(tl.int64) * OH * OW + offs, (pix / 255.0 - mean) * inv_std, mask=ok)

    return preprocess_image_kernel


BLOCK = 1024


def preprocess_image(images: torch.Tensor, mean: Sequence[float] = (0.485, 0.456, 0.406),
                     std: Sequence[float] = (0.229, 0.224, 0.225), *, out_dtype: torch.dtype = torch.float32,
                     bgr_to_rgb: bool = False, crop: tuple[int, int, int, int] | None = None,
                     out: torch.Tensor | None = None, force_triton: bool | None = None) -> torch.Tensor:
    """images [N, H, W, 3] uint8 -> [N, 3, h, w] normalised (defaults: ImageNet mean and std)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError("mean and std need 3 values each, std all positive")
    N, H, W, _ = images.shape
    top, left, oh, ow = crop if crop is not None else (0, 0, H, W)
    if min(top, left, oh, ow) < 0 or top + oh > H or left + ow > W:
        raise ValueError(f"crop (top {top}, left {left}, height {oh}, width {ow}) does not fit a {H}x{W} image")
    result = output(out, (N, 3, oh, ow), out_dtype, images.device)
    if result.numel() == 0:
        return result
    if not use_triton(images, force=force_triton):
        result.copy_(reference(images, mean, std, out_dtype, bgr_to_rgb, crop))
        return result
    grid = (N * 3, (oh * ow + BLOCK - 1) // BLOCK)
    _kernel()[grid](images.contiguous(), result, *(float(v) for v in mean), *(float(v) for v in std), H, W, top, left,
                    oh, ow, BGR=bgr_to_rgb, BLOCK=BLOCK)
    return result
