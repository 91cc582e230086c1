"""Paired hierarchical bootstrap of a linear contrast between model groups, from the benchmark's item table.

The item table has one row per scored unit: ``model, task, metric, lang, tier, article, value`` (``article`` is
the held-out text id; the same (lang, article) units are scored for every model). A *group* (an arm) is a name
mapped to the model keys of its seeds, e.g. ``{"decay_eng": ["decay_eng", "decay_eng_seed2"]}``.

A contrast is ``sum_k coef_k * M(group_k, tiers_k)`` with

    M(g, T) = mean over the languages of tiers T of
              (mean over that language's texts of (mean over g's seeds of value)),

so every language weighs the same whatever its number of texts, and every text the same whatever its number of
seeds. Its sign is oriented so that a POSITIVE contrast always means "better": for ``cross_entropy`` (lower is
better) the contrast is negated, once, inside :func:`bootstrap_contrast` / :func:`per_language`.

Uncertainty comes from three sources, and the bootstrap resamples all three, in the nesting of the data:

* languages: which languages a tier happens to hold (the claims are about "low-resource languages", not about
  these twelve) — resampled per distinct tier set, with one resampled list shared by every term on that tier set;
* texts: which held-out articles were scored — resampled within each language, shared by every group;
* seeds: training randomness — each group's seeds resampled independently (a group with one seed contributes none;
  then the interval says nothing about seed variation).

Sharing the language and text draws across groups makes the comparison *paired*: the per-(lang, article)
difficulty, which is far larger than the differences between models, cancels inside each replicate. Resampling at
every level of a hierarchy is known to be somewhat conservative (the lower-level variance is counted again inside
the upper-level resample), which is the safe direction for "does the claim hold".

The interval is the plain percentile interval of the replicates: no normality assumption (the contrast of a few
languages can be skewed), invariant to monotone transforms, and simple to explain; with few languages and seeds
a BCa or studentised interval would not be better founded. Everything is a weighted mean, so one replicate is a
set of resampling *weights* (counts / n) and all replicates are computed at once with ``einsum``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

LOWER_IS_BETTER = frozenset({"cross_entropy"})


@dataclass(frozen=True)
class Term:
    """One summand of a contrast: ``coef * M(group, tiers)``."""

    coef: float
    group: str
    tiers: tuple[str, ...]


@dataclass(frozen=True)
class Interval:
    """A contrast's point estimate and bootstrap percentile interval (oriented: > 0 = better), with its sizes:
    languages used, texts per language (max), seeds per group (max), replicates."""

    estimate: float
    low: float
    high: float
    n_langs: int
    n_texts: int
    n_seeds: int
    n_boot: int


def orientation(metric: str) -> float:
    """+1 where higher is better, -1 where lower is (cross-entropy): multiply a difference by it so > 0 = better."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


@dataclass
class _Data:
    """The paired units of one contrast as dense arrays.

    ``values[g]``: (L, T, S_g) values of group g's seeds (0 where ``mask`` is False); ``mask``: (L, T) which text
    slots of a language are real (languages have their texts in the first ``n_texts[l]`` slots); ``tier_langs``:
    per tier set (a frozenset), the indices of its languages.
    """

    langs: list[str]
    lang_tier: list[str]
    n_texts: np.ndarray  # (L,)
    mask: np.ndarray  # (L, T) bool
    values: dict[str, np.ndarray]
    tier_langs: dict[frozenset, np.ndarray]

    def only_lang(self, i: int) -> _Data:
        """The same data restricted to language ``i`` (every tier set then holds just it)."""
        return _Data([self.langs[i]], [self.lang_tier[i]], self.n_texts[i:i + 1], self.mask[i:i + 1],
                     {g: v[i:i + 1] for g, v in self.values.items()},
                     {k: np.array([0]) for k in self.tier_langs})


