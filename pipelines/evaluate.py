"""The evaluation job: `python -m pipelines.evaluate task=retrieval ...` — index, search, score, write.

Which retrieval task (the `data.*` keys; `data.source` defaults to `auto`, which picks by `data.path`):

    python -m pipelines.evaluate task=retrieval                                  # the synthetic world: sub-questions
                                                                                 #   of its test questions -> passage
    python -m pipelines.evaluate task=retrieval data.path=/data/beir/nfcorpus    # a BEIR folder (qrels/test.tsv)
    python -m pipelines.evaluate task=retrieval data.path=seal_tools             # a shared tool-retrieval task by
    python -m pipelines.evaluate data.source=toolset data.path=bfcl              #   name (pipelines/data/toolsets.py)

with `data.source=synthetic|beir|toolset` to say it explicitly. Then pick the retriever and the settings:

    retriever=dense_flat|dense_ivf|dense_hnsw|bm25    retriever.num_shards=2    retriever.index_dir=<cache folder>
    evaluate.use_instructions=true    evaluate.max_queries=200    evaluate.split=dev    evaluate.depth=100

The job builds the index with the Ray Data job of pipelines/index.py (or reuses the folder in `retriever.index_dir`
when its manifest matches the config and the corpus — point several runs at one folder to encode a corpus once),
starts one Retriever actor per shard, sends the queries in batches (each call with a deadline), and scores the run
with pipelines/metrics.py: nDCG@{1,5,10,100}, Recall@{5,10,20,100}, MRR@10, MAP@100 and C@{5,10,20}. It prints a
table and writes, in the Hydra run directory (or `output_dir`): `metrics.json` (the metrics and what produced them),
`run.trec` (TREC run format: `qid Q0 docid rank score tag`, ranks as the metrics count them) and `config.yaml`.

`evaluate.max_queries` keeps evenly spaced queries (deterministic) and only their qrels, so a capped run is an
unbiased sample and never scores the dropped queries as misses.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from actors.retriever import ShardedRetriever, as_retriever_config
from pipelines import config as _config  # noqa: F401  (registers the schemas with Hydra)
from pipelines.data.beir import CORPUS, RetrievalTask, load_beir
from pipelines.index import build_index
from pipelines.metrics import Run, evaluate_run, ranked_doc_ids

log = logging.getLogger(__name__)

TASKS = ("retrieval",)
SOURCES = ("auto", "synthetic", "beir", "toolset")
METRIC_ORDER = ("ndcg@1", "ndcg@5", "ndcg@10", "ndcg@100", "recall@5", "recall@10", "recall@20", "recall@100",
                "mrr@10", "map@100", "c@5", "c@10", "c@20")  # fmt: skip
SYNTHETIC_INSTRUCTION = "Given a question about a fictional person, company or city, retrieve the passage that answers it."


# ---------------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_task(world_cfg: Any, split: str = "test") -> RetrievalTask:
    """The world as a retrieval task: each decomposition step's sub-question must find the passage it reads.

    Why sub-questions rather than whole questions: a multi-hop question names only its first entity, so no single
    passage answers it; each step does name its subject, and its passage is known exactly.
    """
    from pipelines.data.world import WorldConfig, build_world

    if isinstance(world_cfg, DictConfig):
        world_cfg = OmegaConf.to_object(world_cfg)
    assert isinstance(world_cfg, WorldConfig)
    world = build_world(world_cfg)
    queries, qrels = {}, {}
    for question in world.questions(split):
        for number, step in enumerate(question["decomposition"]):
            query_id = f"{question['id']}-{number}"
            queries[query_id] = step["question"]
            qrels[query_id] = {step["passage_id"]: 1}
    corpus = [{"id": d["id"], "title": d["title"], "text": d["text"]} for d in world.documents()]
    instructions = dict.fromkeys(queries, SYNTHETIC_INSTRUCTION)
    return RetrievalTask(f"synthetic-{split}", corpus, queries, qrels, instructions)


def resolve_source(data: Any) -> str:
    """`data.source`, with `auto` resolved from `data.path`: none = synthetic, a folder = BEIR, a name = tool task."""
    source = data.source
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r} is not one of {SOURCES}")
    if source != "auto":
        return source
    if not data.path:
        return "synthetic"
    if (Path(data.path) / CORPUS).is_file():
        return "beir"
    from pipelines.data.toolsets import TOOL_TASKS

    if data.path in TOOL_TASKS:
        return "toolset"
    raise ValueError(
        f"data.path={data.path!r} is neither a BEIR folder (no {CORPUS}) nor a tool task ({sorted(TOOL_TASKS)})"
    )


def evenly_spaced(ids: list[str], limit: int | None) -> list[str]:
    """At most `limit` ids spread over the whole list (files are often sorted by topic or difficulty)."""
    if limit is None or len(ids) <= limit:
        return ids
    if limit < 1:
        raise ValueError(f"evaluate.max_queries must be >= 1, got {limit}")
    return [ids[(index * len(ids)) // limit] for index in range(limit)]


def cap_queries(task: RetrievalTask, limit: int | None) -> RetrievalTask:
    keep = evenly_spaced([q for q in task.queries if q in task.qrels], limit)
    return replace(task, queries={q: task.queries[q] for q in keep}, qrels={q: task.qrels[q] for q in keep},
                   instructions={q: task.instructions[q] for q in keep if q in task.instructions})  # fmt: skip


def load_task(cfg: DictConfig) -> RetrievalTask:
    """The retrieval task the config names, capped to `evaluate.max_queries`."""
    source = resolve_source(cfg.data)
    limit = cfg.evaluate.max_queries
    if source == "synthetic":
        task = synthetic_task(cfg.data.world, cfg.evaluate.split)
    elif source == "beir":
        if not cfg.data.path:
            raise ValueError("data.source=beir needs data.path=<BEIR folder>")
        task = load_beir(cfg.data.path, cfg.evaluate.split)
    else:
        from pipelines.data.toolsets import DEFAULT_SHARED_ROOT, load_tool_task

        if not cfg.data.path:
            raise ValueError("data.source=toolset needs data.path=<tool task name>")
        root = Path(cfg.evaluate.shared_root) if cfg.evaluate.shared_root else DEFAULT_SHARED_ROOT
        task = load_tool_task(cfg.data.path, root, max_queries=limit)
    return cap_queries(task, limit)


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval and scoring
# ---------------------------------------------------------------------------------------------------------------------


def retrieve(retriever: ShardedRetriever, task: RetrievalTask, depth: int, use_instructions: bool,
             batch_size: int) -> Run:  # fmt: skip
    """query id -> doc id -> score for every query of the task, `batch_size` queries per call."""
    query_ids = list(task.queries)
    run: Run = {}
    for start in range(0, len(query_ids), batch_size):
        batch = query_ids[start:start + batch_size]
        instructions = [task.instructions.get(q) for q in batch] if use_instructions else None
        hits = retriever.search([task.queries[q] for q in batch], depth, instructions)
        for query_id, query_hits in zip(batch, hits, strict=True):
            run[query_id] = {hit["id"]: hit["score"] for hit in query_hits}
    return run


def write_trec_run(run: Run, path: Path, tag: str) -> Path:
    """`qid Q0 docid rank score tag` lines, ranked as the metrics rank them (trec_eval's tie rule)."""
    with path.open("w", encoding="utf-8") as out:
        for query_id, scores in run.items():
            for rank, doc_id in enumerate(ranked_doc_ids(scores), start=1):
                out.write(f"{query_id} Q0 {doc_id} {rank} {scores[doc_id]:.6f} {tag}\n")
    return path


def run_tag(retriever_cfg: Any, use_instructions: bool) -> str:
    name = retriever_cfg.kind if retriever_cfg.kind == "bm25" else f"{retriever_cfg.kind}-{retriever_cfg.index}"
    return name + ("+instr" if use_instructions else "")


def metrics_table(metrics: dict[str, float]) -> str:
    names = [m for m in METRIC_ORDER if m in metrics] + [m for m in metrics if m not in METRIC_ORDER and m != "queries"]
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {m} | {metrics[m]:.4f} |" for m in names])


def run_retrieval(cfg: DictConfig, out: Path) -> dict:
    """The retrieval evaluation in an already connected job; returns what metrics.json holds."""
    retriever_cfg = as_retriever_config(cfg.retriever)
    started = time.perf_counter()
    task = load_task(cfg)
    if not task.queries:
        raise ValueError(f"task {task.name!r}: no judged queries in split {cfg.evaluate.split!r}")
    index_dir = Path(retriever_cfg.index_dir) if retriever_cfg.index_dir else out / "index"
    # A BEIR corpus is indexed from its file (Ray Data reads it in parallel); other tasks from their documents.
    corpus = Path(cfg.data.path) if resolve_source(cfg.data) == "beir" else task.corpus
    build_index(corpus, retriever_cfg, index_dir)
    indexed = time.perf_counter()

    retriever = ShardedRetriever.launch(index_dir, retriever_cfg)
    try:
        depth = max(cfg.evaluate.depth, 1)
        run = retrieve(retriever, task, depth, cfg.evaluate.use_instructions, cfg.evaluate.query_batch_size)
    finally:
        retriever.close()
    searched = time.perf_counter()

    metrics = evaluate_run(run, task.qrels)
    tag = cfg.evaluate.run_name or run_tag(retriever_cfg, cfg.evaluate.use_instructions)
    write_trec_run(run, out / "run.trec", tag)
    result = {
        "task": task.name,
        "run": tag,
        "metrics": {name: float(value) for name, value in metrics.items() if name != "queries"},
        "queries": int(metrics["queries"]),
        "corpus": len(task.corpus),
        "instructed_queries": sum(q in task.instructions for q in task.queries) if cfg.evaluate.use_instructions else 0,
        "retriever": OmegaConf.to_container(cfg.retriever, resolve=True),
        "index_dir": str(index_dir),
        "seconds": {"index": round(indexed - started, 2), "search": round(searched - indexed, 2)},
        "queries_per_second": round(len(run) / max(searched - indexed, 1e-9), 1),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{task.name}: {result['queries']} queries, {result['corpus']} documents, run {tag}\n", flush=True)
    print(metrics_table(metrics), flush=True)
    return result


def run_job(cfg: DictConfig) -> dict:
    """The whole job on a composed config (the entry point, and tests through Hydra's compose API)."""
    from pipelines.jobs import start_job

    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {TASKS}")
    out, _ = start_job(cfg)
    result = run_retrieval(cfg, out)
    print(f"\nResults in {out}", flush=True)
    return result


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    main()
