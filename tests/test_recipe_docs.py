from pathlib import Path

from compress.recipe_docs import generate

DOC = Path(__file__).parents[1] / "docs" / "recipes.md"


def test_recipe_reference_is_current():
    assert DOC.read_text() == generate(), (
        "docs/recipes.md is stale: run `compress recipe docs > docs/recipes.md`")


def test_reference_lists_every_pass_and_section():
    text = generate()
    for heading in ("## `model`", "## `calibration`", "## `evaluation.gate`", "### `quantize`",
                    "### `ort_quantize`"):
        assert heading in text
