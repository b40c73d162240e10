"""cluster.connect: local by default, any address by config or RAY_ADDRESS, and a fast clear error when unreachable."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cluster.config import ClusterConfig
from cluster.connect import ClusterUnreachableError, check_reachable, resolve_address, runtime_env
from tests.conftest import REPO
from tests.ports import free_port


def test_local_cluster_reports_its_resources(ray_cluster):
    assert ray_cluster.local
    assert ray_cluster.resources["CPU"] == 2
    assert ray_cluster.nodes == 1
    assert "2 CPU" in ray_cluster.describe()


def test_workers_get_the_thread_limits(ray_cluster):
    import ray

    @ray.remote(num_cpus=0.1)
    def threads():
        import os

        return os.environ.get("OMP_NUM_THREADS")

    assert ray.get(threads.remote(), timeout=60) == "1"


def test_address_comes_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_address(ClusterConfig()) == "10.1.2.3:6379"
    assert resolve_address(ClusterConfig(address="127.0.0.1:1234")) == "127.0.0.1:1234"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(ClusterConfig()) is None


def test_code_is_shipped_to_remote_clusters_only():
    assert "working_dir" not in runtime_env(ClusterConfig(), remote=False)
    remote = runtime_env(ClusterConfig(), remote=True)
    assert remote["working_dir"] == str(REPO)
    assert ".venv" in remote["excludes"]
    assert remote["env_vars"]["OMP_NUM_THREADS"] == "1"


def test_unreachable_address_fails_fast_and_names_it():
    address = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(ClusterUnreachableError, match=address):
        check_reachable(address, timeout_s=2)
    assert time.perf_counter() - started < 5


def test_malformed_address_is_named():
    with pytest.raises(ValueError, match="not-an-address"):
        check_reachable("not-an-address", timeout_s=1)


def test_job_with_unreachable_cluster_exits_with_the_address():
    address = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.run", f"cluster.address={address}", "cluster.connect_timeout_s=2"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode != 0
    assert "unreachable" in done.stderr and address in done.stderr
    assert time.perf_counter() - started < 90
