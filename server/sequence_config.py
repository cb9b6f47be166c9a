"""`sequence_batching { }` -> a frozen SequenceSpec, resolved when the model loads.

What the sequence batcher (scheduler/sequence.py) reads per request is computed here once: the
control tensors a request carries (START, END, READY as the configured int32/fp32/bool pair, CORRID
as the configured datatype), and each implicit state's input, output and initial value. Control and
state inputs are model inputs that the client never sends (they are not in `input`); the state
outputs are model outputs that the client never gets. Auto-complete skips them (`hidden_inputs`,
`hidden_outputs`), as Triton's does.

    sequence_batching {
      max_sequence_idle_microseconds: 5000000       # default 1 s
      direct { }  |  oldest { max_candidate_sequences: 4  preferred_batch_size: [2]  max_queue_delay_microseconds: 100 }
      control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START  int32_false_true: [0, 1] } ] } ]
      state [ { input_name: "STATE_IN"  output_name: "STATE_OUT"  data_type: TYPE_FP32  dims: [4]
                initial_state: { data_type: TYPE_FP32  dims: [4]  zero_data: true  name: "zeros" } } ]
    }
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import dtypes
from ._proto import model_config_pb2 as mc
from .dtypes import DType
from .errors import ModelLoadError

DEFAULT_IDLE_US = 1_000_000  # Triton's default max_sequence_idle_microseconds
DEFAULT_BACKLOG = 4096  # sequences waiting for a slot, past which a new one is rejected
BACKLOG_PARAMETER = "fuserve_sequence_backlog"
START, END, READY, CORRID = "START", "END", "READY", "CORRID"
_KINDS = {mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START: START,
          mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END: END,
          mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY: READY,
          mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID: CORRID}
_CORRID_TYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")
# Fields of sequence_batching fuserve does not implement (the load fails naming them). The two
# memory switches of a state are TensorRT/GPU allocation hints that change no answer: accepted.
UNIMPLEMENTED = {"iterative_sequence": "iterative sequences (request rescheduling) are not implemented",
                 "oldest.preserve_ordering": "responses across sequences are not reordered"}


@dataclass(frozen=True)
class ControlSpec:
    """One control input: the tensor a request carries for it, per value (shape [1, 1] when the
    model batches, [1] otherwise; CORRID's value is the request's id)."""

    name: str
    kind: str  # START, END, READY or CORRID
    dtype: DType
    false: np.ndarray | None  # None for CORRID
    true: np.ndarray | None


@dataclass(frozen=True)
class StateSpec:
    """An implicit state: fed as `input_name`, taken back from `output_name` after each request."""

    input_name: str
    output_name: str
    dtype: DType
    initial: np.ndarray  # the value a sequence starts with, batch dim included when the model batches


@dataclass(frozen=True)
class SequenceSpec:
    strategy: str  # "direct": a sequence keeps its slot and instance; "oldest": batches the oldest candidates
    slots: int  # sequence slots per instance: max(1, max_batch_size) for direct, max_candidate_sequences for oldest
    idle_us: int
    max_queue_delay_us: int
    minimum_slot_utilization: float  # direct: the share of slots with a request before a delayed batch is formed
    preferred_batch_sizes: tuple[int, ...]  # oldest
    controls: tuple[ControlSpec, ...]
    states: tuple[StateSpec, ...]
    batch_dim: bool  # max_batch_size > 0: control and state tensors carry a batch dim of 1
    backlog: int = DEFAULT_BACKLOG  # the parameter fuserve_sequence_backlog

    @property
    def hidden_inputs(self) -> frozenset[str]:
        return frozenset([c.name for c in self.controls] + [s.input_name for s in self.states])

    @property
    def hidden_outputs(self) -> frozenset[str]:
        return frozenset(s.output_name for s in self.states)

    def corrid(self, value: int | str) -> dict[str, np.ndarray]:
        """The CORRID control tensors for a request of sequence `value`; ValueError (saying why)
        for an id the control's datatype cannot hold."""
        out = {}
        for c in self.controls:
            if c.kind == CORRID:
                shape = (1, 1) if self.batch_dim else (1,)
                if c.dtype is dtypes.BYTES:
                    out[c.name] = np.array([str(value).encode()], dtype=object).reshape(shape)
                    continue
                if isinstance(value, str):
                    raise ValueError(f"the string correlation ID '{value}'; the model's CONTROL_SEQUENCE_CORRID "
                                     f"'{c.name}' takes a numeric one ({c.dtype.config})")
                info = np.iinfo(c.dtype.numpy)
                if not info.min <= value <= info.max:
                    raise ValueError(f"the correlation ID {value}, which the model's CONTROL_SEQUENCE_CORRID "
                                     f"'{c.name}' ({c.dtype.config}) cannot hold")
                out[c.name] = np.array([value], dtype=c.dtype.numpy).reshape(shape)
        return out


