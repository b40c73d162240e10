"""The E-step at scale: Ray Data streams questions through agent actors that sample, score and weight trajectories.

For each question x the current policy samples K ExSearch trajectories z_1..z_K (engine actors + retriever actors),
the same policy scores log p(y | x, z_k) of the gold answer y written at the end of each trajectory (`score`, summed
or averaged over the answer's tokens), and the importance weights are w_k = softmax_k(log p(y | x, z_k) / T) over the
K samples *of that question only*. Each weighted sample is the trajectory up to its answer followed by the gold
answer (ExSearch's choice: the M-step learns to reason towards, and then write, the right answer), with the loss mask
of the trajectory (observations masked) and 1 on the gold answer.

Output: `shard-NNNNN.parquet` files of `weighted_sample` records, each covering a fixed slice of the input examples,
written atomically when the slice is complete, plus `manifest.json` at the end. A rerun skips finished shards, so
an interrupted job resumes without duplicating or losing an example. Rows that cannot be used (no id, no question,
no gold answer) go to `quarantine.jsonl` with the reason, and the job goes on.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import records
from pipelines.shards import plan_shards, shard_path, write_atomically, write_quarantine

log = logging.getLogger(__name__)


@dataclass
class EStepConfig:
    """Sampling and weighting of the E-step (Hydra: `recipe.estep`)."""

    samples_per_question: int = 4
    weight_temperature: float = 1.0
    """Softmax temperature over a question's samples: higher flattens the weights towards uniform."""
    score_reduce: str = "sum"
    """How a gold answer's token logprobs become log p(y | x, z): `sum` (the likelihood) or `mean` (length-fair)."""
    shard_size: int = 64
    """Questions per output shard: the unit of resumption."""
    batch_size: int = 16
    """Questions per agent batch (one Ray Data batch; every round of it is one engine call)."""
    concurrency: int = 1
    """Agent actors in the Ray Data actor pool (never more than there are batches: an idle actor costs a start-up)."""
    seed: int = 0
    weighting: str = "posterior"
    """`posterior`: a softmax over the question's K samples, the self-normalised estimate of p(z | x, y); every question
    weighs 1 in all, so one whose samples all missed still trains on its least-bad sample. `likelihood`: p(y | x, z)
    itself (tempered by `weight_temperature`), the unbiased estimate of the gradient of p(y | x); samples that missed
    weigh almost nothing. Measured on the tiny demo policy: docs/results/exsearch_study.md."""

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"recipe.estep.weighting={self.weighting!r} is not one of {WEIGHTINGS}")

    def weights(self, log_likelihoods: Sequence[float]) -> list[float]:
        """One question's importance weights, from its samples' log p(gold answer | x, z)."""
        if self.weighting == "likelihood":
            return likelihood_weights(log_likelihoods, self.weight_temperature)
        return softmax_weights(log_likelihoods, self.weight_temperature)


WEIGHTINGS = ("posterior", "likelihood")


def likelihood_weights(log_likelihoods: Sequence[float], temperature: float = 1.0) -> list[float]:
    """p(y | x, z) ** (1 / temperature) per sample, not normalised over the question."""
    if temperature <= 0:
        raise ValueError(f"weight_temperature={temperature} must be > 0")
    return np.exp(np.minimum(np.asarray(log_likelihoods, dtype=np.float64), 0.0) / temperature).tolist()


