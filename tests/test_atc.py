"""ATC on the synthetic world's tool tasks, against the real sandbox (and the real engine): one program chains the
tools, attributable reflection revises failed programs, and black-box (and chain) probing documents tools."""

from __future__ import annotations

import json

import pytest

from actors.config import ModelConfig
from actors.models import build_causal_lm
from actors.tools import EXECUTION_ERROR, SYNTAX_ERROR, ToolError, ToolRegistry, normalize_spec
from agents.atc import ATC, ATCConfig, attribute_error, format_call, undocumented
from pipelines import records
from tests.doubles import (
    FlakyTool,
    ScriptedPolicy,
    SyncEngine,
    TeacherForcedPolicy,
    atc_oracle,
    by_query,
    chain_program,
    prober_oracle,
    tool_outputs,
    world_sandbox,
)


@pytest.fixture(scope="module")
def tasks(small_world):
    tasks = small_world.tool_tasks("dev")[:33]
    assert {len(t["gold_calls"]) for t in tasks} == {1, 2, 3, 4}
    return tasks


@pytest.fixture(scope="module")
def registry(small_world):
    return ToolRegistry.from_functions(small_world.tools(), small_world.tool_functions())


@pytest.fixture(scope="module")
def sandbox(small_world):
    return world_sandbox(small_world)


def test_one_program_per_task_chains_the_gold_calls(tasks, sandbox, registry, small_world, tokenizer):
    policy = ScriptedPolicy(tokenizer, atc_oracle(by_query(tasks), tool_outputs(small_world)))
    atc = ATC(policy, sandbox, small_world.tools(), tokenizer)
    runs = atc.run(tasks)
    programs = []
    for task, run in zip(tasks, runs, strict=True):
        assert run.finish_reason == "answer" and run.answer == task["answer"], (task, run.errors)
        assert run.calls == task["gold_calls"] and run.errors == []
        (program,) = [s.text for s in run.trajectories["programmer"].steps if s.role == "program"]
        programs.append(program)
    # results flow through variables: a founder's name into the next lookup, looked-up years into calculate
    assert any("lookup(entity=r0, " in p for p in programs) and any("a=int(r" in p for p in programs)
    assert policy.calls == 1  # every task's program in one engine call
    rows = records.to_table([row for run in runs for row in run.records()], "trajectory").to_pylist()
    assert len(rows) == len(tasks) and all(r["valid"] for r in rows)
    t = runs[0].trajectories["programmer"]
    assert [s.role for s in t.steps] == ["program", "program_output"] and t.loss_mask.count(1) == t.steps[0].end


def reflections(run):
    return [json.loads(s.text) for s in run.trajectories["programmer"].steps if s.role == "tool_error"]


def test_reflection_blames_the_tool_that_raised(tasks, registry, small_world, tokenizer):
    """Injected fault: each lookup fails once; the error names the tool, the model sees its call and docs and reruns."""
    flaky = FlakyTool(small_world.tool_functions()["lookup"])
    chosen = [t for t in tasks if t["gold_calls"][0]["name"] == "lookup"][:4]

    def rerun(task, context):
        return chain_program(task["gold_calls"], tool_outputs(small_world))

    policy = ScriptedPolicy(tokenizer, atc_oracle(by_query(chosen), tool_outputs(small_world), revise=rerun))
    runs = ATC(policy, world_sandbox(small_world, lookup=flaky), small_world.tools(), tokenizer).run(chosen)
    for task, run in zip(chosen, runs, strict=True):
        lookups = sum(c["name"] == "lookup" for c in task["gold_calls"])
        assert run.finish_reason == "answer" and run.answer == task["answer"] and run.calls == task["gold_calls"]
        assert len(run.errors) == lookups  # one failed program per (newly) flaky lookup, each reflected on
        for record in reflections(run):
            assert record["code"] == EXECUTION_ERROR and record["attributed_tool"] == "lookup"
            assert record["call"]["name"] == "lookup" and record["call"]["ok"] is False
        shown = tokenizer.decode(run.trajectories["programmer"].token_ids)
        assert "Caused by: lookup(entity=" in shown and "which failed (execution_error)" in shown
        assert "Its documentation: {\"name\":\"lookup\"" in shown


