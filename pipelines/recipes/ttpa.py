"""The TTPA recipe: reversed construction -> SFT -> token-level preference pairs -> `token_dpo`, judged on held-out
tool tasks by the error-oriented scorer.

    connect -> world -> the world's tools in a SandboxPool ->
    data:    reversed construction (pipelines/ttpa.py): train tasks on the world's train split, held-out test tasks
             (on the test split's entities by default); each chain cut into the turns a model makes its calls in
             (a call that needs an earlier result waits for it), so every gold value is in the query or a result
    sft:     SFT of the policy on the train turns (prompt -> gold calls), Ray Train
    eval-00: greedy calls on the held-out turns, scored by the TTPA error scorer (exact accuracies, mean score,
             error counts by code)
    for t in 1..T:
      pairs-t: token-level pairs on the train turns with the current policy (Ray Data over the engine and sandbox
               actors), kept when the error scorer prefers the gold by more than the margin
      dpo-t:   `token_dpo` from the current policy (the frozen reference), Ray Train
      eval-t:  the same held-out evaluation
    -> results.csv / results.md (one row per round: accuracies, score, error counts), errors.csv / errors.md (one row
       per error code, a column per round) and errors.png (error counts before / after), accuracy.png.

Every stage writes `result.json` in its folder last; a rerun on the same output folder skips finished stages (pair
shards and training checkpoints inside an unfinished stage are resumed by their own writers).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipelines import records
from pipelines.recipes.iterations import finished_result, write_result
from pipelines.report import markdown_table, plot_bars, plot_curves, write_table

log = logging.getLogger(__name__)

TEST_ENTITIES = ("test", "train")
"""`recipe.test_entities`: held-out tasks on the test split's entities (names the policy never saw), or new tasks on
the train split's entities (chains, phrasings and attribute choices the policy never saw, names it did)."""


class _Policy:
    """The engine actors, started on first use and reloaded when a stage needs another checkpoint."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.engines, self.pool, self.loaded = cfg, None, None, None

    def at(self, checkpoint: str):
        from actors.llm import EnginePool, start_engines

        if self.engines is None:
            self.engines = start_engines(checkpoint, self.cfg.engine, self.cfg.model.dtype)
            self.pool = EnginePool(self.engines, self.cfg.engine.request_timeout_s)
        elif self.loaded != checkpoint:
            self.pool.reload(checkpoint)
        self.loaded = checkpoint
        return self.pool

    def close(self) -> None:
        import ray

        for engine in self.engines or []:
            ray.kill(engine)


def _reversed_config(recipe, seed: int):
    """The recipe's reversed construction settings, its seed offset by the job's (`seed=1` is another draw)."""
    from pipelines.ttpa import ReversedConfig

    values = OmegaConf.to_container(recipe.reversed, resolve=True)
    return ReversedConfig(**{**values, "seed": values["seed"] + seed})


def build_tasks(world, sandbox, recipe, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(train tasks, held-out test tasks, construction figures), disjoint by their gold calls."""
    from pipelines.ttpa import build_reversed_tasks

    if recipe.test_entities not in TEST_ENTITIES:
        raise ValueError(f"recipe.test_entities={recipe.test_entities!r} is not one of {TEST_ENTITIES}")
    reversed_cfg = _reversed_config(recipe, seed)
    if recipe.test_entities == "train":  # one construction deduplicates its samples: the tail is new to the head
        tasks, report = build_reversed_tasks(world, sandbox, recipe.train_tasks + recipe.test_tasks, "train",
                                             reversed_cfg)  # fmt: skip
        random.Random(seed).shuffle(tasks)
        train, test = tasks[: recipe.train_tasks], tasks[recipe.train_tasks :]
        figures = {"train": report.rows()}
    else:
        train, train_report = build_reversed_tasks(world, sandbox, recipe.train_tasks, "train", reversed_cfg)
        test, test_report = build_reversed_tasks(world, sandbox, recipe.test_tasks, "test", reversed_cfg)
        figures = {"train": train_report.rows(), "test": test_report.rows()}
    for name, part, wanted in (("train", train, recipe.train_tasks), ("test", test, recipe.test_tasks)):
        if len(part) < wanted:
            log.warning("reversed construction built %d of the %d %s tasks asked for (the world is too small "
                        "for more distinct chains)", len(part), wanted, name)  # fmt: skip
    return train, test, figures


def other_worlds(world, count: int) -> list:
    """`count` other seeded worlds of the same sizes (other names); their facts never meet this world's tools."""
    from dataclasses import replace

    from pipelines.data.world import build_world

    return [build_world(replace(world.cfg, seed=world.cfg.seed + 20_000 + index, dev_questions=1, test_questions=1))
            for index in range(count)]  # fmt: skip


