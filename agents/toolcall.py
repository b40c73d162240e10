"""Function calling: the one text format in which our policies see tools and write calls.

Why one format: the tool agents (ConAgents, ATC, 360°REA), the Ray Serve chat endpoint and the BFCL-style checker all
turn model text into calls, so they must read it the same way. Plain standard library (with `actors/tools.py` and
`agents/trajectory.py`, which are plain standard library too), so any of them can import it.

The layout a model sees and writes:

    <|system|>
    Tools (call them with <calls>, one JSON object per line, then </calls>):
    {"name":"lookup","description":"...","parameters":{"type":"object","properties":{...},"required":[...]}}
    <|user|>
    How many years after the birth of its founder was Nili Motors founded?
    <|assistant|>
    <calls>                                                       <- model
    {"name":"lookup","arguments":{"entity":"Nili Motors","attribute":"founder"}}
    {"name":"lookup","arguments":{"entity":"Nili Motors","attribute":"founded_year"}}
    </calls>
    <|tool|>
    <results>                                                     <- environment
    {"id":"call_0","name":"lookup","output":"Mira Tovenka"}
    {"id":"call_1","name":"lookup","output":"1931"}
    </results>

One call per line covers every BFCL shape: a single call, parallel calls (one function, several lines), multiple
(one function chosen among several offered) and parallel-multiple. The call block is the one TTPA's preference data
trains (`pipelines/ttpa.py`: `<calls>`, a compact JSON call per line, `</calls>`), so a TTPA-trained policy is read
by this parser unchanged.

A model's output is never trusted: `parse_calls` returns the calls it could read *and* a typed `ToolError` per
problem, with the codes of `actors/tools.py` (`syntax_error` for text that is not a call, `wrong_type` for arguments
that are not an object, `unknown_tool` for a name that was not offered), so an agent can show the model the same
kind of message the sandbox gives for a bad call. Nothing here raises on model text; malformed *caller* input
(messages, specs) raises ValueError naming the message and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.tools import SYNTAX_ERROR, UNKNOWN_TOOL, WRONG_TYPE, ToolError, ToolResult, normalize_spec
from agents.trajectory import Step, Trajectory

CALLS_OPEN, CALLS_CLOSE = "<calls>", "</calls>"
RESULTS_OPEN, RESULTS_CLOSE = "<results>", "</results>"
TOOLS_HEADER = f"Tools (call them with {CALLS_OPEN}, one JSON object per line, then {CALLS_CLOSE}):"
ROLES = ("system", "user", "assistant", "tool")


# ---------------------------------------------------------------------------------------------------- tools


def openai_tool(spec: Mapping) -> dict:
    """A spec in any accepted form (OpenAI, BFCL, plain) as an OpenAI `tools` entry."""
    plain = normalize_spec(spec)
    return {"type": "function", "function": plain}


def render_tool(spec: Mapping, descriptions: bool = True) -> str:
    """One compact JSON line: name, description and the parameters' JSON schema.

    `descriptions=False` drops every description (the tool's and its parameters'): a small model's context then
    holds the schema alone.
    """
    plain = normalize_spec(spec)
    if not descriptions:
        plain = {"name": plain["name"], "parameters": _without_descriptions(plain["parameters"])}
    return json.dumps(plain, separators=(",", ":"), ensure_ascii=False)


def _without_descriptions(schema: object) -> object:
    if isinstance(schema, Mapping):
        return {k: _without_descriptions(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_without_descriptions(item) for item in schema]
    return schema


def render_tools(specs: Iterable[Mapping], descriptions: bool = True) -> str:
    """The tools section of a prompt: how to call, then one line per tool."""
    return "\n".join([TOOLS_HEADER, *(render_tool(spec, descriptions) for spec in specs)])


# ---------------------------------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class ToolCall:
    """A call read from model text; `id` pairs it with its result message (OpenAI `tool_call_id`)."""

    name: str
    arguments: dict
    id: str

    def as_call(self) -> dict:
        """The `{"name", "arguments"}` form the registry and the sandbox take."""
        return {"name": self.name, "arguments": dict(self.arguments)}

    def to_openai(self) -> dict:
        """An entry of an OpenAI assistant message's `tool_calls` (arguments as a JSON string, as OpenAI sends)."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}

    @classmethod
    def from_openai(cls, entry: Mapping, where: str = "tool_call") -> ToolCall:
        """From an OpenAI `tool_calls` entry (arguments as a JSON string or an object); caller input, so it raises."""
        function = entry.get("function") if isinstance(entry, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}.function.name: expected a string")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}.function.arguments: not valid JSON ({error.msg})") from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"{where}.function.arguments: expected an object, got {type(arguments).__name__}")
        call_id = entry.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"{where}.id: expected a non-empty string")
        return cls(function["name"], dict(arguments), call_id)


@dataclass
class ParsedCalls:
    """What `parse_calls` read: the text before the call block, the calls, and a typed error per problem."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolError] = field(default_factory=list)
    block: bool = False
    """The output opened a call block (a turn without one is a plain message)."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def assistant_message(self) -> dict:
        """The OpenAI assistant message: content (None when empty) and, if any, `tool_calls`."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.calls:
            message["tool_calls"] = [call.to_openai() for call in self.calls]
        return message


def render_calls(calls: Sequence[Mapping]) -> str:
    """The call block a model writes for `calls` ({"name", "arguments"} or ToolCall): demonstrations, doubles."""
    lines = []
    for call in calls:
        name, arguments = (call.name, call.arguments) if isinstance(call, ToolCall) else (call["name"],
                                                                                          call.get("arguments"))
        lines.append(json.dumps({"name": name, "arguments": dict(arguments or {})}, separators=(",", ":"),
                                ensure_ascii=False))  # fmt: skip
    return CALLS_OPEN + "\n" + "".join(line + "\n" for line in lines) + CALLS_CLOSE


def parse_calls(text: str, tools: Iterable[Mapping | str] | None = None, first_id: int = 0) -> ParsedCalls:
    """Read a model turn: free text, then optionally one call block. Never raises.

    `tools` (specs or names) are the offered tools: a call to any other name is an `unknown_tool` error. Call ids
    are `call_<n>` from `first_id`, so ids stay unique over a conversation. A line that is not a call is reported
    and skipped; the calls on the other lines are still returned (the agent decides whether to run a turn that has
    errors: ours do not).
    """
    offered = None if tools is None else {n for n in map(_tool_name, tools) if n}
    start = text.find(CALLS_OPEN)
    if start < 0:
        stray = text.find(CALLS_CLOSE)
        if stray >= 0:
            return ParsedCalls(text[:stray].strip(), errors=[ToolError(SYNTAX_ERROR, f"{CALLS_CLOSE} without "
                                                                       f"{CALLS_OPEN}")], block=True)  # fmt: skip
        return ParsedCalls(text.strip())
    parsed = ParsedCalls(text[:start].strip(), block=True)
    body, closed, after = text[start + len(CALLS_OPEN) :].partition(CALLS_CLOSE)
    body = body[1:] if body.startswith("\n") else body  # lines are numbered from the first line inside the block
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        call = _read_line(line, number, offered, first_id + len(parsed.calls))
        if isinstance(call, ToolError):
            parsed.errors.append(call)
        else:
            parsed.calls.append(call)
    if not closed:
        parsed.errors.append(ToolError(SYNTAX_ERROR, f"no {CALLS_CLOSE}: the call block was cut off"))
    elif after.strip():
        parsed.errors.append(ToolError(SYNTAX_ERROR, f"text after {CALLS_CLOSE}: {after.strip()[:80]!r}"))
    if closed and not parsed.calls and not parsed.errors:
        parsed.errors.append(ToolError(SYNTAX_ERROR, "an empty call block"))
    return parsed


def _tool_name(tool: Mapping | str) -> str | None:
    if isinstance(tool, str):
        return tool
    function = tool.get("function")
    return function.get("name") if isinstance(function, Mapping) else tool.get("name")


def _read_line(line: str, number: int, offered: set | None, index: int) -> ToolCall | ToolError:
    where = f"call line {number}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return ToolError(SYNTAX_ERROR, f"{where} is not JSON ({error.msg} at column {error.colno}): {line.strip()[:80]!r}")
    if not isinstance(value, dict):
        return ToolError(SYNTAX_ERROR, f"{where} is not an object with 'name' and 'arguments'")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return ToolError(SYNTAX_ERROR, f"{where} has no string 'name'")
    unknown = sorted(set(value) - {"name", "arguments"})
    if unknown:
        return ToolError(SYNTAX_ERROR, f"{where} has unknown key(s) {unknown}; a call is {{'name', 'arguments'}}", name)
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's habit: arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return ToolError(WRONG_TYPE, f"{where}: arguments are not valid JSON ({error.msg})", name)
    if not isinstance(arguments, dict):
        return ToolError(WRONG_TYPE, f"{where}: arguments must be an object, got {type(arguments).__name__}", name)
    if offered is not None and name not in offered:
        return ToolError(UNKNOWN_TOOL, f"{where}: unknown tool {name!r}; offered: {sorted(offered)}", name)
    return ToolCall(name, arguments, f"call_{index}")


# ---------------------------------------------------------------------------------------------------- results


def result_line(call: ToolCall | Mapping, result: ToolResult) -> dict:
    """One result as the model sees it: the output, or the typed error (code, message, argument)."""
    call_id, name = (call.id, call.name) if isinstance(call, ToolCall) else (call.get("id"), call.get("name"))
    line: dict[str, Any] = {"id": call_id, "name": name}
    if result.ok:
        line["output"] = result.output
    else:
        line["error"] = error_fields(result.error)
    return line


def error_fields(error: ToolError) -> dict:
    """What a model is shown of a typed error: code, message and, when known, the argument."""
    return {k: v for k, v in (("code", error.code), ("message", error.message), ("argument", error.argument))
            if v is not None}  # fmt: skip


def render_results(pairs: Iterable[tuple[ToolCall | Mapping, ToolResult]]) -> str:
    """The results block the environment inserts after a call block, one JSON line per call, in call order."""
    lines = [json.dumps(result_line(call, result), separators=(",", ":"), ensure_ascii=False) for call, result in pairs]
    return RESULTS_OPEN + "\n" + "".join(line + "\n" for line in lines) + RESULTS_CLOSE


def render_errors(errors: Iterable[ToolError]) -> str:
    """A results block for text that never became calls (parse failures): one error line per problem."""
    lines = [json.dumps({"error": error_fields(e)}, separators=(",", ":"), ensure_ascii=False) for e in errors]
    return RESULTS_OPEN + "\n" + "".join(line + "\n" for line in lines) + RESULTS_CLOSE


def tool_message(call: ToolCall, result: ToolResult) -> dict:
    """The OpenAI `tool` message answering `call`."""
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result.observation()}


# ---------------------------------------------------------------------------------------------------- messages


def flatten_messages(messages: Sequence[Mapping], tools: Iterable[Mapping] | None = None,
                     descriptions: bool = True) -> list[dict]:  # fmt: skip
    """OpenAI chat messages (with `tools`, `tool_calls` and `tool` results) as plain {role, content} messages.

    Tools go into the system message (one is added when there is none), an assistant's tool calls become its call
    block, and consecutive tool messages become one results block: any chat template that renders plain content
    (ours, or a model's own) then shows exactly this module's format. Raises ValueError naming the message and field.
    """
    flat: list[dict] = []
    calls_by_id: dict[str, ToolCall] = {}
    tools = list(tools or [])
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: {role!r} is not one of {ROLES}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"{where}.content: expected a string or null, got {type(content).__name__}")
        content = content or ""
        if role == "assistant" and message.get("tool_calls"):
            entries = message["tool_calls"]
            if not isinstance(entries, list):
                raise ValueError(f"{where}.tool_calls: expected a list")
            calls = [ToolCall.from_openai(e, f"{where}.tool_calls[{i}]") for i, e in enumerate(entries)]
            calls_by_id.update((call.id, call) for call in calls)
            content = (content + "\n" if content else "") + render_calls(calls)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls_by_id:
                raise ValueError(f"{where}.tool_call_id: {call_id!r} answers no earlier assistant tool call")
            call = calls_by_id[call_id]
            line = json.dumps({"id": call_id, "name": call.name, "output": content}, separators=(",", ":"),
                              ensure_ascii=False)  # fmt: skip
            if flat and flat[-1]["role"] == "tool":
                flat[-1]["content"] = flat[-1]["content"][: -len(RESULTS_CLOSE)] + line + "\n" + RESULTS_CLOSE
                continue
            content = RESULTS_OPEN + "\n" + line + "\n" + RESULTS_CLOSE
        elif role != "assistant" and not content:
            raise ValueError(f"{where}.content: a {role} message needs content")
        flat.append({"role": role, "content": content})
    if tools:
        section = render_tools(tools, descriptions)
        if flat and flat[0]["role"] == "system":
            flat[0]["content"] = flat[0]["content"].rstrip("\n") + "\n" + section
        else:
            flat.insert(0, {"role": "system", "content": section})
    return flat


def render_chat(messages: Sequence[Mapping], tools: Iterable[Mapping] | None = None, tokenizer: Any = None,
                add_generation_prompt: bool = True, descriptions: bool = True) -> str:  # fmt: skip
    """The prompt text of a conversation: the tokenizer's own chat template when it has one, else our layout
    (`<|role|>` then the content on its own lines: the tiny policy's template without its end-of-turn token)."""
    flat = flatten_messages(messages, tools, descriptions)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in flat)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------------- responses

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def response_schema(output: str) -> dict:
    """The type schema of a tool's text output: its JSON value's schema when it parses as JSON, else a string.

    What an agent shows a model instead of a large response (ConAgents' observing agent) and what probing records
    as a tool's documented return type (ATC). Numbers written as text ("1931") are numbers; a YYYY-MM-DD string is
    `format: date`.
    """
    try:
        value = json.loads(output)
    except (json.JSONDecodeError, TypeError):
        value = output
    return value_schema(value)


def value_schema(value: object) -> dict:
    """JSON schema of a JSON value: arrays carry the merged schema of their items, objects their properties."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string", "format": "date"} if _DATE.match(value) else {"type": "string"}
    if value is None:
        return {"type": "null"}
    if isinstance(value, list):
        schema: dict[str, Any] = {"type": "array"}
        items = [value_schema(item) for item in value]
        if items:
            merged = items[0]
            for item in items[1:]:
                merged = merge_schemas(merged, item)
            schema["items"] = merged
        return schema
    if isinstance(value, Mapping):
        return {"type": "object", "properties": {str(k): value_schema(v) for k, v in value.items()}}
    return {}


def merge_schemas(a: Mapping, b: Mapping) -> dict:
    """The narrowest schema both satisfy: integer and number make number; object properties merge (a property
    missing from one side stays, as optional); unlike types give a list of types."""
    if a == b:
        return dict(a)
    kinds = {a.get("type"), b.get("type")}
    if kinds == {"integer", "number"}:
        return {"type": "number"}
    if kinds == {"string"}:
        return {"type": "string"}  # a format both do not share is no format
    if kinds == {"object"}:
        properties = dict(a.get("properties") or {})
        for key, sub in (b.get("properties") or {}).items():
            properties[key] = merge_schemas(properties[key], sub) if key in properties else sub
        return {"type": "object", "properties": properties}
    if kinds == {"array"}:
        if "items" in a and "items" in b:
            return {"type": "array", "items": merge_schemas(a["items"], b["items"])}
        return {"type": "array", **({"items": a.get("items") or b.get("items")} if (a.get("items") or b.get("items"))
                                    else {})}  # fmt: skip
    flat: list = []
    for schema in (a, b):
        kind = schema.get("type")
        for k in kind if isinstance(kind, list) else [kind]:
            if k is not None and k not in flat:
                flat.append(k)
    return {"type": flat}


# ---------------------------------------------------------------------------------------------------- tool agents
#
# The plumbing the tool agents (ConAgents, ATC, 360°REA) share. Each agent writes one run as a plain generator that
# yields what it needs next — a model turn, tool calls, a program — and receives the answer; `run_lockstep` advances
# every run of a batch together and sends each kind of request in one call per round (one engine call per engine
# and stop set, one sandbox call for all tool calls), so a batch of tasks costs (turns) engine calls, not
# (tasks x turns), as in ExSearch. Still standard library only: engines and sandboxes are whatever object has
# `generate` / `call_many` / `run_program`.


@dataclass
class ModelTurn:
    """Ask `engine` to continue `trajectory`; the answer is a `Completion`, or None when the context is full."""

    trajectory: Trajectory
    engine: Any
    stop: tuple[str, ...]
    max_tokens: int


@dataclass
class CallTools:
    """Run `calls` ({"name", "arguments"}) through the sandbox; the answer is a list of `ToolResult`."""

    calls: list[dict]


@dataclass
class RunProgram:
    """Run `code` in the sandbox with `tools` granted; the answer is a `ProgramResult`."""

    code: str
    tools: list[str] = field(default_factory=list)


@dataclass
class Decoding:
    """How model turns are sampled, shared by every agent config."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_context_tokens: int = 2048
    greedy: bool = False
    seed: int | None = None

    def sampling(self, stop: tuple[str, ...], max_tokens: int, round_index: int):
        from actors.llm import Sampling

        return Sampling(n=1, temperature=0.0 if self.greedy else self.temperature,
                        top_p=1.0 if self.greedy else self.top_p, max_tokens=max_tokens, stop=stop,
                        seed=None if self.seed is None else self.seed + round_index)  # fmt: skip


@dataclass
class ToolAgentConfig:
    """What every tool agent's config shares (each agent's config extends it): prompt detail, turn lengths, context
    and sampling."""

    descriptions: bool = True
    """Show tool and parameter descriptions (off: schemas only, for small contexts)."""
    max_tokens_per_turn: int = 96
    max_program_tokens: int = 256
    """Turns that write a program get this many tokens."""
    max_context_tokens: int = 4096
    """A turn that would not fit ends its run with `length`."""
    temperature: float = 0.8
    top_p: float = 0.95

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("max_tokens_per_turn", "max_program_tokens", "max_context_tokens"))

    def decoding(self, greedy: bool = False, seed: int | None = None) -> Decoding:
        return Decoding(self.temperature, self.top_p, self.max_context_tokens, greedy, seed)


def require_at_least(cfg: Any, minimum: int, names: Sequence[str]) -> None:
    """Config bounds shared by the tool agents' configs: each named field >= `minimum`, else a ValueError naming it."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"agent.{name} must be >= {minimum}, got {getattr(cfg, name)}")


def run_lockstep(runs: Sequence[Any], sandbox: Any, decoding: Decoding) -> int:
    """Drive generator `runs` to their end; returns the number of rounds. A run may yield one request or a list
    of them (answered with a list, in order)."""
    active: dict[int, tuple[Any, list, bool]] = {}
    for index, run in enumerate(runs):
        _advance(active, index, run, None, start=True)
    rounds = 0
    while active:
        pending = [(key, request) for index, (_, requests, _) in active.items()
                   for key, request in (((index, j), r) for j, r in enumerate(requests))]  # fmt: skip
        answers: dict[tuple[int, int], Any] = {}
        groups: dict[tuple, list] = {}
        for key, request in pending:
            if isinstance(request, ModelTurn):
                context = len(request.trajectory.context()) + request.max_tokens
                if context > decoding.max_context_tokens:
                    answers[key] = None
                else:
                    groups.setdefault((id(request.engine), request.stop, request.max_tokens), []).append((key, request))
            elif not isinstance(request, (CallTools, RunProgram)):
                raise TypeError(f"a tool-agent run yielded {type(request).__name__}; expected ModelTurn, CallTools "
                                "or RunProgram")  # fmt: skip
        for members in groups.values():
            first = members[0][1]
            sampling = decoding.sampling(first.stop, first.max_tokens, rounds)
            generations = first.engine.generate([r.trajectory.context() for _, r in members], sampling)
            for (key, _), generation in zip(members, generations, strict=True):
                answers[key] = generation.completions[0]
        tool_requests = [(key, r) for key, r in pending if isinstance(r, CallTools)]
        flat = [call for _, r in tool_requests for call in r.calls]
        results = iter(sandbox.call_many(flat) if flat else [])
        for key, request in tool_requests:
            answers[key] = [next(results) for _ in request.calls]
        programs = [(key, r) for key, r in pending if isinstance(r, RunProgram)]
        for key, request in programs:
            answers[key] = sandbox.run_program(request.code, request.tools)
        rounds += 1
        for index, (run, requests, single) in list(active.items()):
            out = [answers[(index, j)] for j in range(len(requests))]
            _advance(active, index, run, out[0] if single else out)
    return rounds


def _advance(active: dict, index: int, run: Any, answer: Any, start: bool = False) -> None:
    try:
        request = next(run) if start else run.send(answer)
    except StopIteration:
        active.pop(index, None)
        return
    single = not isinstance(request, list)
    active[index] = (run, [request] if single else list(request), single)


@dataclass
class ToolRun:
    """One tool-agent run of one task: a token-level Trajectory per role (each role's own context, where the other
    roles' messages and the tools' answers are observations), the calls that ran, every typed error met, the answer.

    Trajectory ids are `<task id>/<role>`, so the records of every role of every run stay distinct rows of the
    `trajectory` schema.
    """

    task_id: str
    trajectories: dict[str, Trajectory] = field(default_factory=dict)
    calls: list[dict] = field(default_factory=list)
    """Calls that succeeded, in the order they ran."""
    errors: list[ToolError] = field(default_factory=list)
    """Every typed error: parse failures of model text, tool errors, program errors."""
    answer: str | None = None
    finish_reason: str = "running"

    @property
    def done(self) -> bool:
        return self.finish_reason != "running"

    def trajectory(self, role: str, prompt_ids: Sequence[int], sample_index: int = 0) -> Trajectory:
        t = Trajectory(f"{self.task_id}/{role}", list(prompt_ids), sample_index=sample_index)
        self.trajectories[role] = t
        return t

    def finish(self, reason: str, answer: str | None = None) -> None:
        """End the run: every role's trajectory ends with the same reason (valid only when the run answered)."""
        self.finish_reason, self.answer = reason, answer if answer is not None else self.answer
        for t in self.trajectories.values():
            t.finish(reason, answer)

    def records(self) -> list[dict]:
        return [t.to_record() for t in self.trajectories.values()]


def add_turn(t: Trajectory, completion: Any, role: str, text: str | None = None) -> Step:
    """Append a model turn (trained on) as one step of `role`."""
    start, end = t.add_generated(completion.token_ids, completion.logprobs)
    step = Step(role, start, end, completion.text if text is None else text)
    t.steps.append(step)
    return step


def add_observation(t: Trajectory, tokenizer: Any, role: str, text: str, record: str | None = None) -> Step:
    """Append environment text (masked out of training), tokenized once here; `record` is the step's text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return t.add_observation(role, ids, text if record is None else record)


def error_record(error: ToolError) -> str:
    """A typed error as a step's text: the JSON of its code, message, tool and argument."""
    return json.dumps(error.to_dict(), ensure_ascii=False)
