"""Language statistics and per-stage token mixtures, computed by the DuckDB SQL in ``sql/``.

The SQL files are the single source of the mixture logic (one query per file, bound parameters, CTEs named after
what they compute); this module only registers inputs, binds recipe values and validates the results.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import duckdb
import polars as pl

from mmbert_dagster.recipe import Recipe, Stage

SHARE_TOLERANCE = 1e-6
STATS_FILE = "language_stats.parquet"  # the language_stats artifact: one row per language
MIXTURE_FILE = "mixture.parquet"  # a mixture_<stage> artifact: one row per language of the stage


class MixtureError(ValueError):
    """A stage mixture that cannot be computed; the message names the stage and recipe field."""


def sql_text(name: str) -> str:
    return (resources.files("mmbert_dagster.sql") / f"{name}.sql").read_text()


def sql_hash(*names: str) -> str:
    return hashlib.sha256("".join(sql_text(n) for n in names).encode()).hexdigest()[:12]


def _query(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> pl.DataFrame:
    return pl.from_arrow(con.sql(sql, params=params).to_arrow_table())


def language_stats(docs_files: list[Path], lid_file: Path, fertility: pl.DataFrame, recipe: Recipe) -> pl.DataFrame:
    """(lang, docs, tokens_est, bytes, tier, rank) from ``sql/language_stats.sql``; ``fertility`` is
    (lang, tokens_per_byte) measured with the tokenizer. Languages are ranked by tokens."""
    con = duckdb.connect()
    con.read_parquet([str(f) for f in docs_files]).create_view("documents")
    con.read_parquet(str(lid_file)).create_view("language_id")
    con.register("fertility", fertility.to_arrow())
    stats = _query(con, sql_text("language_stats"), {"tier_high": recipe.tier_high, "tier_mid": recipe.tier_mid})
    if stats.height == 0:
        raise MixtureError(f"{lid_file}: no document passed language ID; nothing to build mixtures from")
    return stats


def build_language_stats(filtered_corpus_dir: Path, language_id_dir: Path, tokenizer_dir: Path, out_dir: Path,
                         recipe: Recipe) -> pl.DataFrame:
    """The language_stats artifact: :func:`language_stats` of the filtered documents, their language-ID labels and
    the tokenizer's measured fertility, written to ``out_dir``."""
    from mmbert_dagster.data import filtering, langid, tokenizer

    stats = language_stats(filtering.docs_files(filtered_corpus_dir), langid.table_file(language_id_dir),
                           tokenizer.read_fertility(tokenizer_dir), recipe)
    stats.write_parquet(Path(out_dir) / STATS_FILE)
    return stats


