"""The main job: `python -m pipelines.run recipe=<name> key=value ...`.

`prepare` builds what every recipe shares — the world's datasets, the policy model and its tokenizer, token
statistics measured with Ray Data — then the recipe runs (pipelines/recipes/): `exsearch` (the default) is the warm
start plus generalized EM with its ablations, ending in results.md / results.csv and learning-curve PNGs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from actors.models import ensure_policy
from pipelines import config as _config  # noqa: F401  (registers the schema with Hydra)
from pipelines.copy_pretrain import copy_pretrain
from pipelines.data.export import export_world, world_folders
from pipelines.data.stats import token_stats
from pipelines.data.world import SYLLABLES, WorldConfig, build_world
from pipelines.jobs import start_job
from pipelines.report import markdown_table, write_table

log = logging.getLogger(__name__)

RECIPES = {"exsearch": "pipelines.recipes.exsearch:run_exsearch", "toolret": "pipelines.recipes.toolret:run_toolret", "dro": "pipelines.recipes.dro:run_dro",
           "ttpa": "pipelines.recipes.ttpa:run_ttpa"}
"""Recipe name -> `module:function(cfg, out, prepared)`; each recipe's schema is in pipelines/config.py RECIPE_SCHEMAS."""


def best_checkpoint(out: Path) -> str:
    """The policy a finished run would serve: the kept iteration with the highest dev EM (later wins ties).

    Every iteration folder's `result.json` names its checkpoint and dev metrics (the recipe contract `serve.run` and
    `pipelines.status` read); a recipe that trains no servable policy writes none, and serving it is an error.
    """
    best = None
    for path in sorted(out.glob("iter-*/result.json")):
        result = json.loads(path.read_text())
        if "checkpoint" not in result or not result.get("kept", True):
            continue
        dev_em = float(result.get("dev", {}).get("em", float("-inf")))
        if best is None or dev_em >= best[0]:
            best = (dev_em, result["checkpoint"])
    if best is None:
        raise ValueError(f"serve.run=true: {out} has no iteration with a checkpoint (iter-*/result.json)")
    return best[1]


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

    policy = ensure_policy(cfg.model, world.texts, out / "policy", SYLLABLES)
    if not cfg.model.path and cfg.model.copy_pretrain_steps > 0:
        policy = copy_pretrain(policy, cfg, out / "policy-copy-pretrained", SYLLABLES)
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
    out, info = start_job(cfg)
    prepared = prepare(cfg, out)
    print(markdown_table(prepared["datasets"]), flush=True)
    run_recipe(cfg, out, prepared)
    if cfg.serve.run:
        from pipelines.serve import serve_until_stopped

        cfg.model.path = best_checkpoint(out)
        print(f"Serving the best policy of this run: {cfg.model.path}", flush=True)
        serve_until_stopped(cfg, out / "serve", info.local)
    print(f"Results in {out}", flush=True)


if __name__ == "__main__":
    main()
