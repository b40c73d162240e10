"""The DRO recipe: a listwise selector and its generator, trained jointly by EM over document permutations.

    connect -> world -> single-hop questions (each step of the world's decompositions: a sub-question, its answer
    and the one passage that states it) -> index the passages -> warm start (SFT on scripted answers copied from the
    gold passage and scripted selections: random labels by default, so relevance is learnt from the generator
    alone, as in DRO; or the gold passage's) -> for t in 1..T:
        E-step (Ray Data, `run_dro_estep`: m permutations per question sampled from the selector, log p(gold | x, z)
                scored by the generator, weights from it: `recipe.estep.weighting`, likelihood by default)
        M-step (Ray Train, `weighted_nll` on the selector rows and the generator rows: one model plays both; in one
                pass on all rows, or in passes, `recipe.mstep_passes`)
        reload the engines, evaluate on held-out questions, keep the checkpoint only if dev score did not fall
    -> results.csv / results.md (iteration 0 = the warm start) + curve PNGs (selector Recall@K, generator EM / F1).

Why single-hop questions answered from a document: the tiny policy copies names from retrieved passages well but not
from the question to unseen entities, and DRO's generator answers from the selected passages, so every answer here is
a span of exactly one passage. Why the candidates are shuffled: the retriever alone ranks the gold passage first for
~94% of these questions, so a selector shown the retriever's order could score well by always writing "[1]". Each
question's N candidates are the retriever's top N (the question is the query) in a seeded per-question order, so the
selector's Recall@K measures what it learnt to read; the retriever's own Recall@K is reported beside it.

Every iteration writes `result.json` in its folder last; a rerun with the same output folder reuses finished
iterations, so a stopped job continues at the first unfinished step.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipelines.recipes.iterations import estep_questions, finished_result, write_result
from pipelines.report import markdown_table, plot_curves, write_table


def single_hop_questions(questions: Sequence[dict]) -> list[dict]:
    """One question per distinct decomposition step: {id, question, answers, supporting_passage_ids}.

    The world's multi-hop questions repeat steps ("Who founded X?" under several chains), so steps are distinct by
    their question text; ids keep the parent question's id and the step's position, so they stay traceable."""
    seen, out = set(), []
    for question in questions:
        for index, step in enumerate(question["decomposition"]):
            if step["question"] in seen:
                continue
            seen.add(step["question"])
            out.append({"id": f"{question['id']}-step{index}", "question": step["question"],
                        "answers": [step["answer"]], "supporting_passage_ids": [step["passage_id"]]})
    return out


@dataclass
class ShuffledSearcher:
    """A searcher whose hits come back in a seeded per-query order (the same order every time for one query).

    Picklable (a retriever handle and an int), so the E-step's Ray Data actors search exactly as evaluation does."""

    retriever: Any
    seed: int = 0

    def search(self, queries: Sequence[str], k: int) -> list[list[dict]]:
        results = self.retriever.search(list(queries), k)
        shuffled = []
        for query, hits in zip(queries, results, strict=True):
            hits = list(hits)
            random.Random(self.seed * 1_000_003 + zlib.crc32(query.encode())).shuffle(hits)
            shuffled.append(hits)
        return shuffled


WARM_START_SELECTIONS = ("gold", "random")
WARM_START_WORLDS, ESTEP_WORLDS = 20_000, 30_000
"""Seed offsets of the other worlds: the warm start's and the E-steps' never overlap."""


