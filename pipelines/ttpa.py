"""TTPA data generation: reversed construction, token-level preference pairs, error-oriented scoring.

TTPA (Huang et al., 2025, arXiv 2505.20016) trains tool calling with preferences instead of plain SFT. Three parts,
each a section below:

1. **Reversed construction** (`build_reversed_tasks`): tools are chosen and called first, through the real sandbox,
   so every result in a sample is a true result; the answer is read off the last result; the user query is written
   *last*, from the scenario. Writing the query last is what makes the gold calls correct by construction: nobody has
   to guess which calls a free-form query needs. Samples are then filtered for consistency (calls run, the answer
   re-executes, the query names what the calls start from) and every drop is counted by reason.
2. **Token-level preference pairs** (`make_pairs`): along the gold call text after the prompt, at each position
   where the policy's top alternatives include a token other than the gold one within `max_logprob_gap` of the best,
   branch: keep the gold tokens up to there, put the alternative token, let the policy finish greedily. The branch
   and the gold share every token before the branch point, so the pair isolates the decision the policy is unsure
   about (what `token_dpo` trains on: `prefix_length` marks where they part).
3. **Error-oriented scoring** (`score_call`, `score_calls`): a call is scored by the errors it makes, typed by the
   sandbox's own taxonomy (`actors/tools.py`: `validate_call` finds schema errors, execution finds run-time ones) plus
   two codes only a gold call can tell (`wrong_tool`, `wrong_value`). Each error subtracts its configurable penalty
   from 1.0; a pair is kept when the gold beats the branch by more than `margin`.

The job (`run_ttpa_generation`) follows the E-step's shape (`pipelines/generate.py`): tasks stream through Ray Data
into `TTPASampler` actors over shared engine actors; `shard-NNNNN.parquet` files of `preference_pair` records, each
covering a fixed slice of the tasks, are written atomically with a `.stats.json` sidecar (branch and drop counts), so
a rerun resumes from the complete shards and still reports whole-job counts; bad task rows go to `quarantine.jsonl`.

Policy text format (ours): the prompt lists the offered tools, one compact JSON line each (`"unit?"` marks an
optional argument, `"a|b"` an enum; or their names only, `TTPAConfig.tool_schemas`), then the query, then the earlier
turns of the task if any (a call block and its `<results>` block each, as `agents/toolcall.py` shows results), then
`<calls>`; the target is one JSON call per line, `{"name": ..., "arguments": {...}}`, closed by `</calls>`.

Turns (`split_turns`): a chain whose later calls use earlier results (a bridge's second lookup names what the first
found) is cut into turns, each a task whose history holds the earlier gold calls with their real results. A model
cannot write a value it has not been shown, so only in this form is every gold call of a sample learnable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actors.tools import (
    EXECUTION_ERROR,
    INVALID_VALUE,
    MISSING_ARGUMENT,
    OUTPUT_TOO_LARGE,
    SANDBOX_UNAVAILABLE,
    TIMEOUT,
    UNEXPECTED_ARGUMENT,
    UNKNOWN_TOOL,
    WRONG_TYPE,
    ToolRegistry,
    ToolResult,
    normalize_spec,
    parse_arguments,
    validate_call,
)
from pipelines import records
from pipelines.shards import plan_shards, shard_path, write_atomically, write_quarantine

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- error codes

WRONG_TOOL = "wrong_tool"
"""An offered tool, but not the one the gold call uses (the sandbox cannot know this; the gold can)."""
WRONG_VALUE = "wrong_value"
"""A schema-valid argument whose value differs from the gold call's."""
MISSING_CALL = "missing_call"
"""The output has fewer calls than the gold."""
EXTRA_CALL = "extra_call"
"""The output has more calls than the gold."""
MALFORMED = "malformed"
"""The output does not parse as one JSON call per line closed by the end tag."""

DEFAULT_PENALTIES: dict[str, float] = {
    UNKNOWN_TOOL: 1.0,
    WRONG_TOOL: 0.8,
    MISSING_ARGUMENT: 0.5,
    UNEXPECTED_ARGUMENT: 0.3,
    WRONG_TYPE: 0.5,
    INVALID_VALUE: 0.4,
    WRONG_VALUE: 0.3,
    EXECUTION_ERROR: 0.6,
    TIMEOUT: 0.6,
    OUTPUT_TOO_LARGE: 0.6,
    MISSING_CALL: 1.0,
    EXTRA_CALL: 0.5,
    MALFORMED: 1.0,
}
"""Our choice of severities: the tool itself worst, then arguments the tool cannot use, then values it can use but
that answer another question. Override any of them with `TTPAConfig.penalties`."""

_NOT_THE_MODELS_FAULT = {SANDBOX_UNAVAILABLE}
"""Infrastructure failures while executing a call: not scored, so a flaky sandbox never invents a preference."""


@dataclass
class TTPAConfig:
    """Pair generation and scoring. Plain-typed fields, so it can become a Hydra recipe group as it stands."""

    penalties: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PENALTIES))
    """Error code -> amount subtracted from a call's score of 1.0 (scores are clamped at 0)."""
    default_penalty: float = 0.5
    """For error codes missing from `penalties` (e.g. a sandbox code added later)."""
    margin: float = 0.3
    """Keep a pair only when chosen_score - rejected_score exceeds this."""
    top_k: int = 5
    """Alternatives read per position (`LLMEngine.top_alternatives`)."""
    max_logprob_gap: float = 2.0
    """Branch on an alternative only if its logprob is within this of the position's best token."""
    max_branches_per_call: int = 2
    """Branch points per gold call line (the closing tag counts as one more line); the closest calls win."""
    max_new_tokens: int = 96
    """Greedy completion budget after a branch point (and for sampled completions)."""
    execute_calls: bool = True
    """Run schema-valid calls in the sandbox so run-time failures score as `execution_error`."""
    tool_schemas: bool = True
    """Show each offered tool's arguments, types and enums in the prompt; off: the offered names only. A real model
    needs the schemas; the tiny demo policy learns the world's five fixed tools from the data, and without their
    schema lines its sequences are half as long (training twice as fast on two cores)."""
    sampled_completions: int = 0
    """Also sample this many completions per task and pair the best against the worst (0 = off)."""
    sample_temperature: float = 1.0
    shard_size: int = 32
    """Tasks per output shard: the unit of resumption."""
    batch_size: int = 8
    """Tasks per Ray Data batch (one top-k call and one completion call per batch)."""
    concurrency: int = 1
    """Sampler actors in the Ray Data actor pool."""
    seed: int = 0
    timeout_s: float = 600.0
    """Deadline of one engine request."""

    def __post_init__(self) -> None:
        problems = []
        if self.top_k < 2:
            problems.append(f"top_k={self.top_k} must be >= 2 (an alternative besides the best)")
        if self.max_logprob_gap < 0:
            problems.append(f"max_logprob_gap={self.max_logprob_gap} must be >= 0")
        if self.max_branches_per_call < 0:
            problems.append(f"max_branches_per_call={self.max_branches_per_call} must be >= 0")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.shard_size < 1 or self.batch_size < 1:
            problems.append(f"shard_size={self.shard_size} and batch_size={self.batch_size} must be >= 1")
        bad = {code: value for code, value in self.penalties.items() if not (isinstance(value, (int, float))
                                                                               and value >= 0)}  # fmt: skip
        if bad:
            problems.append(f"penalties {bad} must be numbers >= 0")
        if problems:
            raise ValueError("invalid ttpa config: " + "; ".join(problems))

    def penalty(self, code: str) -> float:
        return float(self.penalties.get(code, self.default_penalty))