def hidden_names(config: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The control and state inputs, and the state outputs, a config names, in its order."""
    sb = config.sequence_batching
    inputs = [c.name for c in sb.control_input] + [s.input_name for s in sb.state]
    return tuple(dict.fromkeys(inputs)), tuple(s.output_name for s in sb.state)


def _pair(name: str, ctl: Any, batch_dim: bool, where: str) -> tuple[DType, np.ndarray, np.ndarray]:
    shape = (1, 1) if batch_dim else (1,)
    given = [(field, list(values)) for field, values in (("int32_false_true", ctl.int32_false_true),
                                                          ("fp32_false_true", ctl.fp32_false_true),
                                                          ("bool_false_true", ctl.bool_false_true)) if values]
    if len(given) != 1 or len(given[0][1]) != 2:
        raise ModelLoadError(f"{where}: sequence_batching control input '{name}' needs exactly one of "
                             f"int32_false_true, fp32_false_true or bool_false_true, with two values")
    field, (false, true) = given[0]
    dtype = dtypes.BY_CONFIG[{"int32_false_true": "TYPE_INT32", "fp32_false_true": "TYPE_FP32",
                              "bool_false_true": "TYPE_BOOL"}[field]]
    return (dtype, np.full(shape, false, dtype=dtype.numpy), np.full(shape, true, dtype=dtype.numpy))


def _controls(sb: Any, batch_dim: bool, where: str) -> tuple[ControlSpec, ...]:
    out: list[ControlSpec] = []
    for ci in sb.control_input:
        if len(ci.control) != 1:
            raise ModelLoadError(f"{where}: sequence_batching control input '{ci.name}' must have exactly one "
                                 f"control, it has {len(ci.control)}")
        ctl = ci.control[0]
        kind = _KINDS[ctl.kind]
        if any(c.kind == kind for c in out):
            raise ModelLoadError(f"{where}: sequence_batching has more than one CONTROL_SEQUENCE_{kind} control")
        if kind == CORRID:
            type_name = mc.DataType.Name(ctl.data_type)
            if type_name not in _CORRID_TYPES:
                raise ModelLoadError(f"{where}: sequence_batching control input '{ci.name}' (CONTROL_SEQUENCE_CORRID) "
                                     f"has data_type {type_name}; it must be one of {', '.join(_CORRID_TYPES)}")
            out.append(ControlSpec(ci.name, kind, dtypes.BY_CONFIG[type_name], None, None))
        else:
            out.append(ControlSpec(ci.name, kind, *_pair(ci.name, ctl, batch_dim, where)))
    return tuple(out)


def _states(sb: Any, batch_dim: bool, version_dir: Path | None, where: str) -> tuple[StateSpec, ...]:
    out = []
    for s in sb.state:
        if not s.input_name or not s.output_name:
            raise ModelLoadError(f"{where}: a sequence_batching state needs both input_name and output_name")
        dtype = dtypes.BY_CONFIG.get(mc.DataType.Name(s.data_type))
        if dtype is None or dtype is dtypes.BYTES:
            raise ModelLoadError(f"{where}: sequence_batching state '{s.input_name}' has data_type "
                                 f"{mc.DataType.Name(s.data_type)}; implicit state takes numeric types")
        dims = tuple(int(d) for d in s.dims)
        if len(s.initial_state) > 1:
            raise ModelLoadError(f"{where}: sequence_batching state '{s.input_name}' has more than one initial_state")
        if s.initial_state:
            init = s.initial_state[0]
            if init.data_type != s.data_type:
                raise ModelLoadError(f"{where}: the initial_state of state '{s.input_name}' has data_type "
                                     f"{mc.DataType.Name(init.data_type)}, the state {dtype.config}")
            shape = tuple(int(d) for d in init.dims)
            if any(d < 0 for d in shape):
                raise ModelLoadError(f"{where}: the initial_state of state '{s.input_name}' needs fixed dims, "
                                     f"got {list(shape)}")
            if init.data_file:
                value = _data_file(init.data_file, dtype, shape, version_dir, s.input_name, where)
            else:
                value = np.zeros(shape, dtype=dtype.numpy)
        else:  # no initial_state: zeros, a variable dim starting empty
            value = np.zeros(tuple(max(d, 0) for d in dims), dtype=dtype.numpy)
        if batch_dim:
            value = value.reshape((1, *value.shape))
        value.setflags(write=False)
        out.append(StateSpec(s.input_name, s.output_name, dtype, value))
    return tuple(out)


def _data_file(name: str, dtype: DType, shape: tuple[int, ...], version_dir: Path | None, state: str,
               where: str) -> np.ndarray:
    """An initial_state's data_file: raw little-endian values in `<version>/initial_state/<name>`."""
    if version_dir is None:
        raise ModelLoadError(f"{where}: the initial_state data_file of state '{state}' has no version folder")
    base = (version_dir / "initial_state").resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ModelLoadError(f"{where}: the initial_state data_file '{name}' is outside {base}")
    want = int(np.prod(shape)) * np.dtype(dtype.numpy).itemsize
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read the initial_state data_file of state '{state}': {exc}") from None
    if len(raw) != want:
        raise ModelLoadError(f"{where}: the initial_state data_file '{name}' has {len(raw)} bytes; "
                             f"dims {list(shape)} of {dtype.config} need {want}")
    return np.frombuffer(raw, dtype=np.dtype(dtype.numpy).newbyteorder("<")).astype(dtype.numpy).reshape(shape)


def sequence_spec(config: Any, backend: str, version_dir: Path | None, where: str) -> SequenceSpec | None:
    if not config.HasField("sequence_batching"):
        return None
    sb = config.sequence_batching
    batch_dim = config.max_batch_size > 0
    rows = max(1, config.max_batch_size)
    controls = _controls(sb, batch_dim, where)
    states = _states(sb, batch_dim, version_dir, where)
    if states and backend not in ("onnxruntime", "pytorch"):
        raise ModelLoadError(f"{where}: sequence_batching.state (implicit state) is supported for ONNX and PyTorch "
                             f"models, not the '{backend}' backend")
    declared = {t.name for t in config.input} | {t.name for t in config.output}
    clash = sorted(declared & ({c.name for c in controls} | {s.input_name for s in states} |
                               {s.output_name for s in states}))
    if clash:
        raise ModelLoadError(f"{where}: {', '.join(clash)} is a sequence control or state tensor; the server "
                             f"provides it, so it must not be listed in input or output")
    idle = sb.max_sequence_idle_microseconds or DEFAULT_IDLE_US
    backlog = DEFAULT_BACKLOG
    if BACKLOG_PARAMETER in config.parameters:
        text = config.parameters[BACKLOG_PARAMETER].string_value.strip()
        if not text.isdigit():
            raise ModelLoadError(f"{where}: parameter '{BACKLOG_PARAMETER}' must be a non-negative integer, "
                                 f"not {text!r}")
        backlog = int(text)
    if sb.HasField("oldest"):
        o = sb.oldest
        candidates = o.max_candidate_sequences or rows
        preferred = tuple(sorted(set(o.preferred_batch_size)))
        bad = [p for p in preferred if p < 1 or p > rows]
        if bad:
            raise ModelLoadError(f"{where}: sequence_batching.oldest.preferred_batch_size {bad} must be between 1 "
                                 f"and max_batch_size ({config.max_batch_size})")
        return SequenceSpec("oldest", candidates, idle, o.max_queue_delay_microseconds, 0.0, preferred, controls,
                            states, batch_dim, backlog)
    d = sb.direct
    if not 0.0 <= d.minimum_slot_utilization <= 1.0:
        raise ModelLoadError(f"{where}: sequence_batching.direct.minimum_slot_utilization must be between 0 and 1")
    return SequenceSpec("direct", rows, idle, d.max_queue_delay_microseconds, d.minimum_slot_utilization, (),
                        controls, states, batch_dim, backlog)
