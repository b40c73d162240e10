"""Our retrieval metrics against pytrec_eval (trec_eval) on the same runs, plus hand-computed cases for C@k."""

from __future__ import annotations

import math
import random

import pytest

from pipelines.metrics import evaluate_per_query, evaluate_run, ranked_doc_ids

pytrec_eval = pytest.importorskip("pytrec_eval")

NDCG_KS = (1, 3, 5, 10, 20)
RECALL_KS = (1, 5, 10, 20)
MAP_K = 10
MRR_K = 10


def random_world(seed: int, queries: int = 120, docs: int = 40) -> tuple[dict, dict]:
    """Runs with many exact score ties, graded qrels (0-3), queries missing from the run or from the qrels."""
    rng = random.Random(seed)
    doc_ids = [f"d{i}" for i in range(docs)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(queries):
        query_id = f"q{q}"
        if rng.random() < 0.9:
            judged = rng.sample(doc_ids, rng.randint(1, 12))
            qrels[query_id] = {doc_id: rng.choice([0, 0, 1, 1, 2, 3]) for doc_id in judged}
        if rng.random() < 0.85:
            retrieved = rng.sample(doc_ids, rng.randint(1, docs))
            # scores from a small set: ties are everywhere, as with quantised or duplicated embeddings
            run[query_id] = {doc_id: float(rng.randint(0, 6)) / 2 for doc_id in retrieved}
    return run, qrels


def truncated(run: dict[str, dict[str, float]], k: int) -> dict[str, dict[str, float]]:
    """The run cut to its top k under trec_eval's order, so that recip_rank becomes MRR@k."""
    return {
        query_id: dict(sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])
        for query_id, scores in run.items()
    }


def reference(run, qrels) -> dict[str, dict[str, float]]:
    """pytrec_eval's figures under our metric names, for the queries pytrec_eval evaluates (in run and qrels)."""
    measures = {
        "ndcg_cut." + ",".join(map(str, NDCG_KS)),
        "recall." + ",".join(map(str, RECALL_KS)),
        f"map_cut.{MAP_K}",
    }
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(truncated(run, MRR_K))
    out = {}
    for query_id, row in full.items():
        mapped = {f"ndcg@{k}": row[f"ndcg_cut_{k}"] for k in NDCG_KS}
        mapped |= {f"recall@{k}": row[f"recall_{k}"] for k in RECALL_KS}
        mapped[f"map@{MAP_K}"] = row[f"map_cut_{MAP_K}"]
        mapped[f"mrr@{MRR_K}"] = mrr[query_id]["recip_rank"]
        out[query_id] = mapped
    return out


def ours(run, qrels) -> dict[str, dict[str, float]]:
    return evaluate_per_query(
        run, qrels, ndcg_ks=NDCG_KS, recall_ks=RECALL_KS, mrr_k=MRR_K, map_k=MAP_K, completeness_ks=(5,)
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_per_query_metrics_match_pytrec_eval(seed):
    run, qrels = random_world(seed)
    expected = reference(run, qrels)
    got = ours(run, qrels)
    with_relevant = {q for q, judged in qrels.items() if any(grade > 0 for grade in judged.values())}
    assert set(got) == with_relevant
    missing = with_relevant - set(run)
    assert missing and with_relevant & set(run), "the random world must hold both kinds of query"
    for query_id in with_relevant & set(run):
        for name, value in expected[query_id].items():
            assert got[query_id][name] == pytest.approx(value, abs=1e-6), (query_id, name)
    for query_id in missing:
        assert all(value == 0.0 for value in got[query_id].values()), query_id


def test_means_match_pytrec_eval_with_missing_queries_as_zero():
    run, qrels = random_world(7)
    expected = reference(run, qrels)
    evaluated = [q for q, judged in qrels.items() if any(grade > 0 for grade in judged.values())]
    means = evaluate_run(
        run, qrels, ndcg_ks=NDCG_KS, recall_ks=RECALL_KS, mrr_k=MRR_K, map_k=MAP_K, completeness_ks=(5,)
    )
    assert means["queries"] == len(evaluated)
    for name in expected[next(iter(expected))]:
        reference_mean = sum(expected.get(q, {}).get(name, 0.0) for q in evaluated) / len(evaluated)
        assert means[name] == pytest.approx(reference_mean, abs=1e-6), name


def test_ties_are_broken_by_doc_id_descending():
    assert ranked_doc_ids({"a": 1.0, "c": 1.0, "b": 2.0, "d": 1.0}) == ["b", "d", "c", "a"]
    # same scores, the relevant doc "a" sorts last among the ties: rank 3, as trec_eval ranks it
    row = evaluate_per_query({"q": {"a": 0.5, "b": 0.5, "c": 0.5}}, {"q": {"a": 1}})["q"]
    assert row["mrr@10"] == pytest.approx(1 / 3)
    assert row["ndcg@1"] == 0.0
    assert row["ndcg@5"] == pytest.approx(1 / math.log2(4))


def test_graded_gains_and_ideal_from_qrels():
    # the run finds only the grade-1 doc; the ideal ranking holds the grade-3 doc it missed
    row = evaluate_per_query({"q": {"low": 1.0}}, {"q": {"low": 1, "high": 3}}, ndcg_ks=(2,))["q"]
    assert row["ndcg@2"] == pytest.approx(1 / (3 + 1 / math.log2(3)))
    assert row["recall@5"] == 0.5
    assert row["map@100"] == pytest.approx(0.5)


def test_completeness_by_hand():
    qrels = {"both": {"t1": 1, "t2": 2, "noise": 0}, "one": {"t3": 1}}
    run = {
        "both": {"t1": 0.9, "x1": 0.8, "x2": 0.7, "x3": 0.6, "x4": 0.55, "t2": 0.5},  # t2 at rank 6
        "one": {"t3": 0.1},
    }
    per_query = evaluate_per_query(run, qrels, completeness_ks=(1, 5, 6))
    assert per_query["both"]["c@1"] == 0.0
    assert per_query["both"]["c@5"] == 0.0  # recall@5 is 0.5, but the agent lacks a tool it needs
    assert per_query["both"]["recall@5"] == 0.5
    assert per_query["both"]["c@6"] == 1.0
    assert per_query["one"]["c@1"] == 1.0
    assert evaluate_run(run, qrels, completeness_ks=(5,))["c@5"] == 0.5


def test_query_without_relevant_docs_is_skipped_and_missing_query_scores_zero():
    qrels = {"judged_only_irrelevant": {"d1": 0}, "answered": {"d1": 1}, "unanswered": {"d2": 1}}
    run = {"judged_only_irrelevant": {"d1": 1.0}, "answered": {"d1": 1.0}, "not_in_qrels": {"d1": 1.0}}
    per_query = evaluate_per_query(run, qrels)
    assert set(per_query) == {"answered", "unanswered"}
    assert all(value == 1.0 for value in per_query["answered"].values())
    assert all(value == 0.0 for value in per_query["unanswered"].values())
    means = evaluate_run(run, qrels)
    assert means["queries"] == 2
    assert means["ndcg@10"] == 0.5
    assert set(means) == {
        "ndcg@1", "ndcg@5", "ndcg@10", "ndcg@100", "recall@5", "recall@10", "recall@20", "recall@100",
        "mrr@10", "map@100", "c@5", "c@10", "c@20", "queries",
    }  # fmt: skip


def test_no_relevant_document_anywhere_is_an_error():
    with pytest.raises(ValueError, match="no query"):
        evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 0}})
    with pytest.raises(ValueError, match="cutoffs"):
        evaluate_per_query({}, {"q": {"d": 1}}, ndcg_ks=(0,))
