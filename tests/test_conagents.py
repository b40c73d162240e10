"""ConAgents on the synthetic world's tool tasks, against the real sandbox (and the real engine): the three roles
reach the gold calls, IterCali calibrates execution and extraction from typed errors, roles may use separate engines.
"""

from __future__ import annotations

import json

import pytest

from actors.config import ModelConfig
from actors.models import build_causal_lm
from actors.tools import EXECUTION_ERROR, INVALID_VALUE, SYNTAX_ERROR, UNKNOWN_TOOL, WRONG_TYPE
from agents.conagents import ROLES, ConAgents, ConAgentsConfig
from agents.toolcall import render_calls
from pipelines import records
from tests.doubles import (
    FlakyTool,
    ScriptedPolicy,
    SyncEngine,
    TeacherForcedPolicy,
    by_query,
    conagents_oracle,
    role_and_task,
    world_sandbox,
)

CFG = ConAgentsConfig()


@pytest.fixture(scope="module")
def tasks(small_world):
    """Three of each kind of dev task: one, two, three and four gold calls, every tool."""
    tasks = small_world.tool_tasks("dev")[:33]
    assert {len(t["gold_calls"]) for t in tasks} == {1, 2, 3, 4}
    assert {c["name"] for t in tasks for c in t["gold_calls"]} == {t["name"] for t in small_world.tools()}
    return tasks


@pytest.fixture(scope="module")
def sandbox(small_world):
    return world_sandbox(small_world)


def agent(policy, sandbox, small_world, tokenizer, cfg=CFG, tools=None):
    return ConAgents(policy, sandbox, tools or small_world.tools(), tokenizer, cfg)


def steps(run, role, kind):
    return [s for s in run.trajectories[role].steps if s.role == kind]


def test_scripted_roles_reach_the_gold_calls_and_answers(tasks, sandbox, small_world, tokenizer):
    policy = ScriptedPolicy(tokenizer, conagents_oracle(by_query(tasks)))
    con = agent(policy, sandbox, small_world, tokenizer)
    runs = con.run(tasks)
    for task, run in zip(tasks, runs, strict=True):
        assert run.finish_reason == "answer" and run.answer == task["answer"], (task, run.finish_reason)
        assert run.calls == task["gold_calls"] and run.errors == []
        assert [s.text for s in steps(run, "observing", "extract")] == [
            json.loads(s.text)[0] for s in steps(run, "execution", "tool_result")]  # each response relayed as is
        assert len(steps(run, "grounding", "ground")) == len(task["gold_calls"])
    # lock step: one engine call per round and stop set, not one per task and turn
    turns = sum(1 for run in runs for t in run.trajectories.values() for s in t.steps if s.role in
                ("ground", "answer", "calls", "extract"))  # fmt: skip
    assert policy.calls <= 3 * con.rounds and turns > 10 * policy.calls
    rows = records.to_table([row for run in runs for row in run.records()], "trajectory").to_pylist()
    assert len(rows) == 3 * len(tasks) and len({r["id"] for r in rows}) == len(rows) and all(r["valid"] for r in rows)


def test_masks_cover_each_roles_own_turns_only(tasks, sandbox, small_world, tokenizer):
    task = next(t for t in tasks if len(t["gold_calls"]) == 4)
    (run,) = agent(ScriptedPolicy(tokenizer, conagents_oracle(by_query([task]))), sandbox, small_world,
                   tokenizer).run([task])  # fmt: skip
    model_roles = {"grounding": ("ground", "answer"), "execution": ("calls",), "observing": ("extract",)}
    for role, t in run.trajectories.items():
        model = [s for s in t.steps if s.role in model_roles[role]]
        observed = [s for s in t.steps if s.role not in model_roles[role]]
        assert all(set(t.loss_mask[s.start:s.end]) == {1} for s in model)
        assert all(set(t.loss_mask[s.start:s.end]) == {0} for s in observed)
        assert sum(t.loss_mask) == sum(s.end - s.start for s in model)
        assert t.example_id == f"{task['id']}/{role}"
    text = tokenizer.decode([tok for tok, m in zip(run.trajectories["execution"].token_ids,
                                                   run.trajectories["execution"].loss_mask, strict=True) if m])
    assert text == "".join(render_calls([c]) for c in task["gold_calls"])  # the execution agent wrote only calls


