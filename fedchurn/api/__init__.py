"""The Python API (also reachable as ``fedchurn.simulate``, ``fedchurn.load_run``...): see ``fedchurn/api/calls.py``
for configs and overrides, ``fedchurn/api/results.py`` for what each call returns."""

from __future__ import annotations

from fedchurn.api.calls import audit, compare, load_run, predict, pretrain, resolve_config, simulate
from fedchurn.api.folders import RunInfo, find_runs, inspect_run
from fedchurn.api.results import (
    AuditResult,
    ComparisonResult,
    PredictionResult,
    PretrainResult,
    RunResult,
    SplitExport,
)
from fedchurn.api.split import export_split

__all__ = [
    "AuditResult",
    "ComparisonResult",
    "PredictionResult",
    "PretrainResult",
    "RunInfo",
    "RunResult",
    "SplitExport",
    "audit",
    "compare",
    "export_split",
    "find_runs",
    "inspect_run",
    "load_run",
    "predict",
    "pretrain",
    "resolve_config",
    "simulate",
]
