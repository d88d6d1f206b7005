from pathlib import Path

import pytest
import yaml

from compress.errors import RecipeError
from compress.recipe import Recipe, load_recipe, parse_recipe, recipe_from_yaml, recipe_to_yaml
from compress.registry import all_passes

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))

BASE = {"version": 1, "model": {"source": "timm", "name": "test_vit", "weights": "w.safetensors"},
        "calibration": {"path": "c.npz"}, "passes": [{"type": "quantize"}]}


def _errors(data) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data)
    return exc.value.errors


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_bundled_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.version == 1
    assert recipe.name


def test_bundled_recipes_exist():
    assert len(RECIPES) >= 3


def test_recipe_round_trips_through_yaml():
    recipe = parse_recipe(dict(BASE))
    again = recipe_from_yaml(recipe_to_yaml(recipe))
    assert again.model_dump() == recipe.model_dump()


def test_unknown_field_is_named_with_its_path():
    data = {**BASE, "passes": [{"type": "quantize", "weigths": {"bits": 8}}]}
    errors = _errors(data)
    assert errors == [("passes.0.weigths",
                       "unknown field (not allowed here); check its spelling and indentation")]


def test_bad_bits_names_field_and_value():
    data = {**BASE, "passes": [{"type": "quantize", "weights": {"bits": 9}}]}
    (path, msg), = _errors(data)
    assert path == "passes.0.weights.bits"
    assert "got 9" in msg


def test_unknown_pass_type_suggests_the_close_one():
    (path, msg), = _errors({**BASE, "passes": [{"type": "quantise"}]})
    assert path == "passes.0.type"
    assert "Did you mean 'quantize'?" in msg


def test_pass_without_type():
    (path, msg), = _errors({**BASE, "passes": [{"weights": {"bits": 8}}]})
    assert path == "passes.0"
    assert "type" in msg


def test_wrong_version():
    (path, msg), = _errors({**BASE, "version": 2})
    assert path == "version"
    assert "reads recipe version 1" in msg


def test_missing_model_section():
    data = dict(BASE)
    del data["model"]
    assert ("model", "Field required") in _errors(data)


def test_timm_model_needs_name():
    (path, msg), = _errors({**BASE, "model": {"source": "timm", "weights": "w.pt"}})
    assert path == "model"
    assert "needs 'name'" in msg


def test_calibration_required_by_quantize():
    data = {k: v for k, v in BASE.items() if k != "calibration"}
    (path, msg), = _errors(data)
    assert "needs calibration data" in msg


def test_onnx_model_rejects_torch_pass():
    data = {**BASE, "model": {"source": "onnx", "path": "m.onnx"}}
    (path, msg), = _errors(data)
    assert "needs a torch model" in msg


def test_torch_pass_after_onnx_pass():
    data = {**BASE, "passes": [{"type": "ort_quantize"}, {"type": "quantize"}]}
    (_, msg), = _errors(data)
    assert "put torch passes first" in msg


@pytest.mark.parametrize("pass_type", ["quantize", "smooth_quant", "weight_only", "binarize"])
def test_invalid_regex_target(pass_type):
    (path, msg), = _errors({**BASE, "passes": [{"type": pass_type, "ignore": ["re:blocks.(("]}]})
    assert path == "passes.0.ignore"
    assert "not a valid regex" in msg


def test_yaml_syntax_error_gives_line():
    with pytest.raises(RecipeError, match="not valid YAML at line 3"):
        recipe_from_yaml("version: 1\nmodel: {source: timm\n  name: x: y\n")


def test_recipe_must_be_mapping():
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        recipe_from_yaml("- just\n- a list\n")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_set_override_edits_nested_list_entry():
    r = parse_recipe(dict(BASE), overrides=["passes.0.activations.observer=percentile"])
    assert r.passes[0].activations.observer == "percentile"


def test_value_fills_an_empty_section():
    """A recipe written by recipe_to_yaml has `calibration: null`; --calib must still apply."""
    data = yaml.safe_load(recipe_to_yaml(parse_recipe({**BASE, "passes": [],
                                                       "calibration": None})))
    assert data["calibration"] is None
    r = parse_recipe(data, values={"calibration.path": "c.npz"})
    assert r.calibration.path == "c.npz"


def test_set_override_out_of_range_index():
    with pytest.raises(RecipeError, match="not an index"):
        parse_recipe(dict(BASE), overrides=["passes.3.weights.bits=8"])


