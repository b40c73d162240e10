"""Retrieval metrics as plain functions with one signature: a run and qrels in, numbers out.

We compute them ourselves (no pytrec_eval at runtime: one less compiled dependency on every worker), but every
convention follows trec_eval, so that a figure from here can sit beside a published BEIR / MTEB / ToolRet figure:

- ranking: score descending, ties broken by document id *descending* (trec_eval's rule). Embedding retrievers often
  give exactly equal scores (duplicated or empty documents, quantised indexes); breaking ties another way shifts
  nDCG@10 by whole points on small corpora, and the difference would look like a model effect.
- nDCG@k: gain = graded relevance (negative grades count as 0), discount 1/log2(rank + 1), ideal ranking built from
  the qrels (not from what the run retrieved) and cut at k — trec_eval's `ndcg_cut_k`.
- Recall@k: relevant documents in the top k / all relevant documents of the query — trec_eval's `recall_k`.
- MAP@k: sum of precision at the rank of each relevant document within the top k, divided by *all* relevant
  documents of the query — trec_eval's `map_cut_k` (not divided by min(k, relevant), as some libraries do).
- MRR@k: 1 / rank of the first relevant document if it is within the top k, else 0 — trec_eval's `recip_rank` on a
  run truncated to k.
- C@k ("comprehensiveness", ToolRet): 1 if every relevant document is in the top k, else 0. A tool-using agent that
  retrieves only some of the tools a task needs still fails the task, which Recall@k hides.

A document is relevant when its grade is > 0. Queries whose qrels hold no relevant document are skipped (BEIR does
the same: no metric is defined for them); queries in the qrels but absent from the run score 0 on everything, so a
retriever that silently drops queries cannot look better than one that answers them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Run = dict[str, dict[str, float]]  # query id -> doc id -> score (higher = better)
Qrels = dict[str, dict[str, int]]  # query id -> doc id -> graded relevance (> 0 = relevant)


def ranked_doc_ids(scores: dict[str, float]) -> list[str]:
    """Document ids best first, with trec_eval's tie rule (score descending, then doc id descending)."""
    return [doc_id for doc_id, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def ndcg_at_k(ranking: Sequence[str], judgements: dict[str, int], k: int) -> float:
    """trec_eval's ndcg_cut_k: graded gains, log2 discount, ideal from the qrels cut at k."""
    dcg = sum(max(judgements.get(doc_id, 0), 0) / math.log2(rank + 2) for rank, doc_id in enumerate(ranking[:k]))
    ideal_gains = sorted((grade for grade in judgements.values() if grade > 0), reverse=True)[:k]
    ideal = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal_gains))
    return dcg / ideal if ideal > 0 else 0.0


def recall_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of all relevant documents found in the top k (trec_eval's recall_k)."""
    return sum(doc_id in relevant for doc_id in ranking[:k]) / len(relevant)


def average_precision_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    """trec_eval's map_cut_k for one query: precision at each relevant hit in the top k, over all relevant."""
    hits = 0
    precision_sum = 0.0
    for rank, doc_id in enumerate(ranking[:k], start=1):
        if doc_id in relevant:
            hits += 1
            precision_sum += hits / rank
    return precision_sum / len(relevant)


def reciprocal_rank_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    """1 / rank of the first relevant document within the top k, else 0."""
    for rank, doc_id in enumerate(ranking[:k], start=1):
        if doc_id in relevant:
            return 1.0 / rank
    return 0.0


def completeness_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    """ToolRet's C@k: 1 only when every relevant document is in the top k (the agent has all the tools it needs)."""
    return float(relevant <= set(ranking[:k]))


def evaluate_per_query(
    run: Run,
    qrels: Qrels,
    ndcg_ks: Sequence[int] = (1, 5, 10, 100),
    recall_ks: Sequence[int] = (5, 10, 20, 100),
    mrr_k: int = 10,
    map_k: int = 100,
    completeness_ks: Sequence[int] = (5, 10, 20),
) -> dict[str, dict[str, float]]:
    """Every metric for every query that has a relevant document; keys like "ndcg@10", "recall@5", "c@10"."""
    for name, ks in (("ndcg_ks", ndcg_ks), ("recall_ks", recall_ks), ("completeness_ks", completeness_ks)):
        if any(k < 1 for k in ks):
            raise ValueError(f"{name} must hold cutoffs >= 1, got {tuple(ks)}")
    if mrr_k < 1 or map_k < 1:
        raise ValueError(f"mrr_k and map_k must be >= 1, got mrr_k={mrr_k}, map_k={map_k}")
    results: dict[str, dict[str, float]] = {}
    for query_id, judgements in qrels.items():
        relevant = {doc_id for doc_id, grade in judgements.items() if grade > 0}
        if not relevant:
            continue
        ranking = ranked_doc_ids(run.get(query_id, {}))
        row: dict[str, float] = {}
        for k in ndcg_ks:
            row[f"ndcg@{k}"] = ndcg_at_k(ranking, judgements, k)
        for k in recall_ks:
            row[f"recall@{k}"] = recall_at_k(ranking, relevant, k)
        row[f"mrr@{mrr_k}"] = reciprocal_rank_at_k(ranking, relevant, mrr_k)
        row[f"map@{map_k}"] = average_precision_at_k(ranking, relevant, map_k)
        for k in completeness_ks:
            row[f"c@{k}"] = completeness_at_k(ranking, relevant, k)
        results[query_id] = row
    return results


def evaluate_run(run: Run, qrels: Qrels, **cutoffs) -> dict[str, float]:
    """Mean of each metric over the evaluated queries, plus "queries": how many were averaged.

    Takes the same cutoff arguments as `evaluate_per_query`. Raises when no query has a relevant document: a mean
    over nothing is undefined, and a silent 0.0 would read as a (terrible) result.
    """
    per_query = evaluate_per_query(run, qrels, **cutoffs)
    if not per_query:
        raise ValueError(f"no query in the qrels ({len(qrels)} queries) has a relevant document (grade > 0)")
    names = next(iter(per_query.values())).keys()
    means = {name: sum(row[name] for row in per_query.values()) / len(per_query) for name in names}
    means["queries"] = len(per_query)
    return means
