"""Load-time planning of ensembles (`platform: "ensemble"`): the step graph, checked once.

`parse_steps` checks what the ensemble's own config can tell (the data flow between its steps);
`plan_ensemble` checks it against the loaded step models (names, dtypes, dims, batch sizes) and
returns an `EnsemblePlan` for the runtime. Tensor names here are ensemble tensor names (the values
of input_map / output_map, and the ensemble's inputs and outputs); step models' own tensor names
are the keys. The rules follow Triton's ValidateEnsembleSchedulingConfig (model_config_utils.cc)
and ValidateEnsembleConfig (ensemble_utils.cc), with a few of Triton's gaps closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .. import dtypes
from .._proto import model_config_pb2 as mc
from ..dtypes import DType
from ..errors import InvalidArgument, ModelLoadError
from ..model_config import ModelConfig, ModelSpec

ENSEMBLE_PLATFORM = "ensemble"


@dataclass(frozen=True)
class Step:
    index: int  # position in ensemble_scheduling.step
    model_name: str
    model_version: int  # -1: latest
    inputs: Mapping[str, str] = field(hash=False)  # step model input -> ensemble tensor (input_map)
    outputs: Mapping[str, str] = field(hash=False)  # step model output -> ensemble tensor (output_map)

    @property
    def label(self) -> str:
        return f"step {self.index} (model '{self.model_name}')"

    @property
    def consumes(self) -> frozenset[str]:
        return frozenset(self.inputs.values())

    @property
    def produces(self) -> frozenset[str]:
        return frozenset(self.outputs.values())


@dataclass(frozen=True)
class Schedule:
    """What one request that asks for `outputs` runs, in an order that respects the data flow."""

    outputs: frozenset[str]  # the requested ensemble outputs
    steps: tuple[Step, ...]  # only the steps those outputs need, topologically ordered
    # Readers of each tensor among `steps`, +1 for a requested output (the response reads it):
    # a runtime that runs steps concurrently frees a tensor when its count drops to 0.
    uses: Mapping[str, int]
    # For sequential execution in `steps` order: tensors to drop once that step (by index) has
    # run; they include outputs no scheduled step reads and nobody asked for.
    release_after: Mapping[int, tuple[str, ...]]
    unread_inputs: frozenset[str]  # ensemble inputs none of `steps` reads (droppable up front)


@dataclass(frozen=True)
class EnsemblePlan:
    name: str
    steps: tuple[Step, ...]  # topological order (config order among independent steps)
    inputs: tuple[str, ...]  # ensemble inputs, as declared
    optional_inputs: frozenset[str]
    outputs: tuple[str, ...]  # ensemble outputs, as declared
    max_batch_size: int  # the ensemble's; > 0: requests carry a batch dim
    step_at: Mapping[int, Step]  # by Step.index
    producer: Mapping[str, int]  # tensor written by a step -> that step's index
    consumers: Mapping[str, tuple[int, ...]]  # tensor -> indexes of the steps that read it
    upstream: Mapping[int, frozenset[int]]  # step index -> indexes of the steps it waits for
    _cache: dict[frozenset[str], Schedule] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def steps_for(self, outputs: Iterable[str]) -> tuple[Step, ...]:
        """The steps needed for the requested ensemble outputs (none named: all), in execution order."""
        return self.schedule(outputs).steps

    def schedule(self, outputs: Iterable[str]) -> Schedule:
        """`steps_for` plus when each tensor can be freed; cached per set of outputs."""
        key = frozenset(outputs) or frozenset(self.outputs)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._build_schedule(key)
        return hit

    def _build_schedule(self, wanted: frozenset[str]) -> Schedule:
        unknown = sorted(wanted - set(self.outputs))
        if unknown:
            raise InvalidArgument(f"unexpected inference output '{unknown[0]}' for model '{self.name}'")
        needed = set(wanted)
        picked: list[Step] = []
        for step in reversed(self.steps):  # walk back from the outputs
            if step.produces & needed:
                picked.append(step)
                needed |= step.consumes
        picked.reverse()
        uses: dict[str, int] = {t: 1 for t in wanted}
        last_reader: dict[str, int] = {}
        for step in picked:
            for t in step.consumes:
                uses[t] = uses.get(t, 0) + 1
                last_reader[t] = step.index
        release: dict[int, list[str]] = {s.index: [] for s in picked}
        for t, i in last_reader.items():
            if t not in wanted:
                release[i].append(t)
        for step in picked:
            release[step.index].extend(t for t in step.produces if t not in last_reader and t not in wanted)
        return Schedule(wanted, tuple(picked), MappingProxyType(uses),
                        MappingProxyType({i: tuple(sorted(ts)) for i, ts in release.items()}),
                        frozenset(self.inputs) - needed)


def step_dependencies(config: ModelConfig) -> tuple[tuple[str, int], ...]:
    """The (model_name, model_version) pairs the ensemble's steps use, once each, in step order;
    the repository loads these first. Version -1 means the latest ready version."""
    seen: dict[tuple[str, int], None] = {}
    for s in config.ensemble_scheduling.step:
        if s.model_name:
            seen.setdefault((s.model_name, int(s.model_version)), None)
    return tuple(seen)


def parse_steps(config: ModelConfig, where: str) -> tuple[Step, ...]:
    """The ensemble's steps in config order, after every check that needs no step model."""
    if config.platform != ENSEMBLE_PLATFORM or config.backend:
        raise ModelLoadError(f"{where}: an ensemble must have platform '{ENSEMBLE_PLATFORM}' and no backend "
                             f"(got platform '{config.platform}', backend '{config.backend}')")
    for present, what in ((len(config.instance_group) > 0, "instance_group"),
                          (config.HasField("optimization"), "optimization"),
                          (len(config.model_warmup) > 0, "model_warmup")):
        if present:
            raise ModelLoadError(f"{where}: {what} cannot be set for an ensemble")
    if not config.ensemble_scheduling.step:
        raise ModelLoadError(f"{where}: ensemble_scheduling has no step")
    inputs = [t.name for t in config.input]
    outputs = [t.name for t in config.output]
    both = sorted(set(inputs) & set(outputs))
    if both:
        raise ModelLoadError(f"{where}: '{both[0]}' is both an ensemble input and an ensemble output")
    steps = tuple(_parse_step(i, s, config.name, where) for i, s in enumerate(config.ensemble_scheduling.step))

    writer: dict[str, tuple[Step, str]] = {}  # tensor -> (step, its output name)
    for step in steps:
        for out, tensor in sorted(step.outputs.items()):  # sorted: proto maps have no order
            if tensor in inputs:
                raise ModelLoadError(f"{where}: {step.label} output '{out}' writes ensemble tensor '{tensor}', "
                                     "which is an ensemble input")
            if tensor in writer:
                first, first_out = writer[tensor]
                raise ModelLoadError(f"{where}: ensemble tensor '{tensor}' is written by both {first.label} output "
                                     f"'{first_out}' and {step.label} output '{out}'")
            writer[tensor] = (step, out)
    read: set[str] = set()
    for step in steps:
        for inp, tensor in sorted(step.inputs.items()):
            if tensor not in writer and tensor not in inputs:
                raise ModelLoadError(f"{where}: {step.label} input '{inp}' reads ensemble tensor '{tensor}', which "
                                     "is neither an ensemble input nor written by any step")
            read.add(tensor)
    _toposort(steps, where)  # raises on a cycle
    for name in outputs:
        if name not in writer:
            raise ModelLoadError(f"{where}: ensemble output '{name}' is not written by any step")
    for name in inputs:
        if name not in read:
            raise ModelLoadError(f"{where}: ensemble input '{name}' is not read by any step")
    for tensor, (step, out) in writer.items():
        if tensor not in read and tensor not in outputs:
            raise ModelLoadError(f"{where}: ensemble tensor '{tensor}' written by {step.label} output '{out}' is "
                                 "neither read by a step nor an ensemble output")
    return steps


