"""TTPA data generation with the real tiny engine and the real tool sandbox: the error scorer against hand labels,
reversed construction's consistency filter, token-level pairs that share a prefix, resumption and quarantine."""

from __future__ import annotations

import json

import pytest
import ray

from actors.config import EngineConfig, SandboxConfig
from actors.llm import EnginePool, start_engines
from actors.sandbox import SandboxPool, ToolSandboxCore
from actors.tools import (
    EXECUTION_ERROR,
    INVALID_VALUE,
    MISSING_ARGUMENT,
    UNEXPECTED_ARGUMENT,
    UNKNOWN_TOOL,
    WRONG_TYPE,
    ToolRegistry,
)
from pipelines import records
from pipelines.data.world import WorldConfig, build_world
from pipelines.ttpa import (
    ANSWER_IN_QUERY,
    ANSWER_MISMATCH,
    CALL_ERROR,
    DUPLICATE,
    END_TAG,
    EXTRA_CALL,
    MALFORMED,
    MISSING_CALL,
    QUERY_MISSING_ENTITY,
    WRONG_TOOL,
    WRONG_VALUE,
    ReversedConfig,
    Scenario,
    TTPAConfig,
    build_reversed_tasks,
    check_consistency,
    check_task,
    engine_query_writer,
    grounded_entities,
    make_pairs,
    parse_calls,
    render_calls,
    render_prompt,
    run_ttpa_generation,
    score_call,
    score_calls,
    split_turns,
    task_prompt,
    template_query_writer,
    tool_task_records,
    turn_tasks,
)


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(people_per_split=20, companies_per_split=10, cities_per_split=8,
                                   train_questions=4, dev_questions=2, test_questions=2))  # fmt: skip


@pytest.fixture(scope="module")
def registry(world):
    return ToolRegistry.from_functions(world.tools(), world.tool_functions())


@pytest.fixture(scope="module")
def sandbox(registry):
    """The sandbox in-process (same class the actors run): executes calls for the scorer tables."""
    return ToolSandboxCore(registry, SandboxConfig(request_timeout_s=20.0))


@pytest.fixture(scope="module")
def pool(ray_cluster, registry):
    pool = SandboxPool(registry, SandboxConfig(num_actors=1, num_cpus=0.1, request_timeout_s=20.0))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def engines(ray_cluster, tiny_policy):
    engines = start_engines(tiny_policy, EngineConfig(num_actors=1, num_cpus=0.25, max_model_len=512))
    yield engines
    for engine in engines:
        ray.kill(engine)


@pytest.fixture(scope="module")
def tokenizer(tiny_policy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy, local_files_only=True)


def _person(world, index=0):
    return [e for e in world.entities if e["split"] == "train" and e["type"] == "person"][index]


# ---------------------------------------------------------------------------------------------------- text format


def test_calls_render_and_parse_back(world):
    calls = [{"name": "lookup", "arguments": {"entity": "Kalo Systems", "attribute": "founded_year"}},
             {"name": "add_days", "arguments": {"date": "1990-01-01", "days": 12}}]  # fmt: skip
    text = render_calls(calls)
    assert text.endswith(END_TAG) and text.count("\n") == 2
    assert parse_calls(text) == (calls, None)
    assert parse_calls(text.replace(END_TAG, ""))[1] == f"no {END_TAG} (the output was cut off)"
    cut = text.replace('"days":12}}', '"days":1')
    assert parse_calls(cut) == (calls[:1], "line 2 is not JSON (Expecting ',' delimiter at column 61)")
    assert parse_calls('["lookup"]\n' + END_TAG)[1] == "line 1 is not an object with a string 'name'"
    assert parse_calls('{"name":"x","args":{}}\n' + END_TAG)[1] == "line 1 has unknown key(s) ['args']"
    prompt = render_prompt("What is 2 plus 3?", world.tools())
    assert prompt.endswith("Query: What is 2 plus 3?\n<calls>\n")
    assert '"unit?":"days|weeks"' in prompt and '"operation":"add|subtract|multiply|divide"' in prompt


# ---------------------------------------------------------------------------------------------------- scoring