def _prepare(items: pl.DataFrame, groups: Mapping[str, Sequence[str]], terms: Sequence[Term], task: str,
             metric: str) -> _Data:
    """Select the rows of ``task``/``metric``, keep the (lang, article) units that every seed of every group in
    ``terms`` has, and lay them out as arrays. Raises ValueError for a group without rows or an empty tier set."""
    if not terms:
        raise ValueError("a contrast needs at least one term")
    names = list(dict.fromkeys(t.group for t in terms))
    tier_sets = list(dict.fromkeys(frozenset(t.tiers) for t in terms))
    rows = items.filter((pl.col("task") == task) & (pl.col("metric") == metric) & pl.col("article").is_not_null()
                        & pl.col("value").is_not_null() & pl.col("value").is_not_nan())
    present = set(rows["model"].unique().to_list())
    seeds: dict[str, list[str]] = {}
    for g in names:
        if g not in groups:
            raise ValueError(f"group {g!r} is not defined (groups: {sorted(groups)})")
        # Seeds that were not scored (no rows) are left out; a group with none at all is an error.
        seeds[g] = [m for m in dict.fromkeys(groups[g]) if m in present]
        if not seeds[g]:
            raise ValueError(f"group {g!r} has no rows for {task}/{metric} (models {list(groups[g])})")
    all_tiers = set().union(*tier_sets)
    models = [m for g in names for m in seeds[g]]
    rows = rows.filter(pl.col("tier").is_in(sorted(all_tiers)) & pl.col("model").is_in(models))
    # One value per (model, lang, article) (duplicates, if any, averaged), then the units every model has: paired.
    cells = rows.group_by("model", "lang", "article").agg(pl.col("value").mean(), pl.col("tier").first())
    units = (cells.group_by("lang", "article").agg(pl.col("model").n_unique().alias("n"), pl.col("tier").first())
             .filter(pl.col("n") == len(set(models))).sort("lang", "article"))
    langs = units["lang"].unique(maintain_order=True).to_list()
    units = units.with_columns(pl.col("lang").rank("dense").cast(pl.Int64).sub(1).alias("li"),
                               pl.col("article").rank("ordinal").over("lang").cast(pl.Int64).sub(1).alias("ti"))
    n_texts = units.group_by("li").len().sort("li")["len"].to_numpy().astype(np.int64)
    lang_tier = units.group_by("li", maintain_order=True).agg(pl.col("tier").first())["tier"].to_list()
    n_l, n_t = len(langs), int(n_texts.max()) if len(n_texts) else 0
    mask = np.zeros((n_l, n_t), dtype=bool)
    mask[units["li"].to_numpy(), units["ti"].to_numpy()] = True

    keyed = cells.join(units.select("lang", "article", "li", "ti"), on=["lang", "article"], how="inner")
    values: dict[str, np.ndarray] = {}
    for g in names:
        arr = np.zeros((n_l, n_t, len(seeds[g])))
        for s, m in enumerate(seeds[g]):
            part = keyed.filter(pl.col("model") == m)
            arr[part["li"].to_numpy(), part["ti"].to_numpy(), s] = part["value"].to_numpy()
        values[g] = arr

    tier_arr = np.array(lang_tier, dtype=object)
    tier_langs: dict[frozenset, np.ndarray] = {}
    for ts in tier_sets:
        idx = np.flatnonzero(np.isin(tier_arr, list(ts))) if n_l else np.array([], dtype=np.int64)
        if idx.size == 0:
            raise ValueError(f"tiers {tuple(sorted(ts))} have no language with a paired {task}/{metric} unit "
                             f"for groups {names}")
        tier_langs[ts] = idx
    return _Data(langs, lang_tier, n_texts, mask, values, tier_langs)


def _contrast(data: _Data, terms: Sequence[Term], lang_w: Mapping[frozenset, np.ndarray], text_w: np.ndarray,
              seed_w: Mapping[str, np.ndarray]) -> np.ndarray:
    """The (unoriented) contrast for B sets of weights at once.

    ``lang_w[ts]``: (B, L_ts) weights over the tier set's languages; ``text_w``: (B, L, T) weights over each
    language's texts (0 on padding); ``seed_w[g]``: (B, S_g). Each weight vector sums to 1, so every level is a
    (resampled) mean.
    """
    per_lang: dict[str, np.ndarray] = {}
    for g, v in data.values.items():
        by_text = np.einsum("lts,bs->blt", v, seed_w[g])  # mean over seeds
        per_lang[g] = np.einsum("blt,blt->bl", by_text, text_w)  # mean over texts, per language
    out = np.zeros(text_w.shape[0])
    for t in terms:
        ts = frozenset(t.tiers)
        out += t.coef * np.einsum("bl,bl->b", per_lang[t.group][:, data.tier_langs[ts]], lang_w[ts])
    return out


def _uniform(data: _Data) -> tuple[dict, np.ndarray, dict]:
    """The weights of the original data (plain means), as one 'replicate'."""
    lang_w = {ts: np.full((1, len(idx)), 1.0 / len(idx)) for ts, idx in data.tier_langs.items()}
    text_w = (data.mask / data.n_texts[:, None])[None]
    seed_w = {g: np.full((1, v.shape[2]), 1.0 / v.shape[2]) for g, v in data.values.items()}
    return lang_w, text_w, seed_w


