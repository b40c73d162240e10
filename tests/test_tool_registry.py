"""Tests of the tool registry: schema validation and its error taxonomy, simulated tools, dataset loaders.

The TTPA scorer counts error codes, and a BFCL-style checker will reuse `validate_call`, so each code is pinned to
the call that must produce it, and the validator is checked against an independent JSON-schema implementation.
The loaders are checked on the real files: a known gold call validates clean and its corruptions get the right code.
"""

from __future__ import annotations

import copy
import itertools

import jsonschema
import pytest

from actors.tools import (
    ERROR_CODES,
    EXECUTION_ERROR,
    INVALID_VALUE,
    MISSING_ARGUMENT,
    NO_RECORDED_RESPONSE,
    NOT_EXECUTABLE,
    OUTPUT_TOO_LARGE,
    UNEXPECTED_ARGUMENT,
    UNKNOWN_TOOL,
    WRONG_TYPE,
    ToolRegistry,
    bfcl_concrete,
    canonical_arguments,
    load_tool_dataset,
    normalize_spec,
    parse_api_bank_call,
    validate_call,
)
from pipelines.data.world import WorldConfig, build_world

SMALL = dict(people_per_split=12, companies_per_split=6, cities_per_split=5, countries=3, train_questions=4,
             dev_questions=2, test_questions=2, train_tool_tasks=40, dev_tool_tasks=2, test_tool_tasks=2)  # fmt: skip

SPEC = {
    "name": "book",
    "description": "A spec that uses every construct the validator knows.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
            "nights": {"type": "integer", "minimum": 1, "maximum": 30},
            "budget": {"type": "number", "exclusiveMinimum": 0},
            "breakfast": {"type": "boolean"},
            "room": {"type": "string", "enum": ["single", "double"]},
            "date": {"type": "string", "format": "date"},
            "guests": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "options": {
                "type": "object",
                "properties": {"floor": {"type": "integer"}, "view": {"type": "string"}},
                "required": ["floor"],
            },
            "note": {"type": ["string", "null"]},
        },
        "required": ["city", "nights"],
    },
}
GOOD = {"city": "Paris", "nights": 2, "budget": 120, "breakfast": True, "room": "double", "date": "2024-02-29",
        "guests": ["Ann"], "options": {"floor": 3, "view": "sea"}, "note": None}  # fmt: skip


META_SCHEMA = jsonschema.Draft7Validator(jsonschema.Draft7Validator.META_SCHEMA)
"""Checks that a spec's parameters are a JSON schema at all (one instance: building it per spec is slow)."""


def call(**arguments) -> dict:
    return {"name": "book", "arguments": arguments}


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(**SMALL))


@pytest.fixture(scope="module")
def registry(world):
    return ToolRegistry.from_functions(world.tools(), world.tool_functions())


# ---------------------------------------------------------------------------------------------------- validation


def test_a_valid_call_has_no_error():
    assert validate_call(SPEC, call(**GOOD)) is None
    assert validate_call(SPEC, call(city="Rome", nights=1)) is None  # optional arguments may be left out
    assert validate_call(SPEC, {"name": "book", "arguments": '{"city": "Rome", "nights": 1}'}) is None  # OpenAI form
    assert validate_call({"type": "function", "function": SPEC}, call(city="Rome", nights=1)) is None


