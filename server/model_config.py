"""config.pbtxt -> a frozen ModelSpec, with Triton's auto-complete from the model file.

Loading a model goes: `read_config` (the text file, possibly absent or partial) -> the backend
opens the model and reports its inputs and outputs (`ModelIO`) -> `autocomplete` fills in what the
config left out and checks what it declared -> `build_spec` resolves everything the request path
needs (dtype objects, dims, name indexes, instance list) once, so no request re-derives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor

from . import dtypes
from ._proto import model_config_pb2 as mc
from .classification import read_labels
from .dtypes import DType
from .errors import ModelLoadError
from .sequence_config import UNIMPLEMENTED as _SEQUENCE_UNIMPLEMENTED
from .sequence_config import SequenceSpec, hidden_names, sequence_spec

ModelConfig = mc.ModelConfig
CONFIG_FILE = "config.pbtxt"

# platform / backend names -> our backend name
PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}
DEFAULT_MODEL_FILES = {"onnxruntime": "model.onnx", "pytorch": "model.pt", "python": "model.py"}


@dataclass(frozen=True)
class TensorIO:
    """One input or output as the model file declares it (shape includes any batch dim)."""

    name: str
    dtype: DType
    shape: tuple[int, ...]  # -1 for a dynamic dim


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    dims: tuple[int, ...]  # without the batch dim; -1 is variable
    # Shape the backend wants when it differs from `dims` (Triton's `reshape`), without batch dim.
    reshape: tuple[int, ...] | None = None
    optional: bool = False
    datatype: str = ""  # V2 name, filled from dtype
    variable: bool = False  # some dim is -1
    labels: tuple[str, ...] = ()  # an output's label_filename, line by line (classification.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datatype", self.dtype.v2)
        object.__setattr__(self, "variable", -1 in self.dims)

    def with_labels(self, labels: tuple[str, ...]) -> TensorSpec:
        return dataclasses.replace(self, labels=labels)


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    kind: str  # "KIND_CPU" or "KIND_GPU"
    device_id: int  # GPU index; -1 on CPU


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    delay_on_timeout: bool = False  # timeout_action DELAY (else REJECT)
    default_timeout_us: int = 0  # 0: requests never time out in the queue
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0: unbounded


@dataclass(frozen=True)
class BatchingSpec:
    """Triton's dynamic_batching block, resolved. Priority levels count from 1 (the highest)."""

    preferred_batch_sizes: tuple[int, ...] = ()  # ascending
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 1
    default_priority_level: int = 1
    policies: tuple[QueuePolicy, ...] = (QueuePolicy(),)  # index level - 1
    learn_cost: bool = True  # parameter fuserve_batch_learning: size batches by their measured cost
    latency_target_ms: float = 0.0  # parameter fuserve_latency_target_ms (0: no target)


@dataclass(frozen=True)
class ModelSpec:
    """Everything about one model that the request path reads, resolved when the model loads."""

    name: str
    backend: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_index: Mapping[str, TensorSpec]
    output_index: Mapping[str, TensorSpec]
    instances: tuple[InstanceSpec, ...]
    parameters: Mapping[str, str]
    config: ModelConfig  # the completed config, as served by the config endpoints
    # None: each request executes on its own (no dynamic_batching block, or max_batch_size 0).
    dynamic_batching: BatchingSpec | None = None
    # `sequence_batching { }`: the sequence batcher serves it (scheduler/sequence.py)
    sequence: SequenceSpec | None = None


def read_config(model_dir: Path) -> ModelConfig:
    """Parse `model_dir/config.pbtxt`; an absent file gives an empty config for auto-complete."""
    path = model_dir / CONFIG_FILE
    config = ModelConfig()
    if not path.exists():
        return config
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: invalid model configuration: {exc}") from exc
    return config


