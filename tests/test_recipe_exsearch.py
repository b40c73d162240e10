"""The main job's ExSearch recipe end to end at toy size: warm start, E-step, M-step per variant, results, resume."""

from __future__ import annotations

import csv
import json

import pytest
from hydra import compose, initialize_config_dir

import pipelines.config  # noqa: F401
from pipelines.recipes.exsearch import (
    _split_train,
    demonstration_rows,
    fresh_name_pool,
    mstep_rows,
    with_hops,
    with_replay,
)
from pipelines.recipes.iterations import estep_questions
from pipelines.run import prepare
from tests.conftest import REPO

TOY = [
    "data.world.people_per_split=20", "data.world.companies_per_split=10", "data.world.cities_per_split=8",
    "data.world.train_questions=40", "data.world.dev_questions=10", "data.world.test_questions=10",
    "data.world.train_tool_tasks=4", "data.world.dev_tool_tasks=2", "data.world.test_tool_tasks=2",
    "model.vocab_size=400", "model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=2",
    "model.num_key_value_heads=2", "model.copy_pretrain_steps=10",
    "retriever=bm25", "engine.num_cpus=0.5",
    "recipe.iterations=1", "recipe.variants=[importance,rejection,demonstrations]", "recipe.warm_start_questions=12",
    "recipe.estep_worlds=1", "recipe.mstep_replay_rows=4",
    "recipe.warm_start_steps=10", "recipe.warm_start_worlds=1", "recipe.warm_start_world_questions=10",
    "recipe.estep_questions=8", "recipe.dev_questions=4", "recipe.eval_questions=6",
    "recipe.estep.samples_per_question=2", "recipe.estep.shard_size=4", "recipe.estep.batch_size=4",
    "recipe.agent.max_steps=2", "recipe.agent.max_tokens_per_turn=12",
    "trainer.batch_size=4", "trainer.micro_batch_size=4",
]


def test_mstep_rows_per_variant():
    import pyarrow as pa

    table = pa.table({"weight": pa.array([0.9, 0.1], pa.float32()), "correct": [True, False]})
    assert mstep_rows(table, "importance").column("weight").to_pylist() == pytest.approx([0.9, 0.1])
    assert mstep_rows(table, "uniform").column("weight").to_pylist() == [1.0, 1.0]
    assert mstep_rows(table, "rejection").num_rows == 1
    with pytest.raises(ValueError, match="'best' is not one of"):
        mstep_rows(table, "best")
    with pytest.raises(ValueError, match="has no E-step"):
        mstep_rows(table, "demonstrations")


def test_em_by_group_splits_comparisons_from_chains_of_each_length():
    from pipelines.qa_eval import em_by_group

    rows = [{"kind": "bridge", "hops": 2, "em": 1.0}, {"kind": "bridge", "hops": 2, "em": 0.0},
            {"kind": "bridge", "hops": 3, "em": 0.0}, {"kind": "comparison", "hops": 2, "em": 1.0}]
    assert em_by_group(rows) == {"2-hop": 0.5, "3-hop": 0.0, "comparison": 1.0}
    assert em_by_group([]) == {}


def test_with_hops_keeps_the_chosen_hop_counts_and_the_comparisons_with_two(small_world):
    questions = small_world.questions("train")
    assert {q["hops"] for q in questions} == {2, 3, 4}
    short = with_hops(questions, [2])
    assert short and all(q["hops"] == 2 for q in short)
    assert {q["kind"] for q in short} == {"bridge", "comparison"}
    gap = with_hops(questions, [2, 4])
    assert {q["hops"] for q in gap} == {2, 4}
    assert len(gap) == sum(q["hops"] != 3 for q in questions)
    assert with_hops(questions, []) == questions


def test_demonstration_rows_draw_each_demonstration_once_before_any_twice(tmp_path):
    from pipelines import records

    runs = [{"id": f"q{i}-0", "example_id": f"q{i}", "sample_index": 0, "prompt_ids": [1, 2], "token_ids": [10 + i],
             "loss_mask": [1], "logprobs": [0.0], "steps": [], "answer": "a", "finish_reason": "answer", "valid": True}
            for i in range(3)]
    records.write_records(runs, tmp_path, "trajectory")
    table = demonstration_rows(tmp_path, 7, seed=0)
    firsts = [row[0] for row in table.column("token_ids").to_pylist()]
    assert table.num_rows == 7 and sorted(firsts[:3]) == [10, 11, 12] and sorted(firsts[3:6]) == [10, 11, 12]
    assert table.column("weight").to_pylist() == [1.0] * 7
    assert firsts == [row[0] for row in demonstration_rows(tmp_path, 7, seed=0).column("token_ids").to_pylist()]