P = "{person}"  # replaced by a real train person (the lookups must be able to run)
LOOKUP = {"name": "lookup", "arguments": {"entity": P, "attribute": "birth_year"}}
SUBTRACT = {"name": "calculate", "arguments": {"operation": "subtract", "a": 1990, "b": 1950}}
WEEKS = {"name": "date_diff", "arguments": {"start": "2020-01-01", "end": "2020-03-01", "unit": "weeks"}}
DAYS = {"name": "date_diff", "arguments": {"start": "2020-01-01", "end": "2020-03-01"}}
DIVIDE_BY_ZERO = {"name": "calculate", "arguments": {"operation": "divide", "a": 1, "b": 0}}

# (gold, call, expected error codes, expected score with the default penalties); hand-labelled.
HAND_LABELLED = [
    (LOOKUP, LOOKUP, [], 1.0),
    (LOOKUP, {"name": "lookup_entity", "arguments": {"entity": P, "attribute": "birth_year"}}, [UNKNOWN_TOOL], 0.0),
    (LOOKUP, {"name": "calculate", "arguments": {"entity": P, "attribute": "birth_year"}}, [WRONG_TOOL], 0.2),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": P}}, [MISSING_ARGUMENT], 0.5),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": P, "attribute": "birth_year", "year": 1990}},
     [UNEXPECTED_ARGUMENT], 0.7),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": 42, "attribute": "birth_year"}}, [WRONG_TYPE], 0.5),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": P, "attribute": "age"}}, [INVALID_VALUE], 0.6),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": "{other}", "attribute": "birth_year"}}, [WRONG_VALUE], 0.7),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": "Nobody Atall", "attribute": "birth_year"}},
     [WRONG_VALUE, EXECUTION_ERROR], 0.1),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": P, "atribute": "birth_year"}},
     [UNEXPECTED_ARGUMENT, MISSING_ARGUMENT], 0.2),
    (LOOKUP, {"name": "lookup", "arguments": {"entity": 42, "attribute": "age"}}, [WRONG_TYPE, INVALID_VALUE], 0.1),
    (LOOKUP, {"name": "lookup", "arguments": "{not json"}, [WRONG_TYPE], 0.5),
    (SUBTRACT, {"name": "calculate", "arguments": {"operation": "subtract", "a": "1990", "b": 1950}}, [WRONG_TYPE], 0.5),
    (SUBTRACT, {"name": "calculate", "arguments": {"operation": "add", "a": 1990, "b": 1950}}, [WRONG_VALUE], 0.7),
    (SUBTRACT, {"name": "calculate", "arguments": {"operation": "subtract", "a": 1990.0, "b": 1950}}, [], 1.0),
    (WEEKS, DAYS, [MISSING_ARGUMENT], 0.5),  # an optional argument the task needs
    (DAYS, {"name": "date_diff", "arguments": {**DAYS["arguments"], "unit": "days"}}, [], 1.0),  # = the default
    (DAYS, WEEKS, [WRONG_VALUE], 0.7),
    (DIVIDE_BY_ZERO, DIVIDE_BY_ZERO, [EXECUTION_ERROR], 0.4),
]


def _fill(value, world):
    text = json.dumps(value).replace(P, _person(world, 0)["name"]).replace("{other}", _person(world, 1)["name"])
    return json.loads(text)


@pytest.mark.parametrize(("gold", "call", "codes", "score"), HAND_LABELLED,
                         ids=[f"{i}-{'+'.join(row[2]) or 'perfect'}" for i, row in enumerate(HAND_LABELLED)])  # fmt: skip
def test_error_scorer_matches_hand_labels(gold, call, codes, score, world, registry, sandbox):
    gold, call = _fill(gold, world), _fill(call, world)
    got_score, got_codes = score_call(call, gold, registry.specs(), execute=sandbox.call)
    assert got_codes == codes
    assert got_score == pytest.approx(score)


def test_sequence_scores_and_configurable_penalties(world, registry, sandbox):
    gold = [_fill(LOOKUP, world), SUBTRACT]
    wrong = {"name": "calculate", "arguments": {**SUBTRACT["arguments"], "operation": "add"}}
    table = [  # (calls, parse problem, expected codes, expected score)
        (gold, None, [], 1.0),
        (gold[:1], None, [MISSING_CALL], 0.5),
        (gold + [SUBTRACT], None, [EXTRA_CALL], 0.5),
        (gold, "no </calls>", [MALFORMED], 0.0),
        ([gold[0], wrong], None, [WRONG_VALUE], 0.85),
    ]
    for calls, problem, codes, score in table:
        result = score_calls(calls, problem, gold, registry, execute=sandbox.call)
        assert (result.errors, result.score) == (codes, pytest.approx(score)), calls
    lenient = {WRONG_VALUE: 0.1, MALFORMED: 0.25}
    assert score_call(wrong, SUBTRACT, registry.specs(), lenient) == (pytest.approx(0.9), [WRONG_VALUE])
    assert score_calls(gold, "cut", gold, registry, TTPAConfig(penalties=lenient)).score == pytest.approx(0.75)
    with pytest.raises(ValueError, match="penalties"):
        TTPAConfig(penalties={WRONG_VALUE: -1})


# ---------------------------------------------------------------------------------------------------- reversed construction


def test_reversed_construction_yields_consistent_samples(world, registry, pool):
    cfg = ReversedConfig(proposal_noise=0.2, seed=3)
    tasks, report = build_reversed_tasks(world, pool, 40, cfg=cfg)  # every call through the sandbox actors
    assert report.built == len(tasks) == 40
    assert report.attempted == report.built + sum(report.dropped.values())
    assert report.dropped[CALL_ERROR] > 0  # the simulator's slips, rejected by the real sandbox
    assert set(report.by_kind) == {"lookup", "bridge", "arithmetic", "convert", "date"}
    assert set(report.calls_per_sample) == {1, 2, 3}
    for task in tasks:
        outputs = [registry.call(call) for call in task["gold_calls"]]  # re-executed outside the sandbox
        assert all(o.ok for o in outputs) and outputs[-1].output == task["answer"], task
        results = [o.output for o in outputs]
        entities = grounded_entities(task["gold_calls"], results)
        assert entities and all(name in task["query"] for name in entities), task
        assert set(c["name"] for c in task["gold_calls"]) <= set(task["tools"]) and len(task["tools"]) > len(
            set(c["name"] for c in task["gold_calls"]))  # a spare tool is offered
    bridge = next(t for t in tasks if t["kind"] == "bridge")
    found = registry.call(bridge["gold_calls"][0]).output
    assert found not in bridge["query"]  # what a call finds is not given away
    table = records.to_table(tool_task_records(tasks), "tool_task")  # writable as the world's tool-task records
    assert json.loads(table.column("gold_calls")[0].as_py()) == tasks[0]["gold_calls"]


def test_consistency_filter_drops_by_reason(world, sandbox, engines):
    tasks, report = build_reversed_tasks(world, sandbox, 3, cfg=ReversedConfig(kinds=["lookup"]))
    scenario = Scenario("lookup", tasks[0]["gold_calls"], [tasks[0]["answer"]], tasks[0]["answer"],
                        facts={"entity": tasks[0]["gold_calls"][0]["arguments"]["entity"],
                               "attribute": tasks[0]["gold_calls"][0]["arguments"]["attribute"]})  # fmt: skip
    query = template_query_writer(scenario, __import__("random").Random(0))
    assert check_consistency(scenario, query, sandbox) is None
    assert check_consistency(scenario, "What is the birth year of somebody?", sandbox) == QUERY_MISSING_ENTITY
    assert check_consistency(scenario, f"{query} It is {scenario.answer}.", sandbox) == ANSWER_IN_QUERY
    tampered = Scenario("lookup", scenario.calls, scenario.results, scenario.answer + "0", facts=scenario.facts)
    assert check_consistency(tampered, query, sandbox) == ANSWER_MISMATCH

    def forgetful(scenario, rng):  # a writer that drops the entity's name
        return template_query_writer(scenario, rng).replace(scenario.facts["entity"], "them")

    small = build_world(WorldConfig(people_per_split=2, companies_per_split=2, cities_per_split=2, countries=2,
                                    train_questions=1, dev_questions=1, test_questions=1))  # fmt: skip
    small_sandbox = ToolRegistry.from_functions(small.tools(), small.tool_functions())
    tasks, report = build_reversed_tasks(small, small_sandbox, 12, cfg=ReversedConfig(kinds=["convert"],
                                                                                      proposal_noise=0))  # fmt: skip
    assert report.built == 2 * 4 and report.dropped[DUPLICATE] > 0  # 2 cities x 4 target units, no more
    _, report = build_reversed_tasks(small, small_sandbox, 3, writer=forgetful,
                                     cfg=ReversedConfig(kinds=["convert"], proposal_noise=0,
                                                                    max_attempts_per_sample=2))
    assert report.built == 0 and report.dropped[QUERY_MISSING_ENTITY] == 6
    # The engine-backed writer, with this machine's random tiny policy: noise, all caught by the filter.
    _, report = build_reversed_tasks(world, sandbox, 2, writer=engine_query_writer(EnginePool(engines), 16),
                                     cfg=ReversedConfig(kinds=["lookup"], max_attempts_per_sample=2))
    assert report.built == 0 and sum(report.dropped.values()) == 4


