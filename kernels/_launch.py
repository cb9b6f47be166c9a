"""What every kernel's launcher shares: whether to run the Triton kernel or the torch reference,
and the checks on what callers pass in.

The Triton kernel runs when the tensors are on a CUDA device and `triton` imports, or anywhere under
the Triton interpreter (`TRITON_INTERPRET=1`, how the tests run the kernels on CPU). Otherwise each
op's torch reference runs: the same maths, in fp32, so results agree within rounding.
"""

from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(*tensors: torch.Tensor, force: bool | None = None) -> bool:
    """True when the Triton kernel should run on these tensors (`force` overrides: False = torch)."""
    if force is False or not triton_available():
        return False
    on_gpu = all(t.is_cuda for t in tensors)
    return on_gpu or interpreting() or bool(force)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


def output(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`out` checked (shape, dtype, device, contiguous), or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    return out


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
