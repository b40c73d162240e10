"""The factor study: `python -m pipelines.study` — how much do decoding and setup choices move a search agent?

Tool-learning and search-agent results are known to move with choices papers rarely report: decoding temperature,
the step budget, how many passages (tools) are shown and in what order, the size of the pool searched, the system
prompt, and the wording of the question. This job measures those moves on the synthetic world, in one process:

    world -> BM25 (or the configured) index over its passages, one per corpus size studied
          -> policy: the tiny model, SFT-trained here on ExSearch demonstrations (or `study.policy_path`)
          -> the grid: one factor at a time around `study.baseline`, each setting once per seed in `study.seeds`
          -> study_runs.csv (one row per setting and seed), study_table.md|csv (per factor and level: mean, std and
             stability of each metric), study_factors.md|csv (per factor: spread of the level means against the
             seed noise) and study_<factor>.png (the metric's mean ± std per level).

The grid is internal (from `study.factors` / `study.levels`), not a Hydra multirun: one process loads the policy and
the indexes once and runs every setting against them, and the aggregate needs every run anyway. A setting shared by
several factors (the baseline appears under each) runs once per seed and is reused.

What a seed changes: the sampling seed of every model turn and the shuffle of `doc_order=shuffled`. The policy and
the questions stay fixed, so the spread over seeds is the run-to-run noise a single reported number hides.

Stability (per factor level, on `study.metric`): the share of seeds whose value lies within ±`study.tolerance`
(absolute) of the mean over seeds. 1.0 = every seed lands near the mean; a fraction below one says how often a single
run would mislead by more than the tolerance. An absolute band (not 1 - std/mean) because the metrics here are shares
in [0, 1] that can sit near zero, where a relative score explodes. `std` is the sample standard deviation (n - 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, fields, replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pipelines import config as _config  # noqa: F401  (registers the schemas with Hydra)
from pipelines.config import StudySettings
from pipelines.local_engine import InProcessEngine

log = logging.getLogger(__name__)

METRICS = ("em", "f1", "acc", "valid_rate", "mean_searches")

PROMPTS = {
    "plain": "Question: {question}\n",
    "instructed": "Search the passages one fact at a time, record each fact you find, then answer briefly.\n"
                  "Question: {question}\n",
}  # fmt: skip
"""System prompts by name. `plain` is the template the warm start trains on (ExSearchConfig's default)."""

PARAPHRASES: dict[str, Callable[[str], str]] = {
    "none": lambda question: question,
    "lowercase": str.lower,
    "prefixed": lambda question: f"Please tell me: {question}",
    "no_question_mark": lambda question: question.rstrip(" ?"),
}
"""Meaning-preserving rewordings of a question, deterministic so every seed sees the same wording."""

DOC_ORDERS = ("retrieved", "reversed", "shuffled")


# ---------------------------------------------------------------------------------------------------------------------
# The grid and its aggregation
# ---------------------------------------------------------------------------------------------------------------------


def check_settings(settings: StudySettings) -> None:
    """Fail before any run with the field and the allowed values named."""
    problems = []
    if settings.prompt not in PROMPTS:
        problems.append(f"prompt={settings.prompt!r} is not one of {sorted(PROMPTS)}")
    if settings.paraphrase not in PARAPHRASES:
        problems.append(f"paraphrase={settings.paraphrase!r} is not one of {sorted(PARAPHRASES)}")
    if settings.doc_order not in DOC_ORDERS:
        problems.append(f"doc_order={settings.doc_order!r} is not one of {DOC_ORDERS}")
    if not 0 < settings.corpus_fraction <= 1:
        problems.append(f"corpus_fraction={settings.corpus_fraction} must be in (0, 1]")
    if settings.temperature < 0 or settings.max_steps < 1 or settings.top_k < 1:
        problems.append(f"temperature={settings.temperature} must be >= 0, max_steps={settings.max_steps} and "
                        f"top_k={settings.top_k} >= 1")  # fmt: skip
    if problems:
        raise ValueError("study setting: " + "; ".join(problems))


def study_grid(study: Any) -> list[tuple[str, Any, StudySettings]]:
    """(factor, level, settings) for every level of every swept factor, the other factors at the baseline."""
    baseline = study.baseline if isinstance(study.baseline, StudySettings) else StudySettings(**study.baseline)
    names = {f.name for f in fields(StudySettings)}
    grid = []
    for factor in study.factors:
        if factor not in names:
            raise ValueError(f"study.factors: {factor!r} is not one of {sorted(names)}")
        levels = list(getattr(study.levels, factor))
        if not levels:
            raise ValueError(f"study.levels.{factor} is empty")
        for level in levels:
            settings = replace(baseline, **{factor: level})
            check_settings(settings)
            grid.append((factor, level, settings))
    return grid


def summarize(values: Sequence[float], tolerance: float) -> dict[str, float]:
    """Mean, sample std (n - 1; 0 for one value) and stability: the share of values within ±tolerance of the mean."""
    if not values:
        raise ValueError("summarize: no values")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    stable = sum(abs(v - mean) <= tolerance + 1e-12 for v in values) / len(values)
    return {"mean": mean, "std": std, "stability": stable}


def aggregate(grid: Sequence[tuple[str, Any, StudySettings]], runs: dict[tuple, dict], seeds: Sequence[int],
              metric: str, tolerance: float) -> list[dict]:  # fmt: skip
    """One row per (factor, level): each metric's mean and std over seeds, and the stability of `metric`."""
    rows = []
    for factor, level, settings in grid:
        results = [runs[(astuple(settings), seed)] for seed in seeds]
        row: dict[str, Any] = {"factor": factor, "level": level, "seeds": len(results)}
        for name in METRICS:
            summary = summarize([r[name] for r in results], tolerance)
            row[f"{name}_mean"], row[f"{name}_std"] = summary["mean"], summary["std"]
            if name == metric:
                row["stability"] = summary["stability"]
        row["distinct_outputs"] = len({r["fingerprint"] for r in results})
        rows.append(row)
    return rows


def factor_effects(table: Sequence[dict], metric: str) -> list[dict]:
    """Per factor: the spread of its level means (max - min) against the mean seed std at its levels.

    A factor whose spread is well above the seed noise moves results; one whose spread is within the noise may not.
    """
    rows = []
    for factor in dict.fromkeys(row["factor"] for row in table):
        levels = [row for row in table if row["factor"] == factor]
        means = [row[f"{metric}_mean"] for row in levels]
        noise = sum(row[f"{metric}_std"] for row in levels) / len(levels)
        best = max(levels, key=lambda row: row[f"{metric}_mean"])
        rows.append({"factor": factor, "levels": len(levels), f"{metric} spread": max(means) - min(means),
                     "mean seed std": noise, "spread / noise": (max(means) - min(means)) / noise if noise else "",
                     "best level": best["level"], "mean stability": sum(r["stability"] for r in levels) / len(levels)})
    return rows


def plot_factor(table: Sequence[dict], factor: str, metric: str, path: Path) -> Path:
    """The metric's mean ± std over seeds per level of one factor (levels as categories, in grid order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in table if row["factor"] == factor]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    positions = list(range(len(rows)))
    for name in dict.fromkeys((metric, "valid_rate", "f1")):
        ax.errorbar(positions, [r[f"{name}_mean"] for r in rows], yerr=[r[f"{name}_std"] for r in rows],
                    marker="o", capsize=4, alpha=1.0 if name == metric else 0.6, label=name)  # fmt: skip
    ax.set_xticks(positions, [str(r["level"]) for r in rows])
    ax.set_xlabel(factor)
    ax.set_title(f"{metric} by {factor} (mean ± std over {rows[0]['seeds']} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The components one run needs
# ---------------------------------------------------------------------------------------------------------------------


class OrderedSearcher:
    """The retriever's hits in the order a run asks for: best first, reversed, or shuffled by the run's seed."""

    def __init__(self, retriever: Any, order: str, seed: int):
        if order not in DOC_ORDERS:
            raise ValueError(f"doc_order={order!r} is not one of {DOC_ORDERS}")
        self.retriever, self.order, self.rng = retriever, order, random.Random(seed)

    def search(self, queries: Sequence[str], k: int) -> list[list[dict]]:
        hits = self.retriever.search(queries, k)
        if self.order == "reversed":
            return [list(reversed(h)) for h in hits]
        if self.order == "shuffled":
            return [self.rng.sample(list(h), len(h)) for h in hits]
        return hits


def corpus_subset(documents: Sequence[dict], needed: set[str], fraction: float, seed: int) -> list[dict]:
    """Every needed passage plus a seeded `fraction` of the others, in corpus order."""
    others = [d["id"] for d in documents if d["id"] not in needed]
    kept = set(random.Random(seed).sample(others, round(len(others) * fraction))) | needed
    return [d for d in documents if d["id"] in kept]


def build_retrievers(documents: Sequence[dict], questions: Sequence[dict], fractions: Sequence[float],
                     retriever_cfg: Any, out: Path, seed: int) -> dict[float, Any]:  # fmt: skip
    """One in-process retriever per corpus size, each index built once (reused from `out` on a rerun)."""
    from actors.retriever import LocalRetriever, build_index_in_process, corpus_fingerprint, doc_table, load_index
    from pipelines.index import reusable

    needed = {step["passage_id"] for q in questions for step in q["decomposition"]}
    retrievers = {}
    for fraction in dict.fromkeys(float(f) for f in fractions):
        table = doc_table(corpus_subset(documents, needed, fraction, seed))
        folder = out / f"index-{fraction:g}"
        if not reusable(folder, retriever_cfg, corpus_fingerprint(table)):
            build_index_in_process(table, retriever_cfg, folder)
        retrievers[fraction] = LocalRetriever(load_index(folder, retriever_cfg))
    return retrievers


def warm_start(cfg: DictConfig, world: Any, retriever: Any, out: Path) -> Path:
    """The policy the study runs: `study.policy_path`, or the tiny model SFT-trained here on ExSearch demonstrations
    (the recipe's grounded gold runs: scripted by DemonstrationPolicy over the real retriever, kept when every hop's
    gold passage was retrieved). Reused when already saved."""
    from transformers import AutoTokenizer

    from actors.models import check_model_dir, ensure_policy
    from agents.exsearch import ExSearchConfig
    from pipelines.recipes.exsearch import gold_runs
    from pipelines.train import PolicyTrainer, TrainSettings, example_from_row

    study = cfg.study
    if study.policy_path:
        return check_model_dir(study.policy_path)
    folder = out / "warm_start"
    if (folder / "config.json").is_file():
        return folder
    from pipelines.data.world import SYLLABLES

    policy = ensure_policy(cfg.model, world.texts, out / "policy", SYLLABLES)
    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    questions = world.questions("train")[: study.warm_start_questions]
    agent_cfg = ExSearchConfig(**OmegaConf.to_container(cfg.recipe.agent, resolve=True))
    demo_cfg = replace(agent_cfg, prompt_template=PROMPTS["plain"],
                       max_steps=max([agent_cfg.max_steps, *(q["hops"] for q in questions)]))  # fmt: skip
    demos = gold_runs(questions, retriever, tokenizer, demo_cfg)  # grounded runs only: the recipe's warm start data
    rows = [{"prompt_ids": t.prompt_ids, "token_ids": t.token_ids, "loss_mask": t.loss_mask} for t in demos]
    examples = [example_from_row(row, index, "sft") for index, row in enumerate(rows)]
    settings = TrainSettings.from_config(cfg.trainer, policy, objective="sft", lr=study.warm_start_lr,
                                         epochs=10_000, max_steps=study.warm_start_steps, lr_schedule="cosine",
                                         batch_size=study.warm_start_batch_size,
                                         micro_batch_size=study.warm_start_batch_size, seed=cfg.seed)  # fmt: skip
    trainer = PolicyTrainer(settings, examples)
    started = time.perf_counter()
    losses = [trainer.step()["loss"] for _ in range(trainer.total_steps)]
    print(f"[study] warm start: SFT on {len(examples)} demonstrations, {len(losses)} steps, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} in {time.perf_counter() - started:.0f}s", flush=True)  # fmt: skip
    return trainer.save(folder)


def run_setting(engine: InProcessEngine, retrievers: dict[float, Any], questions: Sequence[dict], base_agent: Any,
                settings: StudySettings, seed: int) -> dict:  # fmt: skip
    """One run: the agent configured by `settings` answers every question once with sampling seed `seed`."""
    from agents.exsearch import ExSearchAgent
    from pipelines.qa_eval import score_exsearch

    agent_cfg = replace(base_agent, temperature=float(settings.temperature), max_steps=int(settings.max_steps),
                        top_k=int(settings.top_k), prompt_template=PROMPTS[settings.prompt])  # fmt: skip
    searcher = OrderedSearcher(retrievers[float(settings.corpus_fraction)], settings.doc_order, seed)
    agent = ExSearchAgent(engine, searcher, engine.tokenizer, agent_cfg)
    reword = PARAPHRASES[settings.paraphrase]
    trajectories = agent.run([{"id": q["id"], "question": reword(q["question"])} for q in questions], seed=seed)
    metrics, answers = score_exsearch(questions, trajectories)
    digest = hashlib.sha256(json.dumps([t.token_ids for t in trajectories]).encode()).hexdigest()[:12]
    return {**metrics, "fingerprint": digest, "answers": [a["answer"] for a in answers]}


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------


def run_study(cfg: DictConfig) -> dict:
    """The whole study on a composed config (the entry point, and tests through Hydra's compose API)."""
    from actors.retriever import as_retriever_config
    from agents.exsearch import ExSearchConfig
    from pipelines.data.world import build_world
    from pipelines.jobs import output_dir
    from pipelines.report import markdown_table, write_table

    study = cfg.study
    if study.metric not in METRICS:
        raise ValueError(f"study.metric={study.metric!r} is not one of {METRICS}")
    if not study.seeds:
        raise ValueError("study.seeds is empty")
    grid = study_grid(OmegaConf.to_object(study))
    out = output_dir(cfg)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    started = time.perf_counter()

    world = build_world(OmegaConf.to_object(cfg.data.world))
    questions = world.questions("test")[: study.questions]
    if not questions:
        raise ValueError("study.questions: the world has no test questions (data.world.test_questions)")
    fractions = [1.0, *(s.corpus_fraction for _, _, s in grid)]
    retrievers = build_retrievers(world.documents(), questions + world.questions("train")[: study.warm_start_questions],
                                  fractions, as_retriever_config(cfg.retriever), out, cfg.seed)  # fmt: skip
    policy = warm_start(cfg, world, retrievers[1.0], out)
    engine = InProcessEngine(policy, cfg.engine, cfg.model.dtype)
    base_agent = ExSearchConfig(**OmegaConf.to_container(cfg.recipe.agent, resolve=True))
    prepared = time.perf_counter()

    runs: dict[tuple, dict] = {}
    run_rows = []
    for _, _, settings in grid:
        for seed in study.seeds:
            key = (astuple(settings), seed)
            if key in runs:
                continue
            runs[key] = run_setting(engine, retrievers, questions, base_agent, settings, seed)
            run_rows.append({**asdict(settings), "seed": seed, **{m: runs[key][m] for m in METRICS},
                             "fingerprint": runs[key]["fingerprint"]})  # fmt: skip
            print(f"[study] run {len(run_rows)}: {asdict(settings)} seed {seed}: {study.metric} "
                  f"{runs[key][study.metric]:.3f}, valid {runs[key]['valid_rate']:.2f}", flush=True)  # fmt: skip
    table = aggregate(grid, runs, study.seeds, study.metric, study.tolerance)
    effects = factor_effects(table, study.metric)
    seconds = time.perf_counter() - started

    write_table(run_rows, out, "study_runs", f"Every run of the study ({len(run_rows)} settings x seeds)")
    write_table(table, out, "study_table", f"Factor study: {len(questions)} test questions, seeds {list(study.seeds)}, "
                f"stability = share of seeds within ±{study.tolerance} of the mean {study.metric}")  # fmt: skip
    write_table(effects, out, "study_factors", f"Which factors move {study.metric}: spread of level means vs seed noise")
    plots = [str(plot_factor(table, factor, study.metric, out / f"study_{factor}.png"))
             for factor in dict.fromkeys(row["factor"] for row in table)]  # fmt: skip
    result = {"table": table, "factors": effects, "runs": run_rows, "plots": plots, "policy": str(policy),
              "seconds": {"prepare": round(prepared - started, 1), "total": round(seconds, 1)}}  # fmt: skip
    (out / "study.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{markdown_table(table)}\n{markdown_table(effects)}", flush=True)
    print(f"{len(run_rows)} runs in {seconds / 60:.1f} min; results in {out}", flush=True)
    return result


@hydra.main(version_base=None, config_path="../conf", config_name="study")
def main(cfg: DictConfig) -> None:
    run_study(cfg)


if __name__ == "__main__":
    main()
