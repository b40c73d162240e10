"""The main job's TTPA recipe end to end at toy size on real Ray, engines, sandbox and Ray Train: reversed
construction, SFT, held-out evaluation, token-level pairs, token_dpo, the tables and PNGs, and resumption by stage."""

from __future__ import annotations

import csv
import json

import pytest
from hydra import compose, initialize_config_dir

import pipelines.config  # noqa: F401
from pipelines import records
from pipelines.run import prepare
from tests.conftest import REPO

TOY = [
    "recipe=ttpa",
    "data.world.people_per_split=20", "data.world.companies_per_split=10", "data.world.cities_per_split=8",
    "data.world.train_questions=4", "data.world.dev_questions=2", "data.world.test_questions=2",
    "data.world.train_tool_tasks=4", "data.world.dev_tool_tasks=2", "data.world.test_tool_tasks=2",
    "model.vocab_size=400", "model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=2",
    "model.num_key_value_heads=2", "model.copy_pretrain_steps=0", "engine.num_cpus=0.5", "sandbox.num_actors=1",
    "recipe.train_tasks=16", "recipe.train_worlds=1", "recipe.test_tasks=6", "recipe.sft_steps=8",
    "recipe.pair_turns=12", "recipe.pair_tasks=8", "recipe.dpo_lr=1e-3", "recipe.pairs.max_new_tokens=40", "recipe.pairs.shard_size=6",
    "recipe.pairs.batch_size=6",
    "trainer.batch_size=4", "trainer.micro_batch_size=4",
]


def test_held_out_evaluation_scores_each_turn_and_argument(tiny_policy, small_world):
    """A scripted policy (the model's only double) answers three turns: right, a wrong copied name, cut off."""
    from transformers import AutoTokenizer

    from actors.tools import MISSING_ARGUMENT, ToolRegistry
    from pipelines.ttpa import (
        MALFORMED,
        MISSING_CALL,
        WRONG_VALUE,
        ReversedConfig,
        TTPAConfig,
        build_reversed_tasks,
        render_calls,
        turn_tasks,
    )
    from pipelines.ttpa_eval import cached, evaluate_calls
    from tests.doubles import ScriptedPolicy

    registry = ToolRegistry.from_functions(small_world.tools(), small_world.tool_functions())
    tasks, _ = build_reversed_tasks(small_world, registry, 3, "test", ReversedConfig(kinds=["lookup"]))
    turns, _ = turn_tasks(tasks, registry.call)
    gold = {t["query"]: t["gold_calls"][0] for t in turns}
    outputs = []

    def answer(context: str) -> str:
        call = gold[context.split("Query: ")[1].split("\n")[0]]
        outputs.append(call)
        if len(outputs) == 2:
            return render_calls([{**call, "arguments": {**call["arguments"], "entity": "Somebody Else"}}])
        if len(outputs) == 3:
            return render_calls([{"name": "lookup", "arguments": {"entity": call["arguments"]["entity"]}}])[:-3]
        return render_calls([call])

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy, local_files_only=True)
    specs = {spec["name"]: spec for spec in small_world.tools()}
    result = evaluate_calls(turns, ScriptedPolicy(tokenizer, answer), tokenizer, specs, TTPAConfig(),
                            cached(registry.call))  # fmt: skip
    assert [r["correct"] for r in result.rows] == [True, False, False]
    assert result.metrics["turn_accuracy"] == result.metrics["task_accuracy"] == pytest.approx(1 / 3)
    assert result.metrics["call_accuracy"] == pytest.approx(1 / 3) and result.metrics["tool_accuracy"] == 1.0
    # the unknown name also fails to run; the cut-off call lacks its attribute and its end tag
    assert result.errors == {WRONG_VALUE: 1, "execution_error": 1, MISSING_ARGUMENT: 1, MALFORMED: 1}
    assert MISSING_CALL not in result.errors
    assert result.arguments == {"lookup.attribute": [2, 3], "lookup.entity": [2, 3]}


def test_pairs_never_come_from_the_held_out_test_split(small_world, tmp_path):
    from types import SimpleNamespace

    from pipelines.recipes.ttpa import pair_split_turns

    with pytest.raises(ValueError, match="recipe.pair_split='test' is not one of"):
        pair_split_turns(small_world, None, None, SimpleNamespace(pair_split="test"), tmp_path, 0)


def _result_times(out):
    return {path.parent.name: path.stat().st_mtime_ns for path in out.glob("*/result.json")}