# ---------------------------------------------------------------------------------------------------- text format

CALLS_TAG = "<calls>"
END_TAG = "</calls>"


def render_tool(spec: Mapping) -> str:
    """One compact line per tool: the call's own shape, argument -> type, `a|b` for an enum, `name?` if optional."""
    parameters = normalize_spec(spec)["parameters"]
    required = set(parameters.get("required") or [])
    arguments = {}
    for name, schema in parameters.get("properties", {}).items():
        enum = schema.get("enum")
        kind = "|".join(map(str, enum)) if isinstance(enum, list) and enum else schema.get("type", "any")
        arguments[name if name in required else f"{name}?"] = kind if isinstance(kind, str) else "|".join(kind)
    return json.dumps({"name": spec["name"], "arguments": arguments}, separators=(",", ":"), ensure_ascii=False)


def render_prompt(query: str, tool_specs: Sequence[Mapping], history: Sequence[Mapping] = (),
                  tool_schemas: bool = True) -> str:  # fmt: skip
    """Tools, the query, then the turns so far (each a call block and its results block), then a new `<calls>`.

    `history` holds earlier turns as `{"calls": [...], "results": [output text, ...]}`; results are shown the way
    `agents/toolcall.py` shows them to every tool agent (`<results>`, one JSON line per call, ids over the chat).
    `tool_schemas=False` lists the offered tools by name only (see `TTPAConfig.tool_schemas`).
    """
    from agents.toolcall import render_results

    tools = ["Tools:", *(render_tool(spec) for spec in tool_specs)] if tool_schemas else [
        "Tools: " + ", ".join(spec["name"] for spec in tool_specs)]  # fmt: skip
    lines = [*tools, f"Query: {query.strip()}"]
    numbered = 0
    for turn in history:
        calls = list(turn["calls"])
        lines += [CALLS_TAG, render_calls(calls)]
        named = [{"id": f"call_{numbered + i}", "name": call["name"]} for i, call in enumerate(calls)]
        lines.append(render_results(zip(named, (ToolResult(True, str(out)) for out in turn["results"]), strict=True)))
        numbered += len(calls)
    return "\n".join([*lines, CALLS_TAG, ""])


def task_prompt(task: Mapping, specs: Mapping[str, Mapping], tool_schemas: bool = True) -> str:
    """The prompt of a checked task (`check_task`'s shape: offered tool names, history as JSON text or a list)."""
    history = task.get("history") or []
    history = json.loads(history) if isinstance(history, str) else history
    return render_prompt(task["query"], [specs[name] for name in task["tools"]], history, tool_schemas)


def render_calls(calls: Sequence[Mapping]) -> str:
    """The target text: one compact JSON call per line, then the end tag."""
    lines = [json.dumps({"name": c["name"], "arguments": dict(c.get("arguments") or {})}, separators=(",", ":"),
                        ensure_ascii=False) for c in calls]  # fmt: skip
    return "".join(line + "\n" for line in lines) + END_TAG


def parse_calls(text: str) -> tuple[list[dict], str | None]:
    """(calls, problem): the calls read before the first bad line or the end tag; problem None if well-formed."""
    body, tag, _ = text.partition(END_TAG)
    calls = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            call = json.loads(line)
        except json.JSONDecodeError as error:
            return calls, f"line {number} is not JSON ({error.msg} at column {error.colno})"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return calls, f"line {number} is not an object with a string 'name'"
        unknown = sorted(set(call) - {"name", "arguments"})
        if unknown:
            return calls, f"line {number} has unknown key(s) {unknown}"
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    if not tag:
        return calls, f"no {END_TAG} (the output was cut off)"
    return calls, None


# ---------------------------------------------------------------------------------------------------- scoring

Executor = Callable[[Mapping], ToolResult]


def _spec_index(specs: Mapping[str, Mapping] | Iterable[Mapping] | ToolRegistry) -> dict[str, Mapping]:
    if isinstance(specs, ToolRegistry):
        specs = specs.specs()
    if isinstance(specs, Mapping):
        return dict(specs)
    return {spec["name"]: spec for spec in specs}


def _top_key(path: str | None) -> str | None:
    return re.split(r"[.\[]", path, maxsplit=1)[0] if path else None


def same_value(a: object, b: object) -> bool:
    """Gold comparison: numbers by value (5 == 5.0), strings stripped, bools only equal bools, recursive."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(same_value(a[k], b[k]) for k in a)
    return a == b


_ABSENT = object()


def call_errors(call: Mapping, gold_call: Mapping, specs: Mapping[str, Mapping] | Iterable[Mapping],
                execute: Executor | None = None) -> list[str]:  # fmt: skip
    """Every error of one call against its gold, in order: tool, schema (via `validate_call`), values, execution.

    `validate_call` reports the first schema error; to find them all, the offending argument is set aside (an
    unexpected key dropped, a missing one no longer required, a badly typed one removed) and the call validated
    again. Each argument is blamed once. Arguments that pass the schema are compared with the gold (defaults fill
    what either side omits): a needed optional argument left out is `missing_argument`, one the gold does not use is
    `unexpected_argument`, a different value is `wrong_value`. A call with no schema error is executed, if an
    executor is given, and a failure adds its code (`execution_error`, `timeout`, ...).
    """
    specs = _spec_index(specs)
    name = call.get("name") if isinstance(call, Mapping) else None
    if not isinstance(name, str) or name not in specs:
        return [UNKNOWN_TOOL]
    if name != gold_call.get("name"):
        return [WRONG_TOOL]
    spec = normalize_spec(specs[name])
    spec["parameters"]["required"] = list(spec["parameters"].get("required") or [])  # ours to edit
    arguments, error = parse_arguments(name, call.get("arguments"))
    if error:
        return [error.code]
    errors, blamed, current = [], set(), dict(arguments)
    for _ in range(len(arguments) + len(spec["parameters"]["required"]) + 1):
        error = validate_call(spec, {"name": name, "arguments": current})
        key = _top_key(error.argument) if error else None
        if error is None:
            break
        errors.append(error.code)
        if key is None or key in blamed:
            break  # cannot localise it: stop rather than loop
        blamed.add(key)
        current.pop(key, None)
        if key in spec["parameters"]["required"]:
            spec["parameters"]["required"].remove(key)
    schema_clean = not errors
    gold_arguments, _ = parse_arguments(name, gold_call.get("arguments"))
    gold_arguments = gold_arguments or {}
    for key, schema in spec["parameters"].get("properties", {}).items():
        if key in blamed or (key not in arguments and key not in gold_arguments):
            continue
        default = schema.get("default", _ABSENT)
        if key not in arguments:  # left out: fine only if the default is what the gold asks for
            if default is _ABSENT or not same_value(default, gold_arguments[key]):
                errors.append(MISSING_ARGUMENT)
        elif key not in gold_arguments:  # given though the gold leaves it out: fine only if it is the default
            if default is _ABSENT:
                errors.append(UNEXPECTED_ARGUMENT)
            elif not same_value(arguments[key], default):
                errors.append(WRONG_VALUE)
        elif not same_value(arguments[key], gold_arguments[key]):
            errors.append(WRONG_VALUE)
    if schema_clean and execute is not None:
        result = execute({"name": name, "arguments": arguments})
        if not result.ok and result.error.code not in _NOT_THE_MODELS_FAULT:
            errors.append(result.error.code)
        elif not result.ok:
            log.warning("not scoring the execution of %s: %s", name, result.error.message)
    return errors


def _penalised(errors: Sequence[str], cfg: TTPAConfig) -> float:
    return max(0.0, 1.0 - sum(cfg.penalty(code) for code in errors))


def score_call(call: Mapping, gold_call: Mapping, registry_specs: Mapping[str, Mapping] | Iterable[Mapping],
               penalties: Mapping[str, float] | TTPAConfig | None = None,
               execute: Executor | None = None) -> tuple[float, list[str]]:  # fmt: skip
    """(score, error codes) of one call: 1.0 minus each error's penalty, clamped at 0. See `call_errors`."""
    cfg = penalties if isinstance(penalties, TTPAConfig) else TTPAConfig(
        penalties={**DEFAULT_PENALTIES, **(penalties or {})})
    errors = call_errors(call, gold_call, registry_specs, execute)
    return _penalised(errors, cfg), errors


