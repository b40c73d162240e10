"""Where each role runs: one typed `Placement` per role, read from its config, turned into what Ray asks for.

On a laptop every role shares one node and only CPU fractions matter. On a cluster, engines and trainers belong on GPU
nodes and retrievers and sandboxes on CPU nodes; Ray decides that from the resources an actor asks for. So the
config of each role carries the same few knobs (CPU and GPU shares, custom resources such as `{gpu_node: 0.01}` that
only the right node type advertises, an accelerator type, a placement-group strategy), and this module is the one
place that turns them into `.options(...)` of an actor or the `ScalingConfig` of a Ray Train run. A value Ray would
reject fails here, with the config key in the message, before anything is scheduled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GPU_NODE = "gpu_node"
CPU_NODE = "cpu_node"
"""The custom resources our cluster files give each worker type (one unit per node): a role asking for a share of
one of them, e.g. `+engine.resources.gpu_node=0.01`, is scheduled on that node type only."""

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray placement-group strategies: PACK and SPREAD are best effort, the STRICT_ forms fail rather than bend."""

RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Resources with their own config keys (num_cpus, num_gpus); a custom resource of that name would be ignored."""


class PlacementError(RuntimeError):
    """A placement group could not be reserved in time: the message names the role, its bundles and what is free."""


def _check_amount(where: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}={value} must be a finite number >= 0")
    if value > 1 and not value.is_integer():
        raise ValueError(f"{where}={value}: Ray takes fractions only below 1; above 1, a whole number")
    return value


@dataclass(frozen=True)
class Placement:
    """What one actor, or one Ray Train worker, of a role asks Ray for.

    `where` is the config group the values came from (`engine`, `retriever`, `trainer`), so errors name the key a
    user must change.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    """Custom resources, e.g. `{"gpu_node": 0.01}`: a small share lets up to 100 such actors onto a node started with
    `--resources='{"gpu_node": 1}'`, and none onto a node without it."""
    accelerator_type: str | None = None
    """Only nodes with this accelerator (Ray's `accelerator_type`, e.g. `A100`); None = any."""
    strategy: str | None = None
    """Placement-group strategy for a group of actors (all reserved at once, or none); None = scheduled one by one."""
    where: str = "placement"

    def __post_init__(self) -> None:
        _check_amount(f"{self.where}.num_cpus", self.num_cpus)
        _check_amount(f"{self.where}.num_gpus", self.num_gpus)
        for name, amount in self.resources.items():
            if name in RESERVED_RESOURCES:
                raise ValueError(
                    f"{self.where}.resources[{name!r}]: {name} has its own key ({self.where}.num_cpus / num_gpus)"
                )
            _check_amount(f"{self.where}.resources[{name!r}]", amount)
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"{self.where}.placement_strategy={self.strategy!r} is not one of {STRATEGIES}")

    # ---- from config ------------------------------------------------------------------------------------------
    @classmethod
    def of_actor(cls, cfg: Any, where: str) -> Placement:
        """An actor role's placement from its config (EngineConfig, RetrieverConfig, SandboxConfig or Hydra's node):
        `num_cpus`, `num_gpus`, `resources`, `accelerator_type`, `placement_strategy`; absent keys keep defaults."""
        return cls(
            num_cpus=float(getattr(cfg, "num_cpus", 1.0)),
            num_gpus=float(getattr(cfg, "num_gpus", 0.0) or 0.0),
            resources=dict(getattr(cfg, "resources", None) or {}),
            accelerator_type=getattr(cfg, "accelerator_type", None) or None,
            strategy=getattr(cfg, "placement_strategy", None) or None,
            where=where,
        )

    @classmethod
    def of_trainer(cls, cfg: Any, where: str = "trainer") -> Placement:
        """A Ray Train worker's placement from TrainerConfig: `cpus_per_worker`, `use_gpu` (one GPU per worker),
        `resources_per_worker`, `accelerator_type`, `placement_strategy`."""
        return cls(
            num_cpus=float(cfg.cpus_per_worker),
            num_gpus=1.0 if cfg.use_gpu else 0.0,
            resources=dict(getattr(cfg, "resources_per_worker", None) or {}),
            accelerator_type=getattr(cfg, "accelerator_type", None) or None,
            strategy=getattr(cfg, "placement_strategy", None) or "PACK",
            where=where,
        )

    # ---- to Ray -----------------------------------------------------------------------------------------------
    def bundle(self) -> dict[str, float]:
        """One actor's (or worker's) resources as a placement-group bundle."""
        bundle = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        if self.accelerator_type:
            bundle[f"accelerator_type:{self.accelerator_type}"] = 0.001  # what Ray itself asks for this option
        return {name: amount for name, amount in bundle.items() if amount}

    def actor_options(self) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(...)` (merge with restarts, retries, concurrency)."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        return options

    def scaling_config(self, num_workers: int) -> dict[str, Any]:
        """Keyword arguments for `ray.train.ScalingConfig` (GPU workers get `num_gpus` each through use_gpu)."""
        per_worker = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            per_worker["GPU"] = self.num_gpus
        config: dict[str, Any] = {
            "num_workers": num_workers,
            "use_gpu": self.num_gpus > 0,
            "resources_per_worker": per_worker,
            "placement_strategy": self.strategy or "PACK",
        }
        if self.accelerator_type:
            config["accelerator_type"] = self.accelerator_type
        return config

    def reserve(self, count: int, timeout_s: float = 120.0, name: str = "") -> PlacedGroup:
        """Options for `count` actors of this role: with a strategy, one placement group holding a bundle per actor
        (all placed at once, or a PlacementError after `timeout_s`); without one, the plain actor options."""
        if count < 1:
            raise ValueError(f"{self.where}: cannot place {count} actors")
        base = self.actor_options()
        if self.strategy is None:
            return PlacedGroup([dict(base) for _ in range(count)], None)
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [self.bundle() for _ in range(count)]
        group = placement_group(bundles, strategy=self.strategy, name=name)
        try:
            ray.get(group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise PlacementError(
                f"{self.where}: {count} bundle(s) of {bundles[0]} with placement_strategy={self.strategy} could not be "
                f"placed within {timeout_s:g}s; free now: {ray.available_resources()}. Lower {self.where}.num_actors "
                f"or the per-actor resources, use a looser strategy, or add nodes that advertise these resources."
            ) from None
        options = [
            {**base, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
            for i in range(count)
        ]
        return PlacedGroup(options, group)


@dataclass
class PlacedGroup:
    """Per-actor `.options(...)` for a group, and the placement group reserved for it (None without a strategy)."""

    options: list[dict[str, Any]]
    placement_group: Any = None

    def release(self) -> None:
        """Give the reserved resources back (after the group's actors are killed)."""
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None
