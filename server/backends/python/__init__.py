"""Triton's Python backend, in process: `<model>/<version>/model.py` with `class TritonPythonModel`.

Triton runs each instance of a Python model in a stub process and moves every batch through shared
memory (~55 us a batch measured on 2.51). Here an instance is the model object itself, executed on
the model's worker thread like any other backend's instance: inputs reach `execute` as the arrays
the codecs decoded, outputs leave as the arrays the model returned, with no copy and no process hop.

    import triton_python_backend_utils as pb_utils   # resolves to pb_utils.py (this package)

Lifecycle, as Triton's stub drives it: `auto_complete_config(config)` when the class has it (before
any instance), `initialize(args)` per instance, `execute(requests)` (or `async def execute`, run on
the instance's own event loop, never the server's) with the requests the scheduler batched
together, and `finalize()` when the version is unloaded or the server stops. Each instance imports
its own copy of `model.py`, so module-level state is per instance, as it is with Triton's processes.
"""

from __future__ import annotations

import sys

from . import pb_utils
from .backend import FACTORY

# The one name Python models import pb_utils by; nothing else is put on sys.modules or sys.path.
sys.modules["triton_python_backend_utils"] = pb_utils

__all__ = ["FACTORY", "pb_utils"]