def parse_config_json(text: str, where: str) -> ModelConfig:
    """A ModelConfig given as JSON (the repository load API's `config` parameter)."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise ModelLoadError(f"{where}: invalid model configuration JSON: {exc}") from exc
    return config


def backend_name(config: ModelConfig, model_dir: Path) -> str:
    """Which backend serves this model: `backend`, else `platform`, else the model file present."""
    if config.backend:
        return config.backend
    if config.platform:
        if config.platform not in PLATFORMS:
            raise ModelLoadError(f"{model_dir / CONFIG_FILE}: unsupported platform '{config.platform}'")
        return PLATFORMS[config.platform]
    for name, filename in DEFAULT_MODEL_FILES.items():
        if any((v / filename).exists() for v in model_dir.iterdir() if v.is_dir()):
            return name
    raise ModelLoadError(f"{model_dir}: no platform or backend in {CONFIG_FILE} and no model file to infer one from")


def _supports_batching(io: ModelIO) -> bool:
    tensors = io.inputs + io.outputs
    return bool(tensors) and all(len(t.shape) >= 1 and t.shape[0] == -1 for t in tensors)


def _check_declared(kind: str, declared: list, actual: tuple[TensorIO, ...], batch: bool, where: str) -> None:
    by_name = {t.name: t for t in actual}
    for cfg in declared:
        model_t = by_name.get(cfg.name)
        if model_t is None:
            raise ModelLoadError(
                f"{where}: {kind} '{cfg.name}' is not in the model file (it has: {', '.join(by_name) or 'none'})")
        want = dtypes.BY_CONFIG.get(mc.DataType.Name(cfg.data_type))
        if want is not None and want.v2 != model_t.dtype.v2:
            raise ModelLoadError(
                f"{where}: {kind} '{cfg.name}' is declared {want.config} but the model file has {model_t.dtype.config}")
        shape = model_t.shape[1:] if batch else model_t.shape
        dims = tuple(cfg.reshape.shape) if cfg.HasField("reshape") else tuple(cfg.dims)
        if len(dims) == len(shape) and any(d != s and -1 not in (d, s) for d, s in zip(dims, shape, strict=False)):
            raise ModelLoadError(
                f"{where}: {kind} '{cfg.name}' has dims {list(dims)} but the model file has "
                f"{list(shape)}{' after the batch dim' if batch else ''}")


def autocomplete(config: ModelConfig, io: ModelIO, *, name: str, default_max_batch_size: int,
                 where: str) -> ModelConfig:
    """Return `config` completed from the model file, as Triton's auto-complete does.

    Missing inputs and outputs are added from the model file. A config that declares no tensors
    and no max_batch_size gets `default_max_batch_size` when every tensor's first dim is dynamic,
    plus an (empty) dynamic_batching block. Declared tensors are checked against the model file.
    """
    done = ModelConfig()
    done.CopyFrom(config)
    if not done.name:
        done.name = name
    untouched = not done.input and not done.output and done.max_batch_size == 0
    if untouched and default_max_batch_size > 0 and _supports_batching(io):
        done.max_batch_size = default_max_batch_size
        if not done.HasField("dynamic_batching") and not done.HasField("sequence_batching"):
            done.dynamic_batching.SetInParent()
    batch = done.max_batch_size > 0
    if batch and not _supports_batching(io):
        bad = next(t for t in io.inputs + io.outputs if not t.shape or t.shape[0] != -1)
        raise ModelLoadError(
            f"{where}: max_batch_size is {done.max_batch_size} but '{bad.name}' has no dynamic first dim "
            f"(shape {list(bad.shape)}); set max_batch_size: 0")
    hidden_in, hidden_out = hidden_names(done)  # the sequence batcher's control and state tensors
    for kind, declared, actual, hidden in (("input", done.input, io.inputs, hidden_in),
                                           ("output", done.output, io.outputs, hidden_out)):
        _check_declared(kind, list(declared), actual, batch, where)
        have = {t.name for t in declared} | set(hidden)
        for t in actual:
            if t.name in have:
                continue
            entry = declared.add()
            entry.name = t.name
            entry.data_type = mc.DataType.Value(t.dtype.config)
            entry.dims.extend(t.shape[1:] if batch else t.shape)
    return done


def _tensor_specs(kind: str, entries: list, where: str) -> tuple[TensorSpec, ...]:
    specs = []
    seen: set[str] = set()
    for e in entries:
        if not e.name:
            raise ModelLoadError(f"{where}: an {kind} has no name")
        if e.name in seen:
            raise ModelLoadError(f"{where}: {kind} '{e.name}' is declared twice")
        seen.add(e.name)
        dtype = dtypes.BY_CONFIG.get(mc.DataType.Name(e.data_type))
        if dtype is None:
            raise ModelLoadError(f"{where}: {kind} '{e.name}' has unsupported data_type "
                                 f"{mc.DataType.Name(e.data_type)}")
        dims = tuple(int(d) for d in e.dims)
        if any(d < -1 for d in dims):
            raise ModelLoadError(f"{where}: {kind} '{e.name}' has invalid dims {list(dims)}")
        reshape = tuple(int(d) for d in e.reshape.shape) if e.HasField("reshape") else None
        specs.append(TensorSpec(e.name, dtype, dims, reshape, bool(e.optional) if kind == "input" else False))
    return tuple(specs)


def instance_specs(config: ModelConfig, gpu_count: int) -> tuple[InstanceSpec, ...]:
    """Expand instance_group into one InstanceSpec per instance.

    No instance_group: one GPU instance per GPU when there are GPUs, else one CPU instance (Triton's
    default). KIND_AUTO means GPU when one is present. A GPU group on a machine without GPUs falls
    back to CPU; the backend logs that and reports the providers it really uses.
    """
    groups = list(config.instance_group)
    if not groups:
        groups = [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)]
    out: list[InstanceSpec] = []
    for gi, g in enumerate(groups):
        count = g.count if g.count > 0 else 1
        kind = mc.ModelInstanceGroup.Kind.Name(g.kind)
        if kind in ("KIND_AUTO", "KIND_GPU"):
            kind = "KIND_GPU" if gpu_count > 0 else "KIND_CPU"
        base = g.name or f"{config.name}_{gi}"
        if kind == "KIND_GPU":
            gpus = list(g.gpus) or list(range(gpu_count))
            for gpu in gpus:
                for i in range(count):
                    out.append(InstanceSpec(f"{base}_{i}_gpu{gpu}", kind, gpu))
        else:
            for i in range(count):
                out.append(InstanceSpec(f"{base}_{i}", "KIND_CPU", -1))
    return tuple(out)


def _queue_policy(p: mc.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(delay_on_timeout=p.timeout_action == mc.ModelQueuePolicy.DELAY,
                       default_timeout_us=p.default_timeout_microseconds,
                       allow_timeout_override=p.allow_timeout_override, max_queue_size=p.max_queue_size)


LEARNING_PARAMETER = "fuserve_batch_learning"
LATENCY_TARGET_PARAMETER = "fuserve_latency_target_ms"


def _cost_parameters(config: ModelConfig, where: str) -> tuple[bool, float]:
    """The dynamic batcher's own parameters: learning on or off, and the latency target."""
    params = config.parameters
    learn = params[LEARNING_PARAMETER].string_value.strip().lower() if LEARNING_PARAMETER in params else "true"
    if learn not in ("true", "false"):
        raise ModelLoadError(f"{where}: parameter {LEARNING_PARAMETER} must be \"true\" or \"false\", got '{learn}'")
    target = 0.0
    if LATENCY_TARGET_PARAMETER in params:
        text = params[LATENCY_TARGET_PARAMETER].string_value
        try:
            target = float(text)
        except ValueError:
            target = -1.0
        if not 1e-6 <= target < 3_600_000:  # NaN fails too; below 1 ns it would round to no target
            raise ModelLoadError(f"{where}: parameter {LATENCY_TARGET_PARAMETER} must be a positive number of "
                                 f"milliseconds, got '{text}'")
    batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
    for key in (LEARNING_PARAMETER, LATENCY_TARGET_PARAMETER):
        if key in params and not batching:
            raise ModelLoadError(f"{where}: parameter {key} needs dynamic_batching and max_batch_size > 0")
    if learn == "true" and LEARNING_PARAMETER in params and batching and config.dynamic_batching.preferred_batch_size:
        raise ModelLoadError(f"{where}: parameter {LEARNING_PARAMETER} \"true\" cannot be honoured with "
                             f"preferred_batch_size, which decides the batch sizes itself")
    return learn == "true", target


