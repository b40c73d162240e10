"""The ExSearch recipe: warm start on demonstrations, then generalized EM, with ablations side by side.

    connect -> world -> index its passages -> demonstrations (the gold runs, written by a scripted policy over the
    real retriever) -> SFT warm start -> for each M-step variant, for t in 1..T:
        E-step (Ray Data: K samples per question, each weighted by p(gold | x, z) ** (1/T): `recipe.estep`)
        M-step (Ray Train: `weighted_nll` for `importance`; plain SFT on every sample for `uniform`; SFT on the
                samples that reached the gold answer for `rejection`; `demonstrations`, the control, skips the
                E-step and trains as many rows of the warm start's own demonstrations)
        reload the engines, evaluate on held-out questions, keep the checkpoint only if dev EM did not fall
    -> results.csv / results.md (one row per variant and iteration; iteration 0 = the warm start) + curves PNG.

Every iteration writes `result.json` in its folder last; a rerun with `recipe.resume=true` (or just the same output
folder) reuses finished iterations, so a stopped job continues at the first unfinished step.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from pipelines import records
from pipelines.recipes.iterations import estep_questions, finished_result, write_result
from pipelines.report import markdown_table, plot_curves, write_table

log = logging.getLogger(__name__)

VARIANTS = ("importance", "uniform", "rejection", "demonstrations")


def _split_train(questions: list[dict], warm: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Demonstration questions and the E-step's pool: disjoint, so the loop learns from questions it never saw solved."""
    order = list(questions)
    random.Random(seed).shuffle(order)
    return order[:warm], order[warm:]


def reuse_estep(source: Path, target: Path) -> None:
    """Copy a finished E-step's shards into `target`, so `run_estep` there finds every shard done.

    Why: every variant's iteration 1 starts from the warm start with the same questions and seed, so their E-steps
    would sample the same trajectories; sampling once makes the ablation differ in its M-step only, and saves an
    E-step (a minute of the demo). Each iteration folder still holds its own samples and manifest."""
    target.mkdir(parents=True, exist_ok=True)
    for shard in sorted(source.glob("shard-*.parquet")):
        if not (target / shard.name).exists():
            shutil.copyfile(shard, target / shard.name)


def mstep_rows(table: pa.Table, variant: str) -> pa.Table:
    """The M-step's training rows for a variant (what the ablations change, and nothing else)."""
    if variant == "importance":
        return table
    if variant == "uniform":
        return table.set_column(table.schema.get_field_index("weight"), "weight",
                                pa.array([1.0] * table.num_rows, pa.float32()))
    if variant == "rejection":
        return table.filter(pc.equal(table.column("correct"), True))
    if variant == "demonstrations":
        raise ValueError("the `demonstrations` control has no E-step: its rows come from `demonstration_rows`")
    raise ValueError(f"recipe.variants: {variant!r} is not one of {VARIANTS}")


def demonstration_rows(folder: Path, rows: int, seed: int) -> pa.Table:
    """`rows` of the warm start's demonstrations (a seeded draw, without repeats while they last), weight 1.

    Why: the `demonstrations` control continues the warm start's SFT with the M-step's budget (as many rows as an
    E-step yields plus `recipe.mstep_replay_rows`, the same learning rate, decay and AdamW moments) and no sampling at
    all; the sampled variants' replay (`with_replay`) is drawn here too. The demo's warm start stops at a constant
    learning rate, so part of any M-step's gain is that decay, not what the loop sampled; this variant measures that
    part (README: all of it, on the demo)."""
    table = records.read_records(folder, "trajectory").select(["prompt_ids", "token_ids", "loss_mask"])
    if table.num_rows == 0:
        raise ValueError(f"{folder}: no demonstrations to train the `demonstrations` variant on")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < rows:
        order += rng.sample(range(table.num_rows), table.num_rows)
    picked = table.take(order[:rows])
    return picked.append_column("weight", pa.array([1.0] * rows, pa.float32()))