@dataclass
class CallsScore:
    score: float
    errors: list[str]
    per_call: list[float]


def score_calls(calls: Sequence[Mapping], problem: str | None, gold_calls: Sequence[Mapping],
                registry_specs: Mapping[str, Mapping] | Iterable[Mapping], cfg: TTPAConfig | None = None,
                execute: Executor | None = None) -> CallsScore:  # fmt: skip
    """A whole output: calls compared with the gold in order (chains are ordered: later calls use earlier results).

    Score = mean of the per-gold-call scores (a missing call scores 1 - penalty[missing_call]), minus the
    penalties of extra calls and of a malformed output, clamped at 0.
    """
    cfg = cfg or TTPAConfig()
    specs = _spec_index(registry_specs)
    per_call, errors = [], []
    for index, gold in enumerate(gold_calls):
        found = call_errors(calls[index], gold, specs, execute) if index < len(calls) else [MISSING_CALL]
        per_call.append(_penalised(found, cfg))
        errors.extend(found)
    whole = [EXTRA_CALL] * max(0, len(calls) - len(gold_calls)) + ([MALFORMED] if problem else [])
    errors.extend(whole)
    mean = sum(per_call) / len(per_call) if per_call else 1.0
    return CallsScore(max(0.0, mean - sum(cfg.penalty(code) for code in whole)), errors, per_call)


# ---------------------------------------------------------------------------------------------------- reversed construction

CALL_ERROR = "call_error"
UNUSABLE_RESULT = "unusable_result"
ANSWER_MISMATCH = "answer_mismatch"
EMPTY_QUERY = "empty_query"
QUERY_MISSING_ENTITY = "query_missing_entity"
QUERY_MISSING_VALUE = "query_missing_value"
ANSWER_IN_QUERY = "answer_in_query"
DUPLICATE = "duplicate"
DROP_REASONS = (CALL_ERROR, UNUSABLE_RESULT, ANSWER_MISMATCH, EMPTY_QUERY, QUERY_MISSING_ENTITY,
                QUERY_MISSING_VALUE, ANSWER_IN_QUERY, DUPLICATE)  # fmt: skip

CHAIN_KINDS = ("lookup", "bridge", "arithmetic", "convert", "date")
ATTRIBUTE_PHRASES = {
    "birthplace": "birthplace", "birth_year": "birth year", "employer": "employer", "founder": "founder",
    "headquarters": "headquarters city", "founded_year": "founding year", "country": "country",
    "population": "population", "elevation_m": "elevation in metres", "area_km2": "area in square kilometres",
}  # fmt: skip
UNIT_NAMES = {"ft": "feet", "km": "kilometres", "mi": "miles", "cm": "centimetres"}


@dataclass
class ReversedConfig:
    """Reversed construction over the synthetic world."""

    kinds: list[str] = field(default_factory=lambda: list(CHAIN_KINDS))
    """Chains to sample: `lookup` (1 call), `bridge` (a lookup feeding a lookup), `convert` and `date` (a lookup
    feeding convert_units / add_days), `arithmetic` (two lookups feeding calculate)."""
    spare_tools: int = 1
    """Unneeded tools offered with each task, so choosing the tool is part of it."""
    proposal_noise: float = 0.1
    """Chance that the call simulator proposes an attribute of another entity type (a proposing LLM's typical
    slip); the sandbox rejects such a call and the sample is dropped as `call_error`."""
    max_attempts_per_sample: int = 10
    seed: int = 0


@dataclass
class Scenario:
    """What the writer sees: the calls with their real results, the answer, and what the query must state."""

    kind: str
    calls: list[dict]
    results: list[str]
    answer: str
    literals: list[str] = field(default_factory=list)
    """Values the user must state besides entities (a number of days, a target unit)."""
    facts: dict = field(default_factory=dict)
    """Hints for template writers (attribute names, operation)."""

    def describe(self) -> str:
        """The scenario as text, for an LLM writer."""
        steps = [f"{i + 1}. {json.dumps(c, ensure_ascii=False)} -> {r}"
                 for i, (c, r) in enumerate(zip(self.calls, self.results, strict=True))]  # fmt: skip
        return "Tool calls and results:\n" + "\n".join(steps) + f"\nFinal answer: {self.answer}"


QueryWriter = Callable[[Scenario, random.Random], str]


def grounded_entities(calls: Sequence[Mapping], results: Sequence[str]) -> list[str]:
    """Entities the user must name: lookup subjects that no earlier call produced (found ones stay unsaid)."""
    names = []
    for index, call in enumerate(calls):
        entity = (call.get("arguments") or {}).get("entity")
        if call.get("name") == "lookup" and isinstance(entity, str) and entity not in results[:index]:
            names.append(entity)
    return list(dict.fromkeys(names))