def test_with_replay_puts_weight_one_demonstrations_beside_the_weighted_samples(tmp_path):
    import pyarrow as pa

    from pipelines import records

    runs = [{"id": f"q{i}-0", "example_id": f"q{i}", "sample_index": 0, "prompt_ids": [1, 2], "token_ids": [10 + i],
             "loss_mask": [1], "logprobs": [0.0], "steps": [], "answer": "a", "finish_reason": "answer", "valid": True}
            for i in range(2)]
    records.write_records(runs, tmp_path, "trajectory")
    sampled = pa.table({"example_id": ["s0", "s1"], "prompt_ids": pa.array([[3], [4]], pa.list_(pa.int32())),
                        "token_ids": pa.array([[5], [6]], pa.list_(pa.int32())),
                        "loss_mask": pa.array([[1], [1]], pa.list_(pa.int8())),
                        "weight": pa.array([0.9, 0.01], pa.float32()), "correct": [True, False]})
    mixed = with_replay(mstep_rows(sampled, "importance"), demonstration_rows(tmp_path, 3, seed=0))
    assert mixed.column_names == ["prompt_ids", "token_ids", "loss_mask", "weight"]
    assert mixed.column("weight").to_pylist() == pytest.approx([0.9, 0.01, 1.0, 1.0, 1.0])
    firsts = [row[0] for row in mixed.column("token_ids").to_pylist()]
    assert firsts[:2] == [5, 6] and sorted(firsts[2:4]) == [10, 11] and firsts[4] in (10, 11)


def test_fresh_name_pool_is_about_other_worlds_and_says_nothing_of_this_one(small_world):
    documents, questions = fresh_name_pool(small_world, small_world.cfg, 2)
    names = {doc["title"] for doc in small_world.documents()}
    ids = {doc["id"] for doc in documents}
    assert questions and len(ids) == len(documents)
    assert {doc["id"].split("-doc-")[0] for doc in documents} == {"world20000", "world20001"}
    assert not any(name in doc["text"] for doc in documents for name in names)
    assert not any("-dev-" in doc["entity_id"] or "-test-" in doc["entity_id"] for doc in documents)
    for question in questions:  # answerable from the kept passages, under the prefixed ids
        assert question["id"].startswith("world2000") and set(question["supporting_passage_ids"]) <= ids
        assert [hop["passage_id"] for hop in question["decomposition"]] == question["supporting_passage_ids"]
        assert not any(name in question["question"] for name in names)


def test_each_iteration_samples_fresh_questions_until_the_pool_runs_out():
    pool = [{"id": f"q{i}"} for i in range(5)]
    ids = [[q["id"] for q in estep_questions(pool, iteration, 2)] for iteration in (1, 2, 3, 4)]
    assert ids == [["q0", "q1"], ["q2", "q3"], ["q4", "q0"], ["q1", "q2"]]
    assert [q["id"] for q in estep_questions(pool, 1, 9)] == ["q0", "q1", "q2", "q3", "q4"]  # never one twice at once
    with pytest.raises(ValueError, match="data.world.train_questions"):
        estep_questions([], 1, 2)
    demos, rest = _split_train(pool, 2, seed=0)
    assert len(demos) == 2 and sorted(q["id"] for q in demos + rest) == [q["id"] for q in pool]


