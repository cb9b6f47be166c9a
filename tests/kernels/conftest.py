"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # tests/conftest.py sets it before triton is first imported (triton wraps its own library for the
    # interpreter at import time); set here, it would be too late
    pytest.exit("no CUDA device: run the kernel tests with TRITON_INTERPRET=1", returncode=2)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