def read_language_stats(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(Path(folder) / STATS_FILE)


def tiers_of(stats: pl.DataFrame) -> dict[str, str]:
    """lang -> tier (high / mid / low) from language_stats."""
    return dict(zip(stats["lang"].to_list(), stats["tier"].to_list()))


def write_mixture(mix: pl.DataFrame, folder: Path) -> Path:
    mix.write_parquet(Path(folder) / MIXTURE_FILE)
    return Path(folder) / MIXTURE_FILE


def read_mixture(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(Path(folder) / MIXTURE_FILE)


def stage_mixture(stats: pl.DataFrame, stage: Stage, recipe: Recipe) -> pl.DataFrame:
    """(stage, lang, tier, tokens_available, share, tokens_target, repeat_factor, temperature_share, capped,
    replay_group): ``replay_group`` is "all" without replay, else "replay" (``stage.replay_share`` of the tokens)
    or "new"."""
    where = f"{recipe.source_file}: stages.{stage.name}"
    available = set(stats["lang"].to_list())
    top_n, languages = None, None
    if isinstance(stage.languages, int):
        if stage.languages > len(available):
            raise MixtureError(
                f"{where}.languages asks for the top {stage.languages} languages, but the corpus has only "
                f"{len(available)} languages that passed language ID; lower it or use \"all\""
            )
        top_n = stage.languages
    elif isinstance(stage.languages, tuple):
        missing = sorted(set(stage.languages) - available)
        if missing:
            raise MixtureError(f"{where}.languages: language(s) {missing} have no documents in language_stats")
        languages = list(stage.languages)
    replay = stage.replay_languages
    if stage.replay_share > 0 and isinstance(replay, tuple):
        missing = sorted(set(replay) - available)
        if missing:
            raise MixtureError(f"{where}.replay_languages: language(s) {missing} have no documents in language_stats")
    con = duckdb.connect()
    con.register("language_stats", stats.to_arrow())
    mix = _query(
        con,
        sql_text("stage_mixture"),
        {
            "stage": stage.name, "tau": float(stage.tau), "budget": float(stage.tokens),
            "max_repeat": float(stage.max_repeat), "english": recipe.english,
            "english_boost": float(stage.english_boost), "top_n": top_n, "languages": languages,
            "replay_share": float(stage.replay_share),
            "replay_top_n": replay if isinstance(replay, int) else None,
            "replay_languages": list(replay) if isinstance(replay, tuple) and replay else None,
        },
    )
    if stage.replay_share > 0:
        groups = set(mix["replay_group"].to_list())
        for group, why in (("replay", "none of the stage's languages is a replay language"),
                           ("new", "every stage language is a replay language")):
            if group not in groups:
                raise MixtureError(f"{where}.replay_languages: {why}, so replay_share = {stage.replay_share} cannot "
                                   f"be given to the {group!r} group")
    for (group,), part in mix.group_by("replay_group", maintain_order=True):
        if part["share"].null_count() > 0:
            budget = stage.tokens * (1.0 if group == "all" else
                                     stage.replay_share if group == "replay" else 1 - stage.replay_share)
            capacity = int(stats.filter(pl.col("lang").is_in(part["lang"].to_list()))["tokens_est"].sum()
                           * stage.max_repeat)
            what = "its" if group == "all" else f"its {group!r} group's"
            raise MixtureError(
                f"{where}.tokens: the budget of {int(budget):,} tokens cannot be met: {what} {part.height} languages "
                f"hold at most {capacity:,} tokens at max_repeat={stage.max_repeat} (raise max_repeat, add data or "
                f"lower tokens{'' if group == 'all' else ' or change replay_share'})"
            )
    return mix


def mixture_problems(mix: pl.DataFrame, stage: Stage, stats: pl.DataFrame) -> list[str]:
    """What is wrong with a computed mixture (empty list = fine): the properties asset checks guard."""
    problems = []
    total = float(mix["share"].sum())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        problems.append(f"shares sum to {total:.9f}, not 1")
    if isinstance(stage.languages, int):
        expected = set(stats.filter(pl.col("rank") <= stage.languages)["lang"].to_list())
    elif isinstance(stage.languages, tuple):
        expected = set(stage.languages)
    else:
        expected = set(stats.filter(pl.col("tokens_est") > 0)["lang"].to_list())
    missing = expected - set(mix.filter(pl.col("share") > 0)["lang"].to_list())
    if missing:
        problems.append(f"{len(missing)} stage language(s) missing or at zero share: {sorted(missing)[:10]}")
    if stage.replay_share > 0 and "replay_group" in mix.columns:
        replayed = float(mix.filter(pl.col("replay_group") == "replay")["share"].sum())
        if abs(replayed - stage.replay_share) > SHARE_TOLERANCE:
            problems.append(f"the replay languages hold {replayed:.6f} of the tokens, not replay_share = "
                            f"{stage.replay_share}")
    over = mix.filter(pl.col("repeat_factor") > stage.max_repeat * (1 + 1e-9))
    if over.height:
        problems.append(f"repeat factor above cap {stage.max_repeat} for {over['lang'].to_list()[:10]}")
    return problems


def english_share(mix: pl.DataFrame, english: str) -> float:
    row = mix.filter(pl.col("lang") == english)
    return float(row["share"][0]) if row.height else 0.0
