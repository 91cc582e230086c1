import pytest

from mmbert_dagster.recipe import PAPER_STAGES, RecipeError, checkpoint_key, load_recipe, recipe_from_dict


def tiny_dict():
    import tomllib
    from importlib import resources

    return tomllib.loads((resources.files("mmbert_dagster.recipes") / "tiny.toml").read_text())


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_every_preset_loads_with_all_stages(preset):
    recipe = load_recipe(preset)
    assert recipe.name == preset
    assert tuple(recipe.stages) == PAPER_STAGES
    assert recipe.lineage() == {"pretrain_checkpoint": None, "midtrain_checkpoint": "pretrain_checkpoint",
                                "decay_eng": "midtrain_checkpoint", "decay_cont": "midtrain_checkpoint",
                                "decay_all": "midtrain_checkpoint"}
    assert recipe.merge_base == "midtrain" and recipe.data_stages == list(PAPER_STAGES)


def test_stages_inherit_from_the_stage_they_extend():
    r = load_recipe("tiny")
    assert r.stage("decay_all").tau == r.stage("decay_cont").tau == r.stage("decay_eng").tau == 0.3
    assert r.stage("decay_cont").english_boost == 1.0 and r.stage("decay_eng").english_boost > 1.0
    assert r.stage("decay_all").languages == "all"
    assert r.stage("midtrain").context_length > r.stage("pretrain").context_length
    assert r.stage("midtrain").rope_theta == 160_000.0 and r.stage("pretrain").rope_theta == 10_000.0
    assert [r.stage(s).tau for s in ("pretrain", "midtrain", "decay_all")] == [0.7, 0.5, 0.3]


def test_paper_presets_carry_paper_shapes():
    small, base = load_recipe("small"), load_recipe("base")
    assert (small.model.layers, small.model.hidden, small.model.heads) == (22, 384, 6)
    assert (base.model.layers, base.model.hidden, base.model.heads) == (22, 768, 12)
    assert base.stage("pretrain").languages == 60 and base.stage("midtrain").languages == 110
    for r in (small, base):  # the released ext/decay configs raise the local layers' θ to 160k too
        assert r.stage("pretrain").local_rope_theta == 0.0 and r.model.local_rope_theta == 10_000.0
        assert {r.stage(s).local_rope_theta for s in ("midtrain", "decay_eng", "decay_cont", "decay_all")} == {160_000.0}


@pytest.mark.parametrize("tau", [0, -0.1, 1.5])
def test_tau_out_of_range_names_the_field(tau):
    d = tiny_dict()
    d["stages"]["midtrain"]["tau"] = tau
    with pytest.raises(RecipeError, match=r"stages\.midtrain\.tau.*\(0, 1\]"):
        recipe_from_dict(d, "my.toml")


@pytest.mark.parametrize("rate", [0, 1, 1.3])
def test_mask_rate_out_of_range_names_the_field(rate):
    d = tiny_dict()
    d["stages"]["decay_eng"]["mask_rate"] = rate
    with pytest.raises(RecipeError, match=r"stages\.decay_eng\.mask_rate"):
        recipe_from_dict(d, "my.toml")


def test_unknown_language_code_is_rejected():
    d = tiny_dict()
    d["stages"]["pretrain"]["languages"] = ["eng_Latn", "german"]
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.languages.*german"):
        recipe_from_dict(d, "my.toml")
    d = tiny_dict()
    d["english"] = "en"
    with pytest.raises(RecipeError, match="english"):
        recipe_from_dict(d, "my.toml")


def test_missing_and_unknown_fields_are_named():
    d = tiny_dict()
    del d["stages"]["base"]["tau"]
    with pytest.raises(RecipeError, match=r"missing field\(s\) \['tau'\]"):
        recipe_from_dict(d, "my.toml")
    d = tiny_dict()
    d["stages"]["midtrain"]["temperature"] = 0.5
    with pytest.raises(RecipeError, match=r"stages\.midtrain: unknown field\(s\) \['temperature'\]"):
        recipe_from_dict(d, "my.toml")
    d = tiny_dict()
    del d["stages"]["decay_all"]  # the merge still names it
    with pytest.raises(RecipeError, match=r"\[merge\]\.weights: unknown stage\(s\) \['decay_all'\]"):
        recipe_from_dict(d, "my.toml")


@pytest.mark.parametrize("name", ["../../etc", "/abs", ".hidden", "a/b", ""])
def test_a_recipe_name_cannot_point_outside_the_artifact_root(name):
    d = tiny_dict()
    d["name"] = name
    with pytest.raises(RecipeError, match="name: must be a plain folder name"):
        recipe_from_dict(d, "my.toml")


