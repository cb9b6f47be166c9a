"""Schedulers: how a loaded model version turns requests into executions, chosen from its config.

    platform "ensemble"         -> EnsembleScheduler (ensemble.py): steps through the same core
    dynamic_batching { ... }    -> Batcher (batcher.py), forming batches
    neither                     -> Batcher, one request per execution (Triton's default scheduler)
    sequence_batching { ... }   -> SequenceBatcher (sequence.py): stateful models, one request per
                                   sequence at a time, on the sequence's own instance

`base.py` has the contract the service relies on (Work, Outcome, Scheduler). The repository asks
`scheduler_for`; nothing else constructs a scheduler.
"""

from __future__ import annotations

from ..instances import InstancePool
from ..model_config import ModelSpec
from ..stats import ModelStats
from .base import Outcome, Pending, Scheduler, StepRunner, Work
from .batcher import Batcher
from .ensemble import EnsembleScheduler
from .ensemble_plan import ENSEMBLE_PLATFORM, EnsemblePlan
from .sequence import SequenceBatcher

__all__ = ["ENSEMBLE_PLATFORM", "Batcher", "EnsemblePlan", "EnsembleScheduler", "Outcome", "Pending", "Scheduler",
           "SequenceBatcher", "StepRunner", "Work", "ensemble_scheduler", "scheduler_for"]


def scheduler_for(spec: ModelSpec, pool: InstancePool, stats: ModelStats) -> Scheduler:
    """The scheduler of a model version that runs on instances (every platform but ensembles)."""
    if spec.sequence is not None:
        return SequenceBatcher(spec, pool, stats)
    return Batcher(spec, pool, stats)  # batching or not, from spec.dynamic_batching


def ensemble_scheduler(spec: ModelSpec, plan: EnsemblePlan, steps: dict[int, ModelSpec], stats: ModelStats,
                       run_step: StepRunner) -> Scheduler:
    return EnsembleScheduler(spec, plan, steps, stats, run_step)