def template_query_writer(scenario: Scenario, rng: random.Random) -> str:
    """The query from the scenario with templates: the stand-in for an LLM writer on a machine without one."""
    f = scenario.facts
    phrase = ATTRIBUTE_PHRASES.get(f.get("attribute", ""), str(f.get("attribute", "")).replace("_", " "))
    if scenario.kind == "lookup":
        options = [f"What is the {phrase} of {f['entity']}?", f"Tell me the {phrase} of {f['entity']}."]
    elif scenario.kind == "bridge":
        first, second = ATTRIBUTE_PHRASES[f["first"]], ATTRIBUTE_PHRASES[f["second"]]
        options = [f"What is the {second} of the {first} of {f['entity']}?",
                   f"Find the {first} of {f['entity']} and tell me its {second}."]  # fmt: skip
    elif scenario.kind == "arithmetic":
        a, b = f["first"], f["second"]
        if f["operation"] == "add":
            options = [f"What is the {phrase} of {a} plus the {phrase} of {b}?",
                       f"Add the {phrase} of {a} to the {phrase} of {b}."]  # fmt: skip
        elif f["first_is_larger"]:
            options = [f"How much greater is the {phrase} of {a} than the {phrase} of {b}?",
                       f"By how much does the {phrase} of {a} exceed the {phrase} of {b}?"]  # fmt: skip
        else:
            options = [f"How much smaller is the {phrase} of {a} than the {phrase} of {b}?",
                       f"By how much does the {phrase} of {a} fall short of the {phrase} of {b}?"]  # fmt: skip
    elif scenario.kind == "convert":
        options = [f"What is the elevation of {f['entity']} in {f['unit']}?",
                   f"How many {f['unit']} above sea level is {f['entity']}?"]  # fmt: skip
    elif scenario.kind == "date":
        options = [f"What date is {f['days']} days after January 1 of the {phrase} of {f['entity']}?",
                   f"Which date falls {f['days']} days after the first of January of the {phrase} of {f['entity']}?"]
    else:
        raise ValueError(f"no template for chain kind {scenario.kind!r}")
    return rng.choice(options)


WRITER_INSTRUCTION = ("Write the question a user asked, such that these tool calls answer it. Name every entity the "
                      "first calls use and every number the user must give; do not state the answer.\n")  # fmt: skip


def engine_query_writer(engine: Any, max_tokens: int = 64, instruction: str = WRITER_INSTRUCTION) -> QueryWriter:
    """A writer backed by an LLM engine (an `EnginePool`): what a real cluster uses with an instruction model.

    Greedy, one line. On this machine's tiny random policy it writes noise, which the consistency filter drops.
    """
    from actors.llm import Sampling

    sampling = Sampling(temperature=0, max_tokens=max_tokens, stop=("\n",))

    def write(scenario: Scenario, rng: random.Random) -> str:
        prompt = instruction + scenario.describe() + "\nQuestion:"
        return engine.generate([prompt], sampling)[0].completions[0].text.strip()

    return write


def check_consistency(scenario: Scenario, query: str, sandbox: Any) -> str | None:
    """Why a written sample is inconsistent, or None: re-executes the gold calls and checks the query's mentions."""
    if not query or not query.strip():
        return EMPTY_QUERY
    outputs = [sandbox.call(call) for call in scenario.calls]
    if any(not r.ok for r in outputs) or [r.output for r in outputs] != list(scenario.results) \
            or outputs[-1].output != scenario.answer:  # fmt: skip
        return ANSWER_MISMATCH
    lowered = query.lower()
    if any(name.lower() not in lowered for name in grounded_entities(scenario.calls, scenario.results)):
        return QUERY_MISSING_ENTITY
    if any(str(value).lower() not in lowered for value in scenario.literals):
        return QUERY_MISSING_VALUE
    if re.search(rf"(?<![\w.-]){re.escape(scenario.answer.lower())}(?![\w-]|\.\d)", lowered):
        return ANSWER_IN_QUERY
    return None


def _number(text: str) -> int | float | None:
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class _CallSimulator:
    """Proposes the calls of one chain and runs each through the sandbox as it goes (later calls use results)."""

    def __init__(self, world: Any, sandbox: Any, split: str, cfg: ReversedConfig, rng: random.Random):
        self.sandbox, self.cfg, self.rng = sandbox, cfg, rng
        self.by_id = {e["id"]: e for e in world.entities}
        self.by_name = {e["name"].lower(): e for e in world.entities}
        self.pool = [e for e in world.entities if e["split"] in (split, "shared")]
        lookup = next(s for s in world.tools() if s["name"] == "lookup")
        self.all_attributes = list(lookup["parameters"]["properties"]["attribute"]["enum"])

    def _numeric(self, entity: dict) -> list[str]:
        return [a for a, v in entity["attributes"].items() if isinstance(v, int) and not isinstance(v, bool)]

    def _linked(self, entity: dict) -> list[str]:
        return [a for a, v in entity["attributes"].items() if isinstance(v, str) and v in self.by_id]

    def _attribute(self, choices: list[str], entity: dict) -> str:
        foreign = [a for a in self.all_attributes if a not in entity["attributes"]]
        if foreign and self.rng.random() < self.cfg.proposal_noise:
            return self.rng.choice(foreign)
        return self.rng.choice(choices)

    def _entity(self, want: Callable[[dict], list[str]], types: tuple[str, ...] | None = None) -> dict:
        return self.rng.choice([e for e in self.pool if want(e) and (types is None or e["type"] in types)])

    def run(self, kind: str) -> tuple[Scenario | None, str | None]:
        calls, results = [], []

        def call(name: str, **arguments) -> str | None:
            calls.append({"name": name, "arguments": arguments})
            result = self.sandbox.call(calls[-1])
            results.append(result.output if result.ok else None)
            return result.output if result.ok else None

        rng = self.rng
        if kind == "lookup":
            entity = self._entity(lambda e: list(e["attributes"]))
            attribute = self._attribute(list(entity["attributes"]), entity)
            facts, literals = {"entity": entity["name"], "attribute": attribute}, []
            outputs = [call("lookup", entity=entity["name"], attribute=attribute)]
        elif kind == "bridge":
            entity = self._entity(self._linked)
            first = self._attribute(self._linked(entity), entity)
            found = call("lookup", entity=entity["name"], attribute=first)
            if found is None:
                return None, CALL_ERROR
            target = self.by_name.get(found.lower())
            if target is None:
                return None, UNUSABLE_RESULT
            second = self._attribute(list(target["attributes"]), target)
            facts, literals = {"entity": entity["name"], "first": first, "second": second}, []
            outputs = [found, call("lookup", entity=found, attribute=second)]
        elif kind == "arithmetic":
            a = self._entity(self._numeric)
            attribute = self._attribute(self._numeric(a), a)
            b = self.rng.choice([e for e in self.pool if e["type"] == a["type"] and e["id"] != a["id"]])
            outputs = [call("lookup", entity=a["name"], attribute=attribute),
                       call("lookup", entity=b["name"], attribute=attribute)]  # fmt: skip
            if None in outputs:
                return None, CALL_ERROR
            values = [_number(o) for o in outputs]
            if None in values:
                return None, UNUSABLE_RESULT
            operation = rng.choice(["add", "subtract"])
            x, y = (values[0], values[1]) if operation == "add" else (max(values), min(values))  # no negatives
            facts = {"operation": operation, "attribute": attribute, "first": a["name"], "second": b["name"],
                     "first_is_larger": values[0] >= values[1]}  # fmt: skip
            literals = []
            outputs.append(call("calculate", operation=operation, a=x, b=y))
        elif kind == "convert":
            entity = self._entity(lambda e: ["elevation_m"] if "elevation_m" in e["attributes"] else [])
            attribute = self._attribute(["elevation_m"], entity)
            metres = call("lookup", entity=entity["name"], attribute=attribute)
            if metres is None:
                return None, CALL_ERROR
            value = _number(metres)
            if value is None:
                return None, UNUSABLE_RESULT
            unit = rng.choice(sorted(UNIT_NAMES))
            facts, literals = {"entity": entity["name"], "unit": UNIT_NAMES[unit]}, [UNIT_NAMES[unit]]
            outputs = [metres, call("convert_units", value=value, from_unit="m", to_unit=unit)]
        elif kind == "date":
            entity = self._entity(lambda e: [a for a in ("birth_year", "founded_year") if a in e["attributes"]])
            attribute = self._attribute([a for a in ("birth_year", "founded_year") if a in entity["attributes"]], entity)
            year = call("lookup", entity=entity["name"], attribute=attribute)
            if year is None:
                return None, CALL_ERROR
            value = _number(year)
            if not isinstance(value, int) or not 1 <= value <= 9999:
                return None, UNUSABLE_RESULT
            days = rng.randint(10, 360)
            facts, literals = {"entity": entity["name"], "attribute": attribute, "days": days}, [str(days)]
            outputs = [year, call("add_days", date=f"{value:04d}-01-01", days=days)]
        else:
            raise ValueError(f"unknown chain kind {kind!r}; known: {CHAIN_KINDS}")
        if None in outputs or None in results:
            return None, CALL_ERROR
        return Scenario(kind, calls, results, results[-1], literals, facts), None


