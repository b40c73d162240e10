"""Hydra configuration: the default composes, and mistakes fail at start with the key named."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pipelines.config  # noqa: F401  (registers the schema)
from tests.conftest import REPO

CONF = str(REPO / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_composes_with_typed_groups():
    cfg = _compose()
    assert cfg.recipe.name == "exsearch"
    assert cfg.engine.backend == "hf"
    assert cfg.model.family == "llama" and cfg.model.path is None
    assert cfg.data.world.seed == cfg.seed  # interpolated
    assert OmegaConf.get_type(cfg.cluster).__name__ == "ClusterConfig"


@pytest.mark.parametrize("group,choice,key,value", [
    ("engine", "vllm", "backend", "vllm"),
    ("model", "tiny_qwen2", "family", "qwen2"),
    ("retriever", "bm25", "kind", "bm25"),
])
def test_group_choices_switch_components(group, choice, key, value):
    cfg = _compose(f"{group}={choice}")
    assert cfg[group][key] == value


def test_misspelt_key_is_named():
    with pytest.raises(Exception) as caught:
        _compose("cluster.adress=10.0.0.1:6379")
    assert "adress" in str(caught.value) or "adress" in str(caught.value.__cause__)


def test_wrong_type_is_named():
    with pytest.raises(Exception) as caught:
        _compose("trainer.lr=fast")
    text = f"{caught.value} {caught.value.__cause__}"
    assert "trainer.lr" in text or "lr" in text and "fast" in text


def test_cli_rejects_a_typo_before_doing_any_work():
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "trainer.learning_rate=1e-3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "learning_rate" in done.stderr + done.stdout
    assert "Ray" not in done.stdout  # failed before connecting
    assert time.perf_counter() - started < 60


def test_each_recipe_has_its_own_schema_and_runner():
    """Every registered recipe composes with its own typed keys, and its entry point imports."""
    from pipelines.config import RECIPE_SCHEMAS
    from pipelines.run import RECIPES, recipe_runner

    assert set(RECIPES) == set(RECIPE_SCHEMAS)
    for name, schema in RECIPE_SCHEMAS.items():
        cfg = _compose(f"recipe={name}")
        assert OmegaConf.get_type(cfg.recipe) is schema and cfg.recipe.name == name
        assert callable(recipe_runner(name))
    with pytest.raises(Exception) as caught:
        _compose("recipe.warm_start_stepz=3")
    assert "warm_start_stepz" in f"{caught.value} {caught.value.__cause__}"
    with pytest.raises(ValueError, match="recipe.name='nope'"):
        recipe_runner("nope")


def _defaults(schema) -> dict:
    import dataclasses

    values = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


def test_trainer_schema_and_worker_settings_share_their_defaults():
    """`trainer:` (the Hydra schema) and `TrainSettings` (what `run_training` sends each worker, also built directly by
    recipes and tests) declare the same knobs twice; a default changed in one only would train differently by path."""
    from pipelines.config import TrainerConfig
    from pipelines.train import TrainSettings

    schema, settings = _defaults(TrainerConfig), _defaults(TrainSettings)
    shared = schema.keys() & settings.keys()
    assert {"lr", "lr_schedule", "batch_size", "normalize", "objective", "seed"} <= shared
    assert {name: (schema[name], settings[name]) for name in shared if schema[name] != settings[name]} == {}
