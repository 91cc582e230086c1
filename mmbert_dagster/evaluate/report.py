"""The run report: the paper's claims measured with intervals (evaluate/findings.py), tables per tier, and plots.

``build_report`` returns the Markdown twice — once with the plots as files beside it (``report.md`` +
``plots/*.png``, for people and git) and once with the plots inlined as base64 (Dagster asset metadata) — so
the two never drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mmbert_dagster.evaluate.findings import findings_markdown, findings_table, per_language_delta
from mmbert_dagster.evaluate.suite import CHANCE, TIERS
from mmbert_dagster.render import delta_chart, grouped_bar_chart, inline_png, md_table, multi_line_chart, png_bytes

REPORT_FILE = "report.md"
TASK_METRICS = (("mlm", "accuracy"), ("retrieval", "accuracy@1"), ("topic_probe", "accuracy"))  # higher = better
TABLE_METRICS = (*TASK_METRICS, ("mlm", "cross_entropy"))  # shown per tier (cross-entropy: lower = better)
FINDINGS_FILE = "findings.parquet"


@dataclass
class Report:
    markdown_files: str  # plots referenced as plots/<name>.png
    markdown_inline: str  # plots inlined (asset metadata)
    plots: dict[str, bytes]
    findings: pl.DataFrame  # evaluate/findings.findings_table


def _mean(table: pl.DataFrame, model: str, task: str, metric: str, tier: str) -> float:
    v = table.filter((pl.col("model") == model) & (pl.col("task") == task) & (pl.col("metric") == metric)
                     & (pl.col("tier") == tier) & (pl.col("lang") == "*"))["value"]
    return float(v[0]) if len(v) else float("nan")


def _findings_section(items: pl.DataFrame, groups: Mapping[str, list[str]], seed: int
                      ) -> tuple[list[str], pl.DataFrame, dict[str, bytes]]:
    """The findings table (Markdown lines), the table itself and the per-language Δ plot of finding (a)."""
    table = findings_table(items, groups, seed=seed)
    seeds = {g: len(keys) for g, keys in groups.items() if len(keys) > 1}
    lines = ["## The paper's claims, measured on this run", "",
             "Each row is a claim of the mmBERT paper as a contrast between checkpoints, on the masked-token scores "
             "of every held-out text: Δ with its paired bootstrap 95 % interval (languages, texts"
             + (" and seeds" if seeds else "") + " resampled). The unseen tier (languages no stage trained on) is "
             "the control: a gain that shows there as well is not language-specific.", ""]
    if seeds:
        lines += ["Seeds per arm: " + ", ".join(f"`{g}` {n}" for g, n in seeds.items()) + ".", ""]
    lines += [findings_markdown(table), ""]
    plots = {}
    delta = per_language_delta(items, groups, seed=seed)
    if delta is not None and delta.height:
        plots["finding_a_per_language"] = png_bytes(delta_chart(
            delta, "Decay-All − Decay-Eng per language (held-out cross-entropy, negated; 95 % interval)",
            "Δ (nats, > 0: Decay-All better)"))
        lines += ["{plot:finding_a_per_language}", ""]
    return lines, table, plots


def _tiers_md(items: pl.DataFrame, tier_languages: Mapping[str, list[str]] | None) -> list[str]:
    scored = (items.select("tier", "lang").unique().group_by("tier").agg(pl.col("lang").sort())
              .to_dict(as_series=False))
    by_tier = dict(zip(scored["tier"], scored["lang"]))
    lines = ["## Languages per tier", "",
             "| tier | languages in the recipe's tier | scored here | scored languages |", "|---|---|---|---|"]
    for tier in TIERS:
        langs = by_tier.get(tier, [])
        if tier == "new" and not langs:
            continue
        total = len(tier_languages[tier]) if tier_languages and tier in tier_languages else "–"
        lines.append(f"| {tier} | {total} | {len(langs)} | {', '.join(langs) or '–'} |")
    return lines + ["", "Tiers rank the languages by their tokens in the filtered corpus: high = the pre-training "
                        "set, mid = added in mid-training, low = only Decay-All trains on them, unseen = in no "
                        "stage's mixture (held-out text only, so not counted in the recipe's tiers); new = "
                        "`[eval].new_languages`, the languages a released checkpoint never saw.", ""]


def _mean_sd(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" + ("" if sd is None or sd != sd else f" ± {sd:.3f}")


def _finetune_md(table: pl.DataFrame, models: list[str]) -> list[str]:
    """Per fine-tuned task: mean ± sd over seeds per tier, then per language, one column per model."""
    from mmbert_dagster.evaluate.finetune import STANDIN_NAME

    tuned = table.filter(pl.col("metric").str.ends_with("_mean") | pl.col("metric").str.ends_with("_sd"))
    lines: list[str] = []
    for task in sorted(set(tuned["task"].to_list()), key=lambda t: (t != STANDIN_NAME, t)):
        rows = tuned.filter(pl.col("task") == task).with_columns(
            pl.col("metric").str.extract(r"^(.*)_(mean|sd)$", 1).alias("measure"),
            pl.col("metric").str.extract(r"_(mean|sd)$", 1).alias("stat"))
        measure = rows["measure"][0]
        wide = rows.pivot(on="stat", index=["model", "lang", "tier"], values="value")
        cell = {(r["model"], r["lang"], r["tier"]): _mean_sd(r.get("mean"), r.get("sd"))
                for r in wide.iter_rows(named=True)}
        shown = [m for m in models if any(k[0] == m for k in cell)]
        tiers = [t for t in (*TIERS, "all") if (shown[0], "*", t) in cell] if shown else []
        head = (f"## Fine-tuned: `{task}` — {measure}, mean ± sd over seeds"
                + (" (chance 0.167)" if task in CHANCE else ""))
        what = ("**Offline stand-in**, not a paper benchmark: which UDHR article (25–30) a held-out sentence comes "
                "from, every weight fine-tuned on the English sentences, tested zero-shot on every other scored "
                "language — XNLI's protocol on data every install has." if task == STANDIN_NAME else
                "Fine-tuned on the task's training language(s), tested on each language (seqeval entity F1 for "
                "token tasks).")
        lines += [head, "", what, "",
                  "| tier | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        lines += [f"| {t} | " + " | ".join(cell.get((m, "*", t), "–") for m in shown) + " |" for t in tiers]
        langs = sorted({(k[2], k[1]) for k in cell if k[1] != "*"},
                       key=lambda tl: (TIERS.index(tl[0]) if tl[0] in TIERS else len(TIERS), tl[1]))
        lines += ["", "| language | tier | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
        lines += [f"| {lang} | {tier} | " + " | ".join(cell.get((m, lang, tier), "–") for m in shown) + " |"
                  for tier, lang in langs]
        lines.append("")
    return lines


def _deployment_md(table: pl.DataFrame) -> list[str]:
    rows = table.filter(pl.col("task") == "onnx")
    if not rows.height:
        return []
    v = {(r["model"], r["metric"]): r["value"] for r in rows.iter_rows(named=True)}
    lines = ["## Deployment: ONNX (the `onnx_model` asset)", "",
             "| model | max abs logit Δ vs PyTorch | onnxruntime tokens/s | PyTorch tokens/s | speed-up |",
             "|---|---|---|---|---|"]
    for model in sorted({m for m, _ in v}):
        lines.append(f"| {model} | {v[model, 'max_abs_logit_diff']:.1e} | {v[model, 'onnxruntime_tokens_per_s']:,.0f} "
                     f"| {v[model, 'pytorch_tokens_per_s']:,.0f} | ×{v[model, 'speedup']:.2f} |")
    return lines + ["", "Parity: fp32 logits on held-out text of every script (the blocking check allows 1e-3). "
                        "Throughput: the same padded batches of held-out text, timed side by side in one run with "
                        "the same thread count (transformers' SDPA ModernBERT vs onnxruntime's CPU provider).", ""]


def _tier_table(table: pl.DataFrame, task: str, metric: str, models: list[str]) -> pl.DataFrame:
    rows = table.filter((pl.col("task") == task) & (pl.col("metric") == metric) & (pl.col("lang") == "*"))
    tiers = [t for t in (*TIERS, "all") if t in set(rows["tier"].to_list())]
    data = {"model": models}
    for t in tiers:
        data[t] = [_mean(table, m, task, metric, t) for m in models]
    return pl.DataFrame(data)


def loss_curves(checkpoints: Mapping[str, Path], lineage: Mapping[str, str | None], smooth: int = 10
                ) -> dict[str, tuple[list[float], list[float]]]:
    """Per stage: (tokens since the start of the first stage, training loss as a moving mean over ``smooth``
    steps), from each checkpoint's logs/metrics.jsonl. ``lineage``: checkpoint -> the checkpoint it continues from
    (``Recipe.lineage``); a stage starts where that one ended, so the decays branch off the end of mid-training."""
    raw = {}
    for name, folder in checkpoints.items():
        path = Path(folder) / "logs" / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "train/loss" in r]
        if rows:
            raw[name] = ([float(r.get("train/tokens", r["step"])) for r in rows], [r["train/loss"] for r in rows])

    def start(name: str) -> float:
        parent = lineage.get(name)
        return start(parent) + raw[parent][0][-1] if parent in raw else 0.0

    curves = {}
    for name, (xs, ys) in raw.items():
        k = max(1, min(smooth, len(ys)))
        smoothed = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        curves[name] = ([start(name) + x for x in xs], smoothed)
    return curves


def build_report(table: pl.DataFrame, *, checkpoints: Mapping[str, Path], lineage: Mapping[str, str | None],
                 mixtures: Mapping[str, pl.DataFrame], notes: list[str], title: str, items: pl.DataFrame,
                 groups: Mapping[str, list[str]], seed: int = 0,
                 tier_languages: Mapping[str, list[str]] | None = None, top_languages: int = 12) -> Report:
    """The report of a score table and its items; models are shown in the order of ``checkpoints`` (the recipe's
    stage order, then the merges); ``groups``: the findings' arms -> their seed replicas."""
    scored = set(table["model"].to_list())
    models = [m for m in checkpoints if m in scored] + sorted(scored - set(checkpoints))
    found_md, found, plots = _findings_section(items, groups, seed)
    sections = [f"# {title}", "", *found_md, *_tiers_md(items, tier_languages)]

    for task, metric in TABLE_METRICS:
        tt = _tier_table(table, task, metric, models)
        if tt.width <= 1 or not tt.height:
            continue
        tiers = tt.columns[1:]
        name = f"{task}_by_tier" if (task, metric) in TASK_METRICS else f"{task}_{metric}_by_tier"
        plots[name] = png_bytes(grouped_bar_chart(
            tiers, {m: [float(v) for v in tt.filter(pl.col("model") == m).row(0)[1:]] for m in models},
            f"{task}: {metric} per tier", metric, hline=CHANCE.get(task), hline_label="chance" if task in CHANCE else ""))
        chance = f" (chance {CHANCE[task]:.3f})" if task in CHANCE else ""
        sections += [f"## {task} — {metric} per tier{chance}", "", md_table(tt, max_rows=50), "",
                     f"{{plot:{name}}}", ""]

    speed = table.filter(pl.col("task") == "encode").select("model", pl.col("value").round(0).cast(pl.Int64)
                                                            .alias("tokens_per_s"))
    if speed.height:
        sections += ["## Encoding throughput (packed, this machine)", "", md_table(speed), ""]
    sections += _finetune_md(table, models)
    sections += _deployment_md(table)
    tuned = pl.col("metric").str.ends_with("_mean") | pl.col("metric").str.ends_with("_sd")
    other = table.filter(~pl.col("task").is_in([t for t, _ in TASK_METRICS] + ["encode", "onnx"]) & ~tuned)
    if other.height:
        sections += ["## Online tasks and MTEB (the real benchmarks)", "",
                     "Linear probes of `[eval].hf_tasks` and MTEB tasks of `[eval].mteb_tasks` (each its main "
                     "score), on the real datasets.", "", md_table(other, max_rows=100), ""]
    if notes:
        sections += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]

    curves = loss_curves(checkpoints, lineage)
    if curves:
        plots["loss_curves"] = png_bytes(multi_line_chart(
            curves, "training loss per stage (moving mean of 10 steps)", "tokens since the start of pre-training",
            "MLM loss"))
        sections += ["## Training loss per stage", "", "{plot:loss_curves}", ""]
    if mixtures:
        shares = pl.concat([m.select("stage", "lang", "share") for m in mixtures.values()])
        top = (shares.group_by("lang").agg(pl.col("share").max()).sort("share", descending=True)
               .head(top_languages)["lang"].to_list())
        stages = list(mixtures)
        series = {stage: [float(shares.filter((pl.col("stage") == stage) & (pl.col("lang") == lang))["share"].sum())
                          for lang in top] for stage in stages}
        plots["mixture_shares"] = png_bytes(grouped_bar_chart(top, series, "token share per stage (largest languages)",
                                                              "share of the stage's tokens"))
        sections += ["## Mixture shares per stage", "", "{plot:mixture_shares}", ""]

    sections += ["## How to read this", "",
                 "- `mlm`: share of hidden held-out tokens (UDHR articles 25–30, never trained on) guessed exactly "
                 "(`accuracy`), and the mean cross-entropy of the hidden tokens in nats (`cross_entropy`, lower is "
                 "better: it separates small models that accuracy calls equal).",
                 "- `retrieval`: share of a language's articles whose nearest English article (cosine of mean-pooled "
                 "embeddings) is the same article — the Tatoeba/MTEB bitext stand-in.",
                 "- `topic_probe`: logistic regression on frozen embeddings, fitted on English + high-resource "
                 "languages, tested on the others — zero-shot cross-lingual transfer (XNLI stand-in).",
                 "- Stand-ins vs benchmarks: `retrieval`, `topic_probe` and `udhr_article_standin` are offline "
                 "stand-ins on the held-out UDHR articles; the sections *Online tasks and MTEB* and the fine-tuned "
                 "tasks with a dataset are the real benchmarks.",
                 "- Tier means average languages equally; the long table has every language.", ""]
    template = "\n".join(sections)
    files_md, inline_md = template, template
    for name, png in plots.items():
        files_md = files_md.replace(f"{{plot:{name}}}", f"![{name}](plots/{name}.png)")
        inline_md = inline_md.replace(f"{{plot:{name}}}", inline_png(png, name))
    return Report(files_md, inline_md, plots, found)


def write_report(report: Report, folder: Path) -> Path:
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    for name, png in report.plots.items():
        (folder / "plots" / f"{name}.png").write_bytes(png)
    path = folder / REPORT_FILE
    path.write_text(report.markdown_files)
    report.findings.write_parquet(folder / FINDINGS_FILE)
    return path