def with_replay(table: pa.Table, replay: pa.Table) -> pa.Table:
    """An E-step's M-step rows (`mstep_rows`) followed by `replay`, rows of the warm start's demonstrations (weight 1).

    Why: the M-step's decay continues the warm start's SFT, which by itself lifts held-out EM as much as a whole
    iteration (the `demonstrations` control); replaying demonstrations beside the sampled runs (as OpenRLHF's and
    InstructGPT's pretraining-mix term does) gives every variant that part, so what the variants add beyond the
    control is what the loop sampled."""
    columns = ["prompt_ids", "token_ids", "loss_mask", "weight"]
    sampled = table.select(columns)
    return pa.concat_tables([sampled, replay.select(columns).cast(sampled.schema)])


def gold_runs(questions: list[dict], retriever, tokenizer, demo_cfg) -> list:
    """The scripted gold runs of `questions` over `retriever`, keeping those that saw every hop's gold passage."""
    from agents.exsearch import DemonstrationPolicy, ExSearchAgent, grounded

    runs = ExSearchAgent(DemonstrationPolicy(tokenizer, questions, demo_cfg), retriever, tokenizer, demo_cfg).run(
        [{"id": q["id"], "question": q["question"]} for q in questions])
    return [t for q, t in zip(questions, runs, strict=True) if grounded(t, q, demo_cfg)]


def with_hops(questions: list[dict], hops: Sequence[int]) -> list[dict]:
    """The questions whose hop count is in `hops` (all of them when it is empty): which may have demonstrations."""
    return [q for q in questions if not hops or q["hops"] in hops]


def extra_world_runs(world, world_cfg, worlds: int, questions: int, tokenizer, demo_cfg,
                     hops: Sequence[int] = ()) -> list:
    """Gold runs in `worlds` other seeded worlds (same sizes, other names), each searched with an in-process BM25.

    Why: a tiny model copies a name it has never seen only after it has copied many different names; the ~200 topic
    names of one world's train split are few enough to memorise instead (measured on the first search of held-out
    questions: 2% with this world's 600 questions, 34% when every demonstration has fresh names). Questions that
    mention a name of this world are left out, so no fact of this world's dev or test entities is taught.
    """
    from actors.config import RetrieverConfig
    from actors.retriever import LocalRetriever, build_core, doc_table

    names = world_names(world)
    runs = []
    for index in range(worlds):
        other = build_other_world(world_cfg, 10_000 + index)
        search = LocalRetriever([build_core(doc_table(other.documents()), RetrieverConfig(kind="bm25"))])
        fresh = [{**q, "id": f"world{other.cfg.seed}-{q['id']}"}
                 for q in with_hops(other.questions("train"), hops)
                 if not any(name in q["question"] for name in names)]
        runs += gold_runs(fresh[:questions], search, tokenizer, demo_cfg)
    return runs


def fresh_name_pool(world, world_cfg, worlds: int) -> tuple[list[dict], list[dict]]:
    """The passages and train questions of `worlds` other seeded worlds, for an E-step over fresh names.

    The worlds' seeds differ from the demonstrations' (`extra_world_runs`), ids get the world's seed as a prefix, and
    a passage that mentions a name of this world is left out (with the questions it supports), so the shared index
    never says anything about this world's entities that this world does not.
    """
    names = world_names(world)
    documents, questions = [], []
    for index in range(worlds):
        other = build_other_world(world_cfg, 20_000 + index)
        prefix = f"world{other.cfg.seed}-"
        kept = [doc for doc in other.documents()
                if not any(f"-{split}-" in doc["entity_id"] for split in ("dev", "test"))
                and not any(name in doc["text"] for name in names)]
        documents += [{**doc, "id": prefix + doc["id"]} for doc in kept]
        kept_ids = {doc["id"] for doc in kept}
        for q in other.questions("train"):
            if set(q["supporting_passage_ids"]) <= kept_ids and not any(name in q["question"] for name in names):
                decomposition = [{**hop, "passage_id": prefix + hop["passage_id"]} for hop in q["decomposition"]]
                questions.append({**q, "id": prefix + q["id"], "decomposition": decomposition,
                                  "supporting_passage_ids": [prefix + p for p in q["supporting_passage_ids"]]})
    return documents, questions


