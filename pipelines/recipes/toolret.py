"""The ToolRet recipe: contrastive fine-tuning of the MiniLM embedder for tool retrieval, judged on held-out queries.

    tool-retrieval tasks (../shared/data/tools via pipelines/data/toolsets.py; else the synthetic world's tools)
    -> per dataset, a seeded split (pipelines/data/tool_pairs.py): training queries, and two disjoint test groups,
       `unseen_tools` (their tools are held out of training entirely) and `seen_tools` (held-out queries of tools
       that training saw)
    -> base: the untrained all-MiniLM-L6-v2 indexes each corpus (FAISS, in a Ray task per dataset), scores both test
       groups with and without instructions, and ranks the training queries to mine hard negatives
    -> train: InfoNCE with in-batch and hard negatives on Ray Train (pipelines/train_embedder.py), one run over the
       pairs of every dataset; the checkpoint is exported as a sentence-transformers folder, `embedder/`
    -> trained: the same evaluation with the trained encoder
    -> results.csv / results.md (one row per dataset, test group and instruction setting: untrained vs trained nDCG@10,
       Recall@10, C@10) and PNGs (training loss, nDCG@10 untrained -> trained).

Every stage writes `result.json` in its folder last; a rerun on the same output folder skips finished stages. The
trained encoder serves the other recipes and jobs with `retriever.model_path=<output>/embedder`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from pipelines.data.beir import RetrievalTask
from pipelines.data.tool_pairs import TEST_GROUPS, ToolSplit
from pipelines.recipes.iterations import finished_result, write_result
from pipelines.report import plot_curves, write_table

log = logging.getLogger(__name__)

SOURCES = ("auto", "shared", "synthetic")
METRICS = ("ndcg@10", "recall@10", "c@10")


# ---- data ---------------------------------------------------------------------------------------------------------


def load_tasks(recipe, world) -> tuple[str, list[RetrievalTask]]:
    """The source actually used and its tasks: the shared tool sets named by `recipe.datasets` when the shared data
    folder holds tools/ (or `source=shared` demands it), else the synthetic world's tool tasks."""
    from pipelines.data.tool_pairs import synthetic_tool_task
    from pipelines.data.toolsets import DEFAULT_SHARED_ROOT, load_tool_task

    if recipe.source not in SOURCES:
        raise ValueError(f"recipe.source={recipe.source!r} is not one of {SOURCES}")
    root = Path(recipe.shared_root) if recipe.shared_root else DEFAULT_SHARED_ROOT
    source = recipe.source
    if source == "auto":
        source = "shared" if (root / "tools").is_dir() else "synthetic"
    if source == "synthetic":
        return source, [synthetic_tool_task(world)]
    if not (root / "tools").is_dir():
        raise FileNotFoundError(f"recipe.source=shared: {root / 'tools'} is absent (set recipe.shared_root)")
    if not recipe.datasets:
        raise ValueError("recipe.datasets is empty: name at least one tool set (pipelines/data/toolsets.py)")
    return source, [load_tool_task(name, root, max_queries=None) for name in recipe.datasets]


def split_for(task: RetrievalTask, recipe, seed: int, folder: Path) -> ToolSplit:
    """The dataset's split, written to `folder/<dataset>.json`; a stored split that differs (the recipe's split keys
    changed under an existing output folder) is an error, since finished stages were measured on the stored one."""
    from pipelines.data.tool_pairs import split_task

    split = split_task(task, recipe.test_tool_fraction, recipe.test_query_fraction, recipe.max_train_queries,
                       recipe.max_test_queries, seed)  # fmt: skip
    path = folder / f"{task.name}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != json.loads(json.dumps(split.to_dict())):
            raise ValueError(f"{path}: the stored split differs from what the recipe's keys give now; use a new "
                             f"output_dir (or delete the folder) after changing the split or dataset keys")  # fmt: skip
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(split.to_dict(), indent=1))
    return split


# ---- evaluation (one Ray task per dataset and encoder) ------------------------------------------------------------