@pytest.mark.parametrize(
    "change, code, argument",
    [
        ({"nights": None}, WRONG_TYPE, "nights"),
        ({"nights": True}, WRONG_TYPE, "nights"),  # bool is not an integer
        ({"nights": 2.0}, WRONG_TYPE, "nights"),  # nor is a float, even an integral one
        ({"nights": "2"}, WRONG_TYPE, "nights"),
        ({"budget": "120"}, WRONG_TYPE, "budget"),
        ({"budget": False}, WRONG_TYPE, "budget"),
        ({"breakfast": 1}, WRONG_TYPE, "breakfast"),
        ({"guests": "Ann"}, WRONG_TYPE, "guests"),
        ({"guests": ["Ann", 7]}, WRONG_TYPE, "guests[1]"),
        ({"options": [3]}, WRONG_TYPE, "options"),
        ({"options": {"floor": "3"}}, WRONG_TYPE, "options.floor"),
        ({"note": 5}, WRONG_TYPE, "note"),
        ({"nights": 0}, INVALID_VALUE, "nights"),
        ({"nights": 31}, INVALID_VALUE, "nights"),
        ({"budget": 0}, INVALID_VALUE, "budget"),
        ({"budget": float("nan")}, INVALID_VALUE, "budget"),
        ({"room": "suite"}, INVALID_VALUE, "room"),
        ({"city": "paris"}, INVALID_VALUE, "city"),
        ({"date": "2023-02-29"}, INVALID_VALUE, "date"),
        ({"date": "29/02/2024"}, INVALID_VALUE, "date"),
        ({"guests": []}, INVALID_VALUE, "guests"),
        ({"options": {"view": "sea"}}, MISSING_ARGUMENT, "options.floor"),
        ({"options": {"floor": 1, "spa": True}}, UNEXPECTED_ARGUMENT, "options.spa"),
        ({"pets": 2}, UNEXPECTED_ARGUMENT, "pets"),
    ],
)
def test_each_bad_argument_gets_its_code_and_path(change, code, argument):
    arguments = {**GOOD, **change}
    error = validate_call(SPEC, call(**arguments))
    assert error is not None, f"{change} was accepted"
    assert (error.code, error.argument, error.tool) == (code, argument, "book")
    assert error.message and error.code in ERROR_CODES


def test_missing_unknown_and_malformed_calls():
    missing = validate_call(SPEC, call(city="Rome"))
    assert (missing.code, missing.argument) == (MISSING_ARGUMENT, "nights")
    assert "nights" in missing.message
    assert validate_call(SPEC, {"name": "bok", "arguments": {}}).code == UNKNOWN_TOOL
    assert validate_call(SPEC, {"name": "book", "arguments": "{not json"}).code == WRONG_TYPE
    assert validate_call(SPEC, {"name": "book", "arguments": [1, 2]}).code == WRONG_TYPE
    # A misspelt name is reported as unexpected (it explains the missing one) and names what was expected.
    typo = validate_call(SPEC, call(city="Rome", nigths=2))
    assert typo.code == UNEXPECTED_ARGUMENT and "nights" in typo.message


def test_raw_bfcl_dialect_is_understood():
    """BFCL writes "dict", "float" and Java types; a checker passes such specs straight to validate_call."""
    spec = {"name": "f", "parameters": {"type": "dict", "properties": {
        "x": {"type": "float"}, "n": {"type": "long"}, "s": {"type": "String"}, "m": {"type": "HashMap"},
        "t": {"type": "tuple", "items": {"type": "integer"}}, "a": {"type": "any"}}, "required": ["x"]}}  # fmt: skip
    ok = {"x": 1, "n": 3, "s": "a", "m": {"k": 1}, "t": [1, 2], "a": object()}
    assert validate_call(spec, {"name": "f", "arguments": ok}) is None
    assert validate_call(spec, {"name": "f", "arguments": {"x": "1"}}).code == WRONG_TYPE
    assert validate_call(spec, {"name": "f", "arguments": {"x": 1, "t": [1, "2"]}}).argument == "t[1]"
    assert normalize_spec(spec)["parameters"]["properties"]["m"] == {"type": "object"}


def test_validator_agrees_with_jsonschema_on_accept_or_reject():
    """Reference check: for many argument combinations, accept/reject matches the jsonschema package, except our
    documented strictness (an integral float is not an integer)."""
    spec = normalize_spec(SPEC)
    schema = {**spec["parameters"], "additionalProperties": False}
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    values = {
        "nights": [1, 30, 0, 2.5, "3", True, None],
        "budget": [10, 0.5, 0, -1, "x"],
        "room": ["single", "suite", 1],
        "date": ["2024-01-31", "2024-13-01", "x"],
        "guests": [["a"], [], ["a", 1], "a"],
    }
    compared = 0
    for combo in itertools.product(*values.values()):
        arguments = {"city": "Paris", **dict(zip(values, combo, strict=True))}
        ours = validate_call(SPEC, call(**arguments)) is None
        theirs = checker.is_valid(arguments)
        assert ours == theirs, f"{arguments}: validate_call={ours}, jsonschema={theirs}"
        compared += 1
    assert compared == 7 * 5 * 3 * 3 * 4
    assert validate_call(SPEC, call(city="Paris", nights=2.0)) is not None and checker.is_valid(
        {"city": "Paris", "nights": 2.0})  # the one documented difference


# ---------------------------------------------------------------------------------------------------- registry


