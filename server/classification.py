"""The classification extension: a requested output's `classification` parameter (k) returns the
top k of that output instead of the tensor, as BYTES "<value>:<index>[:<label>]", one row per batch
entry (shape [batch, k], or [k] for a model that does not batch), highest first, ties in index
order. k above the class count gives every class; k = 0 asks for no classification (Triton's
answers, observed on 2.51). Values are written as C's `%f` for floats and as integers otherwise;
the label is the output's `label_filename` line for that index, left out past the file's end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InvalidArgument, ModelLoadError

MAX_LABEL_FILE = 64 << 20


def read_labels(model_dir: Path, filename: str, where: str) -> tuple[str, ...]:
    """An output's labels, one per line of `label_filename` (a file in the model's directory)."""
    parts = filename.split("/")
    if filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ModelLoadError(f"{where}: label_filename '{filename}' must name a file in the model directory")
    path = model_dir.joinpath(*parts)
    try:
        if path.stat().st_size > MAX_LABEL_FILE:
            raise ModelLoadError(f"{where}: label_filename '{filename}' is larger than {MAX_LABEL_FILE} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{where}: label_filename '{filename}' cannot be read: {exc}") from None
    return tuple(text.splitlines())


def count(name: str, parameters: dict) -> int:
    """The requested output's k: 0 when it asks for no classification."""
    k = parameters.get("classification", 0)
    if type(k) is not int or k < 0:
        raise InvalidArgument(f"output '{name}': 'classification' must be a non-negative integer, got {k!r}")
    return k


def classify(arr: np.ndarray, k: int, labels: tuple[str, ...], batched: bool) -> np.ndarray:
    """The top `k` of `arr` per batch entry (all of it when not `batched`), as BYTES strings."""
    rows = arr.reshape(arr.shape[0] if batched else 1, -1)
    if rows.dtype.kind == "V" or rows.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 sorts no NaN in order
        rows = rows.astype(np.float32)
    classes = rows.shape[1]
    k = min(k, classes)
    # descending and stable (ties in index order), for unsigned types too: sort the reversed row
    order = classes - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :k]
    floats = rows.dtype.kind == "f" or rows.dtype.name == "bfloat16"
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for j, index in enumerate(order[r].tolist()):
            value = rows[r, index]
            text = f"{float(value):f}" if floats else str(int(value))
            label = f":{labels[index]}" if index < len(labels) else ""
            out[r, j] = f"{text}:{index}{label}".encode()
    return out if batched else out.reshape(k)