# ---------------------------------------------------------------------------------------------------- turns


def test_chains_are_cut_into_turns_where_a_call_needs_a_result(world, registry, sandbox):
    specs = {spec["name"]: spec for spec in world.tools()}
    founder_age = next(t for t in world.tool_tasks("train") if len(t["gold_calls"]) == 4)  # the world's own chain
    turns, problem = split_turns(founder_age, sandbox.call)
    gold = founder_age["gold_calls"]
    assert problem is None and [len(json.loads(t["history"])) for t in turns] == [0, 1, 2]
    # founder and founding year need nothing; the founder's birth year needs the founder; the subtraction needs both
    assert [t["gold_calls"] for t in turns] == [[gold[0], gold[2]], [gold[1]], [gold[3]]]
    last = json.loads(turns[2]["history"])
    founder = registry.call(gold[0]).output
    assert last[0] == {"calls": [gold[0], gold[2]], "results": [founder, registry.call(gold[2]).output]}
    assert gold[1]["arguments"]["entity"] == founder  # every value of a turn is in the query or the history

    prompt = task_prompt(turns[2], specs)
    assert prompt.endswith("</results>\n<calls>\n") and prompt.count("<results>") == 2
    assert f'{{"id":"call_0","name":"lookup","output":"{founder}"}}' in prompt  # agents/toolcall.py's result lines
    assert '{"id":"call_2","name":"lookup"' in prompt  # ids run over the conversation
    short = task_prompt(turns[0], specs, tool_schemas=False)
    assert short.startswith("Tools: " + ", ".join(founder_age["tools"]) + "\nQuery: ") and '"arguments"' not in short

    tasks, _ = build_reversed_tasks(world, sandbox, 10, cfg=ReversedConfig(kinds=["arithmetic", "bridge"], seed=2))
    steps, dropped = turn_tasks(tasks, sandbox.call)
    assert not dropped and len(steps) == 2 * len(tasks)  # both kinds take two turns
    arithmetic = next(s for s in steps if s["turn"] == 1 and s["gold_calls"][0]["name"] == "calculate")
    earlier = json.loads(arithmetic["history"])[0]
    assert len(earlier["calls"]) == 2 and {c["name"] for c in earlier["calls"]} == {"lookup"}  # parallel lookups
    checked, problem = check_task(arithmetic, specs)
    assert problem is None and json.loads(checked["history"]) == json.loads(arithmetic["history"])

    broken = {**founder_age, "gold_calls": [{"name": "lookup", "arguments": {"entity": "Nobody Atall",
                                                                              "attribute": "birth_year"}}]}  # fmt: skip
    assert split_turns(broken, sandbox.call)[1].startswith("gold call 0 (lookup) fails: execution_error")
    for bad in ("[{\"calls\": []}]", "{not json", '[{"calls": [], "results": ["x"]}]'):
        assert "field 'history'" in check_task({**arithmetic, "history": bad}, specs)[1]


# ---------------------------------------------------------------------------------------------------- pairs


def _assert_pair_shape(pair):
    chosen, rejected, cut = pair["chosen_ids"], pair["rejected_ids"], pair["prefix_length"]
    assert chosen[:cut] == rejected[:cut]
    assert chosen[cut] != rejected[cut]