def other_world_tasks(world, other, count: int, recipe, seed: int) -> list[dict]:
    """Reversed tasks on another world's train split (its tools in-process), minus any that names an entity of this
    world: the same name with other facts would teach this world's held-out entities wrong values."""
    from actors.tools import ToolRegistry
    from pipelines.ttpa import build_reversed_tasks

    names = [entity["name"] for entity in world.entities]
    reversed_cfg = _reversed_config(recipe, seed)
    registry = ToolRegistry.from_functions(other.tools(), other.tool_functions())
    tasks, _ = build_reversed_tasks(other, registry, count, "train", reversed_cfg)
    fresh = [t for t in tasks if not any(name in t["query"] or name in json.dumps(t["gold_calls"]) for name in names)]
    return [{**t, "id": f"world{other.cfg.seed}-{t['id']}"} for t in fresh]


def load_turns(folder: Path, execute) -> list[dict]:
    """A stored task folder cut into turns (re-executing the gold calls: tools are deterministic)."""
    from pipelines.ttpa import turn_tasks

    tasks = records.read_records(folder, "tool_task").to_pylist()
    turns, dropped = turn_tasks(tasks, execute)
    if dropped:
        raise RuntimeError(f"{folder}: {len(dropped)} stored task(s) whose gold calls no longer run, e.g. {dropped[0]}")
    return turns


PAIR_SPLITS = ("train", "dev")
"""`recipe.pair_split`: pairs on the SFT's own train turns, or on reversed tasks over the dev split's entities."""


def pair_split_turns(world, sandbox, execute, recipe, folder: Path, seed: int) -> list[dict]:
    """Turns of reversed tasks on `recipe.pair_split`'s entities, built once into `folder` (then re-read).

    Why another split's entities: on its own train turns the SFT policy is nearly always right, so the branches sit on
    alternatives it already rejects; on names it never saw it makes the held-out mistakes (copying a name or a value),
    and the pairs say which continuation was right there. The test split's entities stay unseen."""
    from pipelines.ttpa import build_reversed_tasks, tool_task_records

    if recipe.pair_split not in PAIR_SPLITS:
        raise ValueError(f"recipe.pair_split={recipe.pair_split!r} is not one of {PAIR_SPLITS}")
    if not (folder / records.MANIFEST).is_file():
        tasks, _ = build_reversed_tasks(world, sandbox, recipe.pair_tasks, recipe.pair_split,
                                        _reversed_config(recipe, seed))
        records.write_records(tool_task_records(tasks), folder, "tool_task",
                              {"recipe": OmegaConf.to_container(recipe, resolve=True)})
    return load_turns(folder, execute)


def sft_rows(turns: list[dict], tokenizer, specs: dict, tool_schemas: bool) -> list[dict]:
    """prompt -> the gold call block, every target token trained on."""
    from pipelines.ttpa import render_calls, task_prompt

    rows = []
    for turn in turns:
        target = tokenizer(render_calls(json.loads(turn["gold_calls"]) if isinstance(turn["gold_calls"], str)
                                        else turn["gold_calls"]), add_special_tokens=False)["input_ids"]  # fmt: skip
        rows.append({"prompt_ids": tokenizer(task_prompt(turn, specs, tool_schemas))["input_ids"],
                     "token_ids": target, "loss_mask": [1] * len(target), "weight": 1.0})  # fmt: skip
    return rows


