"""``score_checkpoints``: what the ``benchmark_scores`` asset does — every checkpoint scored on the held-out text
(``suite.evaluate``), the long score table and the run report written into one folder.

The folder holds ``scores.parquet`` (model, task, lang, tier, metric, value), ``items.parquet`` (the score of
every held-out text: model, task, metric, lang, tier, article, value), ``report.md`` with ``plots/`` and
``findings.parquet`` (the paper's claims with their intervals); :func:`read_scores` reads the table back,
:func:`read_findings` the findings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mmbert_dagster.evaluate.report import Report, build_report, write_report
from mmbert_dagster.evaluate.suite import SCHEMA, evaluate
from mmbert_dagster.recipe import EvalConfig

SCORES_FILE = "scores.parquet"
ITEMS_FILE = "items.parquet"
SUMMARY_TASKS = ("mlm", "retrieval", "topic_probe", "encode")  # every model has rows of these tasks


@dataclass
class Scores:
    table: pl.DataFrame
    report: Report
    notes: list[str]


def deployment_rows(model: str, report: Mapping) -> pl.DataFrame:
    """The score-table rows of an ``onnx_model`` report (``onnx_export.deploy``): task ``onnx`` of ``model``."""
    check, speed = report["parity"], report["throughput"]
    values = {"max_abs_logit_diff": check["max_abs_diff"], "onnxruntime_tokens_per_s": speed["ort_tokens_per_s"],
              "pytorch_tokens_per_s": speed["torch_tokens_per_s"], "speedup": speed["ratio"]}
    return pl.DataFrame([{"model": model, "task": "onnx", "lang": "*", "tier": "all", "metric": k, "value": float(v)}
                         for k, v in values.items()], schema=SCHEMA)


def score_checkpoints(models: Mapping[str, Path], heldout: pl.DataFrame | None, tiers: Mapping[str, str],
                      cfg: EvalConfig, out_dir: Path, *, lineage: Mapping[str, str | None],
                      mixtures: Mapping[str, pl.DataFrame], english: str, seed: int, device: str, title: str,
                      groups: Mapping[str, list[str]] | None = None, deployment: tuple[str, Mapping] | None = None,
                      cache_dir: Path | None = None, log: Callable[[str], None] = print) -> Scores:
    """Score ``models`` (checkpoint key -> HF folder, in report order) and write table and report to ``out_dir``.
    ``groups``: an arm of the findings -> its seed replicas (``Recipe.seed_groups``; default one model each).
    ``tiers`` (lang -> tier) also gives the report how many languages each tier holds (English apart).
    ``deployment``: (the exported model, the ``onnx_model`` report) — its parity and throughput join the table.
    ``cache_dir``: MTEB's task data and results."""
    if heldout is None:
        raise FileNotFoundError("no held-out text: the benchmarks need held-out aligned text (the corpus "
                                "resource's heldout_path)")
    table, notes, items = evaluate(models, heldout, tiers, cfg, english=english, seed=seed, device=device,
                                   cache_dir=cache_dir, log=log)
    if deployment:
        table = pl.concat([table, deployment_rows(*deployment)])
    groups = {g: [m for m in keys if m in models] for g, keys in (groups or {m: [m] for m in models}).items()}
    report = build_report(table, checkpoints=models, lineage=lineage, mixtures=mixtures, notes=notes, title=title,
                          items=items, groups={g: keys for g, keys in groups.items() if keys}, seed=seed,
                          tier_languages=tier_members(tiers, english))
    table.write_parquet(Path(out_dir) / SCORES_FILE)
    items.write_parquet(Path(out_dir) / ITEMS_FILE)
    write_report(report, Path(out_dir))
    return Scores(table, report, notes)


def tier_members(tiers: Mapping[str, str], english: str) -> dict[str, list[str]]:
    """tier -> its languages, English as a tier of its own (the corpus ranks it among the high ones)."""
    members: dict[str, list[str]] = {"english": [english]}
    for lang, tier in sorted(tiers.items()):
        if lang != english:
            members.setdefault(tier, []).append(lang)
    return members


def read_scores(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(Path(folder) / SCORES_FILE)


def missing_rows(table: pl.DataFrame, models: list[str]) -> list[str]:
    """``model/task`` pairs of the summary tasks that the table lacks (the asset check's question)."""
    have = set(zip(table["model"].to_list(), table["task"].to_list()))
    return [f"{m}/{t}" for m in models for t in SUMMARY_TASKS if (m, t) not in have]


def read_findings(folder: Path) -> pl.DataFrame:
    """The findings table ``benchmark_scores`` wrote (evaluate/findings.findings_table's columns)."""
    from mmbert_dagster.evaluate.report import FINDINGS_FILE

    return pl.read_parquet(Path(folder) / FINDINGS_FILE)
