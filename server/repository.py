"""The model repository: which models exist, which versions are loaded, and loading them.

Layout (Triton's): ROOT/<model>/config.pbtxt and ROOT/<model>/<version>/model.onnx. Loading a
model builds every selected version completely (sessions, auto-completed config, instance pool)
on a worker thread, then swaps it in with one assignment, so requests see either the old model or
the new one, never half of either. A failed load leaves whatever was serving untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import model_files
from .backends.base import BackendFactory
from .backends.registry import get_backend
from .errors import InvalidArgument, ModelLoadError, NotFound, ServerError
from .instances import InstancePool
from .model_config import (
    ModelConfig,
    ModelIO,
    ModelSpec,
    autocomplete,
    backend_name,
    build_spec,
    instance_specs,
    parse_config_json,
    read_config,
    refuse_unimplemented,
)
from .scheduler import (
    ENSEMBLE_PLATFORM,
    EnsemblePlan,
    Outcome,
    Scheduler,
    StepRunner,
    Work,
    ensemble_scheduler,
    scheduler_for,
)
from .scheduler.ensemble_plan import parse_steps, plan_ensemble, step_dependencies
from .sequence_config import SequenceSpec
from .stats import ModelStats

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"
# config parameter (in the served config) naming the execution providers in use
PROVIDERS_PARAMETER = "fuserve_execution_providers"


@dataclass(eq=False)
class ModelVersion:
    """One loaded, ready version: its resolved spec, its scheduler and the instances that run it
    (an ensemble has no instances: its steps' models run them)."""

    spec: ModelSpec
    version: int
    pool: InstancePool | None
    load_seconds: float
    stats: ModelStats
    scheduler: Scheduler
    # The backend's own per-request check of input values (e.g. token ids within the vocabulary), run
    # before the request joins a batch so a bad one fails alone; raises InvalidArgument.
    check_inputs: Callable[[Mapping[str, np.ndarray]], None] | None = None
    # the scheduler's `run`, when it can run a request in the caller's task (scheduler/base.py)
    direct: Callable[[Work], Awaitable[Outcome]] | None = None
    # `model_transaction_policy { decoupled: true }`: a request's responses come through its
    # Work.respond, any number of them, until the final flag (InferenceService.stream)
    decoupled: bool = False

    def __post_init__(self) -> None:
        self.direct = getattr(self.scheduler, "run", None)
        self.decoupled = self.spec.config.model_transaction_policy.decoupled

    async def close(self) -> None:
        """Finish what is queued and executing, then release the instances."""
        await self.scheduler.drain()
        if self.pool is not None:
            await self.pool.close()

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(eq=False)
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    latest: ModelVersion | None = None
    fingerprint: tuple = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    files: Path | None = None  # the directory of files a load request sent (model_files.py), while serving


@dataclass(eq=False)
class _Built:
    """A version opened on the loading thread, not yet serving."""

    spec: ModelSpec
    instances: list
    seconds: float
    plan: EnsemblePlan | None = None  # an ensemble's; its steps' specs by step index
    steps: dict[int, ModelSpec] = field(default_factory=dict)


def _valid_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _fingerprint(model_dir: Path) -> tuple:
    """What poll mode compares to notice a changed model: every file's path, size and mtime."""
    items = []
    for p in sorted(model_dir.rglob("*")):
        if p.is_file():
            st = p.stat()
            items.append((str(p.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
    return tuple(items)


def select_versions(model_dir: Path, config: ModelConfig) -> list[int]:
    """The version numbers to load under `version_policy` (default: the latest one)."""
    present = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not present:
        raise ModelLoadError(f"{model_dir}: no version directories (expected e.g. {model_dir}/1/)")
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return present
    if which == "specific":
        wanted = sorted(set(int(v) for v in policy.specific.versions))
        missing = [v for v in wanted if v not in present]
        if missing:
            raise ModelLoadError(f"{model_dir}: version_policy names versions {missing}, which have no directory")
        return wanted
    n = policy.latest.num_versions if which == "latest" and policy.latest.num_versions > 0 else 1
    return present[-n:]



def _model_file(version_dir: Path, config: ModelConfig, backend: BackendFactory) -> Path:
    """The version's model file: the config's default_model_filename, else the backend's names."""
    names = [config.default_model_filename] if config.default_model_filename else \
        [backend.model_filename, *backend.alternative_filenames]
    for name in names:
        if (version_dir / name).is_file():
            return version_dir / name
    raise ModelLoadError(f"{version_dir / names[0]}: model file not found")

class Repository:
    def __init__(self, roots: tuple[Path, ...], *, default_max_batch_size: int = 4,
                 auto_complete: bool = True, histograms: bool = False) -> None:
        self.roots = tuple(r.resolve() for r in roots)
        self.histograms = histograms  # keep latency / batch-size histograms (for /metrics)
        self.default_max_batch_size = default_max_batch_size
        self.auto_complete = auto_complete
        self._models: dict[str, ModelEntry] = {}
        self._loading: set[str] = set()  # ensembles loading their step models (a cycle stops here)
        # How an ensemble's step runs through the core: set by the service that serves this repository.
        self.run_step: StepRunner | None = None

    # ---- the request path -------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The ready version a request addresses; NotFound names what is missing."""
        entry = self._models.get(name)
        if entry is None or entry.latest is None:
            # Triton's wording: its clients and examples look for "Request for unknown model".
            if entry is None:
                raise NotFound(f"Request for unknown model: '{name}' is not found")
            why = f" ({entry.reason})" if entry.reason else ""
            raise NotFound(f"Request for unknown model: '{name}' has no available versions{why}")
        if not version or version == "-1":
            return entry.latest
        mv = entry.versions.get(int(version)) if version.isdigit() else None
        if mv is None:
            ready = ", ".join(str(v) for v in sorted(entry.versions))
            raise NotFound(f"Request for unknown model: '{name}' version {version} is not found "
                           f"(ready versions: {ready})")
        return mv

    def ready_models(self) -> list[ModelVersion]:
        return [mv for e in self._models.values() for mv in e.versions.values()]

    # ---- discovery ------------------------------------------------------------------------------

    def scan(self) -> dict[str, Path]:
        """Model name -> directory, for every model directory in the repositories."""
        found: dict[str, Path] = {}
        for root in self.roots:
            if not root.is_dir():
                continue
            for p in sorted(root.iterdir()):
                if p.is_dir() and not p.name.startswith(".") and _valid_name(p.name):
                    found.setdefault(p.name, p)
        return found

    def model_dir(self, name: str) -> Path:
        """The directory of model `name`, refusing names that would leave the repositories.

        A name is one path component (no separators, not `.` or `..`), so `root / name` is always
        an entry of a repository root. That entry may be a symlink the operator put there (as
        Triton allows); what a request names can never reach beyond the roots' own entries.
        """
        if not _valid_name(name):
            raise InvalidArgument(f"invalid model name '{name}'")
        hits = [root / name for root in self.roots if (root / name).is_dir()]
        if not hits:
            raise NotFound(f"model '{name}' is not in the model repository")
        if len(hits) > 1:
            raise ModelLoadError(f"model '{name}' appears in more than one repository: {', '.join(map(str, hits))}")
        return hits[0]

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index: known models, one row per loaded version (Triton's shape)."""
        rows: list[dict] = []
        names = set(self.scan()) | set(self._models)
        for name in sorted(names):
            entry = self._models.get(name)
            if entry is not None and entry.versions:
                for v in sorted(entry.versions):
                    rows.append({"name": name, "version": str(v), "state": READY, "reason": ""})
            elif not ready_only:
                state = entry.state if entry is not None else UNAVAILABLE
                reason = entry.reason if entry is not None else "unloaded"
                rows.append({"name": name, "version": "", "state": state, "reason": reason})
        return rows

    # ---- loading ------------------------------------------------------------------------------

    def _read(self, name: str, model_dir: Path, config_override: str | None) -> tuple[ModelConfig, str]:
        """The model's config as written (or as overridden), checked for what fuserve does not do."""
        if config_override is not None:
            where = f"the config override for model '{name}'"
            config = parse_config_json(config_override, where)
        else:
            config = read_config(model_dir)
            where = str(model_dir / "config.pbtxt")
        if config.name and config.name != name:
            raise ModelLoadError(f"{where}: name '{config.name}' does not match the directory name '{name}'")
        config.name = name
        refuse_unimplemented(config, where)
        return config, where

    def _build(self, name: str, model_dir: Path, config_override: str | None = None) -> dict[int, _Built]:
        """Open every selected version (blocking; runs on a worker thread)."""
        config, where = self._read(name, model_dir, config_override)
        if config.platform == ENSEMBLE_PLATFORM:
            return self._build_ensemble(config, model_dir, where)
        backend = get_backend(backend_name(config, model_dir))
        if config.model_transaction_policy.decoupled and backend.name != "python":
            raise ModelLoadError(f"{where}: model_transaction_policy.decoupled is not supported by fuserve for the "
                                 f"'{backend.name}' backend (decoupled models are Python models)")
        instances = instance_specs(config, backend.gpu_count())
        built: dict[int, _Built] = {}
        try:
            for version in select_versions(model_dir, config):
                started = time.monotonic()
                path = _model_file(model_dir / str(version), config, backend)
                completed = backend.complete_config(path, config, where)
                opened = []
                try:
                    for spec_i in instances:
                        opened.append(backend.create_instance(path, completed, spec_i))
                    done = ModelConfig()
                    done.CopyFrom(completed)
                    if self.auto_complete:
                        done = autocomplete(completed, opened[0].io, name=name,
                                            default_max_batch_size=self.default_max_batch_size, where=where)
                    if not done.backend:
                        done.backend = backend.name
                    # Report where the model really runs (e.g. CPU after a CUDA fallback).
                    devices = ",".join(sorted({i.device for i in opened}))
                    done.parameters[PROVIDERS_PARAMETER].string_value = devices
                    spec = build_spec(done, backend.name, instances, where, model_dir / str(version))
                    if spec.sequence is not None and backend.name == "onnxruntime":
                        _check_sequence_tensors(spec.sequence, opened[0].io, where)
                except BaseException:
                    for instance in opened:
                        instance.close()
                    raise
                built[version] = _Built(spec, opened, time.monotonic() - started)
        except BaseException:
            for b in built.values():
                for instance in b.instances:
                    instance.close()
            raise
        return built

    def _build_ensemble(self, config: ModelConfig, model_dir: Path, where: str) -> dict[int, _Built]:
        """An ensemble's versions: its plan, checked against the step models loaded now."""
        steps = parse_steps(config, where)
        specs: dict[int, ModelSpec] = {}
        for step in steps:
            try:
                pinned = "" if step.model_version < 0 else str(step.model_version)
                specs[step.index] = self.get(step.model_name, pinned).spec
            except NotFound as exc:
                raise ModelLoadError(f"{where}: {step.label} is not ready: {exc.message}") from None
        plan = plan_ensemble(config, specs, where)
        built: dict[int, _Built] = {}
        for version in select_versions(model_dir, config):
            spec = build_spec(config, ENSEMBLE_PLATFORM, (), where, model_dir / str(version))
            built[version] = _Built(spec, [], 0.0, plan, specs)
        return built

    def ensemble_dependencies(self, name: str, config_override: str | None = None,
                              model_dir: Path | None = None) -> list[str]:
        """The step models an ensemble needs loaded first ([] for any other model, or one that
        cannot be read: its load reports why). `model_dir`: where it is, when not in the
        repository (files a load request sent)."""
        try:
            config, _ = self._read(name, model_dir or self.model_dir(name), config_override)
        except Exception:
            return []
        if config.platform != ENSEMBLE_PLATFORM:
            return []
        return [step_name for step_name, _ in step_dependencies(config)]

    def _version(self, name: str, version: int, b: _Built) -> ModelVersion:
        stats = ModelStats(name, str(version))
        if self.histograms:
            stats.enable_histograms()
        if b.plan is not None:
            scheduler = ensemble_scheduler(b.spec, b.plan, b.steps, stats, self._run_step)
            return ModelVersion(b.spec, version, None, b.seconds, stats, scheduler)
        pool = InstancePool(f"{name}-{version}", b.instances)
        return ModelVersion(b.spec, version, pool, b.seconds, stats, scheduler_for(b.spec, pool, stats),
                            b.instances[0].check_inputs)

    def _run_step(self, *args: Any) -> Any:
        if self.run_step is None:
            raise ModelLoadError("ensembles need the inference service (Repository.run_step is unset)")
        return self.run_step(*args)

    async def load(self, name: str, config_override: str | None = None, files: Path | None = None) -> None:
        """Load (or reload) `name` from disk; raise with the reason on failure.

        `config_override` is a ModelConfig in JSON that replaces config.pbtxt (Triton's `config`
        load parameter); auto-complete still fills in what it leaves out. `files`: a directory of
        files the load request sent (model_files.py), which is then the model's directory, whether
        or not the repository has the model; it is removed when the model is unloaded or replaced,
        or now if the load fails. An ensemble's step models that are not loaded are loaded first,
        as Triton does.
        """
        if files is not None:
            try:
                await self._load(name, files, config_override, files)
            except ServerError as exc:  # its message names the private directory: say "the files sent"
                exc.message = exc.message.replace(str(files), "(the files sent)")
                exc.args = (exc.message,)
                raise
            finally:
                entry = self._models.get(name)
                if entry is None or entry.files != files:  # failed, cancelled, or replaced at once
                    model_files.remove(files)
            return
        try:
            model_dir = self.model_dir(name)
        except NotFound:
            raise NotFound(f"failed to load model '{name}': it is not in the model repository") from None
        await self._load(name, model_dir, config_override, None)

    async def _load(self, name: str, model_dir: Path, config_override: str | None, files: Path | None) -> None:
        if not _valid_name(name):
            raise InvalidArgument(f"invalid model name '{name}'")
        for dependency in await asyncio.to_thread(self.ensemble_dependencies, name, config_override, model_dir):
            entry = self._models.get(dependency)
            if dependency != name and dependency not in self._loading and (entry is None or not entry.versions):
                with contextlib.suppress(Exception):  # the ensemble's own load names what is missing
                    self._loading.add(name)
                    try:
                        await self.load(dependency)
                    finally:
                        self._loading.discard(name)
        entry = self._models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            previous_state = entry.state
            if not entry.versions:
                entry.state, entry.reason = LOADING, ""
            fingerprint = await asyncio.to_thread(_fingerprint, model_dir)
            try:
                built = await asyncio.to_thread(self._build, name, model_dir, config_override)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
                if entry.versions:  # a failed reload leaves the loaded model serving
                    entry.state = previous_state
                else:
                    entry.state, entry.reason = UNAVAILABLE, reason
                entry.fingerprint = fingerprint
                log.error("failed to load model '%s': %s", name, reason)
                raise ModelLoadError(f"failed to load model '{name}': {reason}") from exc
            versions = {v: self._version(name, v, b) for v, b in built.items()}
            old, old_files = entry.versions, entry.files
            entry.versions, entry.latest = versions, versions[max(versions)]
            entry.state, entry.reason, entry.fingerprint, entry.files = READY, "", fingerprint, files
            for v, mv in sorted(versions.items()):
                where_runs = ", ".join(sorted(set(mv.pool.devices))) if mv.pool is not None else "its steps' models"
                log.info("loaded model '%s' version %d on %s in %.2fs", name, v, where_runs, mv.load_seconds)
        try:
            for mv in old.values():
                await mv.close()
        finally:
            if old_files != files:
                model_files.remove(old_files)

    async def unload(self, name: str) -> None:
        if not _valid_name(name):
            raise InvalidArgument(f"invalid model name '{name}'")
        entry = self._models.get(name)
        if entry is None or not entry.versions:
            if entry is None:
                self.model_dir(name)  # NotFound for a name that is nowhere
            return
        async with entry.lock:
            old, old_files = entry.versions, entry.files
            entry.versions, entry.latest, entry.files = {}, None, None
            entry.state, entry.reason = UNAVAILABLE, "unloaded"
        try:
            for mv in old.values():
                await mv.close()
        finally:
            model_files.remove(old_files)
        log.info("unloaded model '%s'", name)

    async def load_many(self, names: list[str]) -> dict[str, str]:
        """Load each model; return name -> error for those that failed (the others still load)."""
        errors: dict[str, str] = {}
        # ensembles last: their step models are then loaded already (load() would load them first)
        kinds = {n: bool(await asyncio.to_thread(self.ensemble_dependencies, n)) for n in names}
        for name in sorted(names, key=kinds.__getitem__):
            try:
                await self.load(name)
            except Exception as exc:
                errors[name] = str(exc)
                if not isinstance(exc, ModelLoadError):  # load() logged the others already
                    log.error("failed to load model '%s': %s", name, exc)
        return errors

    async def poll_once(self) -> None:
        """Poll mode: load new models, reload changed ones, unload removed ones."""
        present = self.scan()
        kinds = {n: bool(await asyncio.to_thread(self.ensemble_dependencies, n)) for n in present}
        for name in sorted(present, key=lambda n: (kinds[n], n)):
            entry = self._models.get(name)
            if entry is not None and entry.fingerprint == await asyncio.to_thread(_fingerprint, present[name]):
                continue
            with contextlib.suppress(Exception):  # logged by load(); the index shows it unavailable
                await self.load(name)
        for name in sorted(set(self._models) - set(present)):
            await self.unload(name)

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)


def _check_sequence_tensors(sequence: SequenceSpec, io: ModelIO, where: str) -> None:
    """A sequence model's control and state tensors are in its model file, as the config says."""
    for kind, names, have in (("input", sequence.hidden_inputs, io.inputs), ("output", sequence.hidden_outputs,
                                                                           io.outputs)):
        by_name = {t.name: t for t in have}
        for name in sorted(names):
            if name not in by_name:
                raise ModelLoadError(f"{where}: sequence_batching names {kind} '{name}', which is not in the model "
                                     f"file (it has: {', '.join(by_name) or 'none'})")
    wanted = {c.name: c.dtype for c in sequence.controls}
    wanted.update({s.input_name: s.dtype for s in sequence.states})
    wanted.update({s.output_name: s.dtype for s in sequence.states})
    for t in io.inputs + io.outputs:
        dtype = wanted.get(t.name)
        if dtype is not None and dtype.v2 != t.dtype.v2:
            raise ModelLoadError(f"{where}: sequence_batching tensor '{t.name}' is {dtype.config} in the config "
                                 f"but {t.dtype.config} in the model file")