def run_ttpa(cfg: DictConfig, out: Path, prepared: dict) -> list[dict]:
    from transformers import AutoTokenizer

    from actors.sandbox import SandboxPool
    from actors.tools import ToolRegistry
    from cluster.resources import Placement
    from pipelines.train import TrainSettings, run_training
    from pipelines.ttpa import TTPAConfig, run_ttpa_generation
    from pipelines.ttpa_eval import cached, evaluate_calls

    recipe = cfg.recipe
    world, policy = prepared["world"], str(prepared["policy"])
    ttpa_cfg = TTPAConfig(**OmegaConf.to_container(recipe.pairs, resolve=True))
    started = time.perf_counter()
    specs = {spec["name"]: spec for spec in world.tools()}
    sandbox = SandboxPool(ToolRegistry.from_functions(world.tools(), world.tool_functions()),
                          OmegaConf.to_object(cfg.sandbox))
    execute = cached(sandbox.call)
    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    engines = _Policy(cfg)
    placement = Placement.of_trainer(cfg.trainer)

    def train(rows, settings: TrainSettings, folder: Path, name: str):
        return run_training(rows, settings, folder, cfg.trainer.num_workers, cfg.trainer.cpus_per_worker,
                            cfg.trainer.use_gpu, cfg.trainer.max_failures, resume=True, name=name,
                            placement=placement)  # fmt: skip

    # ---- data ---------------------------------------------------------------------------------------------------
    data_dir = out / "data"
    data = finished_result(data_dir)
    worlds = other_worlds(world, recipe.train_worlds)
    if data is None:
        from pipelines.ttpa import tool_task_records

        train_tasks, test_tasks, figures = build_tasks(world, sandbox, recipe, cfg.seed)
        parts = {"train": train_tasks, "test": test_tasks}
        for index, other in enumerate(worlds):
            parts[f"train-world-{index}"] = other_world_tasks(world, other, recipe.train_tasks, recipe, cfg.seed)
        for name, tasks in parts.items():
            records.write_records(tool_task_records(tasks), data_dir / name, "tool_task",
                                  {"recipe": OmegaConf.to_container(recipe, resolve=True)})  # fmt: skip
    train_turns, test_turns = load_turns(data_dir / "train", execute), load_turns(data_dir / "test", execute)
    extra_turns = []
    for index, other in enumerate(worlds):
        registry = ToolRegistry.from_functions(other.tools(), other.tool_functions())
        extra_turns += load_turns(data_dir / f"train-world-{index}", registry.call)
    if data is None:
        data = write_result(data_dir, {"train_tasks": len(train_tasks), "test_tasks": len(test_tasks),
                                  "other_world_tasks": sum(len(t) for n, t in parts.items() if n.startswith("train-")),
                                  "train_turns": len(train_turns), "other_world_turns": len(extra_turns),
                                  "test_turns": len(test_turns), "construction": figures})  # fmt: skip
    print(f"[ttpa] {data['train_tasks']} train tasks ({len(train_turns)} turns) + {len(extra_turns)} turns from "
          f"{len(worlds)} other worlds; {data['test_tasks']} held-out tasks ({len(test_turns)} turns) on the "
          f"{recipe.test_entities} split's entities", flush=True)  # fmt: skip

    # ---- SFT ----------------------------------------------------------------------------------------------------
    sft_dir = out / "sft"
    sft = finished_result(sft_dir)
    if sft is None:
        rows = sft_rows(train_turns + extra_turns, tokenizer, specs, ttpa_cfg.tool_schemas)
        settings = TrainSettings.from_config(cfg.trainer, policy, objective="sft", lr=recipe.sft_lr,
                                             lr_schedule="cosine", epochs=10_000, max_steps=recipe.sft_steps,
                                             micro_batch_size=recipe.micro_batch_size)  # fmt: skip
        print(f"[ttpa] SFT on {len(rows)} turns for {recipe.sft_steps} steps", flush=True)
        trained = train(rows, settings, sft_dir, "sft")
        sft = write_result(sft_dir, {"checkpoint": str(trained.checkpoint), "rows": len(rows),
                                "final_loss": trained.metrics.get("loss")})  # fmt: skip

    def evaluate(folder: Path, checkpoint: str) -> dict:
        result = finished_result(folder)
        if result is None:
            evaluation = evaluate_calls(test_turns, engines.at(checkpoint), tokenizer, specs, ttpa_cfg, execute)
            write_table(evaluation.rows, folder, "test_calls")
            result = write_result(folder, {"checkpoint": checkpoint, "metrics": evaluation.metrics,
                                      "errors": evaluation.errors, "arguments": evaluation.arguments})  # fmt: skip
        return result

    evaluations = [evaluate(out / "eval-00", sft["checkpoint"])]
    rounds = [{"round": 0, "stage": "sft", **_row(evaluations[0])}]
    print(markdown_table(rounds), flush=True)

    # ---- preference rounds --------------------------------------------------------------------------------------
    current = sft["checkpoint"]
    pair_source = train_turns if recipe.pair_split == "train" else pair_split_turns(
        world, sandbox, execute, recipe, data_dir / f"pairs-{recipe.pair_split}", cfg.seed)
    for t in range(1, recipe.rounds + 1):
        pairs_dir = out / f"pairs-{t:02d}"
        pairs = finished_result(pairs_dir)
        if pairs is None:
            chosen_turns = pair_source[: recipe.pair_turns] if recipe.pair_turns > 0 else pair_source
            engines.at(current)
            summary = run_ttpa_generation(chosen_turns, pairs_dir / "pairs", engines.engines, sandbox, current,
                                          ttpa_cfg, {"round": t, "ttpa": asdict(ttpa_cfg)})  # fmt: skip
            pairs = write_result(pairs_dir, {"policy": current, "summary": asdict(summary)})
        dpo_dir = out / f"dpo-{t:02d}"
        dpo = finished_result(dpo_dir)
        if dpo is None:
            table = records.read_records(pairs_dir / "pairs", "preference_pair")
            # token_dpo continues the policy's AdamW moments (as the EM recipes' M-steps do)
            settings = TrainSettings.from_config(cfg.trainer, current, objective="token_dpo", lr=recipe.dpo_lr,
                                                 beta=recipe.dpo_beta, epochs=recipe.dpo_epochs,
                                                 max_steps=recipe.dpo_steps, lr_schedule="linear",
                                                 micro_batch_size=recipe.micro_batch_size,
                                                 rpo_alpha=recipe.dpo_rpo_alpha,
                                                 optimizer_from=current)  # fmt: skip
            if table.num_rows >= settings.batch_size:
                print(f"[ttpa {t}] token_dpo on {table.num_rows} pairs", flush=True)
                trained = train(table, settings, dpo_dir, "token_dpo")
                dpo = {"checkpoint": str(trained.checkpoint), "trained": True, "pairs": table.num_rows,
                       "final_loss": trained.metrics.get("loss")}  # fmt: skip
            else:  # too few pairs for one batch: the policy stays as it was, and the table says so
                print(f"[ttpa {t}] {table.num_rows} pairs < batch_size={settings.batch_size}: no training", flush=True)
                dpo = {"checkpoint": current, "trained": False, "pairs": table.num_rows, "final_loss": None}
            dpo = write_result(dpo_dir, dpo)
        current = dpo["checkpoint"]
        evaluations.append(evaluate(out / f"eval-{t:02d}", current))
        row = {"round": t, "stage": "token_dpo", **_row(evaluations[-1]),
               "pairs": dpo["pairs"], "dpo_loss": dpo["final_loss"]}  # fmt: skip
        rounds.append(row)
        print(markdown_table(rounds[-1:]), flush=True)
    engines.close()
    sandbox.shutdown()
    report(rounds, [e["arguments"] for e in evaluations], out, time.perf_counter() - started, recipe.test_entities)
    return rounds


