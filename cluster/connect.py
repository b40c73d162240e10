"""One way for every job to reach Ray: a local cluster by default, any cluster by address.

Jobs call `connect(cfg.cluster)` and never `ray.init` themselves, so the runtime_env (code, thread limits) is the
same on a laptop, under `ray job submit`, and on KubeRay.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray

from cluster.config import ClusterConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

JOB_CONFIG_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by `ray job submit` for the job's driver: the job's runtime_env, which ray.init may extend but not contradict."""


class ClusterUnreachableError(ConnectionError):
    """The configured Ray address did not answer; raised instead of letting ray.init retry for minutes."""


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    local: bool
    resources: dict[str, float]
    nodes: int
    dashboard_url: str | None

    def describe(self) -> str:
        cpus = self.resources.get("CPU", 0)
        gpus = self.resources.get("GPU", 0)
        where = "local cluster" if self.local else f"cluster at {self.address}"
        dash = f", dashboard {self.dashboard_url}" if self.dashboard_url else ""
        return f"Ray {where}: {self.nodes} node(s), {cpus:g} CPU, {gpus:g} GPU{dash}"


def resolve_address(cfg: ClusterConfig) -> str | None:
    """The address to join, or None for a new local cluster. The config wins over RAY_ADDRESS."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def _split_host_port(address: str) -> tuple[str, int] | None:
    """host and port of a GCS or client address; None for forms we cannot probe (`auto`)."""
    if address == "auto" or address.startswith(("http://", "https://")):
        return None
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"cluster.address={address!r} is not of the form host:port or ray://host:port")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast with the address in the message when nothing listens there."""
    target = _split_host_port(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise ClusterUnreachableError(
            f"Ray cluster at {address!r} is unreachable ({error}). Check cluster.address (or RAY_ADDRESS) and that "
            f"the head is running (`ray status --address {address}`)."
        ) from error


def submitted_runtime_env() -> dict:
    """The runtime_env `ray job submit` gave this driver ({} outside a submitted job)."""
    raw = os.environ.get(JOB_CONFIG_ENV_VAR)
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}


def runtime_env(cfg: ClusterConfig, remote: bool, submitted: dict | None = None) -> dict:
    """Code and thread limits for every worker. Under `ray job submit`, Ray refuses a ray.init runtime_env that sets
    what the job already set: the job's working_dir (`--working-dir .`) then carries the code, and its env vars win."""
    submitted = submitted_runtime_env() if submitted is None else submitted
    job_vars = submitted.get("env_vars") or {}
    env: dict = {"env_vars": {name: value for name, value in cfg.env_vars.items() if name not in job_vars}}
    ship = remote if cfg.ship_code is None else cfg.ship_code
    if ship and "working_dir" not in submitted:
        env["working_dir"] = str(REPO_ROOT)
        env["excludes"] = list(cfg.excludes)
    return env


def connect(cfg: ClusterConfig) -> ClusterInfo:
    """Start or join Ray as configured and report what we got. Idempotent within a process."""
    address = resolve_address(cfg)
    local = address is None
    for name, value in cfg.env_vars.items():
        os.environ.setdefault(name, value)  # the driver obeys the same thread limits as its workers
    if not ray.is_initialized():
        if address is not None:
            check_reachable(address, cfg.connect_timeout_s)
        kwargs: dict = {"namespace": cfg.namespace, "runtime_env": runtime_env(cfg, remote=not local)}
        if local:
            # "local", not None: ray.init() without an address joins any cluster already running on this machine
            # (a `ray start` head, another job's), which is not what "local by default" promises
            kwargs["address"] = "local"
            kwargs["num_cpus"] = cfg.num_cpus
            kwargs["include_dashboard"] = cfg.include_dashboard
            if cfg.object_store_memory_mb:
                kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
        else:
            kwargs["address"] = address
        context = ray.init(**kwargs)
    else:
        context = None
    dashboard = getattr(context, "dashboard_url", None) if context is not None else None
    info = ClusterInfo(
        address=address or ray.get_runtime_context().gcs_address,
        local=local,
        resources=dict(ray.cluster_resources()),
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
        dashboard_url=f"http://{dashboard}" if dashboard else None,
    )
    log.info(info.describe())
    return info