@dataclass
class ConstructionReport:
    attempted: int
    built: int
    dropped: dict[str, int]
    """reason -> count, every reason in DROP_REASONS listed (0 when it never happened)."""
    by_kind: dict[str, int]
    calls_per_sample: dict[int, int]

    def rows(self) -> list[dict]:
        rows = [{"figure": "attempted", "value": self.attempted}, {"figure": "built", "value": self.built}]
        rows += [{"figure": f"dropped: {reason}", "value": n} for reason, n in self.dropped.items()]
        rows += [{"figure": f"built: {kind}", "value": n} for kind, n in self.by_kind.items()]
        return rows


def build_reversed_tasks(world: Any, sandbox: Any, count: int, split: str = "train",
                         cfg: ReversedConfig | None = None, writer: QueryWriter = template_query_writer,
                         ) -> tuple[list[dict], ConstructionReport]:  # fmt: skip
    """Up to `count` tool tasks built in reverse: calls and real results first, the answer, the query last.

    `sandbox` is anything with `call({"name", "arguments"}) -> ToolResult` over the world's tools: a `SandboxPool`,
    a `ToolSandboxCore` or a `ToolRegistry`. Tasks have the shape of `world.tool_tasks` (gold_calls a list).
    """
    cfg = cfg or ReversedConfig()
    unknown = sorted(set(cfg.kinds) - set(CHAIN_KINDS))
    if unknown or not cfg.kinds:
        raise ValueError(f"reversed.kinds {cfg.kinds} must be a non-empty subset of {CHAIN_KINDS}")
    rng = random.Random(f"{cfg.seed}:reversed:{split}")
    simulator = _CallSimulator(world, sandbox, split, cfg, rng)
    names = [spec["name"] for spec in world.tools()]
    tasks, seen = [], set()
    dropped = Counter({reason: 0 for reason in DROP_REASONS})
    attempts = 0
    while len(tasks) < count and attempts < count * cfg.max_attempts_per_sample:
        attempts += 1
        scenario, reason = simulator.run(cfg.kinds[attempts % len(cfg.kinds)])
        query = writer(scenario, rng) if scenario is not None else ""
        reason = reason or check_consistency(scenario, query, sandbox)
        key = json.dumps(scenario.calls, sort_keys=True) if scenario is not None else None
        if reason is None and key in seen:
            reason = DUPLICATE
        if reason:
            dropped[reason] += 1
            continue
        seen.add(key)
        needed = list(dict.fromkeys(c["name"] for c in scenario.calls))
        spare = rng.sample([n for n in names if n not in needed], min(cfg.spare_tools, len(names) - len(needed)))
        tasks.append({"id": f"rev-{split}-{len(tasks):05d}", "split": split, "query": query.strip(),
                      "tools": [n for n in names if n in set(needed) | set(spare)], "gold_calls": scenario.calls,
                      "answer": scenario.answer, "kind": scenario.kind})  # fmt: skip
    report = ConstructionReport(attempts, len(tasks), dict(dropped), dict(Counter(t["kind"] for t in tasks)),
                                dict(sorted(Counter(len(t["gold_calls"]) for t in tasks).items())))
    return tasks, report


def tool_task_records(tasks: Iterable[Mapping]) -> list[dict]:
    """Tasks as `tool_task` records (gold calls as JSON text), for `records.write_records`."""
    return [{"id": t["id"], "split": t["split"], "query": t["query"], "tools": list(t["tools"]),
             "gold_calls": t["gold_calls"] if isinstance(t["gold_calls"], str) else json.dumps(t["gold_calls"]),
             "answer": t["answer"]} for t in tasks]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- turns


def _made_from(value: object, output: str) -> bool:
    """Whether an argument value is made from a call's output: the same text or number, or a text holding the
    number whole (a date built from a looked-up year)."""
    if isinstance(value, bool):
        return False
    number = _number(output)
    if isinstance(value, (int, float)):
        return number is not None and math.isclose(value, number, rel_tol=1e-9, abs_tol=1e-9)
    if not isinstance(value, str):
        return False
    if value.strip() == output.strip():
        return True
    return number is not None and re.search(rf"(?<![\d.]){re.escape(output.strip())}(?![\d.])", value) is not None


def split_turns(task: Mapping, execute: Executor) -> tuple[list[dict], str | None]:
    """(one task per turn, None) or ([], why not): a chain's calls grouped into the turns a model makes them in.

    A model cannot write a value it has not seen: the second lookup of a bridge names what the first one found, a
    calculation uses looked-up numbers. So a chain is cut where a call needs an earlier call's result: a call goes
    in the turn after the latest turn whose results it uses (independent calls share a turn, as parallel calls).
    Each turn becomes a task whose `history` holds the earlier turns' gold calls with their real results, executed
    here, and whose `gold_calls` are that turn's calls: every value in them is in the query or in the history.
    """
    gold = json.loads(task["gold_calls"]) if isinstance(task["gold_calls"], str) else list(task["gold_calls"])
    outputs = []
    for index, call in enumerate(gold):
        result = execute(call)
        if not result.ok:
            return [], f"gold call {index} ({call.get('name')}) fails: {result.error.code}: {result.error.message}"
        outputs.append(result.output)
    turn_of: list[int] = []
    for j, call in enumerate(gold):
        sources = [i for i in range(j) for value in (call.get("arguments") or {}).values() if _made_from(value, outputs[i])]
        turn_of.append(1 + max(turn_of[i] for i in sources) if sources else 0)
    turns = [[i for i in range(len(gold)) if turn_of[i] == k] for k in range(max(turn_of) + 1)]
    steps, history = [], []
    for k, members in enumerate(turns):
        steps.append({"id": f"{task['id']}/turn-{k}", "task_id": task["id"], "turn": k, "turns": len(turns),
                      "query": task["query"], "tools": list(task["tools"]), "gold_calls": [gold[i] for i in members],
                      "history": json.dumps(history), "kind": task.get("kind", "")})  # fmt: skip
        history = history + [{"calls": [gold[i] for i in members], "results": [outputs[i] for i in members]}]
    return steps, None