def _resampled(data: _Data, rng: np.random.Generator, n_boot: int, resample_langs: bool = True):
    """Bootstrap weights: counts of a draw with replacement of n out of n, divided by n, at each level.

    Draw order is fixed (tier sets, then languages, then groups, each in a fixed order), so a seed reproduces.
    """
    def counts(n: int) -> np.ndarray:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n

    if resample_langs:
        lang_w = {ts: counts(len(idx)) for ts, idx in data.tier_langs.items()}
    else:
        lang_w = {ts: np.full((n_boot, len(idx)), 1.0 / len(idx)) for ts, idx in data.tier_langs.items()}
    text_w = np.zeros((n_boot, *data.mask.shape))
    for li, n in enumerate(data.n_texts):  # texts within each language, shared by every group (paired)
        text_w[:, li, :n] = counts(int(n))
    seed_w = {g: counts(v.shape[2]) for g, v in data.values.items()}  # each group's seeds, independently
    return lang_w, text_w, seed_w


def _interval(data: _Data, terms: Sequence[Term], sign: float, rng: np.random.Generator, n_boot: int,
              level: float, resample_langs: bool = True) -> Interval:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    estimate = sign * float(_contrast(data, terms, *_uniform(data))[0])
    reps = sign * _contrast(data, terms, *_resampled(data, rng, n_boot, resample_langs))
    alpha = 1.0 - level
    low, high = np.quantile(reps, [alpha / 2, 1.0 - alpha / 2])
    n_langs = len(np.unique(np.concatenate(list(data.tier_langs.values()))))
    return Interval(estimate, float(low), float(high), n_langs, int(data.n_texts.max()),
                    max(v.shape[2] for v in data.values.values()), n_boot)


def bootstrap_contrast(items: pl.DataFrame, groups: Mapping[str, Sequence[str]], terms: Sequence[Term], *,
                       task: str, metric: str, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """The contrast ``sum_k coef_k * M(group_k, tiers_k)`` of ``task``/``metric`` with a paired hierarchical
    bootstrap percentile interval (see the module docstring for what is resampled).

    Sign convention: for ``cross_entropy`` (lower is better) the contrast is multiplied by -1, so a POSITIVE
    estimate always means "the positively weighted groups are better". Only the (lang, article) units that every
    (scored) seed of every group in ``terms`` has are used. ``estimate`` is the contrast of the original data.
    Deterministic for a given ``seed``. Raises ValueError if a group is undefined or has no rows, or a tier set has
    no (paired) language.
    """
    data = _prepare(items, groups, terms, task, metric)
    return _interval(data, terms, orientation(metric), np.random.default_rng(seed), n_boot, level)


def contrast_estimate(items: pl.DataFrame, groups: Mapping[str, Sequence[str]], terms: Sequence[Term], *,
                      task: str, metric: str) -> float:
    """The oriented point estimate of a contrast alone (no bootstrap), e.g. to pick the best of several groups."""
    data = _prepare(items, groups, terms, task, metric)
    return orientation(metric) * float(_contrast(data, terms, *_uniform(data))[0])


def verdict(interval: Interval, margin: float = 0.0) -> str:
    """The claim tested is "contrast > -margin" (margin 0: strictly better; margin > 0: "no worse than by more
    than margin"). "holds" when the whole interval lies above ``-margin``, "reversed" when it lies wholly below,
    otherwise (or for a NaN interval) "not significant"."""
    if interval.low > -margin:
        return "holds"
    if interval.high < -margin:
        return "reversed"
    return "not significant"


def per_language(items: pl.DataFrame, groups: Mapping[str, Sequence[str]], a: str, b: str, *, task: str,
                 metric: str, tiers: tuple[str, ...], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> pl.DataFrame:
    """Per language of ``tiers``: the oriented difference ``b - a`` (> 0: b better; cross-entropy negated) and its
    bootstrap percentile interval over that language's texts and the groups' seeds (one language: nothing to
    resample at the language level). Columns lang, tier, delta, low, high; sorted by delta."""
    terms = [Term(1.0, b, tuple(tiers)), Term(-1.0, a, tuple(tiers))]
    data = _prepare(items, groups, terms, task, metric)
    rng = np.random.default_rng(seed)
    sign = orientation(metric)
    rows = []
    for i, (lang, tier) in enumerate(zip(data.langs, data.lang_tier)):
        iv = _interval(data.only_lang(i), terms, sign, rng, n_boot, level, resample_langs=False)
        rows.append((lang, tier, iv.estimate, iv.low, iv.high))
    schema = {"lang": pl.String, "tier": pl.String, "delta": pl.Float64, "low": pl.Float64, "high": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row").sort("delta", "lang")
