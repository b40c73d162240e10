"""Typed configuration of how a job reaches Ray (the `cluster` Hydra group)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_env_vars() -> dict[str, str]:
    # On small CPU nodes every extra BLAS / tokenizer thread competes with Ray's own workers: one thread each is faster.
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@dataclass
class ClusterConfig:
    """Where the job runs.

    `address` empty means: join the cluster named by RAY_ADDRESS if set, else start a local one. That makes
    `ray job submit -- python -m pipelines.run` (which sets RAY_ADDRESS) and a laptop run use the same config.
    """

    address: str | None = None
    """`host:port` of a running head's GCS, `ray://host:10001`, or `auto`; empty = RAY_ADDRESS or local."""
    namespace: str = "toolseek"
    num_cpus: int | None = None
    """CPUs of a local cluster (ignored when joining one); empty = all cores."""
    object_store_memory_mb: int | None = None
    include_dashboard: bool = True
    connect_timeout_s: float = 10.0
    """How long to wait for the head's port to answer before failing (never hang on a wrong address)."""
    ship_code: bool | None = None
    """Upload the repo as the runtime_env working_dir; empty = only when joining a remote cluster."""
    excludes: list[str] = field(
        default_factory=lambda: [".git", ".venv", "outputs", "multirun", "runs", "**/__pycache__", "*.parquet"]
    )
    env_vars: dict[str, str] = field(default_factory=_default_env_vars)
