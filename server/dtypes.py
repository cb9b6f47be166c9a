"""V2 datatypes: the one table that maps them to numpy, to Triton's config enums and to ONNX types."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    v2: str  # "FP32", the KServe V2 name
    config: str  # "TYPE_FP32", Triton's ModelConfig DataType enum name
    numpy: np.dtype  # object for BYTES
    itemsize: int  # bytes per element on the wire; 0 for BYTES (length-prefixed)
    onnx: str  # onnxruntime's type string, "tensor(float)"


_TABLE = [
    DType("BOOL", "TYPE_BOOL", np.dtype(np.bool_), 1, "tensor(bool)"),
    DType("UINT8", "TYPE_UINT8", np.dtype(np.uint8), 1, "tensor(uint8)"),
    DType("UINT16", "TYPE_UINT16", np.dtype(np.uint16), 2, "tensor(uint16)"),
    DType("UINT32", "TYPE_UINT32", np.dtype(np.uint32), 4, "tensor(uint32)"),
    DType("UINT64", "TYPE_UINT64", np.dtype(np.uint64), 8, "tensor(uint64)"),
    DType("INT8", "TYPE_INT8", np.dtype(np.int8), 1, "tensor(int8)"),
    DType("INT16", "TYPE_INT16", np.dtype(np.int16), 2, "tensor(int16)"),
    DType("INT32", "TYPE_INT32", np.dtype(np.int32), 4, "tensor(int32)"),
    DType("INT64", "TYPE_INT64", np.dtype(np.int64), 8, "tensor(int64)"),
    DType("FP16", "TYPE_FP16", np.dtype(np.float16), 2, "tensor(float16)"),
    DType("FP32", "TYPE_FP32", np.dtype(np.float32), 4, "tensor(float)"),
    DType("FP64", "TYPE_FP64", np.dtype(np.float64), 8, "tensor(double)"),
    DType("BF16", "TYPE_BF16", np.dtype(ml_dtypes.bfloat16), 2, "tensor(bfloat16)"),
    DType("BYTES", "TYPE_STRING", np.dtype(np.object_), 0, "tensor(string)"),
]

BY_V2: dict[str, DType] = {d.v2: d for d in _TABLE}
BY_CONFIG: dict[str, DType] = {d.config: d for d in _TABLE}
BY_ONNX: dict[str, DType] = {d.onnx: d for d in _TABLE}
BYTES = BY_V2["BYTES"]