def evaluate_encoder(model_path: str | None, task: RetrievalTask, split: ToolSplit, settings: dict) -> dict:
    """Index the task's whole corpus with the encoder (exact FAISS), score each test group (with and without the
    task's instructions), and with `settings["mine"]` rank the training queries and draw their hard negatives."""
    from actors.config import RetrieverConfig
    from actors.retriever import DenseIndex, Embedder, LocalRetriever, doc_table
    from pipelines.data.tool_pairs import mine_hard_negatives
    from pipelines.evaluate import retrieve
    from pipelines.metrics import evaluate_run

    started, cpu_started = time.perf_counter(), time.process_time()
    cfg = RetrieverConfig(kind="dense", index="flat", model_path=model_path, max_seq_length=settings["max_seq_length"],
                          batch_size=settings["batch_size"])  # fmt: skip
    embedder = Embedder(model_path, settings["max_seq_length"], device="cpu")
    retriever = LocalRetriever([DenseIndex.build(doc_table(task.corpus), cfg, embedder)])
    result: dict = {"metrics": {}}
    for group in TEST_GROUPS:
        ids = split.test(group)
        if not ids:
            continue
        part = replace(task, queries={q: task.queries[q] for q in ids}, qrels={q: task.qrels[q] for q in ids})
        for instructed in (False, True) if settings["instructions"] else (False,):
            metrics = evaluate_run(retrieve(retriever, part, settings["depth"], instructed, 256), part.qrels)
            result["metrics"][f"{group}{'+instr' if instructed else ''}"] = metrics
    if settings.get("mine"):
        part = replace(task, queries={q: task.queries[q] for q in split.train},
                       qrels={q: task.qrels[q] for q in split.train})  # fmt: skip
        run = retrieve(retriever, part, settings["depth"], False, 256)  # deep: held-out tools are skipped
        result["hard_negatives"] = mine_hard_negatives(run, task, split.train, set(split.held_out_tools),
                                                       settings["hard_negatives"], settings["mine_depth"],
                                                       settings["seed"])  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["cpu_seconds"] = round(time.process_time() - cpu_started, 1)  # what the stage costs on idle cores
    return result


def evaluate_all(model_path: str | None, tasks: list[RetrievalTask], splits: dict[str, ToolSplit], stage: Path,
                 recipe, seed: int, mine: bool) -> dict[str, dict]:  # fmt: skip
    """Every dataset's evaluation under `stage/<dataset>/result.json`, pending ones as parallel Ray tasks."""
    import ray

    settings = {"max_seq_length": recipe.max_seq_length, "batch_size": recipe.eval_batch_size,
                "instructions": recipe.instructions, "depth": recipe.depth, "mine": mine,
                "hard_negatives": recipe.hard_negatives, "mine_depth": recipe.mine_depth, "seed": seed}  # fmt: skip
    results = {task.name: finished_result(stage / task.name) for task in tasks}
    pending = [task for task in tasks if results[task.name] is None]
    if pending:
        remote = ray.remote(num_cpus=recipe.eval_cpus, max_retries=1)(evaluate_encoder)
        refs = [remote.remote(model_path, task, splits[task.name], settings) for task in pending]
        names = ", ".join(task.name for task in pending)
        print(f"[{stage.name}] encoding and searching {names} with {model_path or 'all-MiniLM-L6-v2'}", flush=True)
        try:
            outputs = ray.get(refs, timeout=recipe.eval_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"[{stage.name}] evaluating {names} took longer than recipe.eval_timeout_s="
                               f"{recipe.eval_timeout_s}") from None  # fmt: skip
        for task, output in zip(pending, outputs, strict=True):
            results[task.name] = write_result(stage / task.name, {"model": model_path, **output})
    return results  # type: ignore[return-value]


# ---- the recipe ---------------------------------------------------------------------------------------------------


def run_toolret(cfg: DictConfig, out: Path, prepared: dict) -> list[dict]:
    from cluster.resources import Placement
    from pipelines.data.tool_pairs import batch_rows, fit_batches, training_pairs
    from pipelines.train_embedder import EmbedderSettings, export_embedder, run_embedder_training

    recipe = cfg.recipe
    started = time.perf_counter()
    source, tasks = load_tasks(recipe, prepared.get("world"))
    splits = {task.name: split_for(task, recipe, cfg.seed, out / "splits") for task in tasks}
    by_name = {task.name: task for task in tasks}
    for name, split in splits.items():
        print(f"[split] {name}: {split.stats}", flush=True)

    base = evaluate_all(None, tasks, splits, out / "base", recipe, cfg.seed, mine=True)

    train_dir = out / "train"
    trained = finished_result(train_dir)
    if trained is None:
        pairs = [row for name, split in splits.items()
                 for row in training_pairs(by_name[name], split.train, base[name]["hard_negatives"])]  # fmt: skip
        batch_size, plan = fit_batches(pairs, recipe.batch_size, recipe.steps, recipe.num_workers, cfg.seed)
        settings = EmbedderSettings(
            base_path=None, lr=recipe.lr, lr_schedule=recipe.lr_schedule, warmup_steps=recipe.warmup_steps,
            weight_decay=recipe.weight_decay, temperature=recipe.temperature, max_seq_length=recipe.train_max_seq_length,
            freeze_embeddings=recipe.freeze_embeddings, checkpoint_every=recipe.checkpoint_every,
            report_every=recipe.report_every, threads=cfg.trainer.threads, seed=cfg.seed,
        )
        print(f"[train] {len(pairs)} pairs, {recipe.steps} steps of {batch_size} on {recipe.num_workers} Ray Train "
              f"workers", flush=True)  # fmt: skip
        train_started = time.perf_counter()
        result = run_embedder_training(batch_rows(pairs, plan), settings, train_dir, recipe.num_workers,
                                       Placement.of_trainer(cfg.trainer), cfg.trainer.max_failures)  # fmt: skip
        embedder = export_embedder(result.checkpoint, out / "embedder")
        last = result.history[-1] if result.history else {}
        trained = write_result(train_dir, {
            "checkpoint": str(result.checkpoint), "embedder": str(embedder), "pairs": len(pairs),
            "steps": recipe.steps, "batch_size": batch_size, "epochs": round(recipe.steps * batch_size / len(pairs), 2),
            "seconds": round(time.perf_counter() - train_started, 1), "final_loss": last.get("loss"),
            "cpu_seconds": round(sum(row.get("cpu_seconds", 0.0) for row in result.history), 1),
            "history": result.history,
        })  # fmt: skip
    after = evaluate_all(trained["embedder"], tasks, splits, out / "trained", recipe, cfg.seed, mine=False)
    rows = result_rows(splits, base, after)
    timing = timing_rows(base, trained, after, time.perf_counter() - started)
    write_table(timing, out, "timing", title="Stage costs: wall seconds (summed over parallel tasks) and CPU seconds "
                "(summed over processes; / 2 = the least wall time on 2 idle cores)")  # fmt: skip
    report(rows, trained, out, source)
    print(f"Trained embedder: {trained['embedder']} (use it with retriever.model_path={trained['embedder']})", flush=True)
    return rows


