"""The backend seam: what the repository and the scheduler need from a model runtime.

A backend module offers a `BackendFactory`. The repository asks it for one `Instance` per entry
of the model's instance_group; each instance runs on the thread the scheduler gives it, one
execution at a time. An instance declares how it takes a batch:

- `executes_requests = False`: one concatenated batch, `execute(inputs, outputs)` (ONNX Runtime,
  PyTorch): the scheduler concatenates the batched requests' rows and splits the outputs;
- `executes_requests = True`: the batched requests themselves, `execute_requests(requests)`, one
  result per request (Triton's Python models, whose `execute` gets the list of requests).

`inline_ok` says whether the scheduler may run a cheap execution on the event loop thread itself;
user code that can block (a Python model, a BLS call) never may.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..model_config import InstanceSpec, ModelConfig, ModelIO
from ..types import Parameters


@dataclass(slots=True, eq=False)
class Request:
    """One request as a backend that executes requests sees it."""

    inputs: dict[str, np.ndarray]  # validated against the model, shaped as the client sent them
    outputs: tuple[str, ...]  # the outputs asked for (every output when the client named none)
    id: str
    parameters: Parameters  # the client's own request parameters
    is_cancelled: Callable[[], bool]  # True once the client has gone away
    # A decoupled model's way to answer: `respond(outputs or error or None, final)`, from any thread,
    # any number of times until `final`; it may wait while the client is slow to read (backpressure).
    # None for other models, which answer with execute_requests' result.
    respond: Callable[[RequestResult | None, bool], None] | None = None
    # A sequence model's request (the sequence batcher's): its correlation ID, and Triton's request
    # flags (1: the sequence's START, 2: its END).
    correlation_id: int | str = 0
    flags: int = 0


# Per request: its outputs, or the error that fails it alone; None from a decoupled model, whose
# responses went (or will go) through Request.respond.
RequestResult = dict[str, np.ndarray] | Exception


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

    executes_requests: bool  # see the module docstring
    inline_ok: bool

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The backend's own check of one request's input values (e.g. token ids within the
        vocabulary), before it joins a batch, so a bad one fails alone; raises InvalidArgument."""
        ...

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model on one concatenated batch: `inputs` are shaped as the model wants; return
        the named outputs (executes_requests False)."""
        ...

    def execute_requests(self, requests: Sequence[Request]) -> list[RequestResult | None]:
        """Run the model on the batched requests themselves; one result per request, in order. An
        exception fails every request of the call (executes_requests True)."""
        ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    name: str
    model_filename: str  # default file name in a version directory, e.g. "model.onnx"
    alternative_filenames: tuple[str, ...]  # tried next, in order, e.g. ("model.pt2",)

    def gpu_count(self) -> int:
        """GPUs this backend can use on this machine (0 here on a CPU-only install)."""
        ...

    def complete_config(self, model_path: Path, config: ModelConfig, where: str) -> ModelConfig:
        """The config the instances are created with: `config` itself, or what the model adds to it
        (a Python model's `auto_complete_config`). Raise ModelLoadError on failure."""
        ...

    def create_instance(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> Instance:
        """Open `model_path` for one instance; raise ModelLoadError naming the file on failure."""
        ...