def turn_tasks(tasks: Iterable[Mapping], execute: Executor) -> tuple[list[dict], list[dict]]:
    """(every task's turns, [{"id", "reason"}] of tasks whose gold calls do not run)."""
    steps, dropped = [], []
    for task in tasks:
        turns, problem = split_turns(task, execute)
        steps.extend(turns)
        if problem:
            dropped.append({"id": task.get("id"), "reason": problem})
    return steps, dropped


# ---------------------------------------------------------------------------------------------------- token-level pairs


def _char_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """(token ids, start character of each token) of `text` without special tokens."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [start for start, _ in encoded["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError):  # a slow tokenizer: measure by decoding prefixes
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, [len(tokenizer.decode(ids[:t])) for t in range(len(ids))]


def branch_points(gold_ids: Sequence[int], alternatives: Sequence[Sequence[tuple[int, float]]],
                  regions: Sequence[int], cfg: TTPAConfig, banned: Iterable[int] = ()) -> list[tuple[int, int, float]]:  # fmt: skip
    """(position, alternative token, logprob gap to the best) to branch on, at most `max_branches_per_call` per
    region (call line), the smallest gaps first: where the policy is closest to leaving the gold path."""
    banned = set(banned)
    by_region: dict[int, list[tuple[float, int, int]]] = {}
    for position, (gold, options) in enumerate(zip(gold_ids, alternatives, strict=True)):
        best = options[0][1]
        for token, logprob in options[: cfg.top_k]:
            if token != gold and token not in banned and best - logprob <= cfg.max_logprob_gap:
                by_region.setdefault(regions[position], []).append((best - logprob, position, token))
    picked = [c for region in sorted(by_region) for c in sorted(by_region[region])[: cfg.max_branches_per_call]]
    return sorted((position, token, gap) for gap, position, token in picked)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TaskOutcome:
    """One task's pairs and what happened on the way (summed into the job's summary)."""

    task_id: str
    pairs: list[dict]
    branch_points: int = 0
    completions: int = 0
    kept_branches: int = 0
    kept_sampled: int = 0
    dropped_margin: int = 0
    dropped_no_divergence: int = 0
    margin_sum: float = 0.0
    rejected_errors: dict[str, int] = field(default_factory=dict)


def make_pairs(tasks: Sequence[Mapping], engine: Any, tokenizer: Any, specs: Mapping[str, Mapping] | Iterable[Mapping],
               cfg: TTPAConfig | None = None, execute: Executor | None = None) -> list[TaskOutcome]:  # fmt: skip
    """Token-level (and optionally sampled) preference pairs for checked tasks, with one engine call per stage.

    `engine` is an `EnginePool` (sync `top_alternatives` / `generate`). A task needs id, query, tools (offered names)
    and gold_calls (a list or its JSON text).
    """
    from actors.llm import Sampling

    cfg = cfg or TTPAConfig()
    specs = _spec_index(specs)
    banned = {t for t in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) if t is not None}
    prepared = []
    for task in tasks:
        gold = json.loads(task["gold_calls"]) if isinstance(task["gold_calls"], str) else list(task["gold_calls"])
        offered = {name: specs[name] for name in task["tools"]}
        prompt_ids = list(tokenizer(task_prompt(task, specs, cfg.tool_schemas))["input_ids"])
        text = render_calls(gold)
        gold_ids, starts = _char_starts(tokenizer, text)
        regions = [min(text.count("\n", 0, start), len(gold)) for start in starts]
        prepared.append((task, gold, offered, prompt_ids, gold_ids, regions))

    def judge(ids: Sequence[int], gold: list, offered: dict) -> CallsScore:
        calls, problem = parse_calls(tokenizer.decode(list(ids), skip_special_tokens=True))
        return score_calls(calls, problem, gold, offered, cfg, execute)

    alternatives = engine.top_alternatives([(p[3], p[4]) for p in prepared], cfg.top_k) if prepared else []
    outcomes, branches = [], []  # branches: (task index, position, token, prefix ids)
    for index, ((task, _, _, _, gold_ids, regions), options) in enumerate(zip(prepared, alternatives, strict=True)):
        points = branch_points(gold_ids, options, regions, cfg, banned)
        outcomes.append(TaskOutcome(task["id"], [], branch_points=len(points)))
        branches.extend((index, position, token, gold_ids[:position] + [token]) for position, token, _ in points)
    greedy = Sampling(temperature=0, max_tokens=cfg.max_new_tokens, stop=(END_TAG,))
    # A branch that already ends (EOS, or the end tag completed) needs no completion.
    todo = [k for k, (_, _, token, prefix) in enumerate(branches) if token != tokenizer.eos_token_id
            and END_TAG not in tokenizer.decode(prefix, skip_special_tokens=True)]  # fmt: skip
    prompts = [prepared[branches[k][0]][3] + branches[k][3] for k in todo]
    generated = engine.generate(prompts, greedy) if todo else []
    completion_of = {k: g.completions[0].token_ids for k, g in zip(todo, generated, strict=True)}
    chosen_scores = [judge(p[4], p[1], p[2]) for p in prepared]

    def scored(outcome: TaskOutcome, ids: Sequence[int], gold: list, offered: dict) -> CallsScore:
        result = judge(ids, gold, offered)
        outcome.completions += 1
        for code in result.errors:
            outcome.rejected_errors[code] = outcome.rejected_errors.get(code, 0) + 1
        return result

    def offer(outcome: TaskOutcome, pair_id: str, prompt_ids: list, chosen: list, rejected: list,
              prefix_length: int, chosen_score: float, rejected_score: CallsScore, sampled: bool) -> None:  # fmt: skip
        margin = chosen_score - rejected_score.score
        if margin <= cfg.margin:
            outcome.dropped_margin += 1
            return
        outcome.kept_sampled += sampled
        outcome.kept_branches += not sampled
        outcome.margin_sum += margin
        outcome.pairs.append({"id": pair_id, "example_id": outcome.task_id, "prompt_ids": prompt_ids,
                              "chosen_ids": list(chosen), "rejected_ids": list(rejected),
                              "prefix_length": prefix_length, "chosen_score": chosen_score,
                              "rejected_score": rejected_score.score})  # fmt: skip

    for k, (index, position, token, prefix) in enumerate(branches):
        task, gold, offered, prompt_ids, gold_ids, _ = prepared[index]
        rejected = prefix + list(completion_of.get(k, []))
        offer(outcomes[index], f"{task['id']}/branch-{position}-{token}", prompt_ids, gold_ids, rejected, position,
              chosen_scores[index].score, scored(outcomes[index], rejected, gold, offered), sampled=False)

    if cfg.sampled_completions > 0 and prepared:
        seed = cfg.seed + zlib.crc32(" ".join(p[0]["id"] for p in prepared).encode()) % 100_000
        sampling = Sampling(n=cfg.sampled_completions, temperature=cfg.sample_temperature,
                            max_tokens=cfg.max_new_tokens, stop=(END_TAG,), seed=seed)  # fmt: skip
        generations = engine.generate([p[3] for p in prepared], sampling)
        for index, generation in enumerate(generations):
            task, gold, offered, prompt_ids, _, _ = prepared[index]
            ranked = sorted(((scored(outcomes[index], c.token_ids, gold, offered), c.token_ids)
                             for c in generation.completions), key=lambda item: -item[0].score)  # fmt: skip
            (best, best_ids), (worst, worst_ids) = ranked[0], ranked[-1]
            shared = _common_prefix(best_ids, worst_ids)
            if best.score - worst.score > cfg.margin and shared >= min(len(best_ids), len(worst_ids)):
                outcomes[index].dropped_no_divergence += 1  # one is a prefix of the other: no token to prefer
                continue
            offer(outcomes[index], f"{task['id']}/sampled", prompt_ids, best_ids, worst_ids, shared, best.score,
                  worst, sampled=True)
    return outcomes


# ---------------------------------------------------------------------------------------------------- the job

OUTCOME = pa.schema([
    pa.field("task_id", pa.string(), nullable=False),
    pa.field("pairs", pa.list_(pa.struct(list(records.PREFERENCE_PAIR)))),
    *(pa.field(name, pa.int32()) for name in ("branch_points", "completions", "kept_branches", "kept_sampled",
                                              "dropped_margin", "dropped_no_divergence")),
    pa.field("margin_sum", pa.float64()),
    pa.field("rejected_errors", pa.string()),  # JSON {code: count}
])  # fmt: skip
_COUNTS = ("branch_points", "completions", "kept_branches", "kept_sampled", "dropped_margin", "dropped_no_divergence")


class _SandboxActors:
    """Tool calls on a SandboxPool's actors: a Ray Data worker gets the handles (the pool itself holds a lock)."""

    def __init__(self, actors: list, timeout_s: float):
        self.actors, self.timeout_s, self.turn = list(actors), timeout_s, 0

    def call(self, call: Mapping) -> ToolResult:
        import ray

        actor = self.actors[self.turn % len(self.actors)]
        self.turn += 1
        try:
            return ray.get(actor.call.remote(dict(call)), timeout=self.timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as error:  # GetTimeoutError is both
            return ToolResult.failure(SANDBOX_UNAVAILABLE, f"sandbox actor failed: {type(error).__name__}: "
                                      f"{str(error)[:300]}", call.get("name"))  # fmt: skip


class TTPASampler:
    """A Ray Data actor UDF: token-level pairs for a batch of tasks, over shared engine and sandbox actors."""

    def __init__(self, engines: list, sandbox: Any, specs: list[dict], model_path: str, cfg: dict):
        from transformers import AutoTokenizer

        from actors.llm import EnginePool

        self.cfg = TTPAConfig(**cfg)
        self.pool = EnginePool(engines, timeout_s=self.cfg.timeout_s)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.specs = _spec_index(specs)
        self.sandbox = None
        if self.cfg.execute_calls and isinstance(sandbox, ToolRegistry):
            from actors.sandbox import ToolSandboxCore

            self.sandbox = ToolSandboxCore(sandbox)
        elif self.cfg.execute_calls and sandbox:
            self.sandbox = _SandboxActors(sandbox, self.cfg.timeout_s)
        self._results: dict[str, ToolResult] = {}

    def execute(self, call: Mapping) -> ToolResult:
        """Tools are deterministic: each distinct call runs once per actor (gold calls recur in every branch)."""
        key = json.dumps(call, sort_keys=True, default=str)
        if key not in self._results:
            self._results[key] = self.sandbox.call(call)
        return self._results[key]

    def __call__(self, batch: pa.Table) -> pa.Table:
        outcomes = make_pairs(batch.to_pylist(), self.pool, self.tokenizer, self.specs, self.cfg,
                              self.execute if self.sandbox is not None else None)  # fmt: skip
        rows = [{**asdict(o), "rejected_errors": json.dumps(o.rejected_errors)} for o in outcomes]
        return pa.Table.from_pylist(rows, schema=OUTCOME)


def check_task(row: Mapping, specs: Mapping[str, Mapping]) -> tuple[dict | None, str | None]:
    """(the task as the sampler reads it, None) or (None, why it cannot be used)."""
    if not isinstance(row, Mapping):
        return None, f"a task must be a mapping, got {type(row).__name__}"
    if not row.get("id") or not isinstance(row.get("id"), str):
        return None, "field 'id' is missing or empty"
    if not isinstance(row.get("query"), str) or not row["query"].strip():
        return None, "field 'query' is missing or empty"
    gold = row.get("gold_calls")
    if isinstance(gold, str):
        try:
            gold = json.loads(gold)
        except json.JSONDecodeError as error:
            return None, f"field 'gold_calls' is not JSON ({error.msg})"
    if not isinstance(gold, list) or not gold or not all(isinstance(c, Mapping) for c in gold):
        return None, "field 'gold_calls' has no calls"
    tools = row.get("tools")
    if not isinstance(tools, (list, tuple)) or not tools:
        return None, "field 'tools' lists no offered tool"
    unknown = [name for name in tools if name not in specs]
    if unknown:
        return None, f"offered tool(s) {unknown} are not in the registry"
    for index, call in enumerate(gold):
        if call.get("name") not in tools:
            return None, f"gold call {index} uses {call.get('name')!r}, which the task does not offer"
        error = validate_call(specs[call["name"]], call)
        if error:
            return None, f"gold call {index} ({call['name']}) fails its schema: {error.code}: {error.message}"
    history = row.get("history") or []
    if isinstance(history, str):
        try:
            history = json.loads(history)
        except json.JSONDecodeError as error:
            return None, f"field 'history' is not JSON ({error.msg})"
    for number, turn in enumerate(history if isinstance(history, list) else [None]):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("calls"), list) or not isinstance(
                turn.get("results"), list) or len(turn["calls"]) != len(turn["results"]):  # fmt: skip
            return None, f"field 'history' turn {number} is not {{'calls': [...], 'results': [...]}} of equal length"
    return {"id": row["id"], "query": row["query"], "tools": list(tools), "gold_calls": json.dumps(gold),
            "history": json.dumps(history)}, None