@pytest.mark.slow
def test_ttpa_recipe_runs_end_to_end_and_resumes_by_stage(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from pipelines.recipes.ttpa import run_ttpa

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*TOY, f"output_dir={tmp_path}"])
    rounds = run_ttpa(cfg, tmp_path, prepare(cfg, tmp_path))

    assert [(r["round"], r["stage"]) for r in rounds] == [(0, "sft"), (1, "token_dpo")]
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2
    assert {"turn_accuracy", "task_accuracy", "call_accuracy", "score", "turns", "pairs"} <= set(table[0])
    assert any(column.startswith("err_") for column in table[0])  # the error breakdown, a column per code
    for name in ("results.md", "errors.md", "errors.csv", "arguments.md"):
        assert (tmp_path / name).is_file()
    for png in ("errors.png", "accuracy.png"):
        assert (tmp_path / png).stat().st_size > 1000

    data = json.loads((tmp_path / "data" / "result.json").read_text())
    assert data["test_tasks"] == 6 and data["train_turns"] >= 16 and data["other_world_turns"] > 0
    train_ids = set(records.read_records(tmp_path / "data" / "train", "tool_task").column("id").to_pylist())
    test_ids = set(records.read_records(tmp_path / "data" / "test", "tool_task").column("id").to_pylist())
    assert train_ids and test_ids and not train_ids & test_ids
    # the pairs' tasks are built on the dev split's entities: neither the SFT's nor the held-out test's
    pair_tasks = records.read_records(tmp_path / "data" / "pairs-dev", "tool_task").to_pylist()
    names = {}
    for entity in prepare(cfg, tmp_path)["world"].entities:  # (countries belong to no split)
        names.setdefault(entity["split"], set()).add(entity["name"])
    assert pair_tasks and all(t["split"] == "dev" for t in pair_tasks)
    first_entities = {json.loads(t["gold_calls"])[0]["arguments"].get("entity") for t in pair_tasks}
    assert first_entities & names["dev"] and not first_entities & (names["train"] | names["test"])

    # the metrics are the scored greedy outputs of each round's policy, turn by turn
    for folder, row in (("eval-00", rounds[0]), ("eval-01", rounds[1])):
        with open(tmp_path / folder / "test_calls.csv") as handle:
            calls = list(csv.DictReader(handle))
        assert len(calls) == row["turns"] == data["test_turns"]
        assert row["turn_accuracy"] == pytest.approx(sum(c["correct"] == "True" for c in calls) / len(calls))
        assert row["score"] == pytest.approx(sum(float(c["score"]) for c in calls) / len(calls))
        errors = sum(len(c["errors"].split()) for c in calls)
        assert errors == sum(v for k, v in row.items() if k.startswith("err_"))

    with open(tmp_path / "arguments.csv") as handle:  # e.g. lookup.entity: the policy's copy of a name, judged alone
        arguments = list(csv.DictReader(handle))  # (none when the toy policy never calls the right tool)
    assert all(0.0 <= float(a[k]) <= 1.0 for a in arguments for k in a if k.startswith("sft") and a[k])

    pairs = records.read_records(tmp_path / "pairs-01" / "pairs", "preference_pair").to_pylist()
    assert pairs and rounds[1]["pairs"] == len(pairs)
    for pair in pairs:  # chosen and rejected part at the branch point, the scorer preferring the gold
        cut = pair["prefix_length"]
        assert pair["chosen_ids"][:cut] == pair["rejected_ids"][:cut] and pair["chosen_ids"][cut] != pair["rejected_ids"][cut]
        assert pair["chosen_score"] - pair["rejected_score"] > cfg.recipe.pairs.margin

    sft = json.loads((tmp_path / "sft" / "result.json").read_text())["checkpoint"]
    dpo = json.loads((tmp_path / "dpo-01" / "result.json").read_text())
    assert dpo["trained"] and dpo["checkpoint"] != sft
    before, after = load_file(f"{sft}/model.safetensors"), load_file(f"{dpo['checkpoint']}/model.safetensors")
    assert any(not before[name].equal(after[name]) for name in before)  # token_dpo moved the policy

    # a rerun reuses every finished stage; a stage whose result.json is gone is the only one redone
    stamps = _result_times(tmp_path)
    assert set(stamps) == {"data", "sft", "eval-00", "pairs-01", "dpo-01", "eval-01"}
    again = run_ttpa(cfg, tmp_path, prepare(cfg, tmp_path))
    assert again == rounds and _result_times(tmp_path) == stamps
    (tmp_path / "eval-01" / "result.json").unlink()
    redone = run_ttpa(cfg, tmp_path, prepare(cfg, tmp_path))
    changed = {name for name, stamp in _result_times(tmp_path).items() if stamps.get(name) != stamp}
    assert changed == {"eval-01"} and redone == rounds  # greedy decoding: the same verdicts again
