"""The main job: `python -m pipelines.run recipe=<name> key=value ...`.

`prepare` builds what every recipe shares — the world's datasets, the policy model and its tokenizer, token
statistics measured with Ray Data — then the recipe runs (pipelines/recipes/): `exsearch` (the default) is the warm
start plus generalized EM with its ablations, ending in results.md / results.csv and learning-curve PNGs.
"""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from actors.models import ensure_policy
from pipelines import config as _config  # noqa: F401  (registers the schema with Hydra)
from pipelines.data.export import export_world, world_folders
from pipelines.data.stats import token_stats
from pipelines.data.world import WorldConfig, build_world
from pipelines.jobs import start_job
from pipelines.report import markdown_table, write_table

log = logging.getLogger(__name__)

RECIPES = {"exsearch": "pipelines.recipes.exsearch:run_exsearch", "toolret": "pipelines.recipes.toolret:run_toolret", "dro": "pipelines.recipes.dro:run_dro"}
"""Recipe name -> `module:function(cfg, out, prepared)`; each recipe's schema is in pipelines/config.py RECIPE_SCHEMAS."""


def recipe_runner(name: str):
    """The recipe's entry point, imported only when chosen (a recipe may pull in heavy modules)."""
    import importlib

    if name not in RECIPES:
        raise ValueError(f"recipe.name={name!r} is not one of {tuple(RECIPES)}")
    module, function = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), function)


def prepare(cfg: DictConfig, out) -> dict:
    """World -> record folders -> policy folder -> token statistics. Each step is skipped when already done."""
    if cfg.data.source != "synthetic":
        raise ValueError(f"data.source={cfg.data.source!r}: the main job runs on the synthetic world for now")
    started = time.perf_counter()
    world_cfg = OmegaConf.to_object(cfg.data.world)
    assert isinstance(world_cfg, WorldConfig)
    world = build_world(world_cfg)
    data_root = out / "data"
    counts = export_world(world, data_root, OmegaConf.to_container(cfg.data.world, resolve=True))
    print(f"[prepare] world written to {data_root} in {time.perf_counter() - started:.1f}s", flush=True)

    policy = ensure_policy(cfg.model, world.texts, out / "policy")
    print(f"[prepare] policy model at {policy}", flush=True)

    kinds = {"documents": "document", "tools": None}
    texts = {}
    for name, folder in world_folders(data_root).items():
        kind = kinds.get(name, "question" if name.startswith("questions") else "tool_task")
        if kind is not None:
            texts[name] = (folder, kind)
    stats = token_stats(texts, policy)
    rows = [{"dataset": name, "rows": counts[name], **{k: v for k, v in stats.get(name, {}).items() if k != "rows"}}
            for name in counts]
    write_table(rows, out, "datasets", title="Datasets prepared by the main job (token counts with the policy tokenizer)")
    return {"policy": policy, "datasets": rows, "world": world}


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_recipe = recipe_runner(cfg.recipe.name)
    out, _ = start_job(cfg)
    prepared = prepare(cfg, out)
    print(markdown_table(prepared["datasets"]), flush=True)
    run_recipe(cfg, out, prepared)
    print(f"Results in {out}", flush=True)


if __name__ == "__main__":
    main()