def test_world_gold_calls_run_clean_and_reach_the_answer(world, registry):
    tasks = world.tool_tasks("train")
    assert len(tasks) == SMALL["train_tool_tasks"]
    for task in tasks:
        outputs = []
        for gold in task["gold_calls"]:
            assert registry.validate(gold) is None, (task["id"], gold)
            result = registry.call(gold)
            assert result.ok, (task["id"], gold, result.error)
            outputs.append(result.output)
        assert outputs[-1] == task["answer"], task["id"]
    assert registry.specs() == world.tools()


def test_registry_turns_every_failure_into_a_typed_result(registry):
    unknown = registry.call({"name": "rm_rf", "arguments": {}})
    assert (unknown.ok, unknown.error.code, unknown.output) == (False, UNKNOWN_TOOL, None)
    assert "lookup" in unknown.error.message  # says what exists
    bad_enum = registry.call({"name": "lookup", "arguments": {"entity": "X", "attribute": "shoe_size"}})
    assert (bad_enum.error.code, bad_enum.error.argument) == (INVALID_VALUE, "attribute")
    failed = registry.call({"name": "lookup", "arguments": {"entity": "Nobody At All", "attribute": "birth_year"}})
    assert failed.error.code == EXECUTION_ERROR and "unknown entity" in failed.error.message
    division = registry.call({"name": "calculate", "arguments": {"operation": "divide", "a": 1, "b": 0}})
    assert division.error.code == EXECUTION_ERROR
    assert registry.call({"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}).output == "5"
    assert registry.call({"name": "calculate", "arguments": {"operation": "add", "a": 2}}).observation().startswith(
        "error (missing_argument)")


def test_output_limit_and_schema_only_tools():
    registry = ToolRegistry(max_output_chars=10)
    registry.add({"name": "big", "parameters": {"type": "object", "properties": {}}}, lambda: "x" * 11)
    registry.add({"name": "small", "parameters": {"type": "object", "properties": {}}}, lambda: {"a": 1})
    registry.add({"name": "schema_only", "parameters": {"type": "object", "properties": {}}})
    assert registry.call({"name": "big", "arguments": {}}).error.code == OUTPUT_TOO_LARGE
    assert registry.call({"name": "small", "arguments": {}}).output == '{"a": 1}'
    assert registry.call({"name": "schema_only", "arguments": {}}).error.code == NOT_EXECUTABLE
    with pytest.raises(ValueError, match="different spec"):
        registry.add({"name": "big", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}})


def test_simulated_tool_replays_by_canonical_arguments():
    spec = {"name": "weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "default": 1}}, "required": ["city"]}}  # fmt: skip
    recorded = {canonical_arguments({"city": "Oslo"}): "rain", canonical_arguments({"days": 3, "city": "Oslo"}): "snow"}
    registry = ToolRegistry()
    registry.add(spec, responses=recorded)
    assert registry.call({"name": "weather", "arguments": {"city": "Oslo"}}).output == "rain"
    assert registry.call({"name": "weather", "arguments": {"city": "Oslo", "days": 1}}).output == "rain"  # default
    assert registry.call({"name": "weather", "arguments": '{"days": 3, "city": "Oslo"}'}).output == "snow"
    never = registry.call({"name": "weather", "arguments": {"city": "Lima"}})
    assert never.error.code == NO_RECORDED_RESPONSE and "Lima" in never.error.message
    assert registry.call({"name": "weather", "arguments": {"city": 5}}).error.code == WRONG_TYPE  # validated first
    assert canonical_arguments({"b": 1.0, "a": [2.0]}) == canonical_arguments({"a": [2], "b": 1})


def test_api_bank_call_parser_handles_unescaped_quotes():
    spec = normalize_spec({"name": "RecordHealthData", "parameters": {"type": "object", "properties": {
        "user_id": {"type": "string"}, "time": {"type": "string"}, "health_data": {"type": "array"}}}})  # fmt: skip
    text = ("RecordHealthData(user_id='12345', time='2023-10-13 09:30:00', health_data='[{'name': 'blood_pressure', "
            "'value': '120/80'}]')")  # fmt: skip
    parsed = parse_api_bank_call(text, spec)
    assert parsed["name"] == "RecordHealthData"
    assert parsed["arguments"]["user_id"] == "12345"
    assert parsed["arguments"]["health_data"] == "[{'name': 'blood_pressure', 'value': '120/80'}]"
    assert parse_api_bank_call("Calculator(formula='(5+6)*3')") == {"name": "Calculator",
                                                                   "arguments": {"formula": "(5+6)*3"}}


def test_bfcl_concrete_picks_first_acceptable_value():
    allowed = {"a": [5], "b": ["", True], "c": [""], "d": [None, 2], "e": [[{"k": [1], "z": [""]}]]}
    assert bfcl_concrete(allowed) == {"a": 5, "b": True, "d": 2, "e": [{"k": 1}]}


# ---------------------------------------------------------------------------------------------------- loaders


def _corruptions(registry: ToolRegistry, gold: dict) -> dict[str, dict]:
    """Broken variants of a clean gold call, keyed by the code each must get."""
    spec = registry.tool(gold["name"]).spec["parameters"]
    required = [r for r in spec.get("required", []) if r in gold["arguments"]]
    first, value = next(iter(gold["arguments"].items()))
    out = {
        UNKNOWN_TOOL: {**gold, "name": gold["name"] + "_nope"},
        UNEXPECTED_ARGUMENT: {**gold, "arguments": {**gold["arguments"], "zz_not_a_parameter": 1}},
        WRONG_TYPE: {**gold, "arguments": {**gold["arguments"], first: 12345 if isinstance(value, str) else "x"}},
    }
    if required:
        out[MISSING_ARGUMENT] = {**gold, "arguments": {k: v for k, v in gold["arguments"].items() if k != required[0]}}
    return out


CASES = {  # dataset -> (example id, gold tool, minimum share of gold calls that validate clean)
    "seal_tools": ("test_in_domain-easy-3", "getFilmMarketing", 0.95),
    "api_bank": ("level-1-0", "ModifyRegistration", 0.85),
    "toolalpaca": ("Nager.Date-4", "LongWeekendLongWeekend", 0.75),
    "bfcl": ("multiple_0", "triangle_properties.get", 0.95),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(CASES))
def test_loader_gives_valid_object_schemas_and_checkable_gold(name, shared_data):
    dataset = load_tool_dataset(name, shared_data / "tools")
    assert len(dataset.specs) > 0 and len(dataset.examples) > 0
    for spec in dataset.specs:
        parameters = spec["parameters"]
        assert parameters["type"] == "object", spec["name"]
        META_SCHEMA.validate(parameters)
        assert set(parameters.get("required", [])) <= set(parameters["properties"]), spec["name"]

    example_id, tool, clean_share = CASES[name]
    example = next(e for e in dataset.examples if e.id == example_id)
    gold = next(c for c in example.calls if c["name"] == tool)
    registry = dataset.registry(example)
    assert registry.validate(gold) is None, f"{name} {example_id}: {registry.validate(gold)}"
    for code, broken in _corruptions(registry, copy.deepcopy(gold)).items():
        error = registry.validate(broken)
        assert error is not None and error.code == code, (name, code, broken, error)

    calls = [(e, c) for e in dataset.examples for c in e.calls]
    clean = sum(dataset.registry(e).validate(c) is None for e, c in calls)
    assert clean / len(calls) >= clean_share, f"{name}: only {clean}/{len(calls)} gold calls validate"


@pytest.mark.shared_data
def test_api_bank_simulated_mode_replays_recorded_responses(shared_data):
    dataset = load_tool_dataset("api_bank", shared_data / "tools")
    assert sum(len(r) for r in dataset.responses.values()) > 100
    registry = dataset.registry()
    modified = registry.call({"name": "ModifyRegistration", "arguments": {
        "new_appointment_doctor": "Dr. Lee", "appointment_id": "34567890", "new_appointment_date": "2023-03-26"}})
    assert modified.ok and modified.output == "success"
    health = registry.call({"name": "QueryHealthData", "arguments": {
        "user_id": "J46801", "start_time": "2023-03-05 00:00:00", "end_time": "2023-03-12 00:00:00"}})
    assert health.ok and "blood_pressure" in health.output
    unrecorded = registry.call({"name": "ModifyRegistration", "arguments": {
        "appointment_id": "00000000", "new_appointment_date": "2023-03-26", "new_appointment_doctor": "Dr. Lee"}})
    assert unrecorded.error.code == NO_RECORDED_RESPONSE
    optional = registry.tool("Translate").spec["parameters"]
    assert optional["required"] == ["src"] and {"src_lang", "tgt_lang"} <= set(optional["properties"])