def _parse_step(index: int, s: mc.ModelEnsembling.Step, ensemble: str, where: str) -> Step:
    if not s.model_name:
        raise ModelLoadError(f"{where}: step {index} has no model_name")
    label = f"step {index} (model '{s.model_name}')"
    if s.model_name == ensemble:
        raise ModelLoadError(f"{where}: {label} is the ensemble itself")
    if s.model_version != -1 and s.model_version < 1:
        raise ModelLoadError(f"{where}: {label} has model_version {s.model_version}; use -1 (latest) or a "
                             "version number >= 1 (an omitted model_version is 0)")
    for kind, mapping in (("input_map", s.input_map), ("output_map", s.output_map)):
        if not mapping:
            raise ModelLoadError(f"{where}: {label} has an empty {kind}")
        for key, value in mapping.items():
            if not key or not value:
                raise ModelLoadError(f"{where}: {label} {kind} has an empty name in '{key}' -> '{value}'")
    return Step(index, s.model_name, int(s.model_version), MappingProxyType(dict(s.input_map)),
                MappingProxyType(dict(s.output_map)))


def _toposort(steps: tuple[Step, ...], where: str) -> tuple[Step, ...]:
    """Kahn's algorithm, taking ready steps in config order; a cycle is reported with its steps."""
    by_tensor = {t: s.index for s in steps for t in s.produces}
    waits = {s.index: {by_tensor[t] for t in s.consumes if t in by_tensor} for s in steps}
    done: list[Step] = []
    left = list(steps)
    while left:
        ready = [s for s in left if not waits[s.index] - {d.index for d in done}]
        if not ready:
            raise ModelLoadError(f"{where}: {_describe_cycle(left, waits, steps)}")
        done.extend(ready)
        left = [s for s in left if s not in ready]
    return tuple(done)


def _describe_cycle(left: list[Step], waits: dict[int, set[int]], steps: tuple[Step, ...]) -> str:
    # Every step left waits on another step left, so following waits from any of them must loop.
    stuck = {s.index for s in left}
    path = [left[0].index]
    while True:
        nxt = min(waits[path[-1]] & stuck)
        if nxt in path:
            loop = path[path.index(nxt):] + [nxt]
            break
        path.append(nxt)
    loop.reverse()  # producer -> consumer order
    by_index = {s.index: s for s in steps}
    links = []
    for a, b in zip(loop, loop[1:], strict=False):
        shared = sorted(by_index[a].produces & by_index[b].consumes)
        links.append(f"{by_index[a].label} -> '{shared[0]}' -> ")
    return "steps form a cycle: " + "".join(links) + by_index[loop[-1]].label


