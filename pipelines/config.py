"""The typed root of every job's configuration, registered with Hydra's ConfigStore.

`conf/config.yaml` composes YAML groups on top of these dataclasses, so a misspelt key or a wrong type fails at
start-up with the key's full name (`cluster.adress`, `trainer.lr`), before any cluster work begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from actors.config import EngineConfig, ModelConfig, RetrieverConfig
from cluster.config import ClusterConfig
from pipelines.data.world import WorldConfig


@dataclass
class DataConfig:
    """Which examples a job reads. `synthetic` builds the seeded world; other sources arrive with the loaders."""

    source: str = "synthetic"
    path: str | None = None
    """A dataset folder or file for non-synthetic sources (BEIR folder, QA JSONL, tool set)."""
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class RecipeConfig:
    """What the main job does with the data and the model (the method being run)."""

    name: str = MISSING
    iterations: int = 3
    """EM (or preference) iterations after the warm start."""


@dataclass
class TrainerConfig:
    """Ray Train settings shared by every objective."""

    num_workers: int = 1
    cpus_per_worker: float = 0.5
    """Fractional CPUs: a Ray Data stream feeding whole-CPU workers on a 2-core node deadlocks."""
    use_gpu: bool = False
    lr: float = 2e-3
    batch_size: int = 16
    epochs: int = 1
    max_steps: int = -1
    grad_accum: int = 1
    seed: int = 0


@dataclass
class ServeConfig:
    """Ray Serve application settings."""

    run: bool = False
    """Deploy the trained agent at the end of the main job."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: str | None = None


@dataclass
class ToolSeekConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    output_dir: str | None = None
    """Where a job writes; empty = Hydra's run directory (outputs/<date>/<time>)."""
    seed: int = 0


SCHEMA_NAME = "toolseek_schema"


def register_configs() -> None:
    """Make the schema known to Hydra; `conf/config.yaml` lists it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ToolSeekConfig)


register_configs()
