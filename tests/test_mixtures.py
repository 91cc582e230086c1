import dataclasses

import polars as pl
import pytest

from mmbert_dagster.mixtures import MixtureError, english_share, mixture_problems, stage_mixture
from mmbert_dagster.recipe import load_recipe

RECIPE = load_recipe("tiny")


def stats(tokens: dict[str, int]) -> pl.DataFrame:
    langs = sorted(tokens, key=lambda k: -tokens[k])
    return pl.DataFrame({
        "lang": langs, "docs": [1] * len(langs), "tokens_est": [tokens[k] for k in langs],
        "bytes": [4 * tokens[k] for k in langs], "tier": ["high"] * len(langs), "rank": list(range(1, len(langs) + 1)),
    })


def stage(**kw):
    return dataclasses.replace(RECIPE.stage("pretrain"), **kw)


def shares(mix: pl.DataFrame) -> dict[str, float]:
    return dict(zip(mix["lang"], mix["share"]))


def test_temperature_sampling_matches_hand_computed_shares():
    # τ = 0.5: weights sqrt(10000) = 100 and sqrt(100) = 10 -> shares 100/110 and 10/110.
    mix = stage_mixture(stats({"eng_Latn": 10_000, "zul_Latn": 100}),
                        stage(tau=0.5, tokens=1000, languages="all", max_repeat=100.0), RECIPE)
    s = shares(mix)
    assert s["eng_Latn"] == pytest.approx(100 / 110)
    assert s["zul_Latn"] == pytest.approx(10 / 110)
    rf = dict(zip(mix["lang"], mix["repeat_factor"]))
    assert rf["eng_Latn"] == pytest.approx(1000 * 100 / 110 / 10_000)  # 0.0909: subsampled
    assert rf["zul_Latn"] == pytest.approx(1000 * 10 / 110 / 100)  # 0.909


def test_lower_tau_flattens_the_distribution():
    st = stats({"eng_Latn": 1_000_000, "deu_Latn": 10_000, "amh_Ethi": 100})
    small_share = [shares(stage_mixture(st, stage(tau=t, tokens=1000, languages="all"), RECIPE))["amh_Ethi"]
                   for t in (0.7, 0.5, 0.3)]
    # τ = 0.3: weights 1e6^.3 = 63.096, 1e4^.3 = 15.849, 100^.3 = 3.981 -> amh share 3.981 / 82.926 = 0.04801
    assert small_share[2] == pytest.approx(3.98107 / (63.0957 + 15.8489 + 3.98107), rel=1e-4)
    assert small_share[0] < small_share[1] < small_share[2]


def test_repetition_cap_holds_small_languages_and_gives_the_rest_to_others():
    # τ = 0.5, budget 5000: uncapped zul target would be 5000 * 10/110 = 454.5 tokens = 4.5 epochs of its 100.
    # With max_repeat 1 it is held at 100 tokens and eng takes the remaining 4900.
    mix = stage_mixture(stats({"eng_Latn": 10_000, "zul_Latn": 100}),
                        stage(tau=0.5, tokens=5000, languages="all", max_repeat=1.0), RECIPE)
    s = shares(mix)
    assert s["zul_Latn"] == pytest.approx(100 / 5000)
    assert s["eng_Latn"] == pytest.approx(4900 / 5000)
    rf = dict(zip(mix["lang"], mix["repeat_factor"]))
    assert rf["zul_Latn"] == pytest.approx(1.0) and rf["eng_Latn"] == pytest.approx(0.49)
    assert mix.filter(pl.col("lang") == "zul_Latn")["capped"][0]


def test_small_languages_are_upsampled_by_repetition():
    mix = stage_mixture(stats({"eng_Latn": 10_000, "zul_Latn": 100}),
                        stage(tau=0.3, tokens=9_000, languages="all", max_repeat=5.0), RECIPE)
    rf = dict(zip(mix["lang"], mix["repeat_factor"]))
    assert 1.0 < rf["zul_Latn"] <= 5.0
    assert mix["share"].sum() == pytest.approx(1.0)


def test_budget_that_cannot_be_met_names_the_field():
    with pytest.raises(MixtureError, match=r"stages\.pretrain\.tokens.*cannot be met"):
        stage_mixture(stats({"eng_Latn": 1000, "deu_Latn": 500}), stage(tokens=10_000, languages="all", max_repeat=2.0), RECIPE)


def test_top_n_and_explicit_language_sets():
    st = stats({"eng_Latn": 1000, "deu_Latn": 500, "fra_Latn": 300, "amh_Ethi": 10})
    assert set(stage_mixture(st, stage(languages=2, tokens=100), RECIPE)["lang"]) == {"eng_Latn", "deu_Latn"}
    assert set(stage_mixture(st, stage(languages=("amh_Ethi", "fra_Latn"), tokens=100), RECIPE)["lang"]) == {
        "amh_Ethi", "fra_Latn"}
    with pytest.raises(MixtureError, match=r"stages\.pretrain\.languages.*top 9"):
        stage_mixture(st, stage(languages=9, tokens=100), RECIPE)
    with pytest.raises(MixtureError, match=r"\['yor_Latn'\] have no documents"):
        stage_mixture(st, stage(languages=("yor_Latn",), tokens=100), RECIPE)


