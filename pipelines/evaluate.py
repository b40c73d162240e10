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

Tool calls and QA are scored in this process (no cluster), `predictions=` saying what is scored:

    python -m pipelines.evaluate task=toolcall data.path=<BFCL question file or folder> predictions=gold|<file>|agent
    python -m pipelines.evaluate task=toolcall data.path=seal_tools|api_bank|apibench predictions=gold|<file>|agent
    python -m pipelines.evaluate task=qa data.path=<QA file or folder> predictions=gold|<file>
    python -m pipelines.evaluate task=qa data.path=<HotpotQA/MuSiQue> predictions=retrieval retriever=bm25
    python -m pipelines.evaluate task=qa data.path=<HotpotQA/MuSiQue> predictions=agent evaluate.agent=exsearch|genground

`toolcall` applies BFCL's AST check (pipelines/toolcall_check.py; gold from `possible_answer/` beside the file) and
writes `toolcall_accuracy.md|csv` (per category), `toolcall_errors.md|csv` (error codes) and `verdicts.jsonl`;
the named sets come from the shared tools folder (pipelines/toolcall_sets.py: concrete golds as BFCL answers), and
`predictions=agent` has the configured policy (`model.path`, else the tiny model) write the calls in
agents/toolcall.py's format (pipelines/toolcall_predict.py), its texts kept in `agent_predictions.jsonl`.
`qa` (formats and the predictions file: pipelines/qa_data.py) writes `qa_answers.md|csv` (EM / F1 / accuracy, and
supporting-passage recall when predictions name passages) and `answers.jsonl`; with `predictions=retrieval` it
indexes the set's passages in-process (LocalRetriever) and writes `qa_retrieval.md|csv`: supporting-passage
Recall@k, all-supporting C@k and the share of questions whose gold answer occurs in the top k passages. With
`predictions=agent` the agent `evaluate.agent` names (ExSearch or GenGround; policy `model.path`, else the tiny
model) answers each question greedily, searching that same in-process retriever; `qa_answers.md|csv` then adds its
valid rate and mean searches, and supporting-passage recall counts every passage it retrieved.

Instructed retrieval (MAIR / ToolRet: each query carries an instruction; the task format is a BEIR folder whose
queries have an `instruction` field, pipelines/data/beir.py), scored with and without the instruction, in-process:

    python -m pipelines.evaluate task=instructed retriever=bm25|dense_flat evaluate.max_queries=200
    python -m pipelines.evaluate task=instructed evaluate.tool_tasks=[seal_tools,bfcl]   # chosen tool tasks
    python -m pipelines.evaluate task=instructed data.path=<BEIR folder with instructions>

Every tool-retrieval task of pipelines/data/toolsets.py whose data is present (or those named) is indexed once and
searched twice; `instructed_retrieval.md|csv` holds nDCG@10, Recall@10 and MRR@10 without, with, and the difference.
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

TASKS = ("retrieval", "toolcall", "qa", "instructed")
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


# ---------------------------------------------------------------------------------------------------------------------
# Tool calls and QA (scored in this process)
# ---------------------------------------------------------------------------------------------------------------------


def predictions_source(cfg: DictConfig, modes: tuple[str, ...]) -> str:
    """`gold`, one of `modes`, or a predictions file; `agent` is a clear error where no agent is wired in."""
    source = cfg.predictions
    if source == "agent" and "agent" not in modes:
        raise NotImplementedError(
            f"task={cfg.task} predictions=agent: running the configured agent is not wired into the evaluation job "
            f"yet; use predictions={'|'.join(modes)} or predictions=<JSON-lines file>"
        )
    if source in modes:
        return source
    if not Path(source).is_file():
        raise FileNotFoundError(f"predictions={source!r} is neither one of {modes} nor an existing file")
    return source


