"""One Ray cluster per test session (starting Ray costs seconds), one thread per process (2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect

    info = connect(ClusterConfig(num_cpus=2, include_dashboard=False))
    yield info
    ray.shutdown()


@pytest.fixture
def shared_data():
    """../shared/data, or a clean skip on a fresh clone that lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA
