"""360°REA on the synthetic world's tool tasks, against the real sandbox, the real embedder and the real experience
pool (in-process and as a Ray actor): leader and crew reach the gold calls, 360° assessments send bad work back,
experience is reused across similar tasks, persists across actor restarts and is shared by concurrent agents."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray

from actors.config import ModelConfig
from actors.experience import LOG_NAME, ExperienceClient, ExperienceConfig, ExperiencePoolCore, start_experience_pool
from actors.models import build_causal_lm
from actors.tools import EXECUTION_ERROR, SYNTAX_ERROR
from agents.rea360 import REAAgent, REAConfig, parse_assessment, parse_plan, weighted_score
from pipelines import records
from tests.doubles import (
    FlakyTool,
    ScriptedPolicy,
    SyncEngine,
    TeacherForcedPolicy,
    by_query,
    rea_oracle,
    tool_outputs,
    world_sandbox,
)


@pytest.fixture(scope="module")
def sandbox(small_world):
    return world_sandbox(small_world)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return ExperiencePoolCore(ExperienceConfig(path=str(tmp_path_factory.mktemp("experience"))))


def agent(tasks, sandbox, small_world, tokenizer, pool, cfg=None, **oracle):
    policy = ScriptedPolicy(tokenizer, rea_oracle(by_query(tasks), tool_outputs(small_world), **oracle))
    return REAAgent(policy, sandbox, small_world.tools(), tokenizer, pool, cfg)


def test_leader_and_crew_reach_the_gold_calls(small_world, sandbox, tokenizer, pool):
    tasks = small_world.tool_tasks("dev")[:22]
    runs = agent(tasks, sandbox, small_world, tokenizer, pool).run(tasks)
    for task, run in zip(tasks, runs, strict=True):
        assert run.finish_reason == "answer" and run.answer == task["answer"], (task, run.errors)
        assert run.calls == task["gold_calls"] and run.errors == []
        assert len(run.plan) == len(task["gold_calls"])
        assert [(a["subtask"], a["crew"], a["self"], a["peer"], a["leader"], a["combined"]) for a in run.assessments] \
            == [(i + 1, f"crew-{i % 2 + 1}", 5, 5, 5, 5.0) for i in range(len(task["gold_calls"]))]
        assert set(run.trajectories) == {"leader", "crew-1", "crew-2"} or len(task["gold_calls"]) == 1
    chained = next(run for run, task in zip(runs, tasks, strict=True) if len(task["gold_calls"]) == 4)
    assert "#1" in chained.plan[1]  # the leader passes the founder found by subtask 1 to subtask 2 by reference
    lessons = pool.items_of("global")
    assert {e["task_id"] for e in lessons} == {run.local_id for run in runs} and all(e["score"] == 5.0
                                                                                     for e in lessons)
    rows = records.to_table([row for run in runs for row in run.records()], "trajectory").to_pylist()
    assert all(r["valid"] for r in rows) and len({r["id"] for r in rows}) == len(rows)
    leader = runs[0].trajectories["leader"]
    model = [s for s in leader.steps if s.role in ("plan", "assessment", "answer")]
    assert sum(leader.loss_mask) == sum(s.end - s.start for s in model) and model[0].role == "plan"


def test_similar_tasks_are_given_earlier_lessons(small_world, sandbox, tokenizer, tmp_path):
    """Global experience: lessons written on train tasks reach the dev tasks of the same kind, by embedding
    similarity, and each use averages the new task's assessed score into the lesson's."""
    pool = ExperiencePoolCore(ExperienceConfig(path=str(tmp_path)))
    train, dev = small_world.tool_tasks("train")[:22], small_world.tool_tasks("dev")[:22]

    def lesson(task):
        return "Use " + " then ".join(c["name"] for c in task["gold_calls"])

    agent(train, sandbox, small_world, tokenizer, pool, lesson=lesson).run(train)
    runs = agent(dev, sandbox, small_world, tokenizer, pool, lesson=lesson).run(dev)
    lessons = {e["id"]: e for e in pool.items_of("global")}
    first_tool = [lessons[run.given[0]]["text"].split()[1] == task["gold_calls"][0]["name"]
                  for task, run in zip(dev, runs, strict=True) if run.given]  # fmt: skip
    assert len(first_tool) >= 20 and sum(first_tool) / len(first_tool) >= 0.8  # the nearest lesson fits the task
    run = next(r for r in runs if r.given)
    for role in ("leader", "crew-1"):
        prompt = tokenizer.decode(run.trajectories[role].prompt_ids)
        assert "Experience from similar tasks:" in prompt and lessons[run.given[0]]["text"] in prompt
    used = [lessons[i] for r in runs for i in r.given]
    assert all(e["updates"] >= 2 for e in used)  # each use was assessed and averaged in
    assert {e["task_id"].split("#")[0] for e in lessons.values()} == {t["id"] for t in train + dev}


def test_a_low_assessment_sends_the_subtask_back_with_its_feedback(small_world, tokenizer, pool):
    """Injected fault: every lookup fails once; the 360° assessors score the failed attempt low, the feedback becomes
    local experience, and the crew agent redoes the subtask with it."""
    flaky = FlakyTool(small_world.tool_functions()["lookup"])
    tasks = [t for t in small_world.tool_tasks("dev")[:22] if t["gold_calls"][0]["name"] == "lookup"][:3]
    runs = agent(tasks, world_sandbox(small_world, lookup=flaky), small_world, tokenizer, pool).run(tasks)
    for task, run in zip(tasks, runs, strict=True):
        assert run.finish_reason == "answer" and run.answer == task["answer"] and run.calls == task["gold_calls"]
        for call_index, call in enumerate(task["gold_calls"], 1):
            rounds = [a for a in run.assessments if a["subtask"] == call_index]
            if call["name"] == "lookup":
                assert [(a["round"], a["combined"], a["error"]) for a in rounds] == [(0, 1.0, EXECUTION_ERROR),
                                                                                     (1, 5.0, None)]
            else:
                assert [(a["round"], a["combined"]) for a in rounds] == [(0, 5.0)]
        local = pool.items_of("local", run.local_id)
        assert {e["author"].split(":")[0] for e in local if e["score"] == 1} == {"self", "peer", "leader"}
        shown = tokenizer.decode(run.trajectories["crew-1"].token_ids)
        assert "\nRevise subtask 1: " in shown and "Feedback:\n- the call failed (execution_error)" in shown


def test_revisions_are_bounded(small_world, tokenizer, pool):
    broken = FlakyTool(small_world.tool_functions()["calculate"], failures=99, message="calculator down")
    task = next(t for t in small_world.tool_tasks("dev") if [c["name"] for c in t["gold_calls"]] == ["calculate"])
    cfg = REAConfig(max_revisions=2)
    (run,) = agent([task], world_sandbox(small_world, calculate=broken), small_world, tokenizer, pool,
                   cfg).run([task])  # fmt: skip
    assert [(a["round"], a["combined"]) for a in run.assessments] == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert run.calls == [] and [e.code for e in run.errors] == [EXECUTION_ERROR] * 3
    assert run.finish_reason == "answer" and run.answer == "error"  # the crew reported the failure; nothing hid it


def test_plans_and_assessments_are_parsed_strictly():
    assert parse_plan("1. lookup X\n2) calculate #1\n\n- answer") == ["lookup X", "calculate #1", "answer"]
    assert parse_assessment('<assess>{"score": 4, "feedback": "fine"}</assess>') == (4, "fine", None)
    for bad in ("<assess>great</assess>", '<assess>{"score": 9}</assess>', '<assess>{"score": true}</assess>',
                "no tags"):
        score, _, error = parse_assessment(bad)
        assert score is None and error.code == SYNTAX_ERROR
    weights = {"self": 0.2, "peer": 0.3, "leader": 0.5}
    assert weighted_score({"self": 5, "peer": 1, "leader": 3}, weights) == 2.8
    assert weighted_score({"self": 5, "peer": None, "leader": 3}, weights) == pytest.approx((1 + 1.5) / 0.7, abs=1e-4)
    assert weighted_score(dict.fromkeys(weights), weights) == 0.0
    with pytest.raises(ValueError, match="assessment_weights"):
        REAConfig(assessment_weights={"self": 1.0})
    with pytest.raises(ValueError, match="agent.crew_size must be >= 1"):
        REAConfig(crew_size=0)


def test_an_unreadable_plan_ends_the_run(small_world, sandbox, tokenizer, pool):
    policy = ScriptedPolicy(tokenizer, lambda context: "I will do it all myself.")
    (run,) = REAAgent(policy, sandbox, small_world.tools(), tokenizer, pool).run(small_world.tool_tasks("dev")[:1])
    assert run.finish_reason.startswith("malformed: expected 1 to 6 subtasks")


def test_real_engine_scores_every_agents_turns(small_world, sandbox, tokenizer, pool, tmp_path_factory):
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=4096, seed=5)  # fmt: skip
    engine = SyncEngine(build_causal_lm(cfg, tokenizer, tmp_path_factory.mktemp("rea_policy")), max_model_len=4096)
    tasks = [t for t in small_world.tool_tasks("dev")[:22] if len(t["gold_calls"]) == 2][:2]
    policy = TeacherForcedPolicy(engine, engine.tokenizer, rea_oracle(by_query(tasks), tool_outputs(small_world)))
    runs = REAAgent(policy, sandbox, small_world.tools(), engine.tokenizer, pool,
                    REAConfig(descriptions=False)).run(tasks)  # fmt: skip
    for task, run in zip(tasks, runs, strict=True):
        assert run.answer == task["answer"]
        for t in run.trajectories.values():
            generated = [i for i, m in enumerate(t.loss_mask) if m]
            rescored = engine.score([(t.prompt_ids, t.token_ids)])[0]
            assert generated and max(abs(rescored[i] - t.logprobs[i]) for i in generated) < 1e-4


# ---------------------------------------------------------------------------------------------------- the pool actor


def test_the_pool_survives_actor_restarts_and_a_torn_write(ray_cluster, tmp_path):
    cfg = ExperienceConfig(path=str(tmp_path), max_restarts=2, max_task_retries=3)
    client = ExperienceClient(start_experience_pool(cfg))
    ids = client.add([{"level": "global", "key": "Convert 3 miles to metres.", "text": "Use convert_units",
                       "score": 4}, {"level": "local", "key": "lookup X", "text": "wrong attribute", "score": 1,
                                     "task_id": "t1"}])  # fmt: skip
    client.update({ids[0]: 2.0}, assessment="task-a")
    client.update({ids[0]: 2.0}, assessment="task-a")  # the same assessment again (a retry) counts once
    before = client.info()
    ray.kill(client.actor, no_restart=False)  # a crash: Ray restarts the actor, which replays its log
    deadline, after = time.monotonic() + 120, before
    while after["pid"] == before["pid"]:  # the kill is asynchronous: wait for the restarted process
        assert time.monotonic() < deadline, "the pool actor did not come back"
        try:
            after = client.info()
        except (ray.exceptions.RayActorError, TimeoutError):
            time.sleep(1)
    assert after["counts"] == {"local": 1, "global": 1} and after["replayed"] == 3
    (found,) = client.query(["How many feet are in 12 kilometres?"], k=1)
    assert found[0]["id"] == ids[0] and found[0]["score"] == 3.0 and found[0]["updates"] == 2
    assert client.add([{"level": "global", "key": "Convert 3 miles to metres.", "text": "Use convert_units",
                        "score": 4}]) == [ids[0]]  # adding it again (a retried add) stores nothing new
    with open(tmp_path / LOG_NAME, "a") as handle:  # a crash in the middle of a write
        handle.write('{"op": "add", "item": {"id": "x')
    fresh = ExperienceClient(start_experience_pool(cfg))
    assert fresh.info()["counts"] == {"local": 1, "global": 1}
    assert [e["id"] for e in fresh.items_of()] == ids
    assert (tmp_path / LOG_NAME).read_text().endswith("}\n")  # the torn line was cut off
    with pytest.raises(ValueError, match="experience 0: a local experience needs a 'task_id'"):
        fresh.add([{"level": "local", "key": "k", "text": "t", "score": 1}])
    for actor in (client.actor, fresh.actor):
        ray.kill(actor, no_restart=True)


def test_concurrent_agents_share_one_pool(ray_cluster, small_world, tokenizer, tmp_path):
    client = ExperienceClient(start_experience_pool(ExperienceConfig(path=str(tmp_path))))
    train = small_world.tool_tasks("train")[:22]
    halves = [train[0::2], train[1::2]]
    results, errors = {}, []

    def work(index):
        try:
            sandbox = world_sandbox(small_world)
            results[index] = agent(halves[index], sandbox, small_world, tokenizer, client).run(halves[index])
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors and all(run.answer == task["answer"] for i in range(2)
                              for task, run in zip(halves[i], results[i], strict=True))  # fmt: skip
    lessons = client.items_of("global")
    assert sorted(e["task_id"] for e in lessons) == sorted(run.local_id for i in range(2) for run in results[i])
    dev = small_world.tool_tasks("dev")[:11]
    runs = agent(dev, world_sandbox(small_world), small_world, tokenizer, client).run(dev)
    authors = {lesson["task_id"].split("#")[0] for run in runs for lesson in lessons if lesson["id"] in run.given}
    assert authors & {t["id"] for t in halves[0]} and authors & {t["id"] for t in halves[1]}  # both agents' lessons
    assert json.loads(json.dumps(client.info()))["counts"]["global"] == len(train) + len(dev)
    ray.kill(client.actor, no_restart=True)
