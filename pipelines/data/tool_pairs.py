"""Training pairs for tool retrieval: disjoint train/test splits, hard negatives, and batches without false negatives.

A tool-retrieval task (pipelines/data/toolsets.py: query -> the tools it needs, corpus = every tool of the dataset)
becomes a fine-tuning set here. Three choices decide whether a trained retriever's gain means anything:

- **The test queries are never trained on**, by id and by text (BFCL repeats a few requests word for word), and
  there are two kinds of them. `unseen tools`: a seeded share of the tools is held out with every query that needs
  only held-out tools, so the retriever meets those tools' documents for the first time at test time (queries that
  need both kinds are dropped: they would leak one side into the other). `seen tools`: held-out queries whose tools
  are all positives of training queries: what an in-domain deployment sees. The corpus stays the whole dataset in both.
- **Hard negatives come from the untrained retriever's ranking** (the near misses it actually makes), never a tool the
  query needs, and never a held-out tool: a held-out tool's document must not appear in training even as a negative.
- **In-batch negatives are true negatives.** InfoNCE (`pipelines.objectives.contrastive`) scores each query against
  every other row's positive and every hard negative; APIBench has ~10 queries per tool, so a random batch would often
  hold the same tool twice and teach the model to push a query away from its own tool. `plan_batches` builds batches
  in which no row's positive or negatives are relevant to another row's query.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from pipelines.data.beir import RetrievalTask
from pipelines.metrics import Run, ranked_doc_ids

TEST_GROUPS = ("unseen_tools", "seen_tools")


def relevant_tools(task: RetrievalTask, query_id: str) -> set[str]:
    return {doc_id for doc_id, grade in task.qrels.get(query_id, {}).items() if grade > 0}


def normalized(text: str) -> str:
    """What counts as "the same query": case and whitespace do not make a test query new."""
    return " ".join(text.lower().split())


SYNTHETIC_INSTRUCTION = "Given a request, retrieve the tools that must be called to answer it."


def synthetic_tool_task(world) -> RetrievalTask:
    """The synthetic world's tool tasks (every split) as a retrieval task over its tool specs: the fallback when the
    shared tool sets are absent. Five tools make it a small problem; it exercises the recipe, not the retriever."""
    from pipelines.data.toolsets import tool_document

    corpus = [tool_document(spec["name"], spec["name"], spec["description"], spec["parameters"])
              for spec in world.tools()]  # fmt: skip
    queries, qrels = {}, {}
    for split in ("train", "dev", "test"):
        for task in world.tool_tasks(split):
            queries[task["id"]] = task["query"]
            qrels[task["id"]] = dict.fromkeys(sorted({call["name"] for call in task["gold_calls"]}), 1)
    return RetrievalTask("synthetic_tools", corpus, queries, qrels, dict.fromkeys(queries, SYNTHETIC_INSTRUCTION))


@dataclass
class ToolSplit:
    """Query ids of one dataset's training set and its two disjoint test groups, and what was held out."""

    dataset: str
    train: list[str]
    unseen_tools: list[str]
    """Test queries whose every tool is held out (no training query needs it, no training row shows it)."""
    seen_tools: list[str]
    """Test queries whose every tool is a positive of some training query."""
    held_out_tools: list[str]
    dropped_straddling: int = 0
    """Queries needing held-out and training tools at once: in neither split."""
    dropped_duplicates: int = 0
    """Training queries removed because a test query has the same text."""
    dropped_untrained: int = 0
    """Held-out queries on the training side whose tools no (kept) training query needs: in neither split."""
    stats: dict = field(default_factory=dict)

    def test(self, group: str) -> list[str]:
        if group not in TEST_GROUPS:
            raise KeyError(f"test group {group!r} is not one of {TEST_GROUPS}")
        return getattr(self, group)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ToolSplit:
        return cls(**values)