@dataclass
class TTPASummary:
    tasks: int
    quarantined: int
    shards_written: int
    shards_reused: int
    branch_points: int
    completions_scored: int
    pairs: int
    pairs_from_branches: int
    pairs_from_samples: int
    dropped_by_margin: int
    dropped_no_divergence: int
    mean_margin: float
    rejected_errors: dict[str, int]
    """Error codes found in the scored completions (branched and sampled), kept or not."""
    seconds: float

    def rows(self) -> list[dict]:
        rows = [{"figure": k, "value": v} for k, v in asdict(self).items() if k != "rejected_errors"]
        return rows + [{"figure": f"rejected error: {code}", "value": n} for code, n in self.rejected_errors.items()]


def _stats_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.stats.json"


def _write_shard(folder: Path, index: int, outcomes: list[dict]) -> int:
    """Stats first, then the pairs: a shard is complete when its Parquet file exists, and then so do its stats."""
    pairs = sorted((p for o in outcomes for p in o["pairs"]), key=lambda p: p["id"])
    table = records.to_table(pairs, "preference_pair", source=f"shard {index}") if pairs else \
        records.PREFERENCE_PAIR.empty_table()  # fmt: skip
    errors: Counter = Counter()
    for outcome in outcomes:
        errors.update(json.loads(outcome["rejected_errors"]))
    stats = {"tasks": len(outcomes), **{k: int(sum(o[k] for o in outcomes)) for k in _COUNTS},
             "margin_sum": float(sum(o["margin_sum"] for o in outcomes)), "rejected_errors": dict(errors)}  # fmt: skip
    write_atomically(_stats_path(folder, index), lambda path: path.write_text(json.dumps(stats, indent=1)))
    write_atomically(shard_path(folder, index), lambda path: pq.write_table(table, path))
    return table.num_rows