def result_rows(splits: dict[str, ToolSplit], base: dict[str, dict], after: dict[str, dict]) -> list[dict]:
    """One row per dataset, test group and instruction setting, then the mean over datasets of each (group, setting)."""
    rows = []
    for name, split in splits.items():
        for setting, before in base[name]["metrics"].items():
            group, instructed = setting.removesuffix("+instr"), setting.endswith("+instr")
            now = after[name]["metrics"][setting]
            row = {"dataset": name, "test": group, "instructions": instructed, "queries": int(before["queries"]),
                   "tools_in_train": f"{split.stats[f'{group}_tools_in_train']}/{split.stats[f'{group}_tools']}",
                   "train_queries": len(split.train)}  # fmt: skip
            for metric in METRICS:
                row[f"{metric} base"] = before[metric]
                row[f"{metric} trained"] = now[metric]
            rows.append(row)
    if len(splits) > 1:
        for group in TEST_GROUPS:
            for instructed in (False, True):
                chosen = [r for r in rows if r["test"] == group and r["instructions"] == instructed]
                if chosen:
                    mean = {"dataset": "mean", "test": group, "instructions": instructed,
                            "queries": sum(r["queries"] for r in chosen), "tools_in_train": "",
                            "train_queries": sum(r["train_queries"] for r in chosen)}  # fmt: skip
                    for key in [k for k in chosen[0] if k.endswith((" base", " trained"))]:
                        mean[key] = sum(r[key] for r in chosen) / len(chosen)
                    rows.append(mean)
    return rows


def timing_rows(base: dict[str, dict], trained: dict, after: dict[str, dict], seconds: float) -> list[dict]:
    """Wall and CPU seconds per stage, as each stage measured them when it ran (a reused stage keeps its figures)."""
    def total(results: dict[str, dict], key: str) -> float:
        return round(sum(r.get(key, 0.0) for r in results.values()), 1)

    return [{"stage": "base (encode, search, mine)", "seconds": total(base, "seconds"),
             "cpu_seconds": total(base, "cpu_seconds")},
            {"stage": "train", "seconds": trained["seconds"], "cpu_seconds": trained.get("cpu_seconds", "")},
            {"stage": "trained (encode, search)", "seconds": total(after, "seconds"),
             "cpu_seconds": total(after, "cpu_seconds")},
            {"stage": "the recipe, this invocation (reused stages add nothing)", "seconds": round(seconds, 1),
             "cpu_seconds": ""}]  # fmt: skip


def report(rows: list[dict], trained: dict, out: Path, source: str) -> None:
    """results.csv / results.md, the training curve, and nDCG@10 untrained -> trained per dataset and test group."""
    title = (f"ToolRet: untrained vs contrastively trained all-MiniLM-L6-v2 on held-out tool-retrieval queries "
             f"({source} data; {trained['pairs']} training pairs, {trained['steps']} steps of "
             f"{trained['batch_size']})")  # fmt: skip
    write_table(rows, out, "results", title=title)
    if trained.get("history"):
        plot_curves(trained["history"], "step", ["loss", "in_batch_accuracy"], out / "train_loss.png",
                    title="contrastive training (InfoNCE loss, in-batch accuracy)")  # fmt: skip
    lines = {f"{r['dataset']} {r['test']}": (r["ndcg@10 base"], r["ndcg@10 trained"])
             for r in rows if not r["instructions"]}  # fmt: skip
    points = [{"stage": 0, **{k: v[0] for k, v in lines.items()}}, {"stage": 1, **{k: v[1] for k, v in lines.items()}}]
    plot_curves(points, "stage", list(lines), out / "curve_ndcg@10.png",
                title="held-out nDCG@10: untrained (0) -> trained (1)")  # fmt: skip
    print(f"Results: {out / 'results.md'}", flush=True)
