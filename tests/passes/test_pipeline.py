"""Pipeline strings, YAML recipes, option coercion and the registry."""

import pytest

from modelfold.passes.drop_layers import DropLayers, DropLayersConfig
from modelfold.passes.layer_importance import LayerImportance
from modelfold.passes.pipeline import (
    PipelineSyntaxError,
    build_pipeline,
    load_recipe,
    parse_pipeline,
    pipeline_string,
)
from modelfold.passes.registry import UnknownPassError, registered_passes


def test_parse_pipeline_with_lists_and_spaces():
    assert parse_pipeline(" layer-importance{n_samples=8, seq_len=64}, drop-layers{layers=[3,5]}") \
        == [("layer-importance", {"n_samples": "8", "seq_len": "64"}),
            ("drop-layers", {"layers": "[3,5]"})]
    assert parse_pipeline("layer-importance") == [("layer-importance", {})]


@pytest.mark.parametrize("text, message", [
    ("", "empty pipeline"),
    ("drop-layers{count=2", "unclosed"),
    ("drop-layers{count}", "must be key=value"),
    ("drop-layers{count=1,count=2}", "given twice"),
    ("drop-layers}", "unexpected '}'"),
])
def test_pipeline_syntax_errors(text, message):
    with pytest.raises(PipelineSyntaxError, match=message):
        parse_pipeline(text)


def test_build_pipeline_coerces_types_and_round_trips():
    passes = build_pipeline("layer-importance{n_samples=8,metric=cosine},drop-layers{layers=[7,3]}")
    assert isinstance(passes[0], LayerImportance) and passes[0].config.n_samples == 8
    assert passes[0].config.metric == "cosine"
    assert passes[1].config.layers == (7, 3)
    text = pipeline_string(passes)
    assert pipeline_string(build_pipeline(text)) == text


@pytest.mark.parametrize("text, message", [
    ("drop-layer{count=2}", "unknown pass 'drop-layer'; did you mean 'drop-layers'"),
    ("drop-layers{cont=2}", "has no option 'cont'; options: layers, count, strategy, seed"),
    ("drop-layers{count=two}", "option 'count' must be an integer; got 'two'"),
    ("drop-layers{count=2,strategy=best}", "option 'strategy' must be one of importance, last, "
                                           "random; got 'best'"),
    ("drop-layers{count=0}", "needs 'layers=\\[i,...\\]' or 'count' >= 1"),
    ("drop-layers{count=2,layers=[1]}", "either 'layers' or 'count'"),
    ("drop-layers{layers=[1,1]}", "repeats an index"),
    ("layer-importance{n_samples=0}", "'n_samples' must be >= 1"),
])
def test_bad_options_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        build_pipeline(text)
    assert issubclass(UnknownPassError, ValueError)


def test_yaml_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - layer-importance: {n_samples: 4}\n"
                      "  - name: drop-layers\n    count: 2\n    strategy: last\n")
    passes = load_recipe(recipe)
    assert [p.name for p in passes] == ["layer-importance", "drop-layers"]
    assert passes[1].config == DropLayersConfig(count=2, strategy="last")
    assert [p.name for p in build_pipeline(str(recipe))] == ["layer-importance", "drop-layers"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: drop-layers\n")
    with pytest.raises(PipelineSyntaxError, match="must be a mapping with a 'passes' list"):
        load_recipe(bad)
    with pytest.raises(PipelineSyntaxError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_python_api_accepts_configs_and_mappings():
    p = DropLayers(DropLayersConfig(layers=(1,)))
    assert build_pipeline([p, {"drop-layers": {"count": 1}}, "layer-importance"])[0] is p
    with pytest.raises(TypeError, match="either a config or keyword options"):
        DropLayers(DropLayersConfig(count=1), count=2)


def test_registry_lists_builtin_passes_with_documented_options():
    passes = registered_passes()
    assert {"drop-layers", "layer-importance"} <= set(passes)
    for cls in passes.values():
        assert cls.kind in ("analysis", "exact", "lossy")
        assert cls.summary
        for opt in cls.config_class.describe_options():
            assert opt["help"], f"{cls.name}.{opt['name']} has no help text"


def test_shipped_recipe_loads():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "drop-4-layers.yaml"
    assert pipeline_string(load_recipe(recipe)) == pipeline_string(
        build_pipeline("layer-importance{n_samples=32,seq_len=256},drop-layers{count=4}"))