def _write_rows(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def configured_policy(cfg: DictConfig, out: Path) -> Path:
    """`model.path`, or the tiny model built from the config (its tokenizer trained on the synthetic world)."""
    from actors.models import ensure_policy
    from pipelines.data.world import SYLLABLES, build_world

    return ensure_policy(cfg.model, lambda: build_world(OmegaConf.to_object(cfg.data.world)).texts(), out / "policy",
                         SYLLABLES)


def run_toolcall(cfg: DictConfig, out: Path) -> dict:
    """BFCL's AST check of gold, predicted or agent-written calls over a BFCL question file (or a folder of them),
    or a named set of pipelines/toolcall_sets.py (seal_tools, api_bank, apibench) from the shared tools folder."""
    from pipelines import toolcall_check, toolcall_sets
    from pipelines.data.toolsets import DEFAULT_SHARED_ROOT
    from pipelines.report import markdown_table, write_table

    if not cfg.data.path:
        raise ValueError(f"task=toolcall needs data.path=<BFCL question file or folder> or one of {toolcall_sets.SETS}")
    source = predictions_source(cfg, ("gold", "agent"))
    skipped: dict[str, str] = {}
    if str(cfg.data.path) in toolcall_sets.SETS:
        root = Path(cfg.evaluate.shared_root) if cfg.evaluate.shared_root else DEFAULT_SHARED_ROOT
        groups, skipped = toolcall_sets.load_toolcall_set(str(cfg.data.path), root / "tools")
    else:
        groups = [toolcall_check.load_bfcl_file(f) for f in toolcall_check.question_files(cfg.data.path)]
    capped = []
    for category, examples in groups:  # evenly spaced questions of each category (files are sorted by topic)
        keep = set(evenly_spaced([e.id for e in examples], cfg.evaluate.max_queries))
        capped.append((category, [e for e in examples if e.id in keep]))
    groups = capped
    if source == "gold":
        predictions = None
    elif source == "agent":
        from pipelines.local_engine import InProcessEngine
        from pipelines.toolcall_predict import agent_predictions

        engine = InProcessEngine(configured_policy(cfg, out), cfg.engine, cfg.model.dtype)
        predictions, texts = agent_predictions([e for _, examples in groups for e in examples], engine,
                                               cfg.evaluate.max_new_tokens)  # fmt: skip
        _write_rows(texts, out / "agent_predictions.jsonl")
    else:
        predictions = toolcall_check.read_predictions(source)
    scored = toolcall_check.score_groups(groups, predictions)
    accuracy, errors = toolcall_check.accuracy_rows(scored), toolcall_check.error_rows(scored)
    write_table(accuracy, out, "toolcall_accuracy", f"BFCL AST accuracy: {cfg.data.path}, predictions={source}")
    write_table(errors, out, "toolcall_errors", "Failures by error code")
    _write_rows([s.to_dict() for s in scored], out / "verdicts.jsonl")
    result = {"task": "toolcall", "data": str(cfg.data.path), "predictions": source, "accuracy": accuracy,
              "errors": errors, "defective_gold": {s.id: s.gold_defects for s in scored if s.gold_defects},
              "skipped_gold": skipped}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if skipped:
        print(f"{len(skipped)} question(s) left out: their gold is not a literal call (metrics.json names them)")
    print(f"\nBFCL AST accuracy, predictions={source}\n\n{markdown_table(accuracy)}", flush=True)
    if errors:
        print(f"Failures by error code\n\n{markdown_table(errors)}", flush=True)
    return result


QA_CUTOFFS = (2, 5, 10, 20)
QA_COLUMNS = {"em": "em", "f1": "f1", "acc": "acc", "support_recall": "support_recall",
              "all_supporting": "all_supporting", "valid": "valid_rate", "searches": "mean_searches"}  # fmt: skip
"""Row field -> column of the answers table (the agent's rows add `valid` and `searches`)."""
QA_AGENTS = {"exsearch": "search", "genground": "question"}
"""The agents `evaluate.agent` may name -> the step role of one search (ExSearch's query, GenGround's sub-question)."""


def _mean(values: list[float]) -> float | str:
    return sum(values) / len(values) if values else ""


def score_answers(dataset: Any, predictions: dict) -> list[dict]:
    """One row per question: EM / F1 / accuracy of the answer, and supporting-passage recall when both the
    prediction and the gold name passages."""
    from pipelines.qa_metrics import accuracy, exact_match, f1_score

    rows = []
    for example in dataset.examples:
        prediction = predictions[example.id]
        row = {"id": example.id, "kind": example.kind, "answer": prediction.answer, "gold": example.answers}
        if prediction.answer is not None:
            row.update(em=exact_match(prediction.answer, example.answers), f1=f1_score(prediction.answer,
                       example.answers), acc=accuracy(prediction.answer, example.answers))  # fmt: skip
        if prediction.passages is not None and example.supporting:
            found = set(prediction.passages) & set(example.supporting)
            row.update(support_recall=len(found) / len(example.supporting),
                       all_supporting=float(len(found) == len(set(example.supporting))))  # fmt: skip
        rows.append(row)
    return rows


def answer_table(dataset: Any, rows: list[dict]) -> list[dict]:
    """Means per question kind (HotpotQA's type, MuSiQue's hops), then over all questions."""
    groups = {kind: [r for r in rows if r["kind"] == kind] for kind in sorted({r["kind"] for r in rows})}
    if len(groups) > 1 or "" not in groups:
        groups["all"] = rows
    table = []
    for kind, chosen in groups.items():
        line = {"dataset": dataset.name, "kind": kind or "all", "questions": len(chosen)}
        for metric, column in QA_COLUMNS.items():
            values = [r[metric] for r in chosen if metric in r]
            if values:
                line[column] = _mean(values)
        table.append(line)
    return table


def qa_retriever(task: RetrievalTask, cfg: DictConfig, out: Path) -> Any:
    """The in-process retriever over a QA set's passages that `predictions=retrieval` scores and the agent searches
    (index in `retriever.index_dir`, else `<out>/index`)."""
    if not task.corpus:
        raise ValueError(f"predictions={cfg.predictions}: QA set {task.name!r} ships no passages to index")
    retriever_cfg = as_retriever_config(cfg.retriever)
    return search_in_process(task, retriever_cfg, Path(retriever_cfg.index_dir) if retriever_cfg.index_dir
                             else out / "index")  # fmt: skip


def qa_agent(cfg: DictConfig, engine: Any, searcher: Any) -> Any:
    """The agent `evaluate.agent` names, its contexts no longer than the engine's (a full context ends a run with
    `length` instead of an engine error). ExSearch takes `recipe.agent` (as the recipe trained it) when the recipe
    has one; GenGround its defaults."""
    from agents.exsearch import ExSearchAgent, ExSearchConfig
    from agents.genground import GenGroundAgent, GenGroundConfig

    name = cfg.evaluate.agent
    if name not in QA_AGENTS:
        raise ValueError(f"evaluate.agent={name!r} is not one of {tuple(QA_AGENTS)}")
    trained = OmegaConf.select(cfg, "recipe.agent")
    if name == "genground":
        agent_cfg = GenGroundConfig()
    else:
        agent_cfg = OmegaConf.to_object(trained) if trained is not None else ExSearchConfig()
    assert isinstance(agent_cfg, ExSearchConfig | GenGroundConfig)
    limit = getattr(engine, "max_model_len", None)
    if limit:
        agent_cfg = replace(agent_cfg, max_context_tokens=min(agent_cfg.max_context_tokens, limit))
    return (ExSearchAgent if name == "exsearch" else GenGroundAgent)(engine, searcher, engine.tokenizer, agent_cfg)


def agent_answers(dataset: Any, cfg: DictConfig, out: Path, engine: Any = None) -> tuple[dict, list[dict]]:
    """The configured agent's answers (greedy, one run per question) as QA predictions whose passages are every
    passage it retrieved, and per question its validity, searches and finish reason (`engine`: a generator with a
    `tokenizer` in place of the configured policy, e.g. a scripted test double)."""
    from pipelines.qa_data import QAPrediction

    task = RetrievalTask(dataset.name, dataset.corpus, {}, {})
    searcher = qa_retriever(task, cfg, out)
    if engine is None:
        from pipelines.local_engine import InProcessEngine

        engine = InProcessEngine(configured_policy(cfg, out), cfg.engine, cfg.model.dtype)
    agent = qa_agent(cfg, engine, searcher)
    runs = agent.run([{"id": e.id, "question": e.question} for e in dataset.examples], greedy=True, seed=cfg.seed)
    predictions, details = {}, []
    for run in runs:
        shown = [s.text or "" for s in run.steps if s.role == agent.cfg.documents_tag]
        passages = list(dict.fromkeys(p for text in shown for p in text.split("\n") if p))
        predictions[run.example_id] = QAPrediction(run.answer or "", passages)
        searches = sum(1 for s in run.steps if s.role == QA_AGENTS[cfg.evaluate.agent])
        details.append({"valid": float(run.valid), "searches": searches, "finish_reason": run.finish_reason,
                        "passages": passages})  # fmt: skip
    return predictions, details


def retrieval_table(dataset: Any, cfg: DictConfig, out: Path) -> tuple[list[dict], dict]:
    """Index the set's passages in-process, search each question, and score the hits against the supporting
    passages (Recall@k, C@k from pipelines/metrics.py) and the answers (gold answer inside the top k texts)."""
    from pipelines.qa_metrics import accuracy

    retriever_cfg = as_retriever_config(cfg.retriever)
    task = RetrievalTask(dataset.name, dataset.corpus, {e.id: e.question for e in dataset.examples},
                         {e.id: dict.fromkeys(e.supporting, 1) for e in dataset.examples if e.supporting})  # fmt: skip
    retriever = qa_retriever(task, cfg, out)
    depth = max(cfg.evaluate.depth, max(QA_CUTOFFS))
    run = retrieve(retriever, task, depth, False, cfg.evaluate.query_batch_size)
    metrics = evaluate_run(run, task.qrels, ndcg_ks=(10,), recall_ks=QA_CUTOFFS, completeness_ks=QA_CUTOFFS)
    texts = {doc["id"]: doc["text"] for doc in dataset.corpus}
    rows = []
    for k in QA_CUTOFFS:
        found = [accuracy(" ".join(texts[d] for d in ranked_doc_ids(run[e.id])[:k]), e.answers)
                 for e in dataset.examples]  # fmt: skip
        rows.append({"dataset": dataset.name, "retriever": run_tag(retriever_cfg, False), "k": k,
                     "support recall@k": metrics[f"recall@{k}"], "all supporting@k": metrics[f"c@{k}"],
                     "answer in top k": _mean(found)})  # fmt: skip
    return rows, {name: float(value) for name, value in metrics.items()}


def run_qa(cfg: DictConfig, out: Path, engine: Any = None) -> dict:
    """EM / F1 / accuracy (and passage recall) of gold, predicted, retrieved or agent answers on a QA set
    (`engine`: see agent_answers)."""
    from pipelines.qa_data import gold_predictions, load_qa, read_qa_predictions
    from pipelines.report import markdown_table, write_table

    if not cfg.data.path:
        raise ValueError("task=qa needs data.path=<QA file or folder> (HotpotQA, MuSiQue, NQ-open, Bamboogle)")
    source = predictions_source(cfg, ("gold", "retrieval", "agent"))
    dataset = load_qa(cfg.data.path)
    every_id = {e.id for e in dataset.examples}
    keep = set(evenly_spaced([e.id for e in dataset.examples], cfg.evaluate.max_queries))
    dataset.examples = [e for e in dataset.examples if e.id in keep]
    result = {"task": "qa", "data": str(cfg.data.path), "format": dataset.format, "predictions": source,
              "questions": len(dataset.examples), "corpus": len(dataset.corpus),
              "corpus_source": dataset.corpus_source}  # fmt: skip
    if source == "retrieval":
        rows, metrics = retrieval_table(dataset, cfg, out)
        write_table(rows, out, "qa_retrieval", f"Retrieval on {dataset.name} ({len(dataset.corpus)} passages)")
        result.update(retrieval=rows, retrieval_metrics=metrics)
        print(f"\n{dataset.name}: retrieval over {len(dataset.corpus)} passages\n\n{markdown_table(rows)}", flush=True)
    else:
        details = None
        if source == "agent":
            predictions, details = agent_answers(dataset, cfg, out, engine)
            source = f"agent:{cfg.evaluate.agent}"
            result["agent"] = cfg.evaluate.agent
        else:
            predictions = gold_predictions(dataset) if source == "gold" else read_qa_predictions(source)
        unknown = sorted(set(predictions) - every_id)
        missing = [e.id for e in dataset.examples if e.id not in predictions]
        if unknown or missing:
            raise ValueError(f"predictions={source}: {len(unknown)} id(s) not in data.path {unknown[:5]}, "
                             f"{len(missing)} question(s) without a prediction {missing[:5]}")  # fmt: skip
        rows = score_answers(dataset, predictions)
        for row, extra in zip(rows, details, strict=True) if details is not None else ():
            row.update(extra)
        table = answer_table(dataset, rows)
        write_table(table, out, "qa_answers", f"Answers on {dataset.name}, predictions={source}")
        _write_rows(rows, out / "answers.jsonl")
        result.update(answers=table)
        print(f"\n{dataset.name}: predictions={source}\n\n{markdown_table(table)}", flush=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


INSTRUCTED_METRICS = ("ndcg@10", "recall@10", "mrr@10")


def search_in_process(task: RetrievalTask, retriever_cfg: Any, index_dir: Path) -> Any:
    """A LocalRetriever over the task's corpus: its index built once in `index_dir` (reused when it matches)."""
    from actors.retriever import LocalRetriever, build_index_in_process, corpus_fingerprint, doc_table, load_index
    from pipelines.index import reusable

    table = doc_table(task.corpus)
    if not reusable(index_dir, retriever_cfg, corpus_fingerprint(table)):
        build_index_in_process(table, retriever_cfg, index_dir)
    return LocalRetriever(load_index(index_dir, retriever_cfg))


def instructed_row(task: RetrievalTask, retriever: Any, cfg: DictConfig, tag: str) -> dict:
    """One task scored twice on the same index: the bare query, then the query with its instruction."""
    depth = max(cfg.evaluate.depth, 10)
    row: dict[str, Any] = {"task": task.name, "queries": len(task.queries), "corpus": len(task.corpus),
                           "instructed": sum(q in task.instructions for q in task.queries), "retriever": tag}  # fmt: skip
    scores = {}
    for use_instructions in (False, True):
        run = retrieve(retriever, task, depth, use_instructions, cfg.evaluate.query_batch_size)
        scores[use_instructions] = evaluate_run(run, task.qrels, ndcg_ks=(10,), recall_ks=(10,))
    for metric in INSTRUCTED_METRICS:
        row[f"{metric}"], row[f"{metric} +instr"] = scores[False][metric], scores[True][metric]
        row[f"{metric} delta"] = scores[True][metric] - scores[False][metric]
    return row


def run_instructed(cfg: DictConfig, out: Path) -> dict:
    """Instructed retrieval (MAIR / ToolRet): every tool-retrieval task of `evaluate.tool_tasks` (or `data.path`, a
    BEIR folder whose queries carry an `instruction` field) with and without the instruction, in this process."""
    from pipelines.data.toolsets import DEFAULT_SHARED_ROOT, TOOL_TASKS, load_tool_task
    from pipelines.report import markdown_table, write_table

    retriever_cfg = as_retriever_config(cfg.retriever)
    root = Path(cfg.evaluate.shared_root) if cfg.evaluate.shared_root else DEFAULT_SHARED_ROOT
    limit = cfg.evaluate.max_queries
    if cfg.data.path and (Path(cfg.data.path) / CORPUS).is_file():
        loaders = {Path(cfg.data.path).name: lambda: load_beir(cfg.data.path, cfg.evaluate.split)}
    else:
        names = list(cfg.evaluate.tool_tasks) or list(TOOL_TASKS)
        unknown = [n for n in names if n not in TOOL_TASKS]
        if unknown:
            raise ValueError(f"evaluate.tool_tasks: {unknown} not among {sorted(TOOL_TASKS)}")
        loaders = {name: (lambda name=name: load_tool_task(name, root, max_queries=limit)) for name in names}
    rows, skipped = [], {}
    for name, load in loaders.items():
        try:
            task = cap_queries(load(), limit)
        except FileNotFoundError as error:
            if cfg.evaluate.tool_tasks:  # asked for by name: its absence is an error, not a silent gap
                raise
            skipped[name] = str(error)
            continue
        if not task.instructions:
            raise ValueError(f"task {name!r}: its queries carry no instruction; nothing to compare")
        base = Path(retriever_cfg.index_dir) if retriever_cfg.index_dir else out / "index"
        retriever = search_in_process(task, retriever_cfg, base / name)
        rows.append(instructed_row(task, retriever, cfg, run_tag(retriever_cfg, False)))
        print(markdown_table(rows[-1:]), flush=True)
    if not rows:
        raise FileNotFoundError(f"task=instructed: no tool task found under {root} ({skipped})")
    write_table(rows, out, "instructed_retrieval", f"Retrieval with and without instructions ({rows[0]['retriever']})")
    result = {"task": "instructed", "rows": rows, "skipped": skipped}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nRetrieval with and without instructions\n\n{markdown_table(rows)}", flush=True)
    return result


def run_job(cfg: DictConfig) -> dict:
    """The whole job on a composed config (the entry point, and tests through Hydra's compose API)."""
    from pipelines.jobs import output_dir, start_job

    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {TASKS}")
    if cfg.task == "retrieval":
        out, _ = start_job(cfg)
        result = run_retrieval(cfg, out)
    else:  # scored in this process: no cluster to reach
        out = output_dir(cfg)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        result = {"toolcall": run_toolcall, "qa": run_qa, "instructed": run_instructed}[cfg.task](cfg, out)
    print(f"\nResults in {out}", flush=True)
    return result


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    main()
