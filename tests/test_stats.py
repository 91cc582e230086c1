"""The paired hierarchical bootstrap (mmbert_dagster.evaluate.stats) and the paper's findings built on it
(evaluate/findings.py), on synthetic item tables with known effects."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mmbert_dagster.evaluate.findings import findings_markdown, findings_table, per_language_delta
from mmbert_dagster.evaluate.stats import Interval, Term, bootstrap_contrast, per_language, verdict
from mmbert_dagster.render import delta_chart, png_bytes

TIERS = {"low": 12, "unseen": 12, "english": 1}
LOW = ("low",)


def make_items(spec: dict[str, tuple[float | dict[str, float], list[float]]], *, tiers: dict[str, int] = TIERS,
               n_articles: int = 6, noise: float = 0.02, seed: int = 0, task: str = "mlm",
               metric: str = "accuracy") -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """An item table and its groups: ``spec[group] = (effect, seed_offsets)``; effect is a number or a
    per-tier dict; one model per seed offset (``g``, ``g_seed2``, ...). value = base(lang, article) + effect +
    seed offset + N(0, noise)."""
    rng = np.random.default_rng(seed)
    units = [(f"{tier}{i:02d}", tier, art) for tier, n in tiers.items() for i in range(n)
             for art in range(25, 25 + n_articles)]
    base = rng.normal(0.5, 0.1, len(units))
    rows, groups = [], {}
    for g, (effect, offsets) in spec.items():
        groups[g] = [g if s == 0 else f"{g}_seed{s + 1}" for s in range(len(offsets))]
        for model, off in zip(groups[g], offsets):
            for (lang, tier, art), b in zip(units, base):
                eff = effect.get(tier, 0.0) if isinstance(effect, dict) else effect
                rows.append((model, task, metric, lang, tier, art, float(b + eff + off + rng.normal(0, noise))))
    cols = ["model", "task", "metric", "lang", "tier", "article", "value"]
    return pl.DataFrame(rows, schema=cols, orient="row"), groups


def diff(b: str, a: str, tiers=LOW) -> list[Term]:
    return [Term(1.0, b, tiers), Term(-1.0, a, tiers)]


def test_no_effect_is_not_significant():
    items, groups = make_items({"a": (0.0, [0, 0, 0]), "b": (0.0, [0, 0, 0])})
    iv = bootstrap_contrast(items, groups, diff("b", "a"), task="mlm", metric="accuracy", n_boot=2000, seed=0)
    assert iv.low < 0 < iv.high
    assert verdict(iv) == "not significant"
    assert (iv.n_langs, iv.n_texts, iv.n_seeds, iv.n_boot) == (12, 6, 3, 2000)


def test_large_effect_holds_and_is_estimated_and_the_reverse_is_reversed():
    items, groups = make_items({"a": (0.0, [0, 0, 0]), "b": (0.2, [0, 0, 0])})
    iv = bootstrap_contrast(items, groups, diff("b", "a"), task="mlm", metric="accuracy")
    assert abs(iv.estimate - 0.2) < 0.02 and iv.low < 0.2 < iv.high
    assert verdict(iv) == "holds"
    rev = bootstrap_contrast(items, groups, diff("a", "b"), task="mlm", metric="accuracy")
    assert verdict(rev) == "reversed"
    assert rev.estimate == pytest.approx(-iv.estimate)


def test_cross_entropy_is_oriented_so_lower_is_better():
    items, groups = make_items({"a": (0.0, [0]), "b": (-0.2, [0])}, metric="cross_entropy")
    iv = bootstrap_contrast(items, groups, diff("b", "a"), task="mlm", metric="cross_entropy")
    assert iv.estimate == pytest.approx(0.2, abs=0.02) and verdict(iv) == "holds"


def test_difference_in_differences_controls_for_a_change_on_every_language():
    # decay_all better by 0.1 everywhere, not specifically where only it trained: the plain row holds, the
    # control (low − unseen) does not.
    items, groups = make_items({"decay_eng": (0.0, [0, 0, 0]), "decay_all": (0.1, [0, 0, 0])})
    plain = bootstrap_contrast(items, groups, diff("decay_all", "decay_eng"), task="mlm", metric="accuracy")
    did = diff("decay_all", "decay_eng") + [Term(-1.0, "decay_all", ("unseen",)), Term(1.0, "decay_eng", ("unseen",))]
    control = bootstrap_contrast(items, groups, did, task="mlm", metric="accuracy")
    assert verdict(plain) == "holds" and verdict(control) == "not significant"
    # A gain only on the low tier passes the control.
    items, groups = make_items({"decay_eng": (0.0, [0, 0, 0]), "decay_all": ({"low": 0.1}, [0, 0, 0])})
    assert verdict(bootstrap_contrast(items, groups, did, task="mlm", metric="accuracy")) == "holds"


def test_margin_for_staying_near_the_best():
    eng = ("english",)
    for below, expected in ((0.005, "holds"), (0.03, "reversed")):
        items, groups = make_items({"best": (0.0, [0]), "merged": (-below, [0])}, tiers={"english": 1},
                                   n_articles=6, noise=0.002)
        iv = bootstrap_contrast(items, groups, diff("merged", "best", eng), task="mlm", metric="accuracy")
        assert verdict(iv, margin=0.01) == expected
        assert verdict(iv) == "reversed"  # strictly better: no


def test_estimate_is_the_hand_computed_contrast_on_paired_units():
    rows = [  # model, lang, tier, article, value
        ("a", "x", "low", 1, 0.1), ("a", "x", "low", 2, 0.3), ("a", "y", "low", 1, 0.5), ("a", "y", "low", 2, 0.9),
        ("b1", "x", "low", 1, 0.2), ("b1", "x", "low", 2, 0.6), ("b1", "y", "low", 1, 0.4), ("b1", "y", "low", 2, 1.0),
        ("b2", "x", "low", 1, 0.4), ("b2", "x", "low", 2, 0.2), ("b2", "y", "low", 1, 0.8), ("b2", "y", "low", 2, 0.6),
        ("a", "z", "low", 1, 9.0), ("b1", "z", "low", 1, 9.0),  # z/1: b2 lacks it, so unpaired and left out
        ("a", "x", "high", 1, 5.0),  # another tier: not in the contrast
    ]
    items = pl.DataFrame([(m, "mlm", "accuracy", lang, t, art, v) for m, lang, t, art, v in rows], orient="row",
                         schema=["model", "task", "metric", "lang", "tier", "article", "value"])
    groups = {"a": ["a"], "b": ["b1", "b2"]}
    # b: seed means x: (0.3, 0.4) -> 0.35, y: (0.6, 0.8) -> 0.7; a: x 0.2, y 0.7; contrast = mean(0.15, 0.0)
    iv = bootstrap_contrast(items, groups, diff("b", "a"), task="mlm", metric="accuracy", n_boot=50)
    assert iv.estimate == pytest.approx(0.075, abs=1e-12)
    assert (iv.n_langs, iv.n_texts, iv.n_seeds) == (2, 2, 2)
    ce = bootstrap_contrast(items.with_columns(metric=pl.lit("cross_entropy")), groups, diff("b", "a"),
                            task="mlm", metric="cross_entropy", n_boot=50)
    assert ce.estimate == pytest.approx(-0.075, abs=1e-12)
    # One language with a weight of its own, two groups: 2·M(b) − M(a) over languages x and y.
    two = bootstrap_contrast(items, groups, [Term(2.0, "b", LOW), Term(-1.0, "a", LOW)], task="mlm",
                             metric="accuracy", n_boot=50)
    assert two.estimate == pytest.approx(2 * (0.35 + 0.7) / 2 - (0.2 + 0.7) / 2, abs=1e-12)


def test_between_seed_variance_widens_the_interval():
    one, g1 = make_items({"a": (0.0, [0]), "b": (0.1, [0])})
    three, g3 = make_items({"a": (0.0, [0]), "b": (0.1, [-0.05, 0.0, 0.05])})
    iv1 = bootstrap_contrast(one, g1, diff("b", "a"), task="mlm", metric="accuracy")
    iv3 = bootstrap_contrast(three, g3, diff("b", "a"), task="mlm", metric="accuracy")
    assert iv3.n_seeds == 3 and iv1.n_seeds == 1
    assert abs(iv3.estimate - iv1.estimate) < 0.01
    assert (iv3.high - iv3.low) > 2 * (iv1.high - iv1.low)


def test_deterministic_for_a_seed_and_fast():
    import time

    spec = {g: (0.01 * k, [0.0, 0.01, -0.01]) for k, g in enumerate(["w", "x", "y", "z"])}
    items, groups = make_items(spec, tiers={"low": 12})
    terms = [Term(1.0, "w", LOW), Term(-1.0, "x", LOW), Term(0.5, "y", LOW), Term(-0.5, "z", LOW)]
    t0 = time.perf_counter()
    first = bootstrap_contrast(items, groups, terms, task="mlm", metric="accuracy", n_boot=2000, seed=3)
    assert time.perf_counter() - t0 < 1.0
    assert bootstrap_contrast(items, groups, terms, task="mlm", metric="accuracy", n_boot=2000, seed=3) == first
    assert bootstrap_contrast(items, groups, terms, task="mlm", metric="accuracy", n_boot=2000, seed=4) != first


def test_bad_input_names_the_group_or_the_tiers():
    items, groups = make_items({"a": (0.0, [0]), "b": (0.0, [0])})
    with pytest.raises(ValueError, match="'ghost'"):
        bootstrap_contrast(items, groups | {"ghost": ["nobody"]}, diff("ghost", "a"), task="mlm", metric="accuracy")
    with pytest.raises(ValueError, match="'b'"):
        bootstrap_contrast(items, groups, diff("b", "a"), task="mlm", metric="cross_entropy")  # no such rows
    with pytest.raises(ValueError, match="mid"):
        bootstrap_contrast(items, groups, diff("b", "a", ("mid",)), task="mlm", metric="accuracy")


def test_verdict_edges():
    iv = Interval(0.0, float("nan"), float("nan"), 1, 1, 1, 10)
    assert verdict(iv) == "not significant"
    assert verdict(Interval(0.0, -0.009, -0.001, 1, 1, 1, 10), margin=0.01) == "holds"


def test_per_language_sorted_with_intervals():
    items, groups = make_items({"a": (0.0, [0, 0]), "b": ({"low": 0.2, "unseen": 0.0}, [0, 0])})
    frame = per_language(items, groups, "a", "b", task="mlm", metric="accuracy", tiers=("low", "unseen"), n_boot=200)
    assert frame.columns == ["lang", "tier", "delta", "low", "high"] and frame.height == 24
    assert frame["delta"].is_sorted()
    assert ((frame["low"] <= frame["delta"]) & (frame["delta"] <= frame["high"])).all()
    low = frame.filter(pl.col("tier") == "low")
    assert (low["low"] > 0.1).all() and frame.filter(pl.col("tier") == "unseen")["delta"].abs().max() < 0.05


def _arms(with_ablations: bool = False):
    off = [0.0, 0.002, -0.002]
    spec = {"decay_eng": ({"english": 0.08}, off), "decay_cont": (0.02, off),
            "decay_all": ({"low": 0.1, "english": 0.05}, off),
            "merged_model": ({"low": 0.08, "english": 0.078}, [0])}  # 0.002 below the best on English
    if with_ablations:
        spec |= {"decay_fixed": (0.0, [0]), "decay_all_mask30": (0.0, [0]), "merged_linear": (0.0, [0])}
    tiers = {"english": 1, "high": 3, "mid": 3, "low": 8, "unseen": 6}
    negated = {g: ({t: -e for t, e in eff.items()} if isinstance(eff, dict) else -eff, off)
               for g, (eff, off) in spec.items()}  # cross-entropy: lower is better
    ce, groups = make_items(negated, tiers=tiers, metric="cross_entropy", noise=0.004, seed=1)
    acc, _ = make_items(spec, tiers=tiers, metric="accuracy", noise=0.004, seed=2)
    return pl.concat([ce, acc]), groups


def test_findings_table_skips_missing_groups_and_is_deterministic():
    items, groups = _arms()
    table = findings_table(items, groups, n_boot=300, seed=0)
    assert table.columns == ["id", "finding", "task", "metric", "tiers", "comparison", "delta", "low", "high",
                             "verdict", "n_langs", "n_texts", "n_seeds"]
    for metric in ("cross_entropy", "accuracy"):
        ids = table.filter(pl.col("metric") == metric)["id"].to_list()
        assert ids == ["a", "a_control", "b1", "b2", "e2"]  # no decay_fixed / mask30 / linear merge: c, d, e1 skipped
    rows = {(r["id"], r["metric"]): r for r in table.iter_rows(named=True)}
    for metric in ("cross_entropy", "accuracy"):
        assert rows[("a", metric)]["verdict"] == "holds" and rows[("a", metric)]["tiers"] == "low"
        assert rows[("a", metric)]["comparison"] == "decay_all − decay_eng"
        assert rows[("a_control", metric)]["tiers"] == "low − unseen"
        assert rows[("a_control", metric)]["verdict"] == "holds"  # the gain is on the low tier only
        assert rows[("b1", metric)]["comparison"] == "merged_model − decay_eng (best)"
        assert rows[("b1", metric)]["verdict"] == "holds"  # 0.002 below the best, margin 0.01 / 0.05 nats
        assert rows[("b2", metric)]["verdict"] == "holds"  # keeps 0.08 of 0.1
    assert "nats" in rows[("b1", "cross_entropy")]["finding"]
    assert findings_table(items, groups, n_boot=300, seed=0).equals(table)
    again = findings_table(items, {g: m for g, m in groups.items() if g != "decay_all"}, n_boot=100)
    assert "a" not in again["id"].to_list() and "b2" not in again["id"].to_list()
    full = findings_table(*_arms(with_ablations=True), n_boot=100, metrics=(("mlm", "accuracy"),))
    assert full["id"].to_list() == ["a", "a_control", "b1", "b2", "c", "d", "e1", "e2"]

    md = findings_markdown(table)
    assert "**holds**" in md and "Δ > 0 favours the claim" in md and "cross-entropy is negated" in md
    r = rows[("a", "accuracy")]
    assert f"[{r['low']:+.3f}".replace("-", "−") in md
    assert "No finding" in findings_markdown(table.head(0))


def test_extension_findings_compare_with_the_released_checkpoint_on_the_new_tier():
    """n1-n4 ([eval].new_languages): the extension learns the new languages, the merge keeps the gain and what the
    released model knew; they appear only with a released arm and a "new" tier."""
    off = [0.0]
    spec = {"released_checkpoint": (0.0, off), "decay_new": ({"new": 0.1, "english": -0.03}, off),
            "decay_known": ({"english": 0.0}, off),
            "merged_model": ({"new": 0.07, "english": -0.002, "high": -0.001}, off)}
    tiers = {"english": 1, "high": 6, "new": 6}
    items, groups = make_items(spec, tiers=tiers, noise=0.004, seed=3)
    table = findings_table(items, groups, n_boot=300, metrics=(("mlm", "accuracy"),))
    rows = {r["id"]: r for r in table.iter_rows(named=True)}
    assert list(rows) == ["n1", "n2", "n3", "n4"]
    assert rows["n1"]["comparison"] == "decay_new − released_checkpoint" and rows["n1"]["tiers"] == "new"
    assert rows["n1"]["verdict"] == rows["n2"]["verdict"] == "holds"
    assert rows["n3"]["tiers"] == "english" and rows["n3"]["verdict"] == "holds"  # 0.002 below, margin 0.01
    assert rows["n4"]["verdict"] == "holds" and rows["n4"]["n_langs"] == 6
    worse, groups = make_items(spec | {"merged_model": ({"new": 0.07, "english": -0.05}, off)}, tiers=tiers,
                               noise=0.004, seed=3)
    assert findings_table(worse, groups, n_boot=300, metrics=(("mlm", "accuracy"),)).filter(
        pl.col("id") == "n3")["verdict"].item() == "reversed"
    no_new = items.filter(pl.col("tier") != "new")
    assert findings_table(no_new, groups, n_boot=100, metrics=(("mlm", "accuracy"),)).height == 0


def test_per_language_delta_and_its_chart():
    items, groups = _arms()
    frame = per_language_delta(items, groups, n_boot=100)
    assert frame is not None and set(frame["tier"].to_list()) == {"high", "mid", "low", "unseen"}
    assert per_language_delta(items, {"decay_eng": groups["decay_eng"]}) is None
    png = png_bytes(delta_chart(frame, "decay_all − decay_eng per language", "Δ cross-entropy (negated)"))
    assert png.startswith(b"\x89PNG")