def warm_start_rows(examples: Sequence[dict], searcher, tokenizer, selector_cfg, selection: str = "gold",
                    seed: int = 0) -> list[dict]:
    """Scripted SFT rows, two per question whose gold passage is among its candidates: the selector writing a
    permutation, and the generator copying the answer from the gold passage (first, then the other candidates in
    shown order, up to k). Same token layout as `SelectorAgent` and `generator_scoring_pair`, so the warm start trains
    exactly what the E-step will sample and score.

    `selection="gold"`: the selector's permutation is the generator's (the gold passage first), so the warm start
    teaches relevance from labels. `selection="random"`: the selector writes a seeded random permutation of the
    candidates, so it learns the format and nothing about which passage answers; only DRO's EM, from the
    generator's likelihood, can teach it that (DRO's setting: question-answer pairs, no relevance labels)."""
    from agents.selector import format_permutation, generator_scoring_pair, render_ranking_observation

    if selection not in WARM_START_SELECTIONS:
        raise ValueError(f"recipe.warm_start_selection={selection!r} is not one of {WARM_START_SELECTIONS}")
    cfg, rows, rng = selector_cfg, [], random.Random(seed)
    candidates = searcher.search([e["question"] for e in examples], cfg.n_docs)
    for example, documents in zip(examples, candidates, strict=True):
        ids = [str(d.get("id")) for d in documents]
        gold = example["supporting_passage_ids"][0]
        if gold not in ids:
            continue
        first = ids.index(gold) + 1
        labels = [first] + [i for i in range(1, len(ids) + 1) if i != first][: cfg.k - 1]
        written = labels if selection == "gold" else rng.sample(range(1, len(ids) + 1), cfg.k)
        prompt = list(tokenizer(cfg.selector_template.format(question=example["question"]))["input_ids"])
        shown = list(tokenizer(render_ranking_observation(documents, cfg), add_special_tokens=False)["input_ids"])
        ranking = list(tokenizer(f" {format_permutation(written)}{cfg.ranking_stop}", add_special_tokens=False)["input_ids"])
        rows.append({"prompt_ids": prompt, "token_ids": shown + ranking,
                     "loss_mask": [0] * len(shown) + [1] * len(ranking), "weight": 1.0})
        selected = [documents[i - 1] for i in labels]
        context, answer = generator_scoring_pair(example["question"], selected, example["answers"][0], tokenizer, cfg)
        prompt_len = len(prompt_ids_of_generator(example["question"], tokenizer, cfg))
        rows.append({"prompt_ids": context[:prompt_len], "token_ids": context[prompt_len:] + answer,
                     "loss_mask": [0] * (len(context) - prompt_len) + [1] * len(answer), "weight": 1.0})
    return rows


def other_worlds(world, world_cfg, offsets: Sequence[int], seed: int):
    """For each offset, another seeded world (same sizes, other names): its single-hop train questions, without those
    that mention a name of `world` (so no fact of this world's dev or test entities is taught), and a searcher over
    its passages (an in-process BM25, shuffled like the main world's candidates)."""
    from actors.config import RetrieverConfig
    from actors.retriever import LocalRetriever, build_core, doc_table
    from pipelines.data.world import build_world

    names = {doc["title"] for doc in world.documents()}
    base = OmegaConf.to_object(world_cfg) if isinstance(world_cfg, DictConfig) else world_cfg
    for offset in offsets:
        other = build_world(replace(base, seed=base.seed + offset, dev_questions=1, test_questions=1))
        search = ShuffledSearcher(LocalRetriever([build_core(doc_table(other.documents()),
                                                             RetrieverConfig(kind="bm25"))]), seed)
        fresh = [{**q, "id": f"world{other.cfg.seed}-{q['id']}"} for q in single_hop_questions(other.questions("train"))
                 if not any(name in q["question"] for name in names)]
        yield fresh, search


def other_world_rows(world, world_cfg, worlds: int, questions: int, tokenizer, selector_cfg, seed: int,
                     selection: str = "gold") -> list[dict]:
    """Warm-start rows from `worlds` other seeded worlds.

    Why: a tiny model copies a name it has never seen only after copying many different names (the ExSearch recipe
    measured this too); one world's train names are few enough to memorise instead."""
    rows = []
    offsets = [WARM_START_WORLDS + index for index in range(worlds)]
    for index, (fresh, search) in enumerate(other_worlds(world, world_cfg, offsets, seed)):
        rows += warm_start_rows(fresh[:questions], search, tokenizer, selector_cfg, selection, seed + 1 + index)
    return rows