def test_unknown_preset_and_missing_file_fail_clearly(tmp_path):
    with pytest.raises(RecipeError, match="unknown preset 'huge'"):
        load_recipe("huge")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(bad)


def test_section_hash_changes_only_with_its_section():
    d = tiny_dict()
    a = recipe_from_dict(d)
    d["stages"]["midtrain"]["tau"] = 0.45
    b = recipe_from_dict(d)
    assert a.section_hash("stages.midtrain.tau") != b.section_hash("stages.midtrain.tau")
    assert a.section_hash("stages.pretrain") == b.section_hash("stages.pretrain")
    assert a.section_hash("lid") == b.section_hash("lid")


def test_checkpoint_keys_of_the_paper_stages_are_fixed():
    assert [checkpoint_key(s) for s in PAPER_STAGES] == [
        "pretrain_checkpoint", "midtrain_checkpoint", "decay_eng", "decay_cont", "decay_all"]
    assert checkpoint_key("decay_all_mask30") == "decay_all_mask30"
    assert checkpoint_key("pretrain_fixed_tau") == "pretrain_fixed_tau_checkpoint"


def test_an_added_stage_extends_another_and_can_reuse_its_data():
    d = tiny_dict()
    d["stages"]["decay_all_mask30"] = {"extends": "decay_all", "mask_rate": 0.30, "data_from": "decay_all"}
    r = recipe_from_dict(d, "my.toml")
    s = r.stage("decay_all_mask30")
    assert s.mask_rate == 0.30 and s.init_from == "midtrain" and s.languages == "all"
    assert r.data_stage("decay_all_mask30") == "decay_all" and "decay_all_mask30" not in r.data_stages
    assert r.lineage()["decay_all_mask30"] == "midtrain_checkpoint"


@pytest.mark.parametrize("change, field, message", [
    ({"init_from": "decay_all_x"}, "init_from", "must name an earlier stage"),
    ({"init_from": "nowhere"}, "init_from", "must name an earlier stage"),
    ({"data_from": "decay_all", "tau": 0.5}, "tau", "differs from stages.decay_all.tau = 0.3"),
    ({"data_from": "nowhere"}, "data_from", "must name another stage"),
    ({"extends": "nowhere"}, "extends", "unknown stage 'nowhere'"),
    ({"replay_share": 0.3}, "replay_languages", "name the languages the model already knows"),
    ({"replay_share": 1.0, "replay_languages": 2}, "replay_share", r"must be in \[0, 1\)"),
    ({"replay_share": 0.3, "replay_languages": ["english"]}, "replay_languages", "unknown language code"),
    ({"local_rope_theta": -1.0}, "local_rope_theta", "must be > 0"),
])
def test_stage_graph_errors_name_the_field(change, field, message):
    d = tiny_dict()
    d["stages"]["decay_all_x"] = {"extends": "decay_all", **change}
    with pytest.raises(RecipeError, match=rf"stages\.decay_all_x\.{field}.*{message}"):
        recipe_from_dict(d, "my.toml")


def test_stage_names_that_clash_with_other_asset_keys_are_refused():
    d = tiny_dict()
    d["stages"]["a_checkpoint"] = {"extends": "pretrain"}  # its mixture: mixture_a_checkpoint
    d["stages"]["mixture_a"] = {"extends": "pretrain"}  # its checkpoint: mixture_a_checkpoint
    with pytest.raises(RecipeError, match=r"clashing asset keys \['mixture_a_checkpoint'\]"):
        recipe_from_dict(d, "my.toml")
    d["stages"]["Decay-Eng"] = d["stages"].pop("mixture_a")
    with pytest.raises(RecipeError, match=r"stages\.Decay-Eng: a stage name is lower-case"):
        recipe_from_dict(d, "my.toml")


def test_merged_stages_must_continue_from_one_checkpoint():
    d = tiny_dict()
    d["merge"]["weights"] = {"decay_all": 1.0, "midtrain": 1.0}
    with pytest.raises(RecipeError, match=r"\[merge\]\.weights: the merged stages must continue from one stage"):
        recipe_from_dict(d, "my.toml")


@pytest.mark.parametrize("change, field, message", [
    ({"heads": 3}, "heads", "hidden = 128 is not a multiple of heads = 3"),
    ({"hidden": 12, "heads": 4, "intermediate": 16}, "heads", "hidden / heads = 3 must be even"),
    ({"local_window": 127}, "local_window", "must be even"),
    ({"layers": 0}, "layers", "must be a positive integer"),
])
def test_model_shapes_modernbert_cannot_build_are_refused(change, field, message):
    d = tiny_dict()
    d["model"].update(change)
    with pytest.raises(RecipeError, match=rf"\[model\]\.{field}: .*{message}"):
        recipe_from_dict(d, "my.toml")


