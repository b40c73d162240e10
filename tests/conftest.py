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

    info = connect(ClusterConfig(num_cpus=2, include_dashboard=True))  # the state API (used by fault tests) needs it
    yield info
    ray.shutdown()


@pytest.fixture
def shared_data():
    """../shared/data, or a clean skip on a fresh clone that lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """A small Llama (random init) with a BPE trained on a small synthetic world: the model every engine test uses."""
    from actors.config import ModelConfig
    from actors.models import build_causal_lm, train_bpe_tokenizer
    from pipelines.data.world import WorldConfig, build_world

    world = build_world(WorldConfig(people_per_split=20, companies_per_split=10, cities_per_split=8,
                                    train_questions=30, dev_questions=10, test_questions=10))
    tokenizer = train_bpe_tokenizer(world.texts(), vocab_size=400, added_tokens=ModelConfig().added_tokens)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=512, seed=1)
    return build_causal_lm(cfg, tokenizer, tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="session")
def tiny_policy_other(tiny_policy, tmp_path_factory):
    """The same architecture and tokenizer with other weights: what a training step's checkpoint looks like."""
    from actors.config import ModelConfig
    from actors.models import build_causal_lm, load_causal_lm

    _, tokenizer = load_causal_lm(tiny_policy)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=512, seed=2)
    return build_causal_lm(cfg, tokenizer, tmp_path_factory.mktemp("tiny_policy_other"))


@pytest.fixture(scope="session")
def small_world():
    """A small seeded world shared by the agent tests (every question answerable from its passages)."""
    from pipelines.data.world import WorldConfig, build_world

    return build_world(WorldConfig(people_per_split=20, companies_per_split=10, cities_per_split=8,
                                   train_questions=30, dev_questions=20, test_questions=10))


@pytest.fixture(scope="session")
def bm25_cores(small_world, tmp_path_factory):
    """The small world's passages in a real BM25 index, loaded in-process."""
    from actors.config import RetrieverConfig
    from actors.retriever import build_index_in_process, load_index

    cfg = RetrieverConfig(kind="bm25")
    return load_index(build_index_in_process(small_world.documents(), cfg, tmp_path_factory.mktemp("bm25")), cfg)


@pytest.fixture
def searcher(bm25_cores):
    from actors.retriever import LocalRetriever

    return LocalRetriever(bm25_cores)


@pytest.fixture(scope="session")
def tokenizer(tiny_policy):
    from actors.models import load_causal_lm

    return load_causal_lm(tiny_policy)[1]
