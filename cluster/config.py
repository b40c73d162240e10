"""Typed configuration of how a job reaches Ray (the `cluster` Hydra group)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_env_vars() -> dict[str, str]:
    # On small CPU nodes every extra BLAS / tokenizer thread competes with Ray's own workers: one thread each is faster.
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # Ray Serve's throughput-optimized mode (gRPC between replicas, request handling and routing on the replica's own
    # event loop, buffered access logs): the chat endpoint's throughput at 16 concurrent requests rose from ~55 to
    # ~80 requests/s on 2 cores (BENCHMARKS.md). Serve reads it when its processes start, so it travels with the
    # cluster's env. RAY_SERVE_ENABLE_HA_PROXY=1 (opt-in, README "Serving") adds HAProxy in front of the ingress.
    serve = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    return {**threads, **serve}


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