@pytest.mark.slow
def test_exsearch_recipe_runs_end_to_end_and_resumes(ray_cluster, tmp_path):
    from pipelines.recipes.exsearch import run_exsearch

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*TOY, f"output_dir={tmp_path}"])
    prepared = prepare(cfg, tmp_path)
    results = run_exsearch(cfg, tmp_path, prepared)
    assert [(r["variant"], r["iteration"]) for r in results] == [
        ("importance", 0), ("rejection", 0), ("demonstrations", 0), ("importance", 1), ("rejection", 1),
        ("demonstrations", 1)]
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {"em", "f1", "valid_rate", "mean_searches"} <= set(rows[0])
    assert all(0.0 <= float(r["em"]) <= 1.0 for r in rows)
    assert (tmp_path / "curve_em.png").stat().st_size > 1000 and (tmp_path / "results.md").is_file()
    with open(tmp_path / "results_by_question.csv") as handle:  # test EM per question kind, from the answers
        by_group = list(csv.DictReader(handle))
    with open(tmp_path / "iter-01-importance" / "test_answers.csv") as handle:
        answers = list(csv.DictReader(handle))
    assert [(r["variant"], r["iteration"]) for r in by_group] == [(r["variant"], r["iteration"]) for r in rows]
    row = next(r for r in by_group if (r["variant"], r["iteration"]) == ("importance", "1"))
    expected: dict[str, list[float]] = {}
    for answer in answers:
        kind = "comparison" if answer["kind"] == "comparison" else f"{answer['hops']}-hop"
        expected.setdefault(kind, []).append(float(answer["em"]))
    assert {k for k in row if row[k] != ""} == {"variant", "iteration", "all", *expected}
    assert {k: float(row[k]) for k in expected} == pytest.approx({k: sum(v) / len(v) for k, v in expected.items()})
    assert (tmp_path / "iter-01-importance" / "estep" / "manifest.json").is_file()
    # recipe.estep_worlds=1: the E-step asks another world's questions, over an index that holds its passages
    indexed = json.loads((tmp_path / "index" / "manifest.json").read_text())["count"]
    assert indexed > len(prepared["world"].documents())
    # both variants start iteration 1 from the warm start: rejection's E-step reuses importance's samples
    shared = json.loads((tmp_path / "iter-01-rejection" / "result.json").read_text())["estep"]
    assert shared["shards_written"] == 0 and shared["shards_reused"] == 2
    from pipelines import records

    sampled = [records.read_records(tmp_path / f"iter-01-{v}" / "estep", "weighted_sample") for v in
               ("importance", "rejection")]
    assert sampled[0].num_rows == 16 and sampled[0].equals(sampled[1])
    assert all(example.startswith("world20000-") for example in sampled[0].column("example_id").to_pylist())
    with open(tmp_path / "iter-01-importance" / "mstep_metrics.csv") as handle:
        first = next(csv.DictReader(handle))
    assert float(first["lr"]) == pytest.approx(cfg.recipe.mstep_lr)  # the M-step runs at recipe.mstep_lr
    import torch

    trained = json.loads((tmp_path / "iter-01-importance" / "result.json").read_text())["trained_checkpoint"]
    state = torch.load(f"{trained}/trainer_state.pt", weights_only=False)
    # AdamW's own step count includes the warm start's steps: the M-step continued its moments
    assert float(state["optimizer"]["state"][0]["step"]) == state["step"] + cfg.recipe.warm_start_steps
    # the control samples nothing: it trains an E-step's worth of the warm start's demonstrations, and the replay's
    control = json.loads((tmp_path / "iter-01-demonstrations" / "result.json").read_text())
    assert "estep" not in control and not (tmp_path / "iter-01-demonstrations" / "estep").exists()
    sampled_rows = cfg.recipe.estep_questions * cfg.recipe.estep.samples_per_question
    assert control["mstep_rows"] == sampled_rows + cfg.recipe.mstep_replay_rows
    # every sampled variant trains its samples and as many replayed demonstrations (recipe.mstep_replay_rows)
    assert json.loads((tmp_path / "iter-01-importance" / "result.json").read_text())["mstep_rows"] == \
        sampled_rows + cfg.recipe.mstep_replay_rows
    assert (tmp_path / "iter-01-demonstrations" / "mstep_metrics.csv").is_file()
    demos = tmp_path / "iter-00-warm-start" / "demonstrations"
    assert all(records.read_records(demos, "trajectory").column("valid").to_pylist())  # gold runs are valid runs

    again = run_exsearch(cfg, tmp_path, prepare(cfg, tmp_path))  # finished iterations are reused, not rerun
    assert [r["em"] for r in again] == [r["em"] for r in results]
