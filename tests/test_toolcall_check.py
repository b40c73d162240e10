"""BFCL-style tool-call checking: every BFCL gold answer passes, systematic corruptions get the verdict and error
code they should, and the evaluation job scores gold and prediction files (pure Python: no Ray here).

The shared-data tests build their cases from the BFCL categories in ../shared/data/tools/bfcl; the hand-built ones
pin BFCL's individual rules (int-to-float, string normalisation, optional "", variables, dicts) on small specs.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from actors.tools import INVALID_VALUE, MISSING_ARGUMENT, UNEXPECTED_ARGUMENT, UNKNOWN_TOOL, WRONG_TYPE, normalize_spec
from pipelines.evaluate import run_job
from pipelines.toolcall_check import (
    check_call,
    check_calls,
    checker_kind,
    gold_calls,
    gold_defects,
    load_and_score,
    load_bfcl_file,
    parse_model_text,
    question_files,
    read_predictions,
    standardize_string,
)
from pipelines.ttpa import EXTRA_CALL, MALFORMED, MISSING_CALL, WRONG_TOOL, WRONG_VALUE
from tests.conftest import REPO

# ---------------------------------------------------------------------------------------------------- hand-built

TRIP = normalize_spec({"name": "plan_trip", "parameters": {"type": "dict", "properties": {
    "city": {"type": "string"},
    "nights": {"type": "integer"},
    "budget": {"type": "float"},
    "mode": {"type": "string", "enum": ["train", "car", "plane"]},
    "stops": {"type": "array", "items": {"type": "float"}},
    "dates": {"type": "tuple", "items": {"type": "string"}},
    "options": {"type": "dict", "properties": {"pets": {"type": "boolean"}, "note": {"type": "string"}}},
    "rooms": {"type": "array", "items": {"type": "dict"}},
    "refundable": {"type": "boolean"},
}, "required": ["city", "nights"]}})  # fmt: skip
OTHER = normalize_spec({"name": "book_hotel", "parameters": {"type": "dict", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}})  # fmt: skip
ALLOWED = {
    "city": ["New York, NY", "NYC"],
    "nights": [3],
    "budget": [500.0, ""],
    "mode": ["train", ""],
    "stops": [[1.5, 2.0], ""],
    "dates": [["2024-04-01", "2024-04-04"], ""],
    "options": [{"pets": [True], "note": ["", "quiet"]}, ""],
    "rooms": [[{"beds": [2]}, {"beds": [1]}], ""],
    "refundable": [True, False, ""],
}


def trip(**arguments) -> dict:
    return {"name": "plan_trip", "arguments": {"city": "NYC", "nights": 3, **arguments}}


def check(call: dict, allowed: dict = ALLOWED):
    return check_call(TRIP, call, allowed, ["plan_trip", "book_hotel"])


def test_valid_calls_pass_with_bfcl_allowances():
    assert check(trip()).valid
    assert check(trip(budget=500)).valid, "an integer where a float is declared (Python's int-to-float allowance)"
    assert check(trip(city="new york ny")).valid, "strings compare after BFCL's normalisation"
    assert standardize_string("April 1, 2024") == standardize_string("april 1 2024") == "april12024"
    assert check(trip(dates=("2024-04-01", "2024-04-04"))).valid, "a tuple is a list"
    assert check(trip(options={"pets": True})).valid, "a dict key whose allowed list holds '' may be left out"
    assert check(trip(options={"pets": True, "note": "QUIET"})).valid
    assert check(trip(rooms=[{"beds": 2}, {"beds": 1}])).valid
    assert check(trip(refundable=False, mode="train", stops=[1.5, 2.0])).valid
    assert check({"name": "plan_trip", "arguments": json.dumps({"city": "NYC", "nights": 3})}).valid, "JSON string"


@pytest.mark.parametrize("call, code, bfcl_type", [
    ({"name": "plan_tripp", "arguments": {"city": "NYC", "nights": 3}}, UNKNOWN_TOOL, "wrong_func_name"),
    ({"name": "book_hotel", "arguments": {"city": "NYC"}}, WRONG_TOOL, "wrong_func_name"),
    ({"name": "plan_trip", "arguments": {"city": "NYC"}}, MISSING_ARGUMENT, "missing_required"),
    (trip(pets=True), UNEXPECTED_ARGUMENT, "unexpected_param"),
    (trip(nights=True), WRONG_TYPE, "type_error:simple"),
    (trip(nights=3.0), WRONG_TYPE, "type_error:simple"),
    (trip(budget="500"), WRONG_TYPE, "type_error:simple"),
    (trip(nights=4), WRONG_VALUE, "value_error:others"),
    (trip(city="Boston"), WRONG_VALUE, "value_error:string"),
    (trip(mode="boat"), INVALID_VALUE, "value_error:string"),  # also outside the spec's enum
    (trip(stops=[2.0, 1.5]), WRONG_VALUE, "value_error:list/tuple"),
    (trip(options={"pets": False}), WRONG_VALUE, "value_error:dict_value"),
    (trip(options={"note": "quiet"}), WRONG_VALUE, "value_error:dict_key"),
    (trip(rooms=[{"beds": 2}]), WRONG_VALUE, "value_error:list_dict_count"),
    (trip(rooms=[{"beds": 1}, {"beds": 2}]), WRONG_VALUE, "value_error:list_dict_count"),  # BFCL: last option's
])  # fmt: skip
def test_each_rule_gives_its_code(call, code, bfcl_type):
    verdict = check(call)
    assert not verdict.valid and verdict.code == code, verdict
    assert verdict.bfcl_error_type.endswith(bfcl_type), verdict
    assert verdict.error.message


def test_array_items_are_typed_one_level_deep_as_bfcl_does():
    needed = {**ALLOWED, "stops": [[1.5, 2.0]]}
    for stops in ([1.5, "2"], [1, 2.0]):  # BFCL's int-to-float allowance is top level only
        verdict = check(trip(stops=stops), needed)
        assert verdict.code == WRONG_TYPE and verdict.bfcl_error_type == "type_error:nested", verdict
    # With "" allowed, BFCL's item check passes vacuously and the list fails on its value; the code still says what
    # the spec finds wrong with it (a string item), as the TTPA scorer would.
    verdict = check(trip(stops=[1.5, "2"]))
    assert verdict.bfcl_error_type == "value_error:list/tuple" and verdict.code == WRONG_TYPE
    assert verdict.error.argument == "stops[1]"


def test_optional_only_where_the_gold_says_so():
    allowed = {**ALLOWED, "budget": [500.0]}  # no "": the gold needs it
    verdict = check(trip(), allowed)
    assert verdict.code == MISSING_ARGUMENT and verdict.bfcl_error_type.endswith("missing_optional")
    assert verdict.error.argument == "budget"
    assert check(trip(budget=500.0), allowed).valid
    without = {k: v for k, v in ALLOWED.items() if k != "refundable"}  # the spec knows it, the gold does not use it
    assert check(trip(refundable=True), without).code == UNEXPECTED_ARGUMENT


def test_a_variable_in_the_gold_is_accepted_by_its_own_type_and_compared_exactly():
    allowed = {**ALLOWED, "nights": ["num_nights"]}  # BFCL's gold passes a variable name for an integer parameter
    assert check(trip(nights="num_nights"), allowed).valid
    assert check(trip(nights="Num_Nights"), allowed).code == WRONG_VALUE, "variables are not normalised"
    assert check(trip(nights=3), allowed).code == WRONG_VALUE


def test_parallel_calls_match_in_any_order_and_blame_the_call_meant_for_the_gold():
    ground_truth = [{"plan_trip": {"city": ["NYC"], "nights": [1]}}, {"plan_trip": {"city": ["Boston"], "nights": [2]}},
                    {"book_hotel": {"city": ["Boston"]}}]  # fmt: skip
    specs = [TRIP, OTHER]
    calls = [{"name": "plan_trip", "arguments": {"city": "NYC", "nights": 1}},
             {"name": "plan_trip", "arguments": {"city": "Boston", "nights": 2}},
             {"name": "book_hotel", "arguments": {"city": "Boston"}}]  # fmt: skip
    assert check_calls(specs, calls, ground_truth, "parallel_multiple").valid
    assert check_calls(specs, calls[::-1], ground_truth, "parallel_multiple").valid
    broken = copy.deepcopy(calls[::-1])
    del broken[1]["arguments"]["city"]  # the Boston trip, now second
    verdict = check_calls(specs, broken, ground_truth, "parallel_multiple")
    assert verdict.code == MISSING_ARGUMENT
    assert verdict.bfcl_error_type.endswith("cannot_find_match (simple_function_checker:missing_required)")
    # A gold call that accepts either city: BFCL's greedy match would give it Rome and leave the Rome-only gold call
    # without a match; any order of a correct answer must pass.
    either = [{"book_hotel": {"city": ["Rome", "Oslo"]}}, {"book_hotel": {"city": ["Rome"]}}]
    hotels = [{"name": "book_hotel", "arguments": {"city": c}} for c in ("Rome", "Oslo")]
    assert check_calls(specs, hotels, either, "parallel").valid
    assert check_calls(specs, hotels[::-1], either, "parallel").valid
    assert check_calls(specs, [hotels[1], hotels[1]], either, "parallel").code == WRONG_VALUE
    assert check_calls(specs, calls[:2], ground_truth, "parallel").code == MISSING_CALL
    assert check_calls(specs, calls + calls[:1], ground_truth, "parallel").code == EXTRA_CALL


def test_categories_choose_the_checker():
    assert [checker_kind(c) for c in ("simple_java", "multiple", "live_parallel_multiple", "parallel",
                                      "live_irrelevance", "irrelevance")] == \
        ["simple", "multiple", "parallel", "parallel", "irrelevance", "irrelevance"]  # fmt: skip
    call = trip()
    assert check_calls([TRIP], [], [], "irrelevance").valid
    assert check_calls([TRIP], [call], [], "irrelevance").code == EXTRA_CALL
    gold = [{"plan_trip": ALLOWED}]
    assert check_calls([OTHER, TRIP], [call], gold, "multiple").valid
    assert check_calls([OTHER, TRIP], [call, call], gold, "multiple").code == EXTRA_CALL
    assert check_calls([OTHER, TRIP], [], gold, "simple").code == MISSING_CALL


def test_model_text_parser_reads_json_python_and_our_policy_format():
    expected = [{"name": "pkg.f", "arguments": {"a": 1, "b": "x"}}, {"name": "g", "arguments": {}}]
    assert parse_model_text('[pkg.f(a=1, b="x"), g()]') == (expected, None)
    assert parse_model_text(json.dumps([{"name": "pkg.f", "arguments": {"a": 1, "b": "x"}}, {"g": {}}])) == \
        (expected, None)  # fmt: skip
    assert parse_model_text('```json\n{"function": {"name": "g", "arguments": "{}"}}\n```') == \
        ([{"name": "g", "arguments": "{}"}], None)  # fmt: skip
    assert parse_model_text('{"name":"g","arguments":{}}\n</calls>') == ([{"name": "g", "arguments": {}}], None)
    assert parse_model_text("  ") == ([], None)
    for bad in ("I cannot help with that.", "[f(1, 2)]", '{"x": 1, "y": 2}'):
        calls, problem = parse_model_text(bad)
        assert calls == [] and problem, bad


# ---------------------------------------------------------------------------------------------------- files and job


def _write_tiny_bfcl(folder: Path) -> Path:
    """A BFCL v3-named folder that is not called `bfcl`: one parallel category, one irrelevance category."""
    (folder / "possible_answer").mkdir(parents=True)
    spec = {"name": "plan_trip", "parameters": {"type": "dict", "properties": {
        "city": {"type": "string"}, "nights": {"type": "integer"}}, "required": ["city"]}}  # fmt: skip
    questions = [{"id": f"parallel_{i}", "question": [[{"role": "user", "content": f"trip {i}"}]], "function": [spec]}
                 for i in range(3)]  # fmt: skip
    answers = [{"id": f"parallel_{i}", "ground_truth": [{"plan_trip": {"city": ["Rome"], "nights": [i, ""]}},
                                                        {"plan_trip": {"city": ["Oslo"], "nights": [""]}}]}
               for i in range(3)]  # fmt: skip
    (folder / "BFCL_v3_parallel.json").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (folder / "possible_answer" / "BFCL_v3_parallel.json").write_text("".join(json.dumps(a) + "\n" for a in answers))
    (folder / "BFCL_v3_irrelevance.json").write_text(json.dumps({**questions[0], "id": "irrelevance_0"}) + "\n")
    return folder


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="evaluate", overrides=list(overrides))


def test_files_load_outside_a_bfcl_folder_and_irrelevance_has_no_gold(tmp_path):
    folder = _write_tiny_bfcl(tmp_path / "data")
    category, examples = load_bfcl_file(folder / "BFCL_v3_parallel.json")
    assert category == "parallel" and [len(gold_calls(e)) for e in examples] == [2, 2, 2]
    category, examples = load_bfcl_file(folder / "BFCL_v3_irrelevance.json")
    assert category == "irrelevance" and examples[0].calls == [] and gold_calls(examples[0]) == []
    (folder / "possible_answer" / "BFCL_v3_parallel.json").unlink()
    with pytest.raises(FileNotFoundError, match="possible_answer"):
        load_bfcl_file(folder / "BFCL_v3_parallel.json")
    with pytest.raises(ValueError, match="BFCL_v<N>_<category>"):
        load_bfcl_file(tmp_path / "questions.json")


def test_predictions_file_errors_name_the_row(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a", "calls": []}\n{"id": "a", "calls": []}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: question 'a' appears twice"):
        read_predictions(path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=r":1: needs 'calls'"):
        read_predictions(path)
    path.write_text('{"id": "a", "calls": [{"name": "f", "args": {}}]}\n')
    with pytest.raises(ValueError, match=r":1: 'calls': .*unknown key"):
        read_predictions(path)


def test_job_scores_gold_and_a_predictions_file(tmp_path):
    folder = _write_tiny_bfcl(tmp_path / "data")
    result = run_job(_compose("task=toolcall", f"data.path={folder}", "predictions=gold",
                              f"output_dir={tmp_path / 'gold'}"))  # fmt: skip
    assert [(r["category"], r["questions"], r["accuracy"]) for r in result["accuracy"]] == \
        [("irrelevance", 1, 1.0), ("parallel", 3, 1.0), ("all", 4, 1.0)]  # fmt: skip
    assert "| parallel | parallel | 3 | 3 | 1 |" in (tmp_path / "gold" / "toolcall_accuracy.md").read_text()

    rows = [
        {"id": "parallel_0", "text": '[plan_trip(city="oslo"), plan_trip(city="Rome", nights=0)]'},  # swapped: fine
        {"id": "parallel_1", "calls": [{"name": "plan_trip", "arguments": {"city": "Rome", "nights": 2}},
                                       {"plan_trip": {"city": "Oslo"}}]},  # wrong value  # fmt: skip
        {"id": "parallel_2", "text": "Sure! Here are your trips."},  # malformed
        {"id": "irrelevance_0", "text": "I cannot plan that."},  # no call: right
    ]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "predicted"
    result = run_job(_compose("task=toolcall", f"data.path={folder}", f"predictions={predictions}", f"output_dir={out}"))
    assert {r["category"]: r["correct"] for r in result["accuracy"]} == {"irrelevance": 1, "parallel": 1, "all": 2}
    assert {r["error"]: r["count"] for r in result["errors"]} == {WRONG_VALUE: 1, MALFORMED: 1}
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [v["valid"] for v in verdicts] == [True, True, False, False]
    assert (out / "toolcall_errors.md").is_file() and (out / "metrics.json").is_file()

    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(ValueError, match="no prediction for 2 question"):
        run_job(_compose("task=toolcall", f"data.path={folder}", f"predictions={predictions}", f"output_dir={out}"))


# ---------------------------------------------------------------------------------------------------- shared BFCL


@pytest.fixture
def bfcl(shared_data):
    """category -> examples, for every BFCL category in the shared data."""
    return dict(load_bfcl_file(path) for path in question_files(shared_data / "tools" / "bfcl"))


@pytest.mark.shared_data
def test_every_sound_gold_answer_passes_and_defects_are_named(bfcl):
    assert {"irrelevance", "multiple", "parallel", "parallel_multiple", "live_multiple", "simple_java"} <= set(bfcl)
    for category, examples in bfcl.items():
        for example in examples:
            verdict = check_calls(example.tools, gold_calls(example), example.allowed or [], category)
            # A gold fails only if it cannot be met under BFCL's rules (and then it must fail): e.g. it requires an
            # argument the function does not declare.
            assert verdict.valid == (not gold_defects(example)), (example.id, verdict, gold_defects(example))
    defective = sum(bool(gold_defects(e)) for examples in bfcl.values() for e in examples)
    assert defective <= 5, f"{defective} BFCL golds flagged as defective: the defect rules are too eager"


def _spec(example, name):
    return next(s for s in example.tools if s["name"] == name)


def _corruptions(example, category):
    """(description, calls, expected code or None for "must pass") for one BFCL example."""
    gold = gold_calls(example)
    if checker_kind(category) == "irrelevance":
        spec = example.tools[0]
        yield "call on irrelevance", [{"name": spec["name"], "arguments": {}}], EXTRA_CALL
        return
    j = len(gold) - 1  # corrupt the last call: in parallel sets it is matched last
    call = gold[j]
    schema_of = _spec(example, call["name"])["parameters"]
    allowed = dict(next(iter(example.allowed[j].values())))

    def changed(**arguments):
        calls = copy.deepcopy(gold)
        calls[j]["arguments"] = arguments
        return calls

    yield "wrong name", [*gold[:j], {**call, "name": "no_such_function"}], UNKNOWN_TOOL
    others = [s["name"] for s in example.tools if s["name"] != call["name"]]
    if others:
        yield "another offered function", [*gold[:j], {**call, "name": others[0]}], WRONG_TOOL
    present_required = [k for k in schema_of.get("required", []) if k in call["arguments"]]
    if present_required:
        dropped = {k: v for k, v in call["arguments"].items() if k != present_required[0]}
        yield "dropped required argument", changed(**dropped), MISSING_ARGUMENT
    yield "extra argument", changed(**call["arguments"], zz_not_a_parameter=1), UNEXPECTED_ARGUMENT
    for key, value in call["arguments"].items():
        schema = schema_of["properties"].get(key, {})
        options = [o for o in allowed.get(key, []) if o != ""]
        if "" in allowed.get(key, []) and key not in schema_of.get("required", []):
            yield "optional argument left out", changed(**{k: v for k, v in call["arguments"].items() if k != key}), None
        kind = schema.get("type")
        if kind in ("string", "integer", "number", "boolean", "array") and not any(isinstance(o, dict) for o in options):
            yield "wrong type", changed(**{**call["arguments"], key: {"corrupted": True}}), WRONG_TYPE
        if kind == "string" and options and all(isinstance(o, str) for o in options):
            constrained = any(c in schema for c in ("pattern", "format", "minLength", "maxLength"))
            if not constrained:
                code = INVALID_VALUE if "enum" in schema else WRONG_VALUE
                yield "out-of-list string", changed(**{**call["arguments"], key: "zz not an allowed value"}), code
            if value.isascii() and not constrained and "enum" not in schema:
                yield "string normalised", changed(**{**call["arguments"], key: f" {value.upper()} ."}), None
        if kind == "integer" and options and all(type(o) is int for o in options) and \
                not any(c in schema for c in ("minimum", "maximum", "enum")):  # fmt: skip
            yield "out-of-list integer", changed(**{**call["arguments"], key: max(options) + 7919}), WRONG_VALUE
        if kind == "number" and type(value) is float and value.is_integer():
            yield "integer for a float", changed(**{**call["arguments"], key: int(value)}), None
    if len(gold) > 1:
        yield "swapped parallel order", gold[::-1], None
        yield "missing parallel call", gold[:-1], MISSING_CALL
    yield "one call too many", [*gold, gold[0]], EXTRA_CALL


@pytest.mark.shared_data
def test_systematic_corruptions_get_the_expected_verdict_and_code(bfcl):
    applied, wrong = Counter(), []
    for category, examples in bfcl.items():
        for example in examples:
            if gold_defects(example):
                continue
            for what, calls, code in _corruptions(example, category):
                verdict = check_calls(example.tools, calls, example.allowed or [], category)
                applied[(checker_kind(category), what)] += 1
                if verdict.valid != (code is None) or verdict.code != code:
                    wrong.append((example.id, what, code, verdict))
    assert not wrong, f"{len(wrong)} corruptions misjudged, e.g. {wrong[:3]}"
    for kind in ("simple", "multiple", "parallel"):
        for what in ("wrong name", "dropped required argument", "extra argument", "wrong type", "out-of-list string",
                     "string normalised", "one call too many"):
            assert applied[(kind, what)] > 0, (kind, what)
    for what in ("another offered function", "out-of-list integer", "integer for a float", "optional argument left out"):
        assert applied[("multiple", what)] > 0, what
    assert applied[("parallel", "swapped parallel order")] > 100 and applied[("parallel", "missing parallel call")] > 100
    assert applied[("irrelevance", "call on irrelevance")] == len(bfcl["irrelevance"])


@pytest.mark.shared_data
def test_job_on_the_shared_bfcl_folder_reports_categories_and_defects(shared_data, tmp_path):
    scored = load_and_score(shared_data / "tools" / "bfcl")
    failed = {s.id for s in scored if not s.verdict.valid}
    assert failed == {s.id for s in scored if s.gold_defects}
    result = run_job(_compose("task=toolcall", f"data.path={shared_data / 'tools' / 'bfcl'}", "predictions=gold",
                              "evaluate.max_queries=20", f"output_dir={tmp_path}"))  # fmt: skip
    rows = {r["category"]: r for r in result["accuracy"]}
    assert rows["all"]["questions"] == sum(min(20, len(load_bfcl_file(f)[1])) for f in
                                           question_files(shared_data / "tools" / "bfcl"))  # fmt: skip
    assert all(r["accuracy (sound gold)"] == 1.0 for r in rows.values())
