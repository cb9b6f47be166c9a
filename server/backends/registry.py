"""Backend name -> factory. Heavy runtimes are imported only when a model needs them."""

from __future__ import annotations

import importlib

from ..errors import ModelLoadError
from .base import BackendFactory

_MODULES = {"onnxruntime": "server.backends.onnxruntime", "pytorch": "server.backends.pytorch",
            "python": "server.backends.python"}
_loaded: dict[str, BackendFactory] = {}


def get_backend(name: str) -> BackendFactory:
    factory = _loaded.get(name)
    if factory is None:
        module = _MODULES.get(name)
        if module is None:
            raise ModelLoadError(f"unsupported backend '{name}' (fuserve has: {', '.join(sorted(_MODULES))})")
        factory = importlib.import_module(module).FACTORY
        _loaded[name] = factory
    return factory