def test_pairs_share_a_prefix_and_the_job_resumes_and_quarantines(world, pool, engines, tiny_policy, tokenizer,
                                                                  tmp_path):  # fmt: skip
    tasks, _ = build_reversed_tasks(world, pool, 6, cfg=ReversedConfig(kinds=["lookup", "bridge"], spare_tools=0))
    bad = [
        {**tasks[0], "id": "no-query", "query": " "},
        {**tasks[0], "id": "bad-gold", "gold_calls": [{"name": "lookup", "arguments": {"entity": 5, "attribute": "birth_year"}}]},
        {**tasks[0], "id": "not-offered", "tools": ["calculate"]},
        {**tasks[0], "id": "too-long", "query": "Who? " * 200},
        dict(tasks[1]),  # a duplicate id
    ]
    cfg = TTPAConfig(top_k=4, max_branches_per_call=1, max_new_tokens=32, shard_size=2, batch_size=2)
    summary = run_ttpa_generation(tasks + bad, tmp_path, engines, pool, tiny_policy, cfg)
    quarantine = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    reasons = {q["id"]: q["reason"] for q in quarantine}
    assert set(reasons) == {"no-query", "bad-gold", "not-offered", "too-long", tasks[1]["id"]}
    assert "wrong_type" in reasons["bad-gold"] and "max_model_len=512" in reasons["too-long"]
    assert "duplicate id" in reasons[tasks[1]["id"]]
    assert (summary.tasks, summary.quarantined, summary.shards_written, summary.shards_reused) == (6, 5, 3, 0)
    assert summary.pairs > 0 and summary.pairs + summary.dropped_by_margin == summary.completions_scored
    assert summary.branch_points == summary.completions_scored <= 6 * 3  # one per call line and the closing tag

    table = records.read_records(tmp_path, "preference_pair")
    assert table.num_rows == summary.pairs
    by_id = {t["id"]: t for t in tasks}
    specs = {s["name"]: s for s in world.tools()}
    for pair in table.to_pylist():
        task = by_id[pair["example_id"]]
        _assert_pair_shape(pair)
        assert tokenizer.decode(pair["chosen_ids"]) == render_calls(task["gold_calls"])  # chosen = the gold tokens
        prompt = render_prompt(task["query"], [specs[n] for n in task["tools"]])
        assert pair["prompt_ids"] == tokenizer(prompt)["input_ids"]
        assert pair["chosen_score"] == 1.0 and pair["chosen_score"] - pair["rejected_score"] > cfg.margin

    (tmp_path / "shard-00001.parquet").unlink()  # as if the job died while writing shard 1
    (tmp_path / "manifest.json").unlink()
    again = run_ttpa_generation(tasks + bad, tmp_path, engines, pool, tiny_policy, cfg)
    assert (again.shards_written, again.shards_reused) == (1, 2)
    assert (again.pairs, again.branch_points, again.rejected_errors) == (summary.pairs, summary.branch_points,
                                                                         summary.rejected_errors)  # fmt: skip
    resumed = records.read_records(tmp_path, "preference_pair").column("id").to_pylist()
    assert sorted(resumed) == sorted(table.column("id").to_pylist())


def test_margin_threshold_and_sampled_pairs(world, sandbox, engines, tokenizer, registry):
    tasks, _ = build_reversed_tasks(world, sandbox, 3, cfg=ReversedConfig(kinds=["lookup"], spare_tools=0, seed=5))
    engine = EnginePool(engines)
    strict = make_pairs(tasks, engine, tokenizer, registry, TTPAConfig(margin=1.0, max_new_tokens=24), sandbox.call)
    assert all(not o.pairs and o.dropped_margin == o.completions > 0 for o in strict)  # no score gap exceeds 1.0
    sampled = make_pairs(tasks, engine, tokenizer, registry,
                         TTPAConfig(margin=-1.0, max_branches_per_call=0, sampled_completions=3, max_new_tokens=24),
                         sandbox.call)  # fmt: skip
    pairs = [p for o in sampled for p in o.pairs]
    assert all(o.completions == 3 for o in sampled) and pairs
    for pair in pairs:
        _assert_pair_shape(pair)
        assert pair["id"].endswith("/sampled") and pair["chosen_score"] >= pair["rejected_score"]