def test_itercali_retries_a_call_the_tool_failed(tasks, small_world, tokenizer):
    """Injected fault: every lookup fails its first call; the typed error goes back and the retry succeeds."""
    flaky = FlakyTool(small_world.tool_functions()["lookup"])
    sandbox = world_sandbox(small_world, lookup=flaky)
    chosen = [t for t in tasks if any(c["name"] == "lookup" for c in t["gold_calls"])][:6]
    runs = agent(ScriptedPolicy(tokenizer, conagents_oracle(by_query(chosen))), sandbox, small_world,
                 tokenizer).run(chosen)  # fmt: skip
    for task, run in zip(chosen, runs, strict=True):
        lookups = sum(c["name"] == "lookup" for c in task["gold_calls"])
        assert run.finish_reason == "answer" and run.answer == task["answer"] and run.calls == task["gold_calls"]
        assert [e.code for e in run.errors] == [EXECUTION_ERROR] * lookups
        errors = [json.loads(s.text) for s in steps(run, "execution", "tool_error")]
        assert len(errors) == lookups and all("service unavailable" in e["message"] for e in errors)
        assert len(steps(run, "execution", "calls")) == len(task["gold_calls"]) + lookups
    assert set(flaky.seen.values()) == {2}  # each lookup: one injected failure, one success


def test_itercali_calibrates_the_models_own_bad_calls(tasks, sandbox, small_world, tokenizer):
    """The execution agent first writes broken JSON, then a wrong value; each typed error is fed back."""

    def clumsy(task, context):
        attempts = context.rsplit("\nInstruction: ", 1)[-1].count("<results>")
        if attempts == 0:
            return '<calls>\n{"name": "lookup", "arguments": {"entity": \n</calls>'
        if attempts == 1:
            return render_calls([{"name": "lookup", "arguments": {"entity": "x", "attribute": "birthyear"}}])
        return None

    task = next(t for t in tasks if [c["name"] for c in t["gold_calls"]] == ["lookup"])
    (run,) = agent(ScriptedPolicy(tokenizer, conagents_oracle(by_query([task]), execution=clumsy)), sandbox,
                   small_world, tokenizer).run([task])  # fmt: skip
    assert run.finish_reason == "answer" and run.calls == task["gold_calls"]
    assert [(e.code, e.argument) for e in run.errors] == [(SYNTAX_ERROR, None), (INVALID_VALUE, "attribute")]
    roles = [s.role for s in run.trajectories["execution"].steps]
    assert roles == ["instruction", "malformed", "tool_error", "calls", "tool_error", "calls", "tool_result"]
    shown = tokenizer.decode(run.trajectories["execution"].token_ids)
    assert '"code":"invalid_value"' in shown and "must be one of" in shown  # the model saw what to fix


def test_calibration_gives_up_after_three_retries(tasks, small_world, tokenizer):
    broken = FlakyTool(small_world.tool_functions()["calculate"], failures=99, message="calculator down")
    task = next(t for t in tasks if [c["name"] for c in t["gold_calls"]] == ["calculate"])
    (run,) = agent(ScriptedPolicy(tokenizer, conagents_oracle(by_query([task]))), world_sandbox(small_world,
                   calculate=broken), small_world, tokenizer).run([task])  # fmt: skip
    assert CFG.max_calibrations == 3  # the paper's limit
    assert run.finish_reason == "calibration_failed: execution_error" and not run.trajectories["grounding"].valid
    assert len(steps(run, "execution", "calls")) == 4 and len(run.errors) == 4 and run.calls == []


def entity_record_tool(world):
    """A real tool over the world's data whose response is large: every attribute of an entity and its passage."""
    lookup = world.tool_functions()["lookup"]
    entities = {e["name"]: e for e in world.entities}
    passages = {d["title"]: d["text"] for d in world.documents()}

    def entity_record(entity: str) -> str:
        found = entities[entity]
        attributes = {a: lookup(entity=entity, attribute=a) for a in found["attributes"]}
        return json.dumps({"name": entity, "type": found["type"], "attributes": attributes,
                           "passage": passages.get(entity, "")})  # fmt: skip

    spec = {"name": "entity_record", "description": "Every attribute of a person, company or city, with its passage.",
            "parameters": {"type": "object", "properties": {"entity": {"type": "string"}}, "required": ["entity"]}}
    return spec, entity_record


