"""The catalog: bundled recipes, recipe validation, passes and the recipe schema."""

from __future__ import annotations

from fastapi import APIRouter

from ...recipes import bundled_recipes, check_recipe
from ...schemas import RecipeCheck, RecipeCheckResult, RecipeInfo
from ..deps import SettingsDep, Tenant
from ..errors import ApiError, responses

router = APIRouter(tags=["catalog"])


@router.get("/v1/recipes", response_model=list[RecipeInfo], responses=responses(401))
def list_recipes(_tenant: Tenant, settings: SettingsDep):
    """The bundled recipes, with their YAML."""
    return bundled_recipes(settings.recipes_dir)


@router.get("/v1/recipes/{name}", response_model=RecipeInfo,
            responses=responses(401, 404, 422))
def get_recipe(name: str, _tenant: Tenant, settings: SettingsDep):
    """One bundled recipe."""
    for r in bundled_recipes(settings.recipes_dir):
        if r["name"] == name.removesuffix(".yaml"):
            return r
    raise ApiError(404, f"no bundled recipe {name[:100]!r}", "NotFound")


@router.post("/v1/recipes/validate", response_model=RecipeCheckResult,
             responses=responses(400, 401, 422))
def validate_recipe(body: RecipeCheck, _tenant: Tenant):
    """Check a recipe as job submission would; 422 lists each problem with its field."""
    recipe = check_recipe(body.yaml, uploads=set(body.uploads), overrides=body.set)
    return {"valid": True, "name": recipe.name, "model_source": recipe.model.source,
            "passes": [p.type for p in recipe.passes]}


@router.get("/v1/passes", responses=responses(401))
def list_passes(_tenant: Tenant) -> list[dict]:
    """Every registered pass with its stage, documentation and config JSON Schema."""
    from compress.registry import pass_catalog

    return pass_catalog()


@router.get("/v1/recipe-schema", responses=responses(401))
def recipe_schema(_tenant: Tenant) -> dict:
    """The JSON Schema of recipes."""
    from compress.recipe import Recipe

    return Recipe.model_json_schema()
