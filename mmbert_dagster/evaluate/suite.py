"""The benchmark suite: every checkpoint x every task -> one long table (model, task, lang, tier, metric, value).

Held-out data: the UDHR articles 25-30 that no stage ever trained on (``raw_corpus/heldout.parquet``), one
text per article per language — aligned across languages by the article number. The header line ("Article 25",
"Статья 26", ...) is dropped, so the article number cannot be read off the digits. Languages are chosen per tier
(English; then up to ``languages_per_tier`` each of high / mid / low, and of languages never trained on,
"unseen"), seeded, so every model is scored on the same texts.

Tasks (chance levels are for the 6 articles):

=================  ===========  ============================================================================
task               metric       what
=================  ===========  ============================================================================
mlm                accuracy     masked-token accuracy on the held-out text (15 % of tokens hidden)
mlm                cross_entropy  mean cross-entropy (nats) of the hidden tokens (lower is better; finer than
                                accuracy for small models)
retrieval          accuracy@1   nearest English article by cosine of mean-pooled embeddings (chance 1/6)
topic_probe        accuracy     logistic regression on frozen embeddings predicting the article, fitted on
                                English + the ``probe_train_tier`` languages, tested on every other language
                                (chance 1/6) — zero-shot cross-lingual transfer, as XNLI
encode             tokens/s     packed inference throughput while embedding (lang "*", tier "all")
<hf task name>     accuracy     an online GLUE/XNLI-style task (``[eval].hf_tasks``), linear probe
<finetune name>    accuracy_mean / _sd, f1_mean / _sd
                                a fine-tuned task (``[[eval.finetune]]``, ``finetune.py``) over its seeds; the
                                offline stand-in ``udhr_article_standin`` (chance 1/6) is tested on the
                                languages scored here
<MTEB task>        its main score  an MTEB task (``[eval].mteb_tasks``, ``embeddings.py``)
=================  ===========  ============================================================================

Summary rows: for every (model, task, metric) the mean over the languages of each tier (lang ``"*"``) and
over all languages (tier ``"all"``); a fine-tuned task's are the mean over seeds of each seed's tier mean, and
its sd over the seeds.

Besides the table, :func:`evaluate` returns the *items*: the masked-token scores of every single held-out text
(model, task, metric, lang, tier, article, value) — the units the findings' paired bootstrap resamples
(``evaluate/stats.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mmbert_dagster.evaluate.metrics import (
    mask_for_eval,
    masked_token_accuracy,
    masked_token_cross_entropy,
    probe_accuracy,
    retrieval_accuracy,
)
from mmbert_dagster.evaluate.encode import Encoder
from mmbert_dagster.recipe import EvalConfig
from mmbert_dagster.seeding import stable_seed

SCHEMA = {"model": pl.String, "task": pl.String, "lang": pl.String, "tier": pl.String, "metric": pl.String,
          "value": pl.Float64}
ITEM_SCHEMA = {"model": pl.String, "task": pl.String, "metric": pl.String, "lang": pl.String, "tier": pl.String,
               "article": pl.Int64, "value": pl.Float64}
TIERS = ("english", "high", "mid", "low", "unseen", "new")  # "new": [eval].new_languages (a released model's)
CHANCE = {"retrieval": 1 / 6, "topic_probe": 1 / 6, "udhr_article_standin": 1 / 6}


def strip_header(text: str, max_header_chars: int = 60) -> str:
    """Drop a short first line (the article's title, which carries its number)."""
    first, _, rest = text.partition("\n")
    return rest.strip() if rest.strip() and len(first) <= max_header_chars else text.strip()


def eval_set(heldout: pl.DataFrame, tiers: Mapping[str, str], english: str, per_tier: int,
             seed: int, new_languages: Sequence[str] = ()) -> pl.DataFrame:
    """(lang, tier, article, text) of the chosen languages: English + up to ``per_tier`` per tier, seeded; every
    one of ``new_languages`` (with held-out text) as the tier "new", whatever its rank in the corpus."""
    need = {"declared_lang", "article", "text"}
    if not need <= set(heldout.columns):
        raise ValueError(f"held-out table lacks {sorted(need - set(heldout.columns))}; has {heldout.columns}")
    df = (heldout.select(pl.col("declared_lang").alias("lang"), "article", "text")
          .with_columns(pl.col("text").map_elements(strip_header, return_dtype=pl.String))
          .filter(pl.col("text").str.len_chars() > 0))
    langs = sorted(set(df["lang"].to_list()))
    if english not in langs:
        raise ValueError(f"no held-out text in {english}: retrieval needs English targets")
    missing = sorted(set(new_languages) - set(langs))
    if missing:
        raise ValueError(f"[eval].new_languages {missing} have no held-out text (the corpus source's heldout_path)")
    tier_of = {lang: ("english" if lang == english else "new" if lang in new_languages else
                      tiers.get(lang, "unseen")) for lang in langs}
    chosen = [english]
    rng = np.random.default_rng(stable_seed(seed, "eval-languages"))
    for tier in TIERS[1:]:
        pool = sorted(lang for lang in langs if tier_of[lang] == tier)
        if len(pool) > per_tier and tier != "new":
            pool = sorted(rng.choice(pool, per_tier, replace=False).tolist())
        chosen += pool
    return (df.filter(pl.col("lang").is_in(chosen))
            .with_columns(pl.col("lang").replace_strict(tier_of, return_dtype=pl.String).alias("tier"))
            .select("lang", "tier", "article", "text").sort("lang", "article"))


def _summaries(rows: pl.DataFrame) -> pl.DataFrame:
    per_lang = rows.filter(pl.col("lang") != "*")
    by_tier = per_lang.group_by("model", "task", "tier", "metric").agg(pl.col("value").mean())
    overall = per_lang.group_by("model", "task", "metric").agg(pl.col("value").mean()).with_columns(
        pl.lit("all").alias("tier"))
    return pl.concat([by_tier, overall], how="diagonal").with_columns(pl.lit("*").alias("lang")).select(list(SCHEMA))


def score_model(name: str, enc: Encoder, evalset: pl.DataFrame, cfg: EvalConfig, *, english: str, seed: int,
                probe_tier: str) -> tuple[list[dict], list[dict]]:
    """The per-language rows of one checkpoint on the held-out tasks (plus its throughput row), and its item rows
    (the masked-token scores of each text)."""
    rows: list[dict] = []
    items: list[dict] = []
    langs, tiers = evalset["lang"].to_list(), evalset["tier"].to_list()
    tier_of = dict(zip(langs, tiers))
    articles = np.asarray(evalset["article"].to_list())
    texts = evalset["text"].to_list()

    # --- embeddings (and throughput)
    emb = enc.embed(texts)
    rows.append({"model": name, "task": "encode", "lang": "*", "tier": "all", "metric": "tokens_per_s",
                 "value": enc.throughput.tokens_per_s})
    lang_arr = np.asarray(langs)

    # --- masked-token accuracy: the same masks for every model (seeded by the text, not by the model)
    never = set(enc.specials.values())
    picked: dict[str, list[int]] = {}
    for i, lang in enumerate(langs):
        if len(picked.setdefault(lang, [])) < cfg.max_texts_per_lang:
            picked[lang].append(i)
    order = [i for idx in picked.values() for i in idx]
    tokens = enc.tokenize([texts[i] for i in order])
    masked = [mask_for_eval(ids, cfg.mask_rate, enc.specials["mask"], never,
                            torch.Generator().manual_seed(stable_seed(seed, "eval-mask", langs[i], int(articles[i]))))
              for ids, i in zip(tokens, order)]
    preds = enc.masked_predictions(masked)
    by_lang: dict[str, list] = {}
    for i, p in zip(order, preds):
        by_lang.setdefault(langs[i], []).append(p)
        if len(p[0]):
            items += [{"model": name, "task": "mlm", "metric": metric, "lang": langs[i], "tier": tier_of[langs[i]],
                       "article": int(articles[i]), "value": value}
                      for metric, value in (("accuracy", masked_token_accuracy([p])[0]),
                                            ("cross_entropy", masked_token_cross_entropy([p])))]
    for lang, results in by_lang.items():
        acc, _ = masked_token_accuracy(results)
        if not math.isnan(acc):
            rows += [{"model": name, "task": "mlm", "lang": lang, "tier": tier_of[lang], "metric": metric,
                      "value": value}
                     for metric, value in (("accuracy", acc), ("cross_entropy", masked_token_cross_entropy(results)))]

    # --- cross-lingual retrieval against English
    eng = lang_arr == english
    for lang in sorted(set(langs) - {english}):
        q = lang_arr == lang
        acc = retrieval_accuracy(emb[q], articles[q].tolist(), emb[eng], articles[eng].tolist())
        if not math.isnan(acc):
            rows.append({"model": name, "task": "retrieval", "lang": lang, "tier": tier_of[lang],
                         "metric": "accuracy@1", "value": acc})

    # --- linear probe: fit on English + the probe tier, test on every other language
    train = np.isin(tiers, ["english", probe_tier])
    tests = {lang: (emb[lang_arr == lang], articles[lang_arr == lang].tolist())
             for lang in sorted(set(lang_arr[~train].tolist()))}
    if train.sum() and len(set(articles[train].tolist())) > 1 and tests:
        for lang, acc in probe_accuracy(emb[train], articles[train].tolist(), tests, seed=seed).items():
            rows.append({"model": name, "task": "topic_probe", "lang": lang, "tier": tier_of[lang],
                         "metric": "accuracy", "value": acc})
    return rows, items


def evaluate(models: Mapping[str, Path], heldout: pl.DataFrame, tiers: Mapping[str, str], cfg: EvalConfig, *,
             english: str, seed: int, device: str = "cpu", cache_dir: Path | None = None,
             log: Callable[[str], None] = print) -> tuple[pl.DataFrame, list[str], pl.DataFrame]:
    """Score every model; returns (the long table with summary rows, notes such as skipped online tasks, the
    item table). ``cache_dir``: where MTEB keeps task data and results (``<cache_dir>/tasks``: local copies)."""
    from mmbert_dagster.evaluate.hf_tasks import run_hf_task

    evalset = eval_set(heldout, tiers, english, cfg.languages_per_tier, seed, cfg.new_languages)
    counts = evalset.group_by("tier").agg(pl.col("lang").n_unique()).sort("tier")
    log(f"evaluating {len(models)} model(s) on {evalset.height} held-out texts in {evalset['lang'].n_unique()} "
        f"languages ({', '.join(f'{t} {n}' for t, n in counts.iter_rows())})")
    rows: list[dict] = []
    items: list[dict] = []
    encoders = {}
    for name, folder in models.items():
        enc = Encoder(Path(folder), device=device, batch_tokens=cfg.batch_tokens)
        if cfg.hf_tasks:  # kept for the online tasks below; otherwise each model is freed after scoring
            encoders[name] = enc
        model_rows, model_items = score_model(name, enc, evalset, cfg, english=english, seed=seed,
                                              probe_tier=cfg.probe_train_tier)
        rows += model_rows
        items += model_items
        means = {(t, m): np.mean([r["value"] for r in model_rows if r["task"] == t and r["metric"] == m])
                 for t, m in (("mlm", "accuracy"), ("mlm", "cross_entropy"), ("retrieval", "accuracy@1"))}
        log(f"{name}: mlm accuracy {means['mlm', 'accuracy']:.3f} (cross-entropy {means['mlm', 'cross_entropy']:.2f}), "
            f"retrieval@1 {means['retrieval', 'accuracy@1']:.3f}, "
            f"{enc.throughput.tokens_per_s:,.0f} tokens/s")
    notes: list[str] = []
    for task in cfg.hf_tasks:
        task_rows, note = run_hf_task(task, encoders, tier=tiers.get(task.lang, "unseen") if task.lang != english
                                      else "english", seed=seed, log=log)
        rows += task_rows
        if note:
            notes.append(note)
            log(note)
    if cfg.finetune:
        from mmbert_dagster.evaluate.finetune import finetune_scores

        scored = dict(zip(evalset["lang"].to_list(), evalset["tier"].to_list()))  # the languages scored above
        tuned = finetune_scores(cfg.finetune, models, scored, english=english, heldout=heldout, device=device,
                                log=log, notes=notes)  # with its own tier rows (means over seeds, and sd)
    else:
        tuned = pl.DataFrame(schema=SCHEMA)
    if cfg.mteb_tasks:
        from mmbert_dagster.evaluate.embeddings import run_mteb

        for name, folder in models.items():
            frame, skipped = run_mteb(list(cfg.mteb_tasks), folder, cache_dir=cache_dir, name=name, tiers=tiers,
                                      english=english, device=device, languages=list(cfg.mteb_languages) or None,
                                      log=log)
            rows += frame.to_dicts()
            notes += [n for n in skipped if n not in notes]
    table = pl.DataFrame(rows, schema=SCHEMA)
    table = pl.concat([table, _summaries(table.filter(pl.col("task") != "encode")), tuned.cast(SCHEMA)])
    return (table.sort("model", "task", "tier", "lang"), notes,
            pl.DataFrame(items, schema=ITEM_SCHEMA).sort("model", "task", "metric", "lang", "article"))