def softmax_weights(log_likelihoods: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Normalised importance weights of one question's samples (max-shifted, so very negative scores are safe)."""
    if temperature <= 0:
        raise ValueError(f"weight_temperature={temperature} must be > 0")
    values = np.asarray(log_likelihoods, dtype=np.float64) / temperature
    values = np.exp(values - values.max())
    return (values / values.sum()).tolist()


def weight_entropy(weights: Sequence[float]) -> float:
    """Entropy of one question's weights (normalised first) in nats: log K when uniform, 0 when one sample takes all."""
    total = float(sum(weights))
    return float(-sum(w / total * math.log(w / total) for w in weights if w > 0)) if total > 0 else 0.0


def check_example(row: dict) -> str | None:
    """Why a question row cannot be sampled, or None."""
    if not row.get("id"):
        return "field 'id' is missing or empty"
    if not (row.get("question") or "").strip():
        return "field 'question' is missing or empty"
    answers = row.get("answers")
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        return "field 'answers' has no non-empty gold answer"
    documents = row.get("documents")
    if documents is not None and not all(isinstance(d, dict) and d.get("id") for d in documents):
        return "field 'documents' must be a list of passages, each with an 'id'"
    return None


class ExSearchSampler:
    """A Ray Data actor UDF: one ExSearch agent over shared engine and retriever actors; batch in, weighted out."""

    def __init__(self, engines: list, retriever: Any, tokenizer: Any, agent: dict, estep: dict,
                 timeout_s: float = 600.0):
        """`tokenizer`: the policy's tokenizer object, loaded once by the caller (`exsearch_sampler_args`). Loading
        it here meant `from transformers import AutoTokenizer`, which imports torch and sklearn: ~3-5 s of every
        sampler actor's start-up on 2 cores, where unpickling the object takes under 1 s and imports neither."""
        from actors.llm import EnginePool
        from agents.exsearch import ExSearchAgent, ExSearchConfig

        self.pool = EnginePool(engines, timeout_s=timeout_s)
        self.tokenizer = tokenizer
        self.agent = ExSearchAgent(self.pool, retriever, self.tokenizer, ExSearchConfig(**agent))
        self.estep = EStepConfig(**estep)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from agents.exsearch import answer_scoring_pair
        from pipelines.qa_metrics import exact_match

        examples = batch.to_pylist()
        k = self.estep.samples_per_question
        seed = self.estep.seed + zlib.crc32(" ".join(e["id"] for e in examples).encode()) % 100_000
        trajectories = self.agent.run(examples, samples=k, seed=seed)
        pairs = [answer_scoring_pair(t, examples[i // k]["answers"][0], self.tokenizer, self.agent.cfg)
                 for i, t in enumerate(trajectories)]
        scores = self.pool.score(pairs)
        reduce = np.mean if self.estep.score_reduce == "mean" else np.sum
        log_likelihoods = [float(reduce(s)) for s in scores]
        rows = []
        for index, example in enumerate(examples):
            group = range(index * k, (index + 1) * k)
            weights = self.estep.weights([log_likelihoods[i] for i in group])
            for i, weight in zip(group, weights, strict=True):
                t, (context, continuation) = trajectories[i], pairs[i]
                kept = len(context) - len(t.prompt_ids)
                rows.append({
                    "example_id": example["id"],
                    "target": "policy",
                    "sample_index": t.sample_index,
                    "prompt_ids": t.prompt_ids,
                    "token_ids": context[len(t.prompt_ids):] + continuation,
                    "loss_mask": t.loss_mask[:kept] + [1] * len(continuation),
                    "log_likelihood": log_likelihoods[i],
                    "weight": weight,
                    "answer": t.answer,
                    "correct": bool(t.answer is not None and exact_match(t.answer, example["answers"])),
                    "valid": t.valid,
                })
        return records.to_table(rows, "weighted_sample")


@dataclass
class EStepSummary:
    examples: int
    samples: int
    quarantined: int
    shards_written: int
    shards_reused: int
    valid_rate: float
    correct_rate: float
    mean_weight_entropy: float
    tokens_per_s: float
    seconds: float

    def rows(self) -> list[dict]:
        return [{"figure": key, "value": value} for key, value in asdict(self).items()]


def run_exsearch_estep(
    examples: Sequence[dict],
    out_dir: str | os.PathLike,
    engines: list,
    retriever: Any,
    model_path: str | os.PathLike,
    agent: dict | None = None,
    estep: EStepConfig | None = None,
    config: dict | None = None,
) -> EStepSummary:
    """Sample, score and weight K ExSearch trajectories per example; resumable by shard."""
    estep = estep or EStepConfig()
    return run_estep(examples, out_dir, ExSearchSampler,
                     exsearch_sampler_args(engines, retriever, model_path, agent or {}, estep), estep, config)


def exsearch_sampler_args(engines: list, retriever: Any, model_path: str | os.PathLike, agent: dict,
                          estep: EStepConfig) -> tuple:
    """ExSearchSampler's constructor arguments, with the policy's tokenizer loaded here, once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    return (list(engines), retriever, tokenizer, agent, asdict(estep))


def run_estep(
    examples: Sequence[dict],
    out_dir: str | os.PathLike,
    sampler: type,
    sampler_args: tuple,
    estep: EStepConfig,
    config: dict | None = None,
) -> EStepSummary:
    """Stream `examples` through a pool of `sampler(*sampler_args)` actors; write every finished slice of examples
    as one shard; skip shards already written. The sampler turns a batch of examples into weighted-sample rows,
    at least one per example (how a shard is known to be complete)."""
    import ray.data

    started = time.perf_counter()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    good, quarantined = [], []
    for index, row in enumerate(examples):
        problem = check_example(row)
        if problem:
            quarantined.append({"row": index, "id": row.get("id"), "reason": problem})
        else:
            example = {"id": row["id"], "question": row["question"], "answers": list(row["answers"]),
                       "supporting_passage_ids": list(row.get("supporting_passage_ids") or [])}
            if row.get("documents") is not None:  # candidates searched beforehand (DRO: questions of other worlds)
                example["documents"] = [dict(d) for d in row["documents"]]
            good.append(example)
    write_quarantine(folder, quarantined, "example")
    shards, pending = plan_shards(good, estep.shard_size, folder)
    shard_of = {example["id"]: i for i in pending for example in shards[i]}
    print(f"[E-step] {len(good)} questions x {estep.samples_per_question} samples: {len(pending)} of {len(shards)} "
          f"shards to do", flush=True)
    if pending:
        todo = [example for i in pending for example in shards[i]]
        dataset = ray.data.from_items(todo).map_batches(
            sampler,
            fn_constructor_args=sampler_args,
            batch_size=estep.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(estep.concurrency, -(-len(todo) // estep.batch_size))),
            num_cpus=0.1,  # the sampler mostly waits on engine and retriever actors
        )
        buffered: dict[int, list[pa.Table]] = {i: [] for i in pending}
        counts = dict.fromkeys(pending, 0)
        seen: set[str] = set()
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for example_id in set(batch.column("example_id").to_pylist()) - seen:
                seen.add(example_id)
                counts[shard_of[example_id]] += 1
            for i in pending:
                part = batch.filter(pa.compute.is_in(batch.column("example_id"),
                                                     value_set=pa.array([e["id"] for e in shards[i]])))
                if part.num_rows:
                    buffered[i].append(part)
                if counts[i] == len(shards[i]) and buffered[i]:
                    _write_shard(folder, i, pa.concat_tables(buffered[i]))
                    buffered[i] = []
    table = pa.concat_tables([pq.read_table(shard_path(folder, i)) for i in range(len(shards))]) if shards else None
    total = table.num_rows if table is not None else 0
    present = set(table.column("example_id").to_pylist()) if table is not None else set()
    missing = [e["id"] for e in good if e["id"] not in present]
    if missing:
        raise RuntimeError(f"E-step output in {folder} lacks {len(missing)} example(s), e.g. {missing[:3]}")
    records.write_manifest(folder, "weighted_sample", total, config,
                           examples=len(good), quarantined=len(quarantined))
    entropies, tokens = [], 0
    if table is not None:
        frame = table.select(["example_id", "target", "weight", "valid", "correct"]).to_pandas()
        # DRO writes each permutation's weight twice (selector row, generator row): count each sample once
        frame = frame[frame["target"] != "selector"]
        entropies = frame.groupby("example_id")["weight"].apply(weight_entropy).tolist()
        tokens = int(sum(len(x) for x in table.column("token_ids").to_pylist()))
    seconds = time.perf_counter() - started
    summary = EStepSummary(
        examples=len(good),
        samples=total,
        quarantined=len(quarantined),
        shards_written=len(pending),
        shards_reused=len(shards) - len(pending),
        valid_rate=float(table.column("valid").to_numpy().mean()) if total else 0.0,
        correct_rate=float(table.column("correct").to_numpy().mean()) if total else 0.0,
        mean_weight_entropy=float(np.mean(entropies)) if entropies else 0.0,
        tokens_per_s=tokens / seconds if pending else 0.0,
        seconds=seconds,
    )
    from pipelines.report import markdown_table

    print(f"[E-step] done: {folder}\n" + markdown_table(summary.rows()), flush=True)
    return summary


def _write_shard(folder: Path, index: int, table: pa.Table) -> None:
    """Write to a temporary name and rename: a shard file either exists complete or not at all."""
    table = records.validate_table(table.sort_by([("example_id", "ascending"), ("target", "ascending"),
                                                  ("sample_index", "ascending")]),
                                   "weighted_sample", source=f"shard {index}")
    write_atomically(shard_path(folder, index), lambda path: pq.write_table(table, path))


class DROSampler:
    """A Ray Data actor UDF for DRO: sample m permutations per question from the selector, merge duplicates, score the
    generator's log p(gold | x, selected documents) for each distinct one, and weight them with a softmax over the
    question's distinct permutations. Each distinct permutation gives two rows with the same weight: the selector's
    turn (`target=selector`) and the generator's answer from those documents (`target=generator`), so one M-step
    trains both (one model plays both roles). A question whose samples were all invalid still yields a generator row
    on the retriever's own order, weight 1, so the question counts as done."""

    def __init__(self, engines: list, retriever: Any, model_path: str, selector: dict, estep: dict,
                 timeout_s: float = 600.0):
        from transformers import AutoTokenizer

        from actors.llm import EnginePool
        from agents.selector import SelectorAgent, SelectorConfig

        self.pool = EnginePool(engines, timeout_s=timeout_s)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.agent = SelectorAgent(self.pool, retriever, self.tokenizer, SelectorConfig(**selector))
        self.estep = EStepConfig(**estep)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from agents.selector import dedupe_permutations, generator_scoring_pair

        examples = batch.to_pylist()
        seed = self.estep.seed + zlib.crc32(" ".join(e["id"] for e in examples).encode()) % 100_000
        selections = self.agent.select(examples, samples=self.estep.samples_per_question, seed=seed)
        distinct = dedupe_permutations(selections)
        by_example: dict[str, list] = {e["id"]: [] for e in examples}
        for selection, count in distinct:
            by_example[selection.example_id].append((selection, count))
        cfg, k = self.agent.cfg, self.agent.cfg.k
        fallback = {s.example_id: s for s in selections}
        jobs = []  # (example, documents, selection or None)
        for example in examples:
            options = by_example[example["id"]]
            if options:
                jobs.extend((example, s.selected, s) for s, _ in options)
            else:
                jobs.append((example, fallback[example["id"]].documents[:k], None))
        pairs = [generator_scoring_pair(e["question"], docs, e["answers"][0], self.tokenizer, cfg)
                 for e, docs, _ in jobs]
        reduce = np.mean if self.estep.score_reduce == "mean" else np.sum
        log_likelihoods = [float(reduce(x)) for x in self.pool.score(pairs)]
        rows = []
        for example in examples:
            group = [i for i, (e, _, _) in enumerate(jobs) if e["id"] == example["id"]]
            weights = self.estep.weights([log_likelihoods[i] for i in group])
            gold = set(example.get("supporting_passage_ids") or [])
            for i, weight in zip(group, weights, strict=True):
                _, documents, selection = jobs[i]
                recalled = bool(gold) and gold <= {str(d.get("id")) for d in documents}
                context, continuation = pairs[i]
                prompt_len = len(self.tokenizer(cfg.generator_template.format(question=example["question"]))["input_ids"])
                common = {"example_id": example["id"], "log_likelihood": log_likelihoods[i], "weight": weight,
                          "correct": recalled, "valid": selection is not None}
                if selection is not None:
                    t = selection.trajectory
                    rows.append({**common, "target": "selector", "sample_index": t.sample_index,
                                 "prompt_ids": t.prompt_ids, "token_ids": t.token_ids, "loss_mask": t.loss_mask,
                                 "answer": t.answer})  # the normalised permutation, e.g. "[2] > [1]"
                rows.append({**common, "target": "generator",
                             "sample_index": selection.trajectory.sample_index if selection is not None else 0,
                             "prompt_ids": context[:prompt_len], "token_ids": context[prompt_len:] + continuation,
                             "loss_mask": [0] * (len(context) - prompt_len) + [1] * len(continuation),
                             "answer": None})
        return records.to_table(rows, "weighted_sample")


def run_dro_estep(
    examples: Sequence[dict],
    out_dir: str | os.PathLike,
    engines: list,
    retriever: Any,
    model_path: str | os.PathLike,
    selector: dict | None = None,
    estep: EStepConfig | None = None,
    config: dict | None = None,
) -> EStepSummary:
    """The DRO E-step over `examples`; `correct_rate` in the summary is the share of rows whose documents hold every
    supporting passage (the selector's Recall@K at the question level)."""
    estep = estep or EStepConfig()
    return run_estep(examples, out_dir, DROSampler,
                     (list(engines), retriever, str(model_path), selector or {}, asdict(estep)), estep, config)