def batching_spec(config: ModelConfig, where: str) -> BatchingSpec | None:
    learn, target = _cost_parameters(config, where)
    if not config.HasField("dynamic_batching") or config.max_batch_size <= 0:
        return None
    db = config.dynamic_batching
    preferred = tuple(sorted(set(db.preferred_batch_size)))
    bad = [p for p in preferred if p < 1 or p > config.max_batch_size]
    if bad:
        raise ModelLoadError(f"{where}: preferred_batch_size {bad} must be between 1 and max_batch_size "
                             f"({config.max_batch_size})")
    levels = max(1, db.priority_levels)
    default_level = db.default_priority_level if db.priority_levels > 0 else 1
    if not 1 <= default_level <= levels:
        raise ModelLoadError(f"{where}: default_priority_level {db.default_priority_level} must be between 1 and "
                             f"priority_levels ({db.priority_levels})")
    unknown = [lvl for lvl in db.priority_queue_policy if not 1 <= lvl <= levels]
    if unknown:
        raise ModelLoadError(f"{where}: priority_queue_policy for levels {sorted(unknown)} outside 1..{levels}")
    default = _queue_policy(db.default_queue_policy)
    policies = tuple(_queue_policy(db.priority_queue_policy[lvl]) if lvl in db.priority_queue_policy else default
                     for lvl in range(1, levels + 1))
    return BatchingSpec(preferred, db.max_queue_delay_microseconds, db.preserve_ordering, levels, default_level,
                        policies, learn, target)


