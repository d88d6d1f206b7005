"""Expedit token clustering and reconstruction for timm ViTs: ``expedit``.

The algorithm is ``tokens.cluster`` (plain tensors), the model wiring ``patch.vit_tokens``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..context import PassContext
from ..errors import RecipeError
from ..models.handle import ModelHandle
from ..models.kind import model_kind, require
from ..patch.vit_tokens import patch_expedit, vit_dims
from ..registry import PassConfig, register_pass
from ..tokens.auto import AutoSchedule, auto_needs_data, check_auto, fidelity_check
from ..tokens.cluster import cluster_grid
from ..tokens.schedule import block_macs, search_strength


class ExpeditConfig(PassConfig):
    """Expedit / Hourglass token clustering and reconstruction (https://arxiv.org/abs/2210.01035).

    After block ``location`` the HxW patch tokens are clustered into hxw tokens (soft k-means:
    centroids start as the adaptive average pool of the grid, ``iters`` steps of
    softmax(-tau * squared distance) restricted to a ``window`` of cluster cells); the later
    blocks see 1 + h*w tokens (class/register tokens are carried unchanged). Before the final
    norm every original token is rebuilt from its ``top_k`` nearest clusters (weights
    exp(-tau * squared distance), rows L2-normalised), so a token-map model (timm ViT with
    ``num_classes: 0, global_pool: ''``) keeps its full output resolution. Classifiers work too.
    Training-free and parameter-free; ``auto`` picks location and cluster grid on calibration
    data. Counts follow from the input's patch grid, so each export holds for any batch size.

    Recipe:
        - type: expedit
          location: 4
          clusters: [8, 8]
          iters: 5
          tau: 0.01
    """

    type: Literal["expedit"] = "expedit"
    location: int | None = Field(None, ge=0, le=255, description=(
        "0-based block after which tokens are clustered; default: depth // 3 (auto: searched "
        "when left out)"))
    clusters: tuple[Annotated[int, Field(ge=1, le=1024)],
                    Annotated[int, Field(ge=1, le=1024)]] | None = Field(
        None, description="cluster grid [h, w]")
    ratio: float | None = Field(None, gt=0, le=1, description=(
        "instead of clusters: share of patch tokens kept (each side scaled by sqrt(ratio))"))
    iters: int = Field(5, ge=0, le=50, description="soft k-means iterations")
    tau: float = Field(0.01, gt=0, description=(
        "temperature on squared feature distances, for clustering and reconstruction"))
    window: int = Field(5, ge=1, le=1024, description=(
        "locality window in cluster cells (a token reaches clusters within window // 2)"))
    top_k: int = Field(20, ge=1, le=1024, description="clusters each token is rebuilt from")
    auto: AutoSchedule | None = Field(None, description=(
        "search location and cluster grid instead (overrides clusters/ratio)"))

    @model_validator(mode="after")
    def _size(self):
        if self.clusters is not None and self.ratio is not None:
            raise ValueError("give clusters or ratio, not both")
        if self.clusters is None and self.ratio is None and self.auto is None:
            raise ValueError("give clusters (e.g. [8, 8]), ratio (e.g. 0.3) or auto")
        if self.clusters is not None and min(self.clusters) < 1:
            raise ValueError("clusters must be positive")
        return self


def expedit_counts(n_prefix: int, grid: tuple[int, int], clusters: tuple[int, int],
                   location: int, depth: int) -> list[int]:
    """Tokens each block runs on (one entry per block)."""
    n = n_prefix + grid[0] * grid[1]
    m = n_prefix + clusters[0] * clusters[1]
    return [n if i <= location else m for i in range(depth)]


def expedit_speedup(n_prefix: int, grid: tuple[int, int], clusters: tuple[int, int],
                    location: int, depth: int, dim: int, mlp_ratio: float, iters: int) -> float:
    """Estimated speed-up of the transformer (blocks + clustering + reconstruction) in MACs."""
    counts = expedit_counts(n_prefix, grid, clusters, location, depth)
    n, m = grid[0] * grid[1], clusters[0] * clusters[1]
    # Pooling matrix, per iteration distances (2) and update (1), reconstruction distances and
    # mixing (2): dense N x M x C products, as implemented (the window only masks).
    overhead = (1 + 3 * iters + 2) * n * m * dim
    base = depth * block_macs(counts[0], counts[0], dim, mlp_ratio)
    ours = sum(block_macs(c, c, dim, mlp_ratio) for c in counts) + overhead
    return base / ours


def _fail(ctx: PassContext, field: str, why: str, message: str) -> RecipeError:
    return RecipeError(message, [(f"passes.{ctx.index}.{field}", why)])


@register_pass(ExpeditConfig, needs_calibration=auto_needs_data)
def expedit(model: ModelHandle, config: ExpeditConfig, ctx: PassContext) -> None:
    module = model.module
    require(model_kind(model), "expedit", ("plain_vit",), needs_runner=True,
            runners=("timm_vit",), where=f"passes.{ctx.index}")
    check_auto(config.auto, model, ctx)
    depth = len(module.blocks)
    grid = tuple(int(v) for v in module.patch_embed.grid_size)
    p = module.num_prefix_tokens
    dim, mlp_ratio = vit_dims(module)
    if config.location is not None and config.location > depth - 2:
        raise _fail(ctx, "location", f"{config.location} not in 0..{depth - 2} (a {depth}-block "
                    "model; clustering after the last block saves nothing)",
                    "location out of range")
    if config.clusters is not None:
        h, w = config.clusters
        if h > grid[0] or w > grid[1]:
            raise _fail(ctx, "clusters", f"{[h, w]} exceeds the {grid[0]}x{grid[1]} patch grid",
                        "more clusters than patch tokens")

    def speed(c) -> float:
        loc, hw = c
        if loc >= depth:        # the search's anchor: no clustering at all
            return 1.0
        return expedit_speedup(p, grid, hw, loc, depth, dim, mlp_ratio, config.iters)

    def apply(c) -> None:
        loc, hw = c
        patch_expedit(module, loc, clusters=hw, iters=config.iters, tau=config.tau,
                      window=config.window, k=config.top_k)

    trials = None
    if config.auto is not None:
        choice, trials = _search(config, model, ctx, grid, depth, speed, apply)
    else:
        loc = config.location if config.location is not None else depth // 3
        choice = (loc, cluster_grid(grid, config.clusters, config.ratio))
    apply(choice)
    loc, hw = choice
    model.info["token_reduction"] = {"method": "expedit", "location": loc, "clusters": list(hw)}
    counts = expedit_counts(p, grid, hw, loc, depth)
    ctx.report.summary.update(
        method="expedit", location=loc, grid=list(grid), clusters=list(hw),
        tokens_per_block=counts, token_ratio=round(sum(counts) / (depth * counts[0]), 4),
        estimated_speedup=round(speed(choice), 3), iters=config.iters, tau=config.tau,
        window=config.window, top_k=config.top_k, protected_tokens=p,
        **({"auto_trials": trials} if trials else {}))


def _search(config: ExpeditConfig, model: ModelHandle, ctx: PassContext, grid, depth, speed,
            apply):
    """Candidates (location, cluster grid) ordered by estimated speed-up, weakest first; the
    strongest that keeps the fidelity bound (binary search, as for ToMe's r)."""
    locs = [config.location] if config.location is not None else list(range(1, depth - 1))
    sides = range(grid[0], 0, -1)
    cands = {(loc, (s, max(1, round(s * grid[1] / grid[0])))) for loc in locs for s in sides}
    # Anchor first: location ``depth`` never clusters (the original forward), so the weakest
    # candidate passes by definition, as search_strength assumes.
    anchor = (depth, grid)
    # Candidates whose clustering costs more than it saves are left out.
    ordered = [anchor] + sorted((c for c in cands if speed(c) > 1.0),
                                key=lambda c: (speed(c), -c[0]))
    apply(anchor)
    ok = fidelity_check(model, ctx, config.auto, "auto")
    check = None if ok is None else (lambda c: ok(lambda: apply(c)))
    choice, trials = search_strength(ordered, speed, check, config.auto.speedup)
    for t in trials:
        loc, hw = t.pop("strength")
        t.update(location=loc, clusters=list(hw))
    if choice == anchor:
        ctx.report.warn("no location/cluster grid met the auto bound; tokens are not clustered")
    ctx.progress(0.9, f"chose location {choice[0]}, clusters {choice[1]}")
    return choice, trials
