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