def with_candidates(questions: Sequence[dict], searcher, n_docs: int) -> list[dict]:
    """The questions, each carrying its N candidates (id, title, text) as `documents`: how E-step questions of several
    worlds, each searched in its own corpus, go through one E-step."""
    hits = searcher.search([q["question"] for q in questions], n_docs)
    return [{**q, "documents": [{"id": str(d.get("id")), "title": d.get("title") or "", "text": d.get("text") or ""}
                                for d in found]} for q, found in zip(questions, hits, strict=True)]


def estep_world_questions(world, world_cfg, iteration: int, worlds: int, questions: int, n_docs: int,
                          seed: int) -> list[dict]:
    """Iteration `iteration`'s E-step questions from other seeded worlds: `questions` from each of `worlds` worlds
    never used before (not the warm start's), with their candidates.

    Why: the E-step needs only question-answer pairs, and this world's train split holds ~900 single-hop questions.
    With this world's 200 per iteration the M-step lowered test EM (17.3% -> 12.0%); with 4 x 600 more it rose a
    little (20.0% -> 22.0% / 21.3%, 300 test questions; gold-label warm start, whose selector no E-step moved)."""
    offsets = [ESTEP_WORLDS + (iteration - 1) * worlds + index for index in range(worlds)]
    out = []
    for fresh, search in other_worlds(world, world_cfg, offsets, seed):
        out += with_candidates(fresh[:questions], search, n_docs)
    return out


def prompt_ids_of_generator(question: str, tokenizer, cfg) -> list[int]:
    return list(tokenizer(cfg.generator_template.format(question=question))["input_ids"])


def evaluate_dro(agent, questions: Sequence[dict]) -> tuple[dict[str, float], list[dict]]:
    """Greedy selection, then a greedy answer from the selected documents: the selector's Recall@K (K = agent k)
    and the generator's EM / F1 / accuracy against the gold answers, plus the valid-permutation rate."""
    from pipelines.qa_metrics import accuracy, exact_match, f1_score

    selections = agent.run([{"id": q["id"], "question": q["question"]} for q in questions], samples=1, greedy=True)
    rows = []
    for q, selection in zip(questions, selections, strict=True):
        gold = set(q["supporting_passage_ids"])
        picked = set(selection.selected_ids)
        answer = selection.answer
        rows.append({
            "id": q["id"], "question": q["question"], "gold": q["answers"][0], "answer": answer,
            "selected": " ".join(selection.selected_ids), "gold_passages": " ".join(sorted(gold)),
            "recall": len(gold & picked) / len(gold), "em": exact_match(answer, q["answers"]),
            "f1": f1_score(answer, q["answers"]), "acc": accuracy(answer, q["answers"]), "valid": float(selection.valid),
            "finish_reason": selection.trajectory.finish_reason,
        })
    metrics = {name: float(np.mean([r[name] for r in rows])) for name in ("recall", "em", "f1", "acc", "valid")}
    metrics["questions"] = len(rows)
    return metrics, rows


def retriever_recall(searcher, questions: Sequence[dict], k: int) -> float:
    """Recall@k of the retriever's own order: the reference the shuffled selector is compared with."""
    hits = searcher.search([q["question"] for q in questions], k)
    return float(np.mean([len(set(q["supporting_passage_ids"]) & {str(h.get("id")) for h in found})
                          / len(q["supporting_passage_ids"]) for q, found in zip(questions, hits, strict=True)]))


def informative_rows(table, min_weight: float, at_least: int = 1):
    """The E-step rows that weigh at least `min_weight` times the heaviest row (all of them at 0): the M-step's set,
    never fewer than the `at_least` heaviest rows (one training batch).

    Relative to the heaviest row, so a weak policy whose every likelihood is tiny still trains on its best rows
    (the self-normalised loss rescales them), while rows a million times lighter than the rest are left out."""
    import pyarrow.compute as pc

    if min_weight <= 0:
        return table
    heaviest = pc.max(table["weight"]).as_py() or 0.0
    if heaviest <= 0:
        raise ValueError("every E-step row weighs 0: the M-step has nothing to learn from")
    kept = pc.greater_equal(table["weight"], min_weight * heaviest)
    if pc.sum(kept).as_py() >= min(at_least, table.num_rows):
        return table.filter(kept)
    heaviest_rows = pc.sort_indices(table, sort_keys=[("weight", "descending")])[:at_least].to_pylist()
    return table.take(sorted(heaviest_rows))  # in their E-step order