def build_spec(config: ModelConfig, backend: str, instances: tuple[InstanceSpec, ...], where: str,
               version_dir: Path | None = None) -> ModelSpec:
    """`version_dir`: where a sequence model's initial_state data files are (`<version>/initial_state/`)."""
    if config.max_batch_size < 0:
        raise ModelLoadError(f"{where}: max_batch_size must be >= 0, got {config.max_batch_size}")
    inputs = _tensor_specs("input", list(config.input), where)
    outputs = _tensor_specs("output", list(config.output), where)
    if version_dir is not None and any(e.label_filename for e in config.output):
        outputs = tuple(t.with_labels(read_labels(version_dir.parent, e.label_filename, where))
                        if e.label_filename else t for t, e in zip(outputs, config.output, strict=True))
    if (not inputs or not outputs) and backend not in ("python", "ensemble"):  # a Python model may declare none
        raise ModelLoadError(f"{where}: the model must have at least one input and one output")
    params = {k: v.string_value for k, v in config.parameters.items()}
    return ModelSpec(
        name=config.name,
        backend=backend,
        platform=config.platform or {v: k for k, v in PLATFORMS.items()}.get(backend, backend),
        max_batch_size=config.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        input_index=MappingProxyType({t.name: t for t in inputs}),
        output_index=MappingProxyType({t.name: t for t in outputs}),
        instances=instances,
        parameters=MappingProxyType(params),
        config=config,
        dynamic_batching=batching_spec(config, where),
        sequence=sequence_spec(config, backend, version_dir, where),
    )


_INT64 = frozenset((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64))


def _int64_numbers(value: dict, descriptor: Any) -> None:
    """protobuf's JSON writes 64-bit integers as strings; Triton's config JSON has numbers
    (`"dims": [4]`), and clients compare them so (Triton's auto_complete example does)."""
    for name, v in value.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        sub = field.message_type
        if sub is not None:
            if sub.GetOptions().map_entry:
                inner = sub.fields_by_name["value"]
                if inner.message_type is not None:
                    for item in v.values():
                        _int64_numbers(item, inner.message_type)
                elif inner.type in _INT64:
                    value[name] = {k: int(x) for k, x in v.items()}
            elif isinstance(v, list):
                for item in v:
                    _int64_numbers(item, sub)
            else:
                _int64_numbers(v, sub)
        elif field.type in _INT64:
            value[name] = [int(x) for x in v] if isinstance(v, list) else int(v)


