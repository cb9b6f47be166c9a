"""Model files sent with a load request (Triton's `file:<relative path>` load parameters).

The files go into a fresh private temporary directory (mode 0700), which then serves as the
model's directory: `file:1/model.onnx` becomes `<dir>/1/model.onnx`. Every path is checked before
anything is decoded or written: relative, each component a plain name (not empty, `.` or `..`,
no NUL) of at most NAME_MAX bytes, so nothing can land outside the directory; files are created
new (O_EXCL, O_NOFOLLOW) in directories this module made, so no symlink can be followed. The
repository removes the directory when the model is unloaded, replaced, or fails to load
(`remove`).
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import InvalidArgument, ServerError

PREFIX = "file:"
NAME_MAX = 255
MAX_FILES = 1024
MAX_BYTES = 1 << 30  # all files of one load, decoded
_POLL = "failed to poll from model repository"


def _parts(path: str) -> list[str]:
    """A file parameter's relative path as its components, or the reason it is refused."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise InvalidArgument(f"{_POLL}: the file path '{path[:64]}' must be a relative path within the model "
                              f"directory")
    parts = path.split("/")
    for part in parts:
        if len(part.encode()) > NAME_MAX:
            # Triton's code and words for this case (tritonclient's model-control example checks them)
            raise ServerError(f"{_POLL}: a component of the file path '{path[:64]}...' is longer than "
                              f"{NAME_MAX} bytes")
        if part in ("", ".", ".."):
            raise InvalidArgument(f"{_POLL}: the file path '{path[:64]}' must be a relative path within the model "
                                  f"directory (no empty, '.' or '..' components)")
    return parts


def _size(value: Any) -> int:
    """The decoded size of a file's content, before decoding it: bytes (gRPC) or base64 (HTTP)."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value) * 3 // 4
    raise InvalidArgument("a 'file:' load parameter must hold the file's content: bytes over gRPC, base64 over "
                          "HTTP")


def _content(path: str, value: bytes | str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"the content of load parameter 'file:{path[:64]}' is not valid base64") from None


def file_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The `file:` entries of load parameters, by relative path."""
    return {key[len(PREFIX):]: value for key, value in parameters.items() if key.startswith(PREFIX)}


def write(files: dict[str, Any]) -> Path:
    """Write the files into a fresh private directory and return it; on any refusal or error
    nothing is left behind."""
    if len(files) > MAX_FILES:
        raise InvalidArgument(f"a load request may carry at most {MAX_FILES} files, this one has {len(files)}")
    checked = [(path, _parts(path)) for path in files]
    total = sum(_size(files[path]) for path, _ in checked)
    if total > MAX_BYTES:
        raise InvalidArgument(f"the files of a load request may hold at most {MAX_BYTES} bytes, these hold about "
                              f"{total}")
    folder = Path(tempfile.mkdtemp(prefix="fuserve_model_"))
    try:
        for path, parts in checked:
            data = _content(path, files[path])
            parent = folder
            for part in parts[:-1]:
                parent = parent / part
                if not parent.is_dir() or parent.is_symlink():
                    parent.mkdir(mode=0o700)  # fails if a file of that name was written before
            fd = os.open(parent / parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except OSError as exc:
        remove(folder)
        raise InvalidArgument(f"{_POLL}: the files cannot be written as given ({exc.strerror})") from None
    except BaseException:
        remove(folder)
        raise
    return folder


def remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