def test_reflection_traces_a_bad_output_to_the_tool_it_came_from(tasks, registry, small_world, tokenizer):
    """Injected fault: lookup answers years as "born 1931"; int() fails two lines later, and the error is still
    blamed on lookup (through the variable), with the output that broke it, so the revision can parse it."""
    lookup = small_world.tool_functions()["lookup"]

    def chatty_lookup(entity, attribute):
        value = lookup(entity=entity, attribute=attribute)
        return f"year {value}" if attribute.endswith("_year") else value

    task = next(t for t in tasks if len(t["gold_calls"]) == 3 and t["gold_calls"][2]["name"] == "calculate")
    years = [c["arguments"]["attribute"] for c in task["gold_calls"][:2]]
    assert all(a.endswith("_year") for a in years)

    a_value = task["gold_calls"][2]["arguments"]["a"]
    a, b = ("x", "y") if a_value == int(registry.call(task["gold_calls"][0]).output) else ("y", "x")

    def next_turn(context):
        read = "int({}.split()[-1])" if "\nError: " in context else "int({})"  # the revision parses the output
        first, second = task["gold_calls"][:2]
        return "<program>\n" + "\n".join([
            f"first = {format_call(first)}", f"second = {format_call(second)}",
            f"x = {read.format('first')}", f"y = {read.format('second')}",
            f"print(calculate(operation='subtract', a={a}, b={b}))"]) + "\n</program>"  # fmt: skip

    (run,) = ATC(ScriptedPolicy(tokenizer, next_turn), world_sandbox(small_world, lookup=chatty_lookup),
                 small_world.tools(), tokenizer).run([task])  # fmt: skip
    assert run.finish_reason == "answer" and run.answer == task["answer"] and run.calls == task["gold_calls"]
    (record,) = reflections(run)
    assert record["code"] == EXECUTION_ERROR and "ValueError" in record["message"] and record["line"] == 3
    assert record["attributed_tool"] == "lookup" and record["call"]["arguments"] == task["gold_calls"][0]["arguments"]
    shown = tokenizer.decode(run.trajectories["programmer"].token_ids)
    assert "Line 3: x = int(first)" in shown and "which returned 'year " in shown


def test_reflection_gives_up_after_max_rounds(tasks, registry, small_world, tokenizer):
    broken = FlakyTool(small_world.tool_functions()["calculate"], failures=99, message="calculator down")
    task = next(t for t in tasks if [c["name"] for c in t["gold_calls"]] == ["calculate"])
    policy = ScriptedPolicy(tokenizer, atc_oracle(by_query([task]), tool_outputs(small_world),
                                                  revise=lambda task, c: chain_program(task["gold_calls"],
                                                                                       tool_outputs(small_world))))
    (run,) = ATC(policy, world_sandbox(small_world, calculate=broken), small_world.tools(), tokenizer).run([task])
    assert ATCConfig().max_reflections == 3
    assert run.finish_reason == "reflection_failed: execution_error" and len(run.errors) == 4
    assert sum(s.role == "program" for s in run.trajectories["programmer"].steps) == 4


def test_attribution_rules_on_real_program_results(sandbox):
    tools = ["lookup", "calculate"]

    def blame(code):
        result = sandbox.run_program(code, tools)
        return attribute_error(code, result.error, result.tool_calls, tools)

    raised = blame("calculate(operation='pow', a=1, b=2)")
    assert (raised.tool, raised.call["arguments"]["operation"]) == ("calculate", "pow")
    on_line = blame("x = 1\ny = int(calculate(operation='add', a=1, b=0.5))")
    assert (on_line.tool, on_line.line, on_line.source) == ("calculate", 2, "y = int(calculate(operation='add', "
                                                                            "a=1, b=0.5))")  # fmt: skip
    traced = blame("r = calculate(operation='add', a=1, b=1)\ns = r + '!'\nt = {'2!': 1}\nprint(t[s] + t[r])")
    assert (traced.tool, traced.line) == ("calculate", 4)
    last = blame("calculate(operation='add', a=1, b=1)\nraise RuntimeError('later')")
    assert last.tool == "calculate"  # nothing on the line came from a tool: the last tool called
    syntax = sandbox.run_program("print(", tools)
    none = attribute_error("print(", syntax.error, syntax.tool_calls, tools)
    assert syntax.error.code == SYNTAX_ERROR and none.tool is None
    own = attribute_error("x", ToolError(EXECUTION_ERROR, "NameError (line 1)"), [], tools)
    assert own.tool is None and own.source == "x"


# ---------------------------------------------------------------------------------------------------- probing


def list_entities_tool(world):
    """A real catalogue tool over the world: the names of every person, company or city (a JSON list)."""
    names = {}
    for entity in world.entities:
        names.setdefault(entity["type"], []).append(entity["name"])

    def list_entities(kind: str) -> str:
        return json.dumps(names[kind])

    spec = {"name": "list_entities", "description": "Names of every entity of a kind, as a JSON list.",
            "parameters": {"type": "object", "properties": {"kind": {"type": "string",
                                                                     "enum": ["person", "company", "city"]}},
                           "required": ["kind"], "additionalProperties": False}}  # fmt: skip
    return spec, list_entities


def shape(parameters):
    """What probing must recover of a schema: parameter names, their types and allowed values, the required set."""
    properties = {k: {f: v[f] for f in ("type", "enum") if f in v} for k, v in parameters["properties"].items()}
    return properties, sorted(parameters.get("required") or []), parameters.get("additionalProperties")