def test_large_responses_are_read_by_a_program_and_a_failed_one_is_calibrated(tasks, small_world, tokenizer):
    spec, function = entity_record_tool(small_world)
    lookups = [t for t in tasks if [c["name"] for c in t["gold_calls"]] == ["lookup"]]
    record_tasks = [{**t, "tools": ["entity_record", "calculate"],
                     "gold_calls": [{"name": "entity_record", "arguments": {"entity": t["gold_calls"][0]["arguments"][
                         "entity"]}}], "attribute": t["gold_calls"][0]["arguments"]["attribute"]} for t in lookups]

    def program(task, step, context):
        if "\nError: " in context.rsplit("\nInstruction: ", 1)[-1]:
            return f"print(response['attributes'][{task['attribute']!r}])"
        return f"print(response[{task['attribute']!r}])"  # the attribute is not at the top level: KeyError

    policy = ScriptedPolicy(tokenizer, conagents_oracle(by_query(record_tasks), program=program))
    cfg = ConAgentsConfig(large_response_chars=150, preview_chars=60)
    runs = agent(policy, world_sandbox(small_world, [spec], entity_record=function), small_world, tokenizer, cfg,
                 tools=[*small_world.tools(), spec]).run(record_tasks)  # fmt: skip
    for task, run in zip(record_tasks, runs, strict=True):
        assert run.finish_reason == "answer" and run.answer == task["answer"] and run.calls == task["gold_calls"]
        (failure,) = run.errors
        assert failure.code == EXECUTION_ERROR and "KeyError" in failure.message and "(line 1)" in failure.message
        (response,) = steps(run, "observing", "response")
        shown = tokenizer.decode(run.trajectories["observing"].token_ids[response.start:response.end])
        output = json.loads(response.text)[0]
        assert len(output) > cfg.large_response_chars and output not in shown  # only the schema and a preview
        assert '"attributes":{"type":"object"' in shown
        assert [s.role for s in run.trajectories["observing"].steps[1:]] == ["program", "tool_error", "program",
                                                                            "program_output"]


def test_roles_can_run_on_separate_engines(tasks, sandbox, small_world, tokenizer):
    oracle = conagents_oracle(by_query(tasks[:6]))

    def only(role):
        def next_turn(context):
            assert role_and_task(context, by_query(tasks[:6]))[0] == role
            return oracle(context)

        return ScriptedPolicy(tokenizer, next_turn)

    engines = {"planner": only("grounding"), "caller": only("execution"), "reader": only("observing")}
    cfg = ConAgentsConfig(role_engines={"grounding": "planner", "execution": "caller", "observing": "reader"})
    runs = ConAgents(engines, sandbox, small_world.tools(), tokenizer, cfg).run(tasks[:6])
    assert all(run.answer == task["answer"] for task, run in zip(tasks[:6], runs, strict=True))
    assert all(engine.calls > 0 for engine in engines.values())
    with pytest.raises(ValueError, match="agent.role_engines.observing='reader': no engine by that name"):
        ConAgents({"planner": 1, "caller": 2}, sandbox, small_world.tools(), tokenizer, cfg)
    with pytest.raises(ValueError, match="missing \\['observing'\\]"):
        ConAgentsConfig(role_engines={"grounding": "a", "execution": "a"})


@pytest.mark.parametrize("turn,reason", [
    ("I would use a tool", "malformed: expected <ground>tool: intent</ground> or <answer>answer</answer>"),
    ("<ground>lookup</ground>", "malformed: expected <ground>tool: intent</ground> or <answer>answer</answer>"),
    ("<ground>teleport: somewhere</ground>", "malformed: unknown tool 'teleport'"),
])  # fmt: skip
def test_unreadable_plans_end_the_run_with_a_reason(tasks, sandbox, small_world, tokenizer, turn, reason):
    (run,) = agent(ScriptedPolicy(tokenizer, lambda context: turn), sandbox, small_world, tokenizer).run(tasks[:1])
    assert run.finish_reason == reason and all(t.finish_reason == reason for t in run.trajectories.values())


