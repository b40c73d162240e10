"""The ToolRet recipe: disjoint splits, hard negatives, false-negative-free batches, and a tiny end-to-end run on Ray
(training on Ray Train, a trained encoder the retriever loads, the results table, resume)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import pipelines.config  # noqa: F401
from pipelines.data.beir import RetrievalTask
from pipelines.data.tool_pairs import (
    ToolSplit,
    batch_rows,
    check_disjoint,
    fit_batches,
    mine_hard_negatives,
    plan_batches,
    relevant_tools,
    split_task,
    synthetic_tool_task,
    training_pairs,
)
from tests.conftest import REPO


def toy_task(tools: int = 12, queries_per_tool: int = 4) -> RetrievalTask:
    """Single-tool queries (several per tool, like APIBench), some two-tool queries, and one duplicated text."""
    corpus = [{"id": f"t{i}", "title": f"tool {i}", "text": f"does thing number {i}"} for i in range(tools)]
    queries, qrels = {}, {}
    for i in range(tools):
        for j in range(queries_per_tool):
            queries[f"q{i}-{j}"] = f"please do thing {i}, variant {j}"
            qrels[f"q{i}-{j}"] = {f"t{i}": 1}
    for i in range(0, tools - 1, 2):
        queries[f"pair{i}"] = f"do things {i} and {i + 1}"
        qrels[f"pair{i}"] = {f"t{i}": 1, f"t{i + 1}": 1}
    queries["twin-a"], qrels["twin-a"] = "Please do thing 3,  variant 0", {"t3": 1}  # same text as q3-0
    return RetrievalTask("toy", corpus, queries, qrels, dict.fromkeys(queries, "find the tool"))


def test_split_holds_out_tools_and_queries_disjointly():
    task = toy_task()
    split = split_task(task, test_tool_fraction=0.25, test_query_fraction=0.25, seed=0)
    held = set(split.held_out_tools)
    assert len(held) == 3
    trained = {d for q in split.train for d in relevant_tools(task, q)}
    assert split.unseen_tools and split.seen_tools and split.train
    assert all(relevant_tools(task, q) <= held for q in split.unseen_tools)
    assert not trained & held
    assert all(relevant_tools(task, q) <= trained for q in split.seen_tools)
    assert not set(split.train) & (set(split.unseen_tools) | set(split.seen_tools))
    assert not set(split.unseen_tools) & set(split.seen_tools)
    texts = {" ".join(task.queries[q].lower().split()) for q in split.train}
    assert not any(" ".join(task.queries[q].lower().split()) in texts for q in split.unseen_tools + split.seen_tools)
    # every judged query is accounted for: a split part, or dropped for a stated reason
    parts = len(split.train) + len(split.unseen_tools) + len(split.seen_tools)
    dropped = split.dropped_straddling + split.dropped_duplicates + split.dropped_untrained
    assert parts + dropped == len(task.queries)
    assert split.stats["unseen_tools_tools_in_train"] == 0
    assert split.stats["seen_tools_tools_in_train"] == split.stats["seen_tools_tools"]
    again = split_task(task, 0.25, 0.25, seed=0)
    assert again.to_dict() == split.to_dict() and ToolSplit.from_dict(split.to_dict()) == split
    assert split_task(task, 0.25, 0.25, seed=1).held_out_tools != split.held_out_tools
    capped = split_task(task, 0.25, 0.25, max_train=5, max_test=2, seed=0)
    assert len(capped.train) == 5 and len(capped.unseen_tools) == 2 and len(capped.seen_tools) <= 2


def test_split_rejects_leaks_and_bad_fractions():
    task = toy_task()
    split = split_task(task, 0.25, 0.25, seed=0)
    leak = ToolSplit.from_dict({**split.to_dict(), "train": split.train + split.unseen_tools[:1]})
    with pytest.raises(ValueError, match=f"shares query '{split.unseen_tools[0]}' with training"):
        check_disjoint(task, leak)
    held_query = next(q for q in task.queries if relevant_tools(task, q) <= set(split.held_out_tools))
    leak = ToolSplit.from_dict({**split.to_dict(), "train": split.train + [held_query],
                                "unseen_tools": [q for q in split.unseen_tools if q != held_query]})
    with pytest.raises(ValueError, match="needs held-out tool"):
        check_disjoint(task, leak)
    with pytest.raises(ValueError, match="recipe.test_tool_fraction=1.0"):
        split_task(task, 1.0, 0.25)


def test_hard_negatives_come_from_the_ranking_minus_relevant_and_held_out():
    task = toy_task()
    run = {"pair0": {f"t{i}": 1.0 - i / 100 for i in range(12)}}  # t0, t1, t2, ... best first
    negatives = mine_hard_negatives(run, task, ["pair0"], excluded={"t2", "t4"}, count=2, depth=3, seed=0)
    assert len(negatives["pair0"]) == 2 and set(negatives["pair0"]) <= {"t3", "t5", "t6"}
    assert negatives["pair0"] == sorted(negatives["pair0"], key=lambda d: int(d[1:]))  # kept in rank order
    with pytest.raises(ValueError, match="query 'pair0' has 1 candidate hard negatives in the top 1"):
        mine_hard_negatives(run, task, ["pair0"], excluded=set(), count=2, depth=1)


def test_batches_hold_only_true_in_batch_negatives():
    task = toy_task(tools=40, queries_per_tool=5)
    split = split_task(task, 0.25, 0.0, seed=0)
    run = {q: {d["id"]: float(-abs(int(d["id"][1:]) - int(q[1:].split("-")[0]))) if q.startswith("q") else 0.0
               for d in task.corpus} for q in split.train}  # neighbours of a query's own tool rank first
    negatives = mine_hard_negatives(run, task, split.train, set(split.held_out_tools), 1, 5)
    pairs = training_pairs(task, split.train, negatives)
    assert len(pairs) == sum(len(relevant_tools(task, q)) for q in split.train)
    plan = plan_batches(pairs, batch_size=8, steps=30, seed=0)
    assert len(plan) == 30 and all(len(batch) == 8 for batch in plan)
    for batch in plan:
        rows = [pairs[i] for i in batch]
        for row in rows:
            relevant = relevant_tools(task, row["query_id"])
            others = [o for o in rows if o is not row]
            assert all(o["query_id"] != row["query_id"] for o in others)
            assert not relevant & {d for o in others for d in [o["positive_id"], *o["negative_ids"]]}
            assert not relevant & set(row["negative_ids"])
    used = np.bincount([i for batch in plan for i in batch], minlength=len(pairs))
    assert used.min() >= 1 and used.max() - used.min() <= 2  # every pair used, about equally often
    rows = batch_rows(pairs, plan)
    assert [(r["step"], r["slot"]) for r in rows[:9]] == [(0, s) for s in range(8)] + [(1, 0)]
    with pytest.raises(ValueError, match="cannot fill a batch of 30 pairs"):
        plan_batches(pairs, batch_size=30, steps=1)
    size, _ = fit_batches(pairs, wanted=30, steps=5, multiple_of=2)
    assert size % 2 == 0 and 8 <= size < 30


def test_synthetic_tool_task_and_its_split(small_world):
    task = synthetic_tool_task(small_world)
    assert sorted(d["id"] for d in task.corpus) == sorted(t["name"] for t in small_world.tools())
    some = small_world.tool_tasks("train")[0]
    assert set(task.qrels[some["id"]]) == {call["name"] for call in some["gold_calls"]}
    split = split_task(task, 0.25, 0.25, max_train=50, max_test=20, seed=0)
    assert len(split.held_out_tools) == 1 and split.unseen_tools and split.seen_tools


@pytest.mark.shared_data
def test_shared_tool_set_split_is_disjoint(shared_data):
    from pipelines.data.toolsets import load_tool_task

    task = load_tool_task("apibench_torchhub", shared_data, max_queries=None)
    split = split_task(task, 0.25, 0.25, max_train=300, max_test=120, seed=0)
    check_disjoint(task, split)
    assert split.stats["corpus"] == len(task.corpus) == 94
    assert split.stats["unseen_tools_queries"] > 20 and split.stats["train_queries"] > 50


def test_training_rows_are_checked_before_training():
    from pipelines.train_embedder import steps_of

    with pytest.raises(ValueError, match="row 0: field 'positive' is missing"):
        steps_of([{"step": 0, "slot": 0, "query": "q", "negatives": []}])
    with pytest.raises(ValueError, match="step 0 has slots that are not 0..1"):
        steps_of([{"step": 0, "slot": s, "query": "q", "positive": "p", "negatives": []} for s in (0, 2)])


TINY = ["recipe=toolret", "recipe.source=synthetic", "recipe.max_train_queries=40", "recipe.max_test_queries=12",
        "recipe.steps=4", "recipe.batch_size=4", "recipe.num_workers=2", "recipe.lr=1e-4", "recipe.warmup_steps=0",
        "recipe.max_seq_length=64", "recipe.train_max_seq_length=32", "recipe.report_every=2", "recipe.eval_cpus=0.5"]


@pytest.mark.slow
def test_toolret_recipe_end_to_end_on_ray_and_resume(ray_cluster, small_world, tmp_path, monkeypatch):
    from actors.retriever import Embedder
    from pipelines.recipes import toolret

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*TINY, f"output_dir={tmp_path}"])
    rows = toolret.run_toolret(cfg, tmp_path, {"world": small_world})

    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) == 4  # one dataset x two test groups x with/without instructions
    assert {"dataset", "test", "instructions", "queries", "tools_in_train", "ndcg@10 base", "ndcg@10 trained",
            "recall@10 base", "recall@10 trained", "c@10 base", "c@10 trained"} <= set(table[0])
    assert {r["test"] for r in table} == {"unseen_tools", "seen_tools"}
    assert all(0.0 <= float(r["ndcg@10 trained"]) <= 1.0 for r in table)
    for name in ("results.md", "timing.md", "train_loss.png", "curve_ndcg@10.png", "splits/synthetic_tools.json",
                 "base/synthetic_tools/result.json", "trained/synthetic_tools/result.json", "train/result.json"):
        assert (tmp_path / name).is_file(), name
    trained = json.loads((tmp_path / "train" / "result.json").read_text())
    assert trained["steps"] == 4 and len(trained["history"]) == 4 and trained["batch_size"] % 2 == 0
    metrics_rows = list(csv.DictReader(open(tmp_path / "train" / "embedder_metrics.csv")))
    assert [int(float(r["step"])) for r in metrics_rows] == [1, 2, 3, 4]

    # the exported encoder is what retriever.model_path loads, and it is not the base model any more
    texts = ["What is the elevation of Vezo in kilometres?", "convert_units: Convert a length or a mass"]
    base, tuned = Embedder(None, 64, "cpu").encode(texts), Embedder(trained["embedder"], 64, "cpu").encode(texts)
    assert tuned.shape == base.shape and np.allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-5)
    assert np.abs(tuned - base).max() > 1e-3
    assert not (tmp_path / "embedder" / "trainer_state.pt").exists()

    # a rerun on the same folder reuses every finished stage: no training, no encoding
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("pipelines.train_embedder.run_embedder_training", refuse)
    monkeypatch.setattr(toolret, "evaluate_encoder", refuse)
    assert toolret.run_toolret(cfg, tmp_path, {"world": small_world}) == rows


def test_embedder_training_resumes_exactly_from_a_checkpoint(tmp_path):
    """The in-process core Ray Train runs per worker: a saved and reloaded trainer repeats the uninterrupted steps."""
    from pipelines.train_embedder import EmbedderSettings, EmbedderTrainer

    rows = [{"step": s, "slot": i, "query": f"query {s} {i}", "positive": f"tool {s} {i} does it",
             "negatives": [f"tool {s} {i} does something else"]} for s in range(3) for i in range(2)]
    settings = EmbedderSettings(max_seq_length=32, lr=1e-4)
    trainer = EmbedderTrainer(settings, rows)
    trainer.step()
    trainer.save(tmp_path)
    uninterrupted = [trainer.step()["loss"] for _ in range(2)]
    resumed = EmbedderTrainer(settings, rows)
    resumed.load(tmp_path)
    assert resumed.step_index == 1
    assert [resumed.step()["loss"] for _ in range(2)] == uninterrupted
