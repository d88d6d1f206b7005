"""The service's recipe check: no server paths, and no way around it through model.kwargs."""

import pytest

from compress.errors import RecipeError
from service.recipes import check_recipe

RECIPE = """
version: 1
model:
  source: timm
  name: test_vit
  kwargs: {img_size: 32, patch_size: 8, num_classes: 10}
evaluation: {path: "reference:digits-vit/calib.npz"}
"""


def test_uploaded_model_recipe_passes():
    recipe = check_recipe(RECIPE, uploads={"model"})
    assert recipe.model.kwargs == {"img_size": 32, "patch_size": 8, "num_classes": 10}


@pytest.mark.parametrize("how", ["yaml", "set"])
def test_checkpoint_path_kwarg_cannot_name_a_server_file(how):
    # The model upload replaces model.weights, so before the allow-list this recipe passed the
    # "no server paths" check and timm opened the file named in kwargs.
    text, overrides = RECIPE, []
    if how == "yaml":
        text = text.replace("num_classes: 10}", "num_classes: 10, checkpoint_path: /etc/passwd}")
    else:
        overrides = ["model.kwargs.checkpoint_path=/etc/passwd"]
    with pytest.raises(RecipeError) as e:
        check_recipe(text, uploads={"model"}, overrides=overrides)
    [(path, msg)] = e.value.errors
    assert path == "model.kwargs.checkpoint_path"
    assert "not allowed in model.kwargs" in msg and "Allowed: num_classes" in msg
    assert e.value.to_dict()["errors"][0]["loc"] == "model.kwargs.checkpoint_path"


def test_hub_model_name_is_refused():
    with pytest.raises(RecipeError) as e:
        check_recipe(RECIPE.replace("name: test_vit", "name: 'hf-hub:timm/test_vit'"),
                     uploads={"model"})
    assert [p for p, _ in e.value.errors] == ["model.name"]


def test_unbounded_batch_is_refused_before_queueing():
    with pytest.raises(RecipeError) as e:
        check_recipe(RECIPE, uploads={"model"},
                     overrides=["evaluation.latency.batch_sizes=[1000000000]"])
    assert [p for p, _ in e.value.errors] == ["evaluation.latency.batch_sizes.0"]