def config_to_json(config: ModelConfig) -> dict:
    """Triton's JSON form of a ModelConfig (field names as in the .proto, defaults included, 64-bit
    integers as numbers)."""
    out = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _int64_numbers(out, ModelConfig.DESCRIPTOR)
    return out


# What fuserve implements of ModelConfig. Any other field set in a config fails the load naming it:
# serving a stateful or streaming model as if it were a plain one would answer wrongly, silently.
_TOP_LEVEL = frozenset((
    "name", "platform", "backend", "version_policy", "max_batch_size", "input", "output", "optimization",
    "dynamic_batching", "ensemble_scheduling", "instance_group", "default_model_filename", "parameters",
    "model_transaction_policy", "sequence_batching",
))
_INPUT = frozenset(("name", "data_type", "dims", "reshape", "optional"))
_OUTPUT = frozenset(("name", "data_type", "dims", "reshape", "label_filename"))
_INSTANCE_GROUP = frozenset(("name", "kind", "count", "gpus"))
# the pinned-memory switches are Triton's GPU-memory hints, which change no answer: accepted, no-ops
# here. A non-default `priority` (rate limiting) is refused: PRIORITY_DEFAULT is never listed as set.
_OPTIMIZATION = frozenset(("graph", "execution_accelerators", "input_pinned_memory", "output_pinned_memory"))
_STEP = frozenset(("model_name", "model_version", "input_map", "output_map"))
# parameters some Triton backends read that fuserve does not implement
_REFUSED_PARAMETERS = {
    "EXECUTION_ENV_PATH": "conda-pack execution environments for Python models are not supported; install the "
                          "model's packages into fuserve's environment",
}


def unimplemented_fields(config: ModelConfig) -> list[str]:
    """The fields `config` sets that fuserve does not implement, as dotted paths (first the top level)."""
    found = [f.name for f, _ in config.ListFields() if f.name not in _TOP_LEVEL]

    def within(prefix: str, message: Any, allowed: frozenset[str]) -> None:
        found.extend(f"{prefix}.{f.name}" for f, _ in message.ListFields() if f.name not in allowed)

    for i, t in enumerate(config.input):
        within(f"input[{i}] '{t.name}'", t, _INPUT)
    for i, t in enumerate(config.output):
        within(f"output[{i}] '{t.name}'", t, _OUTPUT)
    for i, g in enumerate(config.instance_group):
        within(f"instance_group[{i}]", g, _INSTANCE_GROUP)
    if config.HasField("optimization"):
        within("optimization", config.optimization, _OPTIMIZATION)
    for i, s in enumerate(config.ensemble_scheduling.step):
        within(f"ensemble_scheduling.step[{i}]", s, _STEP)
    sb = config.sequence_batching
    if sb.iterative_sequence:
        found.append("sequence_batching.iterative_sequence")
    if sb.oldest.preserve_ordering:
        found.append("sequence_batching.oldest.preserve_ordering")
    found.extend(f"parameters '{key}'" for key in config.parameters if key in _REFUSED_PARAMETERS)
    return found


def refuse_unimplemented(config: ModelConfig, where: str) -> None:
    """Fail the load, naming the field, when the config asks for something fuserve does not do."""
    fields = unimplemented_fields(config)
    if not fields:
        return
    why = {f"sequence_batching.{k}": f" ({v})" for k, v in _SEQUENCE_UNIMPLEMENTED.items()}
    first = fields[0]
    extra = why.get(first, "")
    for key, reason in _REFUSED_PARAMETERS.items():
        if first == f"parameters '{key}'":
            extra = f" ({reason})"
    more = f"; also {', '.join(fields[1:])}" if len(fields) > 1 else ""
    raise ModelLoadError(f"{where}: {first} is not supported by fuserve{extra}{more}")