def scale_generator_rows(table, factor: float):
    """The M-step rows with every generator row's weight multiplied by `factor` (1: DRO's joint objective as written).

    Why: the selector's whole lesson is one label token, the generator's an answer of ~10 tokens; trained together
    with equal weights, the label got about a fourteenth of each step's loss and the selector did not move."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if factor == 1.0:
        return table
    generator = pc.equal(table["target"], "generator")
    weights = pc.if_else(generator, pc.multiply(table["weight"], pa.scalar(factor, table["weight"].type)),
                         table["weight"])
    return table.set_column(table.schema.get_field_index("weight"), "weight", weights)


MSTEP_TARGETS = ("all", "selector", "generator")


def check_passes(passes: Sequence[str]) -> list[str]:
    """`recipe.mstep_passes` as a list, or a ValueError naming the bad entry (checked before any E-step runs)."""
    passes = list(passes)
    if not passes:
        raise ValueError("recipe.mstep_passes is empty: name at least one pass (all, selector or generator)")
    for targets in passes:
        if targets not in MSTEP_TARGETS:
            raise ValueError(f"recipe.mstep_passes: {targets!r} is not one of {MSTEP_TARGETS}")
    return passes


def pass_rows(table, targets: str):
    """The M-step rows one pass trains on: `all`, or only the `selector` / `generator` rows.

    Why passes: trained together, the selector's one label token is swamped by the generator's answer tokens (see
    `scale_generator_rows`); a pass on the selector rows alone moved it, but alone it made the generator forget its
    answer format, so a later pass trains the answers again from that checkpoint."""
    import pyarrow.compute as pc

    check_passes([targets])
    if targets == "all":
        return table
    return table.filter(pc.equal(table["target"], targets))


def run_mstep(sampled, passes: Sequence[str], start: str, folder: Path, cfg: DictConfig) -> tuple[str, list[str]]:
    """The M-step on the E-step's rows `sampled`: one Ray Train run per pass (`recipe.mstep_passes`), each from the
    previous pass's checkpoint, on its targets' rows that weigh at least `recipe.mstep_min_weight` of their heaviest
    (never fewer than one batch); returns the last checkpoint. With one pass the run is `mstep` (as before passes
    existed), else `mstep-<n>-<targets>`, so a rerun resumes the pass it stopped in. Also returns the passes that
    ran: a pass whose targets have fewer rows than one batch (a policy that wrote no valid permutation has no selector
    rows) is skipped with a message rather than failing the iteration after its E-step."""
    from cluster.resources import Placement
    from pipelines.train import TrainSettings, run_training

    recipe, checkpoint, passes, ran = cfg.recipe, start, check_passes(passes), []
    for number, targets in enumerate(passes, start=1):
        chosen = pass_rows(sampled, targets)
        if chosen.num_rows < cfg.trainer.batch_size:
            print(f"[M-step] pass {number} ({targets}) skipped: the E-step wrote {chosen.num_rows} {targets} rows, "
                  f"fewer than one batch (trainer.batch_size={cfg.trainer.batch_size})", flush=True)
            continue
        rows = informative_rows(chosen, recipe.mstep_min_weight, cfg.trainer.batch_size)
        # as in ExSearch: each pass continues the previous policy's AdamW moments (unless switched off)
        settings = TrainSettings.from_config(cfg.trainer, checkpoint, objective="weighted_nll", lr=recipe.mstep_lr,
                                             epochs=recipe.mstep_epochs, normalize=recipe.mstep_normalize,
                                             optimizer_from=checkpoint if recipe.mstep_continue_optimizer else None)
        name = "mstep" if len(passes) == 1 else f"mstep-{number}-{targets}"
        print(f"[M-step {name}] weighted_nll on {rows.num_rows} rows", flush=True)
        trained = run_training(rows, settings, folder, cfg.trainer.num_workers, cfg.trainer.cpus_per_worker,
                               cfg.trainer.use_gpu, cfg.trainer.max_failures, resume=True, name=name,
                               placement=Placement.of_trainer(cfg.trainer))
        checkpoint = str(trained.checkpoint)
        ran.append(targets)
    return checkpoint, ran


def _dev_score(metrics: dict) -> float:
    """What keep-best compares: the selector's recall and the generator's EM count alike."""
    return metrics["recall"] + metrics["em"]


def run_dro(cfg: DictConfig, out: Path, prepared: dict) -> list[dict]:
    from transformers import AutoTokenizer

    from actors.llm import EnginePool, start_engines
    from actors.retriever import ShardedRetriever
    from agents.selector import SelectorAgent, SelectorConfig
    from cluster.resources import Placement
    from pipelines import records
    from pipelines.generate import EStepConfig, run_dro_estep
    from pipelines.index import build_index
    from pipelines.train import TrainSettings, run_training

    recipe = cfg.recipe
    world, policy = prepared["world"], Path(prepared["policy"])
    selector_cfg = SelectorConfig(**OmegaConf.to_container(recipe.selector, resolve=True))
    estep_cfg = EStepConfig(**OmegaConf.to_container(recipe.estep, resolve=True))
    passes = check_passes(recipe.mstep_passes)
    started = time.perf_counter()

    index = build_index(world.documents(), cfg.retriever, out / "index")
    retriever = ShardedRetriever.launch(index, cfg.retriever)
    searcher = ShuffledSearcher(retriever, cfg.seed) if recipe.shuffle_candidates else retriever
    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    train = single_hop_questions(world.questions("train"))
    random.Random(cfg.seed).shuffle(train)
    warm_questions, estep_pool = train[: recipe.warm_start_questions], train[recipe.warm_start_questions :]
    dev = single_hop_questions(world.questions("dev"))[: recipe.dev_questions]
    test = single_hop_questions(world.questions("test"))[: recipe.eval_questions]
    reference = retriever_recall(retriever, test, selector_cfg.k)

    # ---- warm start -----------------------------------------------------------------------------------------
    warm_dir = out / "iter-00-warm-start"
    warm = finished_result(warm_dir)
    engines = None
    if warm is None:
        rows = warm_start_rows(warm_questions, searcher, tokenizer, selector_cfg, recipe.warm_start_selection, cfg.seed)
        rows += other_world_rows(world, cfg.data.world, recipe.warm_start_worlds, recipe.warm_start_world_questions,
                                 tokenizer, selector_cfg, cfg.seed, recipe.warm_start_selection)
        settings = TrainSettings.from_config(cfg.trainer, policy, objective="sft", lr=recipe.warm_start_lr,
                                             epochs=10_000, max_steps=recipe.warm_start_steps,
                                             lr_schedule=recipe.warm_start_schedule)
        print(f"[warm start] SFT on {len(rows)} scripted rows ({len(warm_questions)} questions, "
              f"{recipe.warm_start_worlds} other worlds) for "
              f"{recipe.warm_start_steps} steps", flush=True)
        trained = run_training(rows, settings, warm_dir, cfg.trainer.num_workers, cfg.trainer.cpus_per_worker,
                               cfg.trainer.use_gpu, cfg.trainer.max_failures, resume=True, name="sft",
                               placement=Placement.of_trainer(cfg.trainer))
        engines = start_engines(trained.checkpoint, cfg.engine, cfg.model.dtype)
        agent = SelectorAgent(EnginePool(engines, cfg.engine.request_timeout_s), searcher, tokenizer, selector_cfg)
        dev_metrics, _ = evaluate_dro(agent, dev)
        test_metrics, answers = evaluate_dro(agent, test)
        write_table(answers, warm_dir, "test_answers")
        warm = write_result(warm_dir, {"checkpoint": str(trained.checkpoint), "dev": dev_metrics, "test": test_metrics,
                                  "warm_start_rows": len(rows)})
    if engines is None:
        engines = start_engines(warm["checkpoint"], cfg.engine, cfg.model.dtype)
    pool = EnginePool(engines, cfg.engine.request_timeout_s)
    agent = SelectorAgent(pool, searcher, tokenizer, selector_cfg)
    results = [{"iteration": 0, **_row(warm)}]
    print(markdown_table(results), flush=True)

    # ---- EM iterations --------------------------------------------------------------------------------------
    current, best_dev = warm, _dev_score(warm["dev"])
    for iteration in range(1, recipe.iterations + 1):
        folder = out / f"iter-{iteration:02d}-dro"
        result = finished_result(folder)
        if result is None:
            pool.reload(current["checkpoint"])
            estep = replace(estep_cfg, seed=cfg.seed * 1000 + iteration)
            questions = with_candidates(estep_questions(estep_pool, iteration, recipe.estep_questions), searcher,
                                        selector_cfg.n_docs)
            questions += estep_world_questions(world, cfg.data.world, iteration, recipe.estep_worlds,
                                               recipe.estep_world_questions, selector_cfg.n_docs, cfg.seed)
            summary = run_dro_estep(questions, folder / "estep", engines, searcher, current["checkpoint"],
                                    asdict(selector_cfg), estep, config={"iteration": iteration})
            sampled = scale_generator_rows(records.read_records(folder / "estep", "weighted_sample"),
                                           recipe.mstep_generator_weight)
            table = informative_rows(sampled, recipe.mstep_min_weight, cfg.trainer.batch_size)
            print(f"[dro {iteration}] E-step: {summary.samples} rows, gold passage selected in "
                  f"{summary.correct_rate:.1%}; M-step (weighted_nll, passes {passes}) on "
                  f"{table.num_rows} rows", flush=True)
            checkpoint, passes_run = run_mstep(sampled, passes, current["checkpoint"], folder, cfg)
            pool.reload(checkpoint)
            dev_metrics, _ = evaluate_dro(agent, dev)
            test_metrics, answers = evaluate_dro(agent, test)
            write_table(answers, folder, "test_answers")
            kept = not recipe.keep_best or _dev_score(dev_metrics) >= best_dev
            result = write_result(folder, {
                "checkpoint": checkpoint if kept else current["checkpoint"], "trained_checkpoint": checkpoint,
                "kept": kept, "dev": dev_metrics, "test": test_metrics, "estep": asdict(summary),
                "mstep_rows": table.num_rows, "mstep_passes": passes_run,
            })
        if result["kept"]:
            best_dev = max(best_dev, _dev_score(result["dev"]))
        current = result
        results.append({"iteration": iteration, **_row(result)})
        print(markdown_table(results[-1:]), flush=True)
    import ray

    for engine in engines:
        ray.kill(engine)
    retriever.close()
    report(results, out, time.perf_counter() - started, selector_cfg.k, reference)
    return results


def _row(result: dict) -> dict:
    test, dev = result["test"], result["dev"]
    row = {"recall_at_k": test["recall"], "em": test["em"], "f1": test["f1"], "acc": test["acc"],
           "valid_rate": test["valid"], "dev_recall_at_k": dev["recall"], "dev_em": dev["em"],
           "kept": result.get("kept", True)}
    if "estep" in result:
        row.update(estep_gold_selected=result["estep"]["correct_rate"],
                   weight_entropy=result["estep"]["mean_weight_entropy"], mstep_rows=result["mstep_rows"])
    return row


def report(results: list[dict], out: Path, seconds: float, k: int, reference: float) -> None:
    """results.csv / results.md and one curve PNG per metric (selector Recall@K; generator EM and F1)."""
    title = (f"DRO: held-out test metrics per iteration ({seconds / 60:.1f} min); selector Recall@{k} over shuffled "
             f"candidates (the retriever's own order has Recall@{k} = {reference:.3f})")
    write_table(results, out, "results", title=title)
    plot_curves(results, "iteration", ["recall_at_k"], out / "curve_recall.png", title=f"held-out selector Recall@{k}")
    plot_curves(results, "iteration", ["em", "f1"], out / "curve_em_f1.png", title="held-out generator EM and F1")
    print(f"Results: {out / 'results.md'}", flush=True)
