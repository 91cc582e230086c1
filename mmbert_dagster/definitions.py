"""The one Definitions object: it only gathers what the asset modules define, and picks the executor.

Executor (``MMBERT_EXECUTOR``; default ``in_process``): ``in_process`` runs every step of a run in one process
— on the embedded graph a process per step costs more than the work itself (``benchmarks/orchestration.py``);
``multiprocess`` is Dagster's process-per-step executor (steps isolated, independent steps in parallel);
``<module>:<attribute>`` names any other Dagster executor, e.g. ``dagster_k8s:k8s_job_executor`` (one pod per
step) or ``dagster_celery:celery_executor``. ``multiprocess`` also lets a run's config choose (``execution: {config:
{in_process: {}}}``).
"""

import importlib
import os

from dagster import (
    Definitions,
    in_process_executor,
    load_asset_checks_from_modules,
    load_assets_from_modules,
    multi_or_in_process_executor,
)

from mmbert_dagster.assets import data, evaluation, mixtures, tokens, training
from mmbert_dagster.resources import default_resources

_modules = [data, mixtures, tokens, training, evaluation]


def executor_from_env(value: str | None = None):
    """The executor ``MMBERT_EXECUTOR`` names (see the module docstring)."""
    value = (value if value is not None else os.environ.get("MMBERT_EXECUTOR", "")).strip() or "in_process"
    if value == "in_process":
        return in_process_executor
    if value == "multiprocess":
        return multi_or_in_process_executor
    module, _, attr = value.partition(":")
    if not attr:
        raise ValueError(f"MMBERT_EXECUTOR={value!r}: use in_process, multiprocess or <module>:<executor>")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"MMBERT_EXECUTOR={value!r}: cannot import {attr} from {module} ({e})") from e


defs = Definitions(
    assets=load_assets_from_modules(_modules),
    asset_checks=load_asset_checks_from_modules(_modules),
    jobs=[evaluation.nightly_eval_job],
    schedules=[evaluation.nightly_eval],
    resources=default_resources(),
    executor=executor_from_env(),
)