def test_relative_paths_resolve_against_recipe_folder(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(BASE))
    from compress.recipe import recipe_base_dir

    assert recipe_base_dir(load_recipe(tmp_path / "r.yaml")) == tmp_path.resolve()


def test_union_covers_every_registered_pass():
    schema = Recipe.model_json_schema()
    tags = set(schema["properties"]["passes"]["items"]["discriminator"]["mapping"])
    assert tags == set(all_passes())


def test_every_pass_docstring_recipe_snippet_validates():
    for name, entry in all_passes().items():
        doc = entry.config_cls.__doc__ or ""
        assert "Recipe:" in doc, f"{name} docstring lacks a Recipe: example"
        snippet = doc.split("Recipe:", 1)[1]
        lines = [ln for ln in snippet.splitlines() if ln.strip()]
        indent = len(lines[0]) - len(lines[0].lstrip())
        passes = yaml.safe_load("\n".join(ln[indent:] for ln in lines))
        parse_recipe({**BASE, "passes": passes})


@pytest.mark.parametrize("extra", [{"type": "weight_only"},
                                   {"type": "mixed_precision",
                                    "budget": {"avg_weight_bits": 4.5}}])
def test_block_size_must_be_a_power_of_two(extra):
    (path, msg), = _errors({**BASE, "passes": [{**extra, "block_size": 24}]})
    assert path == "passes.0.block_size"
    assert "power of two" in msg


def _override_errors(*overrides) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as exc:
        parse_recipe(yaml.safe_load(yaml.safe_dump(BASE)), overrides=list(overrides))
    return exc.value.errors


def test_checkpoint_path_kwarg_is_refused_in_yaml_and_in_set():
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["model"]["kwargs"] = {"checkpoint_path": "/srv/compress/data/jobs/other/model.pt"}
    for errors in (_errors(data), _override_errors("model.kwargs.checkpoint_path=/etc/passwd")):
        [(path, msg)] = errors
        assert path == "model.kwargs.checkpoint_path"
        assert msg.startswith("not allowed in model.kwargs")
        assert "Allowed: num_classes, img_size" in msg


@pytest.mark.parametrize("override,path", [
    ("export.verify_batch_sizes=[1.0e+9]", "export.verify_batch_sizes.0"),
    ("evaluation.latency.batch_sizes=[1.0e+9]", "evaluation.latency.batch_sizes.0"),
    ("model.preprocess.input_size=[1, 100000, 100000]", "model.preprocess.input_size.1"),
    ("model.kwargs.img_size=1000000", "model.kwargs.img_size"),
    ("model.kwargs.img_size=[224, 100000]", "model.kwargs.img_size.1"),
    ("evaluation.latency.batch_sizes=[-1]", "evaluation.latency.batch_sizes.0"),
    ("calibration.batch_size=100000", "calibration.batch_size"),
    ("calibration.num_samples=10000000", "calibration.num_samples"),
    ("evaluation.seed=-1", "evaluation.seed"),
    ("evaluation.max_length=100000", "evaluation.max_length"),
    ("passes.0.sqnr_samples=1000000000", "passes.0.sqnr_samples"),
])
def test_every_size_is_bounded_with_its_field_named(override, path):
    errors = _override_errors(override)
    assert path == errors[0][0], errors
    assert all("less than or equal" in m or "greater than or equal" in m for _, m in errors)


@pytest.mark.parametrize("entry,path", [
    ({"type": "tome", "r": 1_000_000}, "passes.0.r"),
    ({"type": "tome", "r": [4, -1]}, "passes.0.r.1"),
    ({"type": "evit", "locations": [1_000_000]}, "passes.0.locations.0"),
    ({"type": "evit", "plot_images": 1_000_000}, "passes.0.plot_images"),
    ({"type": "expedit", "clusters": [100_000, 8]}, "passes.0.clusters.0"),
    ({"type": "expedit", "clusters": [8, 8], "top_k": 1_000_000}, "passes.0.top_k"),
    ({"type": "ia_red", "batch_size": 100_000}, "passes.0.batch_size"),
    ({"type": "weight_only", "calibration_samples": 10**9}, "passes.0.calibration_samples"),
])
def test_pass_sizes_are_bounded(entry, path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["passes"] = [entry]
    assert path in [p for p, _ in _errors(data)]


def test_timm_hub_name_is_refused():
    [(path, msg)] = _override_errors("model.name=hf-hub:timm/vit_base_patch16_224")
    assert path == "model.name" and "hub or folder prefixes" in msg