def _row(result: dict) -> dict:
    m = result["metrics"]
    row = {k: m[k] for k in ("turn_accuracy", "task_accuracy", "call_accuracy", "tool_accuracy", "score", "turns", "tasks")}
    return {**row, **{f"err_{code}": n for code, n in result["errors"].items()}}


def report(rounds: list[dict], arguments: list[dict], out: Path, seconds: float, test_entities: str) -> None:
    """results.csv / results.md, errors.csv / errors.md (error code x round), arguments.csv / arguments.md (argument
    accuracy x round) and the PNGs."""
    codes = sorted({k[4:] for row in rounds for k in row if k.startswith("err_")},
                   key=lambda code: -rounds[0].get(f"err_{code}", 0))  # fmt: skip
    for row in rounds:  # every round has every code's column (0 when it was not seen)
        row.update({f"err_{code}": row.get(f"err_{code}", 0) for code in codes})
    title = (f"TTPA: held-out tool calls ({rounds[0]['turns']} turns of {rounds[0]['tasks']} tasks on the "
             f"{test_entities} split's entities) per round, round 0 = SFT ({seconds / 60:.1f} min)")  # fmt: skip
    write_table(rounds, out, "results", title=title)
    labels = [f"{row['stage']} (round {row['round']})" for row in rounds]
    errors = [{"error": code, **{label: row[f"err_{code}"] for label, row in zip(labels, rounds, strict=True)}}
              for code in codes]  # fmt: skip
    write_table(errors, out, "errors", title="Errors found by the TTPA scorer on the held-out turns, per round")
    names = sorted({name for tallies in arguments for name in tallies})
    rows = [{"argument": name, "asked": arguments[0].get(name, [0, 0])[1],
             **{label: (tallies[name][0] / tallies[name][1] if tallies.get(name) else None)
                for label, tallies in zip(labels, arguments, strict=True)}} for name in names]  # fmt: skip
    write_table(rows, out, "arguments", title="Held-out argument accuracy (calls to the right tool), per round")
    if codes:
        plot_bars(errors, "error", labels, out / "errors.png", title="held-out errors by type, per round")
    plot_curves(rounds, "round", ["turn_accuracy", "call_accuracy", "score"], out / "accuracy.png",
                title="held-out tool calls by round (0 = SFT)")
    print(markdown_table(rounds), flush=True)
    print(f"Results: {out / 'results.md'}", flush=True)
