"""Retriever: dense (flat / IVF / HNSW) and BM25 cores, Ray actors, sharding, index folders, the Ray Data build.

The retrieval task is the synthetic world's: every decomposition step of a test question is a sub-question whose
gold passage is known (pipelines.evaluate.synthetic_task). Floors below were measured on this world (flat and BM25
recall@5 = 1.0, IVF with nprobe 4 of 8 cells 0.96) and leave a margin.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

from actors import retriever as R
from actors.config import RetrieverConfig
from pipelines import records
from pipelines.data.world import WorldConfig
from pipelines.evaluate import synthetic_task
from pipelines.index import build_index

SMALL_WORLD = WorldConfig(
    people_per_split=30, companies_per_split=15, cities_per_split=10, countries=6, train_questions=5,
    dev_questions=5, test_questions=60, train_tool_tasks=0, dev_tool_tasks=0, test_tool_tasks=0,
)  # fmt: skip
FLAT = RetrieverConfig()
RECALL_FLOOR = 0.9  # measured 1.0 (flat, HNSW, BM25) on these sub-questions


@pytest.fixture(scope="module")
def task():
    return synthetic_task(SMALL_WORLD, "test")


@pytest.fixture(scope="module")
def queries(task):
    return list(task.queries.values())


@pytest.fixture(scope="module")
def gold(task):
    return [next(iter(task.qrels[q])) for q in task.queries]


@pytest.fixture(scope="module")
def embedder():
    return R.Embedder()


@pytest.fixture(scope="module")
def docs(task):
    return R.doc_table(task.corpus)


@pytest.fixture(scope="module")
def vectors(docs, embedder):
    texts = [R.document_text(t, x) for t, x in zip(docs["title"].to_pylist(), docs["text"].to_pylist(), strict=True)]
    return embedder.encode(texts, FLAT.batch_size)


@pytest.fixture(scope="module")
def flat_core(docs, vectors, embedder):
    return R.DenseIndex.from_vectors(vectors, docs, FLAT, embedder)


@pytest.fixture(scope="module")
def flat_hits(flat_core, queries):
    return flat_core.search(queries, 10)


def recall_at(hits, gold, k):
    return float(np.mean([g in [h["id"] for h in found[:k]] for found, g in zip(hits, gold, strict=True)]))


def ids(hits):
    return [[h["id"] for h in found] for found in hits]


def assert_same_hits(got, expected):
    assert ids(got) == ids(expected)
    for found, want in zip(got, expected, strict=True):
        np.testing.assert_allclose([h["score"] for h in found], [h["score"] for h in want], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# In-process cores
# ----------------------------------------------------------------------------------------------------------------------


def test_dense_flat_finds_the_passage_of_each_sub_question(flat_hits, gold):
    recall = recall_at(flat_hits, gold, 5)
    print(f"flat recall@5 = {recall:.3f}, recall@10 = {recall_at(flat_hits, gold, 10):.3f} on {len(gold)} sub-questions")
    assert recall >= RECALL_FLOOR
    hit = flat_hits[0][0]
    assert set(hit) == {"id", "title", "text", "score"} and isinstance(hit["score"], float)


@pytest.mark.parametrize("cfg", [replace(FLAT, index="ivf", nlist=8, nprobe=4),
                                 replace(FLAT, index="hnsw", hnsw_m=16, ef_search=32)], ids=["ivf", "hnsw"])  # fmt: skip
def test_approximate_indexes_recall_close_to_flat(cfg, docs, vectors, embedder, queries, gold, flat_hits):
    core = R.DenseIndex.from_vectors(vectors, docs, cfg, embedder)
    recall, flat = recall_at(core.search(queries, 10), gold, 10), recall_at(flat_hits, gold, 10)
    print(f"{cfg.index} recall@10 = {recall:.3f} (flat {flat:.3f})")
    assert recall >= flat - 0.1


def test_bm25_retrieves_the_passage_of_an_exact_name(task, docs, queries, gold):
    core = R.BM25Index.build(docs, replace(FLAT, kind="bm25"))
    hits = core.search(queries, 10)
    print(f"bm25 recall@5 = {recall_at(hits, gold, 5):.3f}, recall@10 = {recall_at(hits, gold, 10):.3f}")
    assert recall_at(hits, gold, 5) >= RECALL_FLOOR
    # Exact-name queries: the entity's own passage (it names the entity in every sentence) must come first.
    real = [d for d in task.corpus if d["id"] in set(gold)][:20]
    top = core.search([d["title"] for d in real], 3)
    assert [found[0]["id"] for found in top] == [d["id"] for d in real]
    assert core.search(["zzqx unknownword"], 5) == [[]]  # no shared term: no hit rather than k arbitrary ones


def test_instruction_is_formatted_and_changes_the_query(flat_core, queries):
    instruction = "Retrieve the passage that answers the question"
    assert R.format_query("Who founded X?", instruction) == f"Instruct: {instruction}\nQuery: Who founded X?"
    assert R.format_query("Who founded X?", None) == "Who founded X?"
    plain, instructed = flat_core.encode_queries(queries[:4]), flat_core.encode_queries(queries[:4], instruction)
    assert not np.allclose(plain, instructed)
    scores = [h["score"] for h in flat_core.search(queries[:4], 5, instruction)[0]]
    assert scores != [h["score"] for h in flat_core.search(queries[:4], 5)[0]]
    with pytest.raises(ValueError, match="2 instructions for 4 queries"):
        flat_core.search(queries[:4], 5, ["a", "b"])


# ----------------------------------------------------------------------------------------------------------------------
# Index folders
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [FLAT, replace(FLAT, index="ivf", nlist=8, nprobe=4), replace(FLAT, index="hnsw"),
                                 replace(FLAT, kind="bm25"), replace(FLAT, num_shards=2)],
                         ids=["flat", "ivf", "hnsw", "bm25", "flat-2-shards"])  # fmt: skip
def test_save_load_round_trip_gives_identical_results(cfg, task, vectors, embedder, queries, tmp_path):
    folder = R.build_index_in_process(task.corpus, cfg, tmp_path / "index", embedder, vectors)
    built = R.load_index(folder, cfg, embedder)
    again = R.load_index(folder, cfg, embedder)  # two independent loads of the files
    assert_same_hits(R.search_shards(again, queries, 10), R.search_shards(built, queries, 10))
    manifest = R.read_index_manifest(folder)
    assert manifest["count"] == len(task.corpus) and manifest["num_shards"] == cfg.num_shards
    assert {manifest["kind"], manifest["metric"]} <= {"dense", "bm25", "inner_product"}
    if cfg.kind == "dense":
        assert manifest["dim"] == 384 and manifest["model"] == R.PACKAGED_MODEL and manifest["index"] == cfg.index


def test_manifest_that_does_not_fit_the_config_is_named(task, vectors, embedder, tmp_path):
    folder = R.build_index_in_process(task.corpus, FLAT, tmp_path / "index", embedder, vectors)
    with pytest.raises(R.IndexMismatchError, match="index='flat' but retriever.index='hnsw'"):
        R.load_shard(folder, 0, replace(FLAT, index="hnsw"), embedder)
    with pytest.raises(R.IndexMismatchError, match="num_shards=1 but retriever.num_shards=2"):
        R.ShardedRetriever.launch(folder, replace(FLAT, num_shards=2))  # fails before starting any actor
    manifest = json.loads((folder / R.MANIFEST).read_text())
    (folder / R.MANIFEST).write_text(json.dumps({**manifest, "dim": 512}))
    with pytest.raises(R.IndexMismatchError, match="dim=512 but the encoder produces dim=384"):
        R.load_shard(folder, 0, FLAT, embedder)
    (folder / R.MANIFEST).write_text(json.dumps({**manifest, "kind": "sparse"}))
    with pytest.raises(R.IndexMismatchError, match="kind='sparse' is not a known kind"):
        R.load_shard(folder, 0, FLAT, embedder)
    (folder / R.MANIFEST).unlink()
    with pytest.raises(R.IndexMismatchError, match="no manifest.json"):
        R.load_shard(folder, 0, FLAT, embedder)


# ----------------------------------------------------------------------------------------------------------------------
# Ray: the Data build and the actors
# ----------------------------------------------------------------------------------------------------------------------


def test_ray_data_build_from_a_records_folder_equals_the_in_process_build(ray_cluster, task, queries, tmp_path):
    """BM25 here (no encoder to load, so it is quick); the dense Ray Data build runs in tests/test_evaluate.py."""
    cfg = replace(FLAT, kind="bm25", num_shards=2)
    rows = [{**d, "entity_id": None, "is_distractor": False} for d in task.corpus]
    records.write_records(rows, tmp_path / "documents", "document")
    folder = build_index(tmp_path / "documents", cfg, tmp_path / "index")
    manifest = R.read_index_manifest(folder)
    assert manifest["count"] == len(rows) and [s["count"] for s in manifest["shards"]] == [len(rows) // 2] * 2
    expected = R.build_index_in_process(task.corpus, cfg, tmp_path / "in_process")
    assert_same_hits(R.search_shards(R.load_index(folder, cfg), queries, 10),
                     R.search_shards(R.load_index(expected, cfg), queries, 10))  # fmt: skip
    stamp = (folder / R.MANIFEST).stat().st_mtime_ns
    started = time.perf_counter()
    assert build_index(tmp_path / "documents", cfg, tmp_path / "index") == folder  # manifest matches: reused
    assert (folder / R.MANIFEST).stat().st_mtime_ns == stamp and time.perf_counter() - started < 1.0
    records.write_records([], tmp_path / "questions", "question")
    with pytest.raises(ValueError, match="holds 'question' records"):
        build_index(tmp_path / "questions", cfg, tmp_path / "bad")


ACTOR = replace(FLAT, num_cpus=0.5, num_shards=2)


def test_flat_on_two_actors_equals_the_unsharded_in_process_core(ray_cluster, task, vectors, embedder, queries, gold,
                                                                 flat_hits, tmp_path):  # fmt: skip
    """Two shards, two Retriever actors, merged by ShardedRetriever: the same hits as one in-process flat index.

    (One actor per shard is the only code path, so a 1-shard index goes through exactly the same calls.)
    """
    folder = R.build_index_in_process(task.corpus, ACTOR, tmp_path / "flat-2", embedder, vectors)
    retriever = R.ShardedRetriever.launch(folder, ACTOR)
    try:
        info = retriever.wait_ready()
        assert [i["shard"] for i in info] == [0, 1] and len({i["pid"] for i in info}) == 2
        assert sum(i["count"] for i in info) == len(task.corpus)
        hits = retriever.search(queries, 10)
        assert recall_at(hits, gold, 5) >= RECALL_FLOOR
        assert_same_hits(hits, flat_hits)
        instruction = "Retrieve the passage that answers the question"
        flat_core = R.load_index(folder, ACTOR, embedder)
        assert_same_hits(retriever.search(queries[:8], 5, instruction),
                         R.search_shards(flat_core, queries[:8], 5, instruction))  # fmt: skip
    finally:
        retriever.close()


def test_bm25_actor_survives_a_crash(ray_cluster, task, queries, tmp_path):
    import ray

    cfg = replace(FLAT, kind="bm25", num_cpus=0.25)
    folder = R.build_index_in_process(task.corpus, cfg, tmp_path / "bm25")
    expected = R.search_shards(R.load_index(folder, cfg), queries, 10)
    retriever = R.ShardedRetriever.launch(folder, cfg)
    try:
        assert_same_hits(retriever.search(queries, 10), expected)
        ray.kill(retriever.handles[0], no_restart=False)  # the process dies; Ray restarts it (max_restarts)
        assert_same_hits(retriever.search(queries, 10), expected)  # and retries the search (max_task_retries)
    finally:
        retriever.close()
    shutil.rmtree(folder)
