import pytest

from mmbert_dagster.recipe import STAGES, RecipeError, load_recipe, recipe_from_dict


def tiny_dict():
    import tomllib
    from importlib import resources

    return tomllib.loads((resources.files("mmbert_dagster.recipes") / "tiny.toml").read_text())


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_every_preset_loads_with_all_stages(preset):
    recipe = load_recipe(preset)
    assert recipe.name == preset
    assert tuple(recipe.stages) == STAGES


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
    del d["stages"]["decay_all"]
    with pytest.raises(RecipeError, match=r"missing stage\(s\) \['decay_all'\]"):
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