def _sandbox_parts(sandbox: Any, timeout_s: float) -> tuple[list[dict], Any]:
    """(the registry's specs, what a sampler actor needs to call tools) for a registry, a sandbox or a pool."""
    import ray

    from actors.sandbox import SandboxPool, ToolSandboxCore

    if isinstance(sandbox, ToolRegistry):
        return sandbox.specs(), sandbox
    if isinstance(sandbox, ToolSandboxCore):
        return sandbox.specs(), sandbox.registry
    if isinstance(sandbox, SandboxPool):
        return ray.get(sandbox.actors[0].specs.remote(), timeout=timeout_s), list(sandbox.actors)
    raise TypeError(f"sandbox must be a ToolRegistry, ToolSandboxCore or SandboxPool, got {type(sandbox).__name__}")


def run_ttpa_generation(tasks: Sequence[Mapping], out_dir: str | os.PathLike, engines: list, sandbox: Any,
                        model_path: str | os.PathLike, cfg: TTPAConfig | None = None,
                        config: dict | None = None) -> TTPASummary:  # fmt: skip
    """Token-level preference pairs for every usable task, resumable by shard. Returns (and prints) the summary."""
    import ray
    import ray.data
    from transformers import AutoTokenizer

    from pipelines.report import markdown_table

    started = time.perf_counter()
    cfg = cfg or TTPAConfig()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    specs, sandbox_arg = _sandbox_parts(sandbox, cfg.timeout_s)
    index = _spec_index(specs)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    max_len = min(ray.get([e.info.remote() for e in engines], timeout=cfg.timeout_s),
                  key=lambda info: info["max_model_len"])["max_model_len"]  # fmt: skip
    good, quarantined, seen = [], [], set()
    for row_number, row in enumerate(tasks):
        task, problem = check_task(row, index)
        if task is not None and task["id"] in seen:
            task, problem = None, f"duplicate id {task['id']!r}"
        if task is not None:
            length = len(tokenizer(task_prompt(task, index, cfg.tool_schemas))["input_ids"]) + len(
                tokenizer(render_calls(json.loads(task["gold_calls"])), add_special_tokens=False)["input_ids"])
            if length + cfg.max_new_tokens > max_len:
                task, problem = None, (f"prompt + gold calls = {length} tokens, + max_new_tokens={cfg.max_new_tokens}"
                                       f" exceed the engine's max_model_len={max_len}")  # fmt: skip
        if problem:
            quarantined.append({"row": row_number, "id": row.get("id") if isinstance(row, Mapping) else None,
                                "reason": problem})  # fmt: skip
            continue
        seen.add(task["id"])
        good.append(task)
    write_quarantine(folder, quarantined, "task")
    shards, pending = plan_shards(good, cfg.shard_size, folder)
    shard_of = {task["id"]: i for i in pending for task in shards[i]}
    print(f"[TTPA] {len(good)} tasks ({len(quarantined)} quarantined): {len(pending)} of {len(shards)} shards to do",
          flush=True)
    if pending:
        todo = [task for i in pending for task in shards[i]]
        dataset = ray.data.from_items(todo).map_batches(
            TTPASampler,
            fn_constructor_args=(list(engines), sandbox_arg, specs, str(model_path), asdict(cfg)),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=0.1,  # the sampler mostly waits on engine and sandbox actors
        )
        buffered: dict[int, dict[str, dict]] = {i: {} for i in pending}  # by task id: a retried batch counts once
        done = 0
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for outcome in batch.to_pylist():
                shard = shard_of[outcome["task_id"]]
                if shard not in buffered:
                    continue  # a late duplicate of a task whose shard is already written
                buffered[shard][outcome["task_id"]] = outcome
                if len(buffered[shard]) == len(shards[shard]):
                    pairs = _write_shard(folder, shard, list(buffered.pop(shard).values()))
                    done += 1
                    print(f"[TTPA] shard {shard} written: {len(shards[shard])} tasks, {pairs} pairs "
                          f"({done}/{len(pending)} shards)", flush=True)  # fmt: skip
        if buffered:
            raise RuntimeError(f"TTPA shards {sorted(buffered)} in {folder} did not receive all their tasks")

    totals: Counter = Counter()
    errors: Counter = Counter()
    margin_sum = 0.0
    for i in range(len(shards)):
        stats = json.loads(_stats_path(folder, i).read_text())
        totals.update({k: stats[k] for k in ("tasks", *_COUNTS)})
        margin_sum += stats["margin_sum"]
        errors.update(stats["rejected_errors"])
    total = sum(pq.read_metadata(shard_path(folder, i)).num_rows for i in range(len(shards)))
    if totals["tasks"] != len(good) or total != totals["kept_branches"] + totals["kept_sampled"]:
        raise RuntimeError(f"TTPA output in {folder} covers {totals['tasks']} of {len(good)} tasks with {total} "
                           f"pairs, its stats say {totals['kept_branches'] + totals['kept_sampled']}")  # fmt: skip
    summary = TTPASummary(
        tasks=len(good),
        quarantined=len(quarantined),
        shards_written=len(pending),
        shards_reused=len(shards) - len(pending),
        branch_points=totals["branch_points"],
        completions_scored=totals["completions"],
        pairs=total,
        pairs_from_branches=totals["kept_branches"],
        pairs_from_samples=totals["kept_sampled"],
        dropped_by_margin=totals["dropped_margin"],
        dropped_no_divergence=totals["dropped_no_divergence"],
        mean_margin=margin_sum / total if total else 0.0,
        rejected_errors=dict(errors.most_common()),
        seconds=time.perf_counter() - started,
    )
    records.write_manifest(folder, "preference_pair", total, config or {"ttpa": asdict(cfg)},
                           tasks=len(good), quarantined=len(quarantined),
                           summary={k: v for k, v in asdict(summary).items() if k != "seconds"})  # fmt: skip
    print(markdown_table(summary.rows()), flush=True)
    return summary