@dataclass(frozen=True)
class _Side:
    """One end of an ensemble tensor: its declared dtype and dims, and where they come from."""

    what: str  # "step 1 (model 'b') input 'x'", "ensemble input 'IN'"
    dtype: DType
    dims: tuple[int, ...]  # without the batch dim
    batching: bool

    def full(self) -> tuple[int, ...]:
        return ((-1,) if self.batching else ()) + self.dims

    def shape(self) -> str:
        return f"dims {list(self.dims)}" + (" after the batch dim" if self.batching else "")


def _dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def _agree(tensor: str, a: _Side, b: _Side, where: str) -> None:
    if a.dtype.v2 != b.dtype.v2:
        raise ModelLoadError(f"{where}: ensemble tensor '{tensor}' is {a.dtype.v2} from {a.what} but {b.what} "
                             f"is {b.dtype.v2}")
    # As Triton: the dims agree, or do once each side's batch dim is spelled out (a non-batching
    # model's [-1, 3] carries the batch dim of a batching model's [3]).
    if not _dims_match(a.dims, b.dims) and not _dims_match(a.full(), b.full()):
        raise ModelLoadError(f"{where}: ensemble tensor '{tensor}' has {a.shape()} from {a.what} but {b.what} has "
                             f"{b.shape()}")


def _declared(kind: str, entry: mc.ModelInput | mc.ModelOutput, batching: bool, where: str) -> _Side:
    dtype = dtypes.BY_CONFIG.get(mc.DataType.Name(entry.data_type))
    if dtype is None:
        raise ModelLoadError(f"{where}: {kind} '{entry.name}' has unsupported data_type "
                             f"{mc.DataType.Name(entry.data_type)}")
    dims = entry.reshape.shape if entry.HasField("reshape") else entry.dims
    return _Side(f"{kind} '{entry.name}'", dtype, tuple(int(d) for d in dims), batching)


def plan_ensemble(config: ModelConfig, specs: Mapping[int, ModelSpec], where: str) -> EnsemblePlan:
    """Check the ensemble against its loaded step models (`specs`, keyed by step index) and plan it."""
    steps = parse_steps(config, where)
    batching = config.max_batch_size > 0
    sides: dict[str, _Side] = {t.name: _declared("ensemble input", t, batching, where) for t in config.input}
    for step in steps:
        spec = specs.get(step.index)
        if spec is None:
            version = "latest version" if step.model_version == -1 else f"version {step.model_version}"
            raise ModelLoadError(f"{where}: {step.label} {version} is not ready")
        if spec.max_batch_size != 0 and spec.max_batch_size < config.max_batch_size:
            raise ModelLoadError(f"{where}: ensemble max_batch_size is {config.max_batch_size} but {step.label} "
                                 f"allows at most {spec.max_batch_size}")
        for out, tensor in step.outputs.items():
            t = spec.output_index.get(out)
            if t is None:
                raise ModelLoadError(f"{where}: {step.label} output_map names output '{out}', which the model does "
                                     f"not have (its outputs: {', '.join(spec.output_index)})")
            sides[tensor] = _Side(f"{step.label} output '{out}'", t.dtype, t.dims, spec.max_batch_size > 0)
    for step in steps:
        spec = specs[step.index]
        for inp in step.inputs:
            if inp not in spec.input_index:
                raise ModelLoadError(f"{where}: {step.label} input_map names input '{inp}', which the model does "
                                     f"not have (its inputs: {', '.join(spec.input_index)})")
        for t in spec.inputs:
            if t.name not in step.inputs:
                if t.optional:
                    continue
                raise ModelLoadError(f"{where}: {step.label} input_map does not map the model's required input "
                                     f"'{t.name}'")
            tensor = step.inputs[t.name]
            _agree(tensor, sides[tensor],
                   _Side(f"{step.label} input '{t.name}'", t.dtype, t.dims, spec.max_batch_size > 0), where)
    for entry in config.output:
        _agree(entry.name, sides[entry.name], _declared("ensemble output", entry, batching, where), where)

    ordered = _toposort(steps, where)
    producer = {t: s.index for s in steps for t in s.produces}
    consumers = {t: tuple(s.index for s in ordered if t in s.consumes) for t in sides}
    return EnsemblePlan(
        name=config.name,
        steps=ordered,
        inputs=tuple(t.name for t in config.input),
        optional_inputs=frozenset(t.name for t in config.input if t.optional),
        outputs=tuple(t.name for t in config.output),
        max_batch_size=config.max_batch_size,
        step_at=MappingProxyType({s.index: s for s in steps}),
        producer=MappingProxyType(producer),
        consumers=MappingProxyType(consumers),
        upstream=MappingProxyType({s.index: frozenset(producer[t] for t in s.consumes if t in producer)
                                   for s in steps}),
    )