def world_names(world) -> set[str]:
    """Every entity name of `world` (its passages' titles): what another world's rows must never mention."""
    return {doc["title"] for doc in world.documents()}


def build_other_world(world_cfg, offset: int):
    """Another seeded world of the same sizes (other names), with no dev or test questions to build."""
    from pipelines.data.world import build_world

    base = OmegaConf.to_object(world_cfg) if isinstance(world_cfg, DictConfig) else world_cfg
    return build_world(replace(base, seed=base.seed + offset, dev_questions=1, test_questions=1))


def evaluate_policy(agent, dev: list[dict], test: list[dict], folder: Path) -> tuple[dict, dict]:
    """Dev and test metrics of the agent's current policy (test with EM per question kind, `em_by_group`); the test
    answers go to `folder/test_answers.*`. One place for the warm start and every iteration, so they are scored alike."""
    from pipelines.qa_eval import em_by_group, evaluate_exsearch

    dev_metrics, _ = evaluate_exsearch(agent, dev)
    test_metrics, answers = evaluate_exsearch(agent, test)
    test_metrics["em_by_group"] = em_by_group(answers)
    write_table(answers, folder, "test_answers")
    return dev_metrics, test_metrics


def run_exsearch(cfg: DictConfig, out: Path, prepared: dict) -> list[dict]:
    from actors.llm import EnginePool, start_engines
    from actors.retriever import ShardedRetriever
    from agents.exsearch import ExSearchAgent, ExSearchConfig
    from cluster.resources import Placement
    from pipelines.generate import EStepConfig, run_exsearch_estep
    from pipelines.index import build_index
    from pipelines.train import TrainSettings, run_training

    recipe = cfg.recipe
    world, policy = prepared["world"], Path(prepared["policy"])
    agent_cfg = ExSearchConfig(**OmegaConf.to_container(recipe.agent, resolve=True))
    estep_cfg = EStepConfig(**OmegaConf.to_container(recipe.estep, resolve=True))
    started = time.perf_counter()

    documents = world.documents()
    if recipe.estep_worlds:
        fresh_documents, fresh_questions = fresh_name_pool(world, cfg.data.world, recipe.estep_worlds)
        documents += fresh_documents
    index = build_index(documents, cfg.retriever, out / "index")
    retriever = ShardedRetriever.launch(index, cfg.retriever)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    demo_questions, estep_pool = _split_train(world.questions("train"), recipe.warm_start_questions, cfg.seed)
    demo_questions = with_hops(demo_questions, list(recipe.warm_start_hops))
    if recipe.estep_worlds:
        estep_pool = random.Random(cfg.seed).sample(fresh_questions, len(fresh_questions))
    dev = world.questions("dev")[: recipe.dev_questions]
    test = world.questions("test")[: recipe.eval_questions]

    # ---- warm start -----------------------------------------------------------------------------------------
    warm_dir = out / "iter-00-warm-start"
    warm = finished_result(warm_dir)
    engines = None
    if warm is None:
        # a gold run searches once per hop: the demonstrations may need more steps than the agent is later allowed
        demo_cfg = replace(agent_cfg, max_steps=max([agent_cfg.max_steps, *(q["hops"] for q in demo_questions)]))
        demos = gold_runs(demo_questions, retriever, tokenizer, demo_cfg)
        extra = extra_world_runs(world, cfg.data.world, recipe.warm_start_worlds, recipe.warm_start_world_questions,
                                 tokenizer, demo_cfg, list(recipe.warm_start_hops))
        rows = [{"prompt_ids": t.prompt_ids, "token_ids": t.token_ids, "loss_mask": t.loss_mask, "weight": 1.0}
                for t in demos + extra]
        records.write_records([t.to_record() for t in demos + extra], warm_dir / "demonstrations", "trajectory")
        print(f"[warm start] {len(demos)} grounded gold runs of {len(demo_questions)} questions, {len(extra)} from "
              f"{recipe.warm_start_worlds} other worlds", flush=True)
        settings = TrainSettings.from_config(cfg.trainer, policy, objective="sft", lr=recipe.warm_start_lr,
                                             epochs=10_000, max_steps=recipe.warm_start_steps,
                                             lr_schedule=recipe.warm_start_schedule)
        print(f"[warm start] SFT on {len(rows)} demonstrations for {recipe.warm_start_steps} steps", flush=True)
        trained = run_training(rows, settings, warm_dir, cfg.trainer.num_workers, cfg.trainer.cpus_per_worker,
                               cfg.trainer.use_gpu, cfg.trainer.max_failures, resume=True, name="sft",
                               placement=Placement.of_trainer(cfg.trainer))
        engines = start_engines(trained.checkpoint, cfg.engine, cfg.model.dtype)
        agent = ExSearchAgent(EnginePool(engines, cfg.engine.request_timeout_s), retriever, tokenizer, agent_cfg)
        dev_metrics, test_metrics = evaluate_policy(agent, dev, test, warm_dir)
        warm = write_result(warm_dir, {"checkpoint": str(trained.checkpoint), "dev": dev_metrics, "test": test_metrics,
                                  "demonstrations": len(rows)})
    if engines is None:
        engines = start_engines(warm["checkpoint"], cfg.engine, cfg.model.dtype)
    pool = EnginePool(engines, cfg.engine.request_timeout_s)
    agent = ExSearchAgent(pool, retriever, tokenizer, agent_cfg)
    results = [{"variant": variant, "iteration": 0, **_row(warm)} for variant in recipe.variants]
    by_group = [_group_row(variant, 0, warm) for variant in recipe.variants]
    print(markdown_table(results[:1]), flush=True)

    # ---- EM iterations, one chain per variant ---------------------------------------------------------------
    sampled: dict[tuple[str, int], Path] = {}  # (policy checkpoint, iteration) -> its E-step folder
    for variant in recipe.variants:
        if variant not in VARIANTS:
            raise ValueError(f"recipe.variants: {variant!r} is not one of {VARIANTS}")
        current = warm
        best_dev = warm["dev"]["em"]
        for iteration in range(1, recipe.iterations + 1):
            folder = out / f"iter-{iteration:02d}-{variant}"
            result = finished_result(folder)
            if result is None:
                summary = None
                seed = cfg.seed * 1000 + iteration  # this iteration's E-step sampling and demonstration draws
                if variant == "demonstrations":  # the control: no E-step (see `demonstration_rows`)
                    table = demonstration_rows(warm_dir / "demonstrations", recipe.estep_questions
                                               * estep_cfg.samples_per_question + recipe.mstep_replay_rows,
                                               seed=seed)
                else:
                    pool.reload(current["checkpoint"])
                    estep = replace(estep_cfg, seed=seed)
                    questions = estep_questions(estep_pool, iteration, recipe.estep_questions)
                    if (current["checkpoint"], iteration) in sampled:
                        reuse_estep(sampled[current["checkpoint"], iteration], folder / "estep")
                    summary = run_exsearch_estep(questions, folder / "estep", engines, retriever,
                                                 current["checkpoint"], asdict(agent_cfg), estep,
                                                 config={"variant": variant, "iteration": iteration})
                    table = mstep_rows(records.read_records(folder / "estep", "weighted_sample"), variant)
                    if recipe.mstep_replay_rows:
                        table = with_replay(table, demonstration_rows(warm_dir / "demonstrations",
                                                                      recipe.mstep_replay_rows, seed=seed))
                objective = "weighted_nll" if variant == "importance" else "sft"
                # the M-step continues the previous policy's AdamW moments (TrainSettings.optimizer_from)
                settings = TrainSettings.from_config(cfg.trainer, current["checkpoint"], objective=objective,
                                                     lr=recipe.mstep_lr, optimizer_from=current["checkpoint"],
                                                     normalize=recipe.mstep_normalize)
                sampling = (f"E-step: {summary.samples} samples, correct {summary.correct_rate:.1%}" if summary
                            else "no E-step (the warm start's demonstrations)")
                print(f"[{variant} {iteration}] {sampling}; M-step ({objective}) on {table.num_rows} rows", flush=True)
                if table.num_rows >= settings.batch_size:
                    trained = run_training(table, settings, folder, cfg.trainer.num_workers,
                                           cfg.trainer.cpus_per_worker, cfg.trainer.use_gpu, cfg.trainer.max_failures,
                                           resume=True, name="mstep", placement=Placement.of_trainer(cfg.trainer))
                    checkpoint = str(trained.checkpoint)
                else:  # rejection sampling can keep too little to train on: the policy stays as it was
                    checkpoint = current["checkpoint"]
                pool.reload(checkpoint)
                dev_metrics, test_metrics = evaluate_policy(agent, dev, test, folder)
                kept = not recipe.keep_best or dev_metrics["em"] >= best_dev
                result = write_result(folder, {
                    "checkpoint": checkpoint if kept else current["checkpoint"], "trained_checkpoint": checkpoint,
                    "kept": kept, "dev": dev_metrics, "test": test_metrics, "mstep_rows": table.num_rows,
                    **({"estep": asdict(summary)} if summary else {}),
                })
            if variant != "demonstrations":
                sampled.setdefault((current["checkpoint"], iteration), folder / "estep")
            if result["kept"]:
                best_dev = max(best_dev, result["dev"]["em"])
            current = result
            results.append({"variant": variant, "iteration": iteration, **_row(result)})
            by_group.append(_group_row(variant, iteration, result))
            print(markdown_table(results[-1:]), flush=True)
    for engine in engines:
        import ray

        ray.kill(engine)
    retriever.close()
    report(results, by_group, out, time.perf_counter() - started)
    return results


