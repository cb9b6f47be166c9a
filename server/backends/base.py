"""The backend seam: what the repository and the scheduler need from a model runtime.

A backend module offers a `BackendFactory`. The repository asks it for one `Instance` per entry
of the model's instance_group; each instance runs on the thread the scheduler gives it (never the
event loop), one execution at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..model_config import InstanceSpec, ModelConfig, ModelIO


class Instance(Protocol):
    """One loaded copy of a model version, bound to one device."""

    @property
    def io(self) -> ModelIO:
        """The inputs and outputs as the model file declares them (used by auto-complete)."""
        ...

    @property
    def device(self) -> str:
        """Where it runs, as reported to users: e.g. 'CPUExecutionProvider' or 'CUDAExecutionProvider:0'."""
        ...

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model: `inputs` are shaped as the model wants; return the named outputs."""
        ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    name: str
    model_filename: str  # default file name in a version directory, e.g. "model.onnx"
    alternative_filenames: tuple[str, ...]  # tried next, in order, e.g. ("model.pt2",)

    def gpu_count(self) -> int:
        """GPUs this backend can use on this machine (0 here on a CPU-only install)."""
        ...

    def create_instance(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> Instance:
        """Open `model_path` for one instance; raise ModelLoadError naming the file on failure."""
        ...