def split_task(task: RetrievalTask, test_tool_fraction: float = 0.25, test_query_fraction: float = 0.25,
               max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> ToolSplit:  # fmt: skip
    """Hold out a seeded share of the tools (and their queries), then a share of the remaining queries; cap each part.

    The same seed and task give the same split on every machine (ids are sorted before the seeded shuffles), so a
    resumed run and a rerun evaluate the same queries.
    """
    for name, value in (("test_tool_fraction", test_tool_fraction), ("test_query_fraction", test_query_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"recipe.{name}={value} must be in [0, 1)")
    rng = random.Random(f"{seed}:{task.name}")
    judged = sorted(q for q in task.queries if relevant_tools(task, q))
    used = sorted({doc_id for q in judged for doc_id in relevant_tools(task, q)})
    rng.shuffle(used)
    held_count = round(test_tool_fraction * len(used))
    if test_tool_fraction > 0 and len(used) > 1:
        held_count = min(max(held_count, 1), len(used) - 1)  # keep at least one tool on each side
    held = set(used[:held_count])
    rng.shuffle(judged)
    unseen, pool, straddling = [], [], 0
    for query_id in judged:
        tools = relevant_tools(task, query_id)
        if tools <= held:
            unseen.append(query_id)
        elif tools & held:
            straddling += 1
        else:
            pool.append(query_id)
    seen_count = round(test_query_fraction * len(pool))
    candidates, train = pool[:seen_count], pool[seen_count:]
    unseen = unseen[:max_test]
    texts = {normalized(task.queries[q]) for q in unseen + candidates}
    kept = [q for q in train if normalized(task.queries[q]) not in texts][:max_train]
    trained = {doc_id for q in kept for doc_id in relevant_tools(task, q)}
    seen = [q for q in candidates if relevant_tools(task, q) <= trained]
    split = ToolSplit(task.name, kept, unseen, seen[:max_test], sorted(held), straddling,
                      sum(normalized(task.queries[q]) in texts for q in train), len(candidates) - len(seen))
    split.stats = split_stats(task, split)
    check_disjoint(task, split)
    return split


def split_stats(task: RetrievalTask, split: ToolSplit) -> dict:
    """Counts a reader needs to judge the split: queries per part, and how many test tools training has seen."""
    trained = {doc_id for q in split.train for doc_id in relevant_tools(task, q)}
    stats = {"corpus": len(task.corpus), "train_queries": len(split.train), "train_tools": len(trained),
             "held_out_tools": len(split.held_out_tools)}  # fmt: skip
    for group in TEST_GROUPS:
        tools = {doc_id for q in split.test(group) for doc_id in relevant_tools(task, q)}
        stats[f"{group}_queries"] = len(split.test(group))
        stats[f"{group}_tools"] = len(tools)
        stats[f"{group}_tools_in_train"] = len(tools & trained)
    return stats


def check_disjoint(task: RetrievalTask, split: ToolSplit) -> None:
    """Fail, naming the query or tool, if a test query (or its text, or an unseen-tools tool) leaks into training."""
    train = set(split.train)
    for group in TEST_GROUPS:
        shared = train & set(split.test(group))
        if shared:
            raise ValueError(f"{task.name}: test group {group} shares query {sorted(shared)[0]!r} with training")
    both = set(split.unseen_tools) & set(split.seen_tools)
    if both:
        raise ValueError(f"{task.name}: query {sorted(both)[0]!r} is in both test groups")
    train_texts = {normalized(task.queries[q]): q for q in split.train}
    for query_id in split.unseen_tools + split.seen_tools:
        twin = train_texts.get(normalized(task.queries[query_id]))
        if twin is not None:
            raise ValueError(f"{task.name}: test query {query_id!r} has the same text as training query {twin!r}")
    held = set(split.held_out_tools)
    for query_id in split.train:
        leaked = relevant_tools(task, query_id) & held
        if leaked:
            raise ValueError(f"{task.name}: training query {query_id!r} needs held-out tool {sorted(leaked)[0]!r}")
    for query_id in split.unseen_tools:
        if not relevant_tools(task, query_id) <= held:
            raise ValueError(f"{task.name}: unseen-tools test query {query_id!r} needs a tool that is not held out")
    trained = {doc_id for q in split.train for doc_id in relevant_tools(task, q)}
    for query_id in split.seen_tools:
        if not relevant_tools(task, query_id) <= trained:
            raise ValueError(f"{task.name}: seen-tools test query {query_id!r} needs a tool no training query needs")


def mine_hard_negatives(run: Run, task: RetrievalTask, query_ids: Sequence[str], excluded: set[str], count: int,
                        depth: int, seed: int = 0) -> dict[str, list[str]]:  # fmt: skip
    """Per query, `count` tools drawn (seeded) from the untrained retriever's top `depth` non-relevant, non-excluded
    hits, kept in rank order. Drawing from the top `depth` rather than taking the very top hits softens the damage of
    unjudged relevant tools (APIBench has near-duplicate APIs), which rank highest of all."""
    negatives = {}
    for query_id in query_ids:
        relevant = relevant_tools(task, query_id)
        ranked = [d for d in ranked_doc_ids(run.get(query_id, {})) if d not in relevant and d not in excluded][:depth]
        if len(ranked) < count:
            raise ValueError(
                f"{task.name}: query {query_id!r} has {len(ranked)} candidate hard negatives in the top {depth} "
                f"(needs recipe.hard_negatives={count}); lower hard_negatives or raise mine_depth"
            )
        rng = random.Random(f"{seed}:{task.name}:{query_id}")
        picked = set(rng.sample(range(len(ranked)), count))
        negatives[query_id] = [ranked[i] for i in sorted(picked)]
    return negatives


def training_pairs(task: RetrievalTask, query_ids: Sequence[str], negatives: dict[str, list[str]]) -> list[dict]:
    """One row per (query, relevant tool), with the query's hard negatives and every tool it needs (for batching)."""
    from actors.retriever import document_text

    texts = {doc["id"]: document_text(doc.get("title"), doc.get("text")) for doc in task.corpus}
    rows = []
    for query_id in query_ids:
        relevant = sorted(relevant_tools(task, query_id))
        for positive in relevant:
            rows.append({
                "dataset": task.name, "query_id": query_id, "query": task.queries[query_id],
                "positive_id": positive, "positive": texts[positive],
                "negative_ids": list(negatives[query_id]), "negatives": [texts[d] for d in negatives[query_id]],
                "relevant_ids": [f"{task.name}\x1f{d}" for d in relevant],
            })  # fmt: skip
    return rows


def _documents(row: dict) -> set[str]:
    """The row's positive and negatives, qualified by dataset (two datasets may reuse a tool id)."""
    return {f"{row['dataset']}\x1f{d}" for d in [row["positive_id"], *row["negative_ids"]]}


def plan_batches(pairs: Sequence[dict], batch_size: int, steps: int, seed: int = 0) -> list[list[int]]:
    """`steps` batches of `batch_size` pair indices in which every in-batch negative is a true negative.

    A pair joins a batch only when its query is not already there, its positive and negatives are relevant to no query
    there, and the batch's documents are relevant to none of its own tools. Epochs are seeded permutations; a pair that
    does not fit waits for the next batch, so over a run every pair is used about equally often.
    """
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size={batch_size} and steps={steps} must be >= 1")
    if len(pairs) < batch_size:
        raise ValueError(f"{len(pairs)} training pairs are fewer than recipe.batch_size={batch_size}")
    documents = [_documents(row) for row in pairs]
    relevant = [set(row["relevant_ids"]) for row in pairs]
    queries = [f"{row['dataset']}\x1f{row['query_id']}" for row in pairs]
    rng = random.Random(seed)

    def epoch() -> list[int]:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        return order

    def fill(queue: list[int]) -> tuple[list[int], list[int]] | None:
        """The first batch the queue's order gives (greedy) and the queue without it; None if it cannot fill one."""
        batch: list[int] = []
        waiting: list[int] = []
        batch_queries: set[str] = set()
        batch_documents: set[str] = set()
        batch_relevant: set[str] = set()
        for position, index in enumerate(queue):
            if len(batch) == batch_size:
                return batch, waiting + queue[position:]
            if (queries[index] not in batch_queries and not documents[index] & batch_relevant
                    and not relevant[index] & batch_documents):  # fmt: skip
                batch.append(index)
                batch_queries.add(queries[index])
                batch_documents |= documents[index]
                batch_relevant |= relevant[index]
            else:
                waiting.append(index)
        return (batch, waiting) if len(batch) == batch_size else None

    queue: list[int] = []
    batches: list[list[int]] = []
    while len(batches) < steps:
        if len(queue) < 2 * batch_size:
            queue.extend(epoch())
        filled = fill(queue)
        if filled is None:  # the leftovers of an epoch are too alike: mix in the next epoch
            queue.extend(epoch())
            filled = fill(queue)
        for _ in range(min(len(queue), 200)):  # a first pick that blocks a small tool set: start the batch elsewhere
            if filled is not None:
                break
            queue = queue[1:] + queue[:1]
            filled = fill(queue)
        if filled is None:
            raise ValueError(
                f"cannot fill a batch of {batch_size} pairs whose in-batch negatives are all true negatives: the "
                f"training set has too few distinct tools; lower recipe.batch_size"
            )
        batch, queue = filled
        batches.append(batch)
    return batches


def batch_rows(pairs: Sequence[dict], plan: Sequence[Sequence[int]]) -> list[dict]:
    """Training rows in step order: each carries its step and slot, so every worker finds its share of each step."""
    return [{"step": step, "slot": slot, "query": pairs[i]["query"], "positive": pairs[i]["positive"],
             "negatives": list(pairs[i]["negatives"])}
            for step, batch in enumerate(plan) for slot, i in enumerate(batch)]  # fmt: skip


def fit_batches(pairs: Sequence[dict], wanted: int, steps: int, multiple_of: int = 1,
                seed: int = 0) -> tuple[int, list[list[int]]]:  # fmt: skip
    """The largest batch size up to `wanted` (a multiple of the worker count) that `plan_batches` can fill for every
    step, with its plan. Tool sets with many tools get `wanted`; the synthetic world's five tools get a few pairs."""
    size = wanted - wanted % multiple_of
    while size >= multiple_of:
        try:
            return size, plan_batches(pairs, size, steps, seed)
        except ValueError:
            size -= multiple_of
    raise ValueError(
        f"no batch of {multiple_of} or more training pairs has only true in-batch negatives: the training set has "
        f"too few distinct tools for {multiple_of} workers (lower recipe.hard_negatives or recipe.num_workers)"
    )