def _row(result: dict) -> dict:
    test, dev = result["test"], result["dev"]
    row = {"em": test["em"], "f1": test["f1"], "acc": test["acc"], "valid_rate": test["valid_rate"],
           "mean_searches": test["mean_searches"], "dev_em": dev["em"], "kept": result.get("kept", True)}
    if "estep" in result:
        row.update(estep_correct=result["estep"]["correct_rate"], estep_valid=result["estep"]["valid_rate"],
                   weight_entropy=result["estep"]["mean_weight_entropy"])
    if "mstep_rows" in result:
        row["mstep_rows"] = result["mstep_rows"]
    return row


def _group_row(variant: str, iteration: int, result: dict) -> dict:
    """Test EM per question kind (`em_by_group`; empty for results written before it existed) and overall."""
    return {"variant": variant, "iteration": iteration, **result["test"].get("em_by_group", {}),
            "all": result["test"]["em"]}


def report(results: list[dict], by_group: list[dict], out: Path, seconds: float) -> None:
    """results.csv / results.md, results_by_question.* (test EM per question kind: `em_by_group`) and one
    learning-curve PNG per metric (a line per variant)."""
    write_table(results, out, "results", title=f"ExSearch: held-out test metrics per iteration ({seconds / 60:.1f} min)")
    write_table(by_group, out, "results_by_question", title="ExSearch: held-out test EM per question kind")
    for metric in ("em", "f1"):
        series = {}
        for row in results:
            series.setdefault(row["iteration"], {"iteration": row["iteration"]})[row["variant"]] = row[metric]
        variants = list(dict.fromkeys(row["variant"] for row in results))
        plot_curves(list(series.values()), "iteration", variants, out / f"curve_{metric}.png",
                    title=f"held-out {metric.upper()} by iteration")
    print(f"Results: {out / 'results.md'}", flush=True)