def test_english_boost_orders_english_share_across_decay_variants():
    st = stats({"eng_Latn": 100_000, "deu_Latn": 50_000, "fra_Latn": 30_000, "amh_Ethi": 500, "zul_Latn": 300})
    eng = english_share(stage_mixture(st, stage(languages=3, tau=0.3, english_boost=2.0, tokens=1000), RECIPE), "eng_Latn")
    cont = english_share(stage_mixture(st, stage(languages=3, tau=0.3, tokens=1000), RECIPE), "eng_Latn")
    all_ = english_share(stage_mixture(st, stage(languages="all", tau=0.3, tokens=1000), RECIPE), "eng_Latn")
    assert eng > cont > all_


def test_mixture_problems_detects_bad_shares_and_caps():
    st = stats({"eng_Latn": 1000, "deu_Latn": 500})
    s = stage(languages="all", tokens=100)
    mix = stage_mixture(st, s, RECIPE)
    assert mixture_problems(mix, s, st) == []
    assert any("sum to" in p for p in mixture_problems(mix.with_columns(share=pl.col("share") * 2), s, st))
    assert any("missing" in p for p in mixture_problems(mix.head(1), s, st))
    assert any("above cap" in p for p in mixture_problems(mix.with_columns(repeat_factor=pl.lit(99.0)), s, st))


def test_language_stats_counts_passed_documents_and_ranks_by_measured_tokens(tmp_path):
    from mmbert_dagster.mixtures import language_stats

    pl.DataFrame({"doc_id": ["a", "b", "c", "d", "e"], "text": ["x" * 1000, "x" * 500, "字" * 200, "y" * 300, "z" * 50]}
                 ).write_parquet(tmp_path / "docs.parquet")
    pl.DataFrame({"doc_id": ["a", "b", "c", "d", "e"],
                  "lang": ["eng_Latn", "eng_Latn", "cmn_Hans", "deu_Latn", "deu_Latn"],
                  "lid_score": [0.9] * 5, "passed": [True, True, True, True, False]}).write_parquet(tmp_path / "lid.parquet")
    # 600 bytes of Chinese at 0.5 tokens/byte (300 tokens) outrank 300 bytes of German at 0.25 (75 tokens)
    fertility = pl.DataFrame({"lang": ["eng_Latn", "cmn_Hans", "deu_Latn"], "tokens_per_byte": [0.25, 0.5, 0.25]})
    recipe = dataclasses.replace(RECIPE, tier_high=1, tier_mid=2)
    stats = language_stats([tmp_path / "docs.parquet"], tmp_path / "lid.parquet", fertility, recipe)
    rows = {r["lang"]: r for r in stats.iter_rows(named=True)}
    assert rows["eng_Latn"] == {"lang": "eng_Latn", "docs": 2, "tokens_est": 375, "bytes": 1500, "tier": "high", "rank": 1}
    assert (rows["cmn_Hans"]["tokens_est"], rows["cmn_Hans"]["tier"]) == (300, "mid")
    assert (rows["deu_Latn"]["docs"], rows["deu_Latn"]["tokens_est"], rows["deu_Latn"]["tier"]) == (1, 75, "low")


def test_replay_share_splits_the_budget_between_known_and_new_languages():
    """A late decay that adds languages: replay_share of the tokens to the languages the model knows, τ-sampled
    within each group; without replay the mixture is exactly the single-group one."""
    st = stats({"eng_Latn": 10_000, "deu_Latn": 4_900, "amh_Ethi": 400, "zul_Latn": 100})
    plain = stage_mixture(st, stage(languages="all", tau=0.5, tokens=2000, max_repeat=10.0), RECIPE)
    assert set(plain["replay_group"]) == {"all"}
    mix = stage_mixture(st, stage(languages="all", tau=0.5, tokens=2000, max_repeat=10.0, replay_share=0.25,
                                  replay_languages=("eng_Latn", "deu_Latn")), RECIPE)
    share = shares(mix)
    assert share["eng_Latn"] + share["deu_Latn"] == pytest.approx(0.25)
    assert share["eng_Latn"] / share["deu_Latn"] == pytest.approx(100 / 70)  # sqrt(10000) : sqrt(4900)
    assert share["amh_Ethi"] / share["zul_Latn"] == pytest.approx(20 / 10)
    assert share["amh_Ethi"] + share["zul_Latn"] == pytest.approx(0.75)
    assert dict(zip(mix["lang"], mix["replay_group"]))["zul_Latn"] == "new"
    top = stage_mixture(st, stage(languages="all", tau=0.5, tokens=2000, max_repeat=10.0, replay_share=0.25,
                                  replay_languages=2), RECIPE)
    assert shares(top) == pytest.approx(share)
    assert mixture_problems(mix, stage(languages="all", replay_share=0.25, replay_languages=2, max_repeat=10.0), st) == []
    assert mixture_problems(plain, stage(languages="all", replay_share=0.5, replay_languages=2, max_repeat=10.0), st)


def test_replay_that_cannot_be_met_names_the_group_and_the_field():
    st = stats({"eng_Latn": 10_000, "zul_Latn": 100})
    with pytest.raises(MixtureError, match="'new' group's 1 languages hold at most 200"):  # 0.9 × 1000 > 2 × 100
        stage_mixture(st, stage(languages="all", tokens=1000, max_repeat=2.0, replay_share=0.1,
                                replay_languages=("eng_Latn",)), RECIPE)
    with pytest.raises(MixtureError, match="every stage language is a replay language"):
        stage_mixture(st, stage(languages="all", tokens=100, replay_share=0.5, replay_languages=2), RECIPE)
    with pytest.raises(MixtureError, match=r"replay_languages: language\(s\) \['yor_Latn'\]"):
        stage_mixture(st, stage(languages="all", tokens=100, replay_share=0.5, replay_languages=("yor_Latn",)), RECIPE)