@pytest.fixture(scope="module")
def probed(small_world, tokenizer):
    spec, function = list_entities_tool(small_world)
    specs = [*small_world.tools(), spec]
    sandbox = world_sandbox(small_world, [spec], list_entities=function)
    atc = ATC(ScriptedPolicy(tokenizer, prober_oracle()), sandbox, [undocumented(s["name"]) for s in specs],
              tokenizer)  # fmt: skip
    docs, runs = atc.probe([s["name"] for s in specs])
    return atc, docs, runs, {s["name"]: s for s in specs}, sandbox


def test_probing_documents_undocumented_tools_with_their_real_schema(probed):
    atc, docs, runs, real, sandbox = probed
    assert set(docs) == set(real) and all(doc.ok for doc in docs.values())
    for name, doc in docs.items():
        assert shape(doc.parameters()) == shape(normalize_spec(real[name])["parameters"]), name
        for example in doc.examples:  # every recorded example is what the tool really answers
            assert sandbox.call({"name": name, "arguments": example["arguments"]}).output == example["output"]
        assert atc.docs[name]["description"].startswith("Documented by probing")
    assert docs["add_days"].returns == {"type": "string", "format": "date"}
    assert docs["date_diff"].returns == {"type": "integer"}
    assert docs["list_entities"].returns == {"type": "array", "items": {"type": "string"}}
    assert docs["calculate"].returns["type"] in ("integer", "number") and len(docs["calculate"].examples) == 2
    run = next(r for r in runs if r.task_id == "probe:calculate")
    roles = [s.role for s in run.trajectories["prober"].steps]
    assert roles.count("probe") == docs["calculate"].probes and "tool_error" in roles and roles[-1] == "tool_result"
    records.to_table([row for r in runs for row in r.records()], "trajectory")


def test_chain_probing_makes_a_tool_work_through_a_probed_helper(probed, registry):
    atc, docs, runs, real, _ = probed
    lookup = docs["lookup"]
    assert lookup.helpers == ["list_entities"] and len(lookup.examples) == 1
    (example,) = lookup.examples
    assert registry.call({"name": "lookup", "arguments": example["arguments"]}).output == example["output"]
    run = next(r for r in runs if r.task_id == "probe:lookup")
    assert any(e.code == EXECUTION_ERROR and "unknown entity" in e.message for e in run.errors)  # direct probes failed
    program = next(s for s in run.trajectories["prober"].steps if s.role == "program")
    assert "list_entities(" in program.text and "lookup(" in program.text
    assert "made to work through list_entities" in atc.docs["lookup"]["description"]


def test_probed_documentation_is_enough_to_solve_the_tasks(probed, tasks, small_world, tokenizer):
    probed_atc, _, _, _, sandbox = probed
    chosen = tasks[:11]
    policy = ScriptedPolicy(tokenizer, atc_oracle(by_query(chosen), tool_outputs(small_world)))
    runs = ATC(policy, sandbox, list(probed_atc.docs.values()), tokenizer).run(chosen)
    assert [r.answer for r in runs] == [t["answer"] for t in chosen]
    assert "Documented by probing" in tokenizer.decode(runs[0].trajectories["programmer"].prompt_ids)


# ---------------------------------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=2048, seed=4)  # fmt: skip
    return SyncEngine(build_causal_lm(cfg, tokenizer, tmp_path_factory.mktemp("atc_policy")), max_model_len=2048)


def assert_rescored(engine, run):
    for t in run.trajectories.values():
        generated = [i for i, m in enumerate(t.loss_mask) if m]
        rescored = engine.score([(t.prompt_ids, t.token_ids)])[0]
        assert generated and max(abs(rescored[i] - t.logprobs[i]) for i in generated) < 1e-4


def test_real_engine_programs_and_reflections_rescore(tasks, sandbox, registry, small_world, engine):
    cfg = ATCConfig(descriptions=False, max_program_tokens=48, max_reflections=1)
    chosen = [t for t in tasks if len(t["gold_calls"]) <= 2][:2]
    scripted = TeacherForcedPolicy(engine, engine.tokenizer, atc_oracle(by_query(chosen), tool_outputs(small_world)))
    runs = ATC(scripted, sandbox, small_world.tools(), engine.tokenizer, cfg).run(chosen)
    assert [r.answer for r in runs] == [t["answer"] for t in chosen]
    free = TeacherForcedPolicy(engine, engine.tokenizer, lambda context: None)  # the random model writes programs
    sampled = ATC(free, sandbox, small_world.tools(), engine.tokenizer, cfg).run(chosen, samples=2, seed=3)
    for run in runs + sampled:
        assert_rescored(engine, run)
    for run in sampled:
        assert run.finish_reason.startswith("reflection_failed: ") and len(run.errors) == 2
    records.to_table([row for run in runs + sampled for row in run.records()], "trajectory")