def test_endless_planning_stops_at_max_steps(tasks, sandbox, small_world, tokenizer):
    task = next(t for t in tasks if [c["name"] for c in t["gold_calls"]] == ["calculate"])
    oracle = conagents_oracle(by_query([task]))

    def never_answers(context):
        if role_and_task(context, by_query([task]))[0] == "grounding":
            return f"<ground>calculate: {json.dumps(task['gold_calls'][0]['arguments'])}</ground>"
        return oracle(context)

    (run,) = agent(ScriptedPolicy(tokenizer, never_answers), sandbox, small_world, tokenizer,
                   ConAgentsConfig(max_steps=2)).run([task])  # fmt: skip
    assert run.finish_reason == "max_steps" and len(run.calls) == 2


def test_bad_task_rows_are_named(sandbox, small_world, tokenizer):
    con = agent(ScriptedPolicy(tokenizer, lambda c: ""), sandbox, small_world, tokenizer)
    with pytest.raises(ValueError, match="task 't1': field 'tools' names unknown tool"):
        con.run([{"id": "t1", "query": "q", "tools": ["lookup", "teleport"]}])
    with pytest.raises(ValueError, match="task 't2': missing field 'query'"):
        con.run([{"id": "t2", "tools": []}])


# ---------------------------------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def long_policy(tokenizer, tmp_path_factory):
    """The tiny policy's shape and tokenizer with room for tool schemas (2048 positions)."""
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=2048, seed=3)  # fmt: skip
    return build_causal_lm(cfg, tokenizer, tmp_path_factory.mktemp("long_policy"))


@pytest.fixture(scope="module")
def engine(long_policy):
    return SyncEngine(long_policy, max_model_len=2048)


def assert_rescored(engine, run):
    for t in run.trajectories.values():
        generated = [i for i, m in enumerate(t.loss_mask) if m]
        if not generated:
            continue
        rescored = engine.score([(t.prompt_ids, t.token_ids)])[0]
        assert max(abs(rescored[i] - t.logprobs[i]) for i in generated) < 1e-4


def test_real_engine_scores_every_roles_turns(tasks, sandbox, small_world, engine):
    chosen = [t for t in tasks if len(t["gold_calls"]) <= 2][:3]
    policy = TeacherForcedPolicy(engine, engine.tokenizer, conagents_oracle(by_query(chosen)))
    cfg = ConAgentsConfig(descriptions=False)
    runs = ConAgents(policy, sandbox, small_world.tools(), engine.tokenizer, cfg).run(chosen)
    for task, run in zip(chosen, runs, strict=True):
        assert run.answer == task["answer"] and run.calls == task["gold_calls"]
        assert all(any(lp < 0 for lp in t.logprobs) for t in run.trajectories.values())  # the real model's numbers
        assert_rescored(engine, run)


def test_real_model_writing_its_own_calls_is_calibrated_then_stopped(tasks, sandbox, small_world, engine):
    """The random tiny model writes the execution turns: whatever it writes ends typed, never raises."""
    chosen = tasks[:2]
    oracle = conagents_oracle(by_query(chosen))

    def sample_execution(context):
        return None if role_and_task(context, by_query(chosen))[0] == "execution" else oracle(context)

    policy = TeacherForcedPolicy(engine, engine.tokenizer, sample_execution)
    cfg = ConAgentsConfig(descriptions=False, max_tokens_per_turn=24)
    runs = ConAgents(policy, sandbox, small_world.tools(), engine.tokenizer, cfg).run(chosen, samples=2, seed=4)
    for run in runs:  # a random model does not write a valid call block: typed errors, IterCali, then a stop
        assert run.finish_reason.startswith("calibration_failed: ") and run.calls == []
        errors = [json.loads(s.text) for s in steps(run, "execution", "tool_error")]
        assert len(errors) == cfg.max_calibrations + 1 and {e["code"] for e in errors} <= {SYNTAX_ERROR, WRONG_TYPE,
                                                                                           UNKNOWN_TOOL}
        assert_rescored(engine, run)
    records.to_table([row for run in runs for row in run.records()], "trajectory")
    assert set(ROLES) == set(runs[0].trajectories)