def test_a_negative_peak_learning_rate_is_named_as_lr_peak():
    d = tiny_dict()
    d["stages"]["base"]["lr_peak"] = -1e-3
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.lr_peak: must be > 0, got -0\.001"):
        recipe_from_dict(d, "my.toml")


def test_the_repro_recipe_is_tiny_plus_the_ablations_and_seeds():
    tiny, r = load_recipe("tiny"), load_recipe("repro")
    assert r.name == "tiny" and r.include == "tiny"  # tiny's artifacts, so the demo's are reused
    assert all(r.stage(s) == tiny.stage(s) for s in PAPER_STAGES)  # the paper stages are unchanged
    assert {"pretrain_fixed", "midtrain_fixed", "decay_fixed", "decay_all_mask30"} <= set(r.stages)
    assert all(r.stage(s).languages == "all" and r.stage(s).tau == 0.5
               for s in ("pretrain_fixed", "midtrain_fixed", "decay_fixed"))
    assert [r.stage(s).tokens for s in ("pretrain_fixed", "midtrain_fixed", "decay_fixed")] == \
        [tiny.stage(s).tokens for s in ("pretrain", "midtrain", "decay_all")]  # the same budgets
    assert r.stage("decay_all_mask30").mask_rate == 0.30 and r.data_stage("decay_all_mask30") == "decay_all"
    assert r.merges["merged_linear"].method == "linear" and r.merge_base_of("merged_linear") == "midtrain"
    # replicas: same data, other seed; merges of the replicas of one seed
    s2 = r.stage("decay_fixed_seed2")
    assert s2.seed == 2 and r.stage_seed("decay_fixed_seed2") == 2 and r.stage_seed("decay_fixed") == r.seed
    assert r.data_stage("decay_fixed_seed2") == "decay_fixed" and s2.init_from == "midtrain_fixed"
    assert r.merges["merged_model_seed3"].weights == {"decay_eng_seed3": 1.0, "decay_cont_seed3": 1.0,
                                                      "decay_all_seed3": 1.0}
    groups = r.seed_groups()
    assert groups["decay_all"] == ["decay_all", "decay_all_seed2", "decay_all_seed3"]
    assert groups["merged_linear"] == ["merged_linear", "merged_linear_seed2", "merged_linear_seed3"]
    assert groups["pretrain_checkpoint"] == ["pretrain_checkpoint"] and "decay_all_seed2" not in groups


def test_include_merges_tables_and_appends_stages(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('include = "tiny"\nname = "mine"\n[tokenizer]\nvocab_size = 4096\n'
                    '[stages.decay_all]\ntokens = 90_000\n[stages.decay_x]\nextends = "decay_all"\n')
    r, tiny = load_recipe(path), load_recipe("tiny")
    assert r.name == "mine" and r.tokenizer.vocab_size == 4096
    assert r.tokenizer.sample_bytes_per_lang == tiny.tokenizer.sample_bytes_per_lang  # the rest of the table kept
    assert r.stage("decay_all").tokens == 90_000 and r.stage("decay_all").mask_rate == 0.05
    assert list(r.stages) == [*PAPER_STAGES, "decay_x"] and r.stage("decay_x").tokens == 90_000
    path.write_text(f'include = "{path}"\n')
    with pytest.raises(RecipeError, match="include: cycle"):
        load_recipe(path)


@pytest.mark.parametrize("table, field, message", [
    ({"seeds": [2], "stages": ["nowhere"]}, "stages", r"unknown stage\(s\) \['nowhere'\]"),
    ({"seeds": [2], "merges": ["nowhere"]}, "merges", r"unknown merge\(s\) \['nowhere'\]"),
    ({"seeds": [2, 2], "stages": ["decay_all"]}, "seeds", "must be distinct positive integers"),
    ({"stages": ["decay_all"]}, "seeds", "name at least one seed"),
])
def test_replica_errors_name_the_field(table, field, message):
    d = tiny_dict()
    d["replicas"] = table
    with pytest.raises(RecipeError, match=rf"\[replicas\]\.{field}.*{message}"):
        recipe_from_dict(d, "my.toml")


def test_a_merge_method_other_than_ties_or_linear_is_refused():
    d = tiny_dict()
    d["merges"] = {"merged_avg": {"method": "average", "weights": {"decay_eng": 1.0, "decay_all": 1.0}}}
    with pytest.raises(RecipeError, match=r"\[merges\.merged_avg\]\.method: must be one of \('ties', 'linear'\)"):
        recipe_from_dict(d, "my.toml")
    d["merges"] = {"merged_model": {"weights": {"decay_eng": 1.0, "decay_all": 1.0}}}
    with pytest.raises(RecipeError, match="merged_model is the \\[merge\\] section's"):
        recipe_from_dict(d, "my.toml")
