"""The tool registry: JSON-schema tools, validated calls, typed errors, and loaders for public tool datasets.

Why one registry for every tool source: agents, the TTPA error-oriented scorer and the sandbox must agree on what a
*bad call* is. So a call is checked against its schema before anything runs, and every failure becomes a
`ToolError` with a machine-readable `code` from `ERROR_CODES` (the taxonomy the scorer counts) and a human message
(what the agent sees as the observation).

Three kinds of tool live here, behind one `ToolRegistry.call`:

- implemented: a Python function (e.g. the synthetic world's `tool_functions()`), run in the calling process;
- simulated: answers replayed from a dataset's recorded responses (API-Bank), keyed by canonicalised arguments;
  an argument combination that was never recorded is a typed error, never an invented answer;
- schema-only: a spec without implementation (Seal-Tools, BFCL, ToolAlpaca); calls are validated, not executed.

Specs are the OpenAI / BFCL function format: {"name", "description", "parameters": <JSON schema of an object>}.
Dataset dialects ("dict", "float", "str", Java's "HashMap", OpenAPI operations) are normalised to plain JSON schema
on load, and `validate_call` also accepts those aliases so a checker can use raw BFCL specs.

`validate_call` is a plain function on purpose: a BFCL-style checker reuses it without a registry.
"""

from __future__ import annotations

import ast
import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------- error codes

UNKNOWN_TOOL = "unknown_tool"
MISSING_ARGUMENT = "missing_argument"
UNEXPECTED_ARGUMENT = "unexpected_argument"
WRONG_TYPE = "wrong_type"
INVALID_VALUE = "invalid_value"
EXECUTION_ERROR = "execution_error"
TIMEOUT = "timeout"
OUTPUT_TOO_LARGE = "output_too_large"
NO_RECORDED_RESPONSE = "no_recorded_response"
"""Simulated tool: these arguments were never recorded, so there is no true answer to replay."""
NOT_EXECUTABLE = "not_executable"
"""A schema-only tool: the call may be valid, but nothing can run it."""
# Programs (actors/sandbox.py):
SYNTAX_ERROR = "syntax_error"
MEMORY_LIMIT = "memory_limit"
FORBIDDEN = "forbidden"
"""The program tried something the sandbox does not allow (file outside its directory, network, subprocess, a tool
it was not granted); the action did not happen."""
CRASHED = "crashed"
"""The interpreter died (a signal, e.g. SIGSEGV from ctypes) without reporting."""
SANDBOX_UNAVAILABLE = "sandbox_unavailable"
"""Infrastructure: no sandbox actor could serve the request (it died and could not be restarted in time)."""

CALL_ERROR_CODES = (UNKNOWN_TOOL, MISSING_ARGUMENT, UNEXPECTED_ARGUMENT, WRONG_TYPE, INVALID_VALUE, EXECUTION_ERROR,
                    TIMEOUT, OUTPUT_TOO_LARGE, NO_RECORDED_RESPONSE, NOT_EXECUTABLE)  # fmt: skip
PROGRAM_ERROR_CODES = (SYNTAX_ERROR, MEMORY_LIMIT, FORBIDDEN, CRASHED, SANDBOX_UNAVAILABLE)
ERROR_CODES = CALL_ERROR_CODES + PROGRAM_ERROR_CODES
SCHEMA_ERROR_CODES = (UNKNOWN_TOOL, MISSING_ARGUMENT, UNEXPECTED_ARGUMENT, WRONG_TYPE, INVALID_VALUE)
"""Errors found before running anything: the call itself is wrong (what the TTPA scorer blames on the model)."""


@dataclass(frozen=True)
class ToolError:
    code: str
    """One of ERROR_CODES."""
    message: str
    """For the agent: what was wrong and, where it helps, what was expected."""
    tool: str | None = None
    argument: str | None = None
    """Path of the offending argument: `entity`, `options.limit`, `points[2]`."""

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "tool": self.tool, "argument": self.argument}

    @classmethod
    def from_dict(cls, data: Mapping) -> ToolError:
        return cls(str(data["code"]), str(data["message"]), data.get("tool"), data.get("argument"))


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    output: str | None = None
    error: ToolError | None = None

    @classmethod
    def failure(cls, code: str, message: str, tool: str | None = None, argument: str | None = None) -> ToolResult:
        return cls(False, None, ToolError(code, message, tool, argument))

    def observation(self) -> str:
        """The text an agent sees: the output, or `error (code): message`."""
        return self.output if self.ok else f"error ({self.error.code}): {self.error.message}"


# ---------------------------------------------------------------------------------------------------- specs

# Dataset type names -> JSON-schema types; None = any value. Lower-cased keys (Java's "String", "HashMap").
_TYPE_ALIASES: dict[str, str | None] = {
    "string": "string", "str": "string", "char": "string", "text": "string",
    "integer": "integer", "int": "integer", "long": "integer", "short": "integer", "byte": "integer",
    "number": "number", "float": "number", "double": "number",
    "boolean": "boolean", "bool": "boolean",
    "array": "array", "list": "array", "tuple": "array", "arraylist": "array", "set": "array",
    "object": "object", "dict": "object", "hashmap": "object", "map": "object",
    "null": "null", "none": "null", "any": None, "": None,
}  # fmt: skip
_GENERIC = re.compile(r"^\s*(list|array|arraylist|set|tuple)\s*[\[(<]\s*(\w+)\s*[\])>]\s*$", re.I)  # list(str)


def json_type(name: object) -> tuple[str | None, str | None]:
    """(JSON-schema type, item type) of a dataset type name; (None, None) when it constrains nothing we know."""
    if not isinstance(name, str):
        return None, None
    generic = _GENERIC.match(name)
    if generic:
        return "array", _TYPE_ALIASES.get(generic.group(2).lower())
    return _TYPE_ALIASES.get(name.strip().lower()), None


def normalize_schema(schema: object) -> dict:
    """A dataset's parameter schema as plain JSON schema (recursive); unknown type names become untyped."""
    if not isinstance(schema, Mapping):
        return {}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties",) and isinstance(value, Mapping):
            out[key] = {str(name): normalize_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = normalize_schema(value)
        elif key != "type":
            out[key] = value
    raw_type = schema.get("type")
    if isinstance(raw_type, list):
        kinds = [json_type(t)[0] for t in raw_type]
        if all(kinds):
            out["type"] = kinds
    elif raw_type is not None:
        kind, item = json_type(raw_type)
        if kind:
            out["type"] = kind
        if item and "items" not in out:
            out["items"] = {"type": item}
    return out


def normalize_spec(spec: Mapping) -> dict:
    """{"name", "description", "parameters"} with an object schema, from the OpenAI / BFCL / plain forms."""
    if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
        spec = spec["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool spec without a name: {str(dict(spec))[:200]}")
    parameters = normalize_schema(spec.get("parameters") or {"type": "object", "properties": {}})
    parameters["type"] = "object"
    parameters.setdefault("properties", {})
    required = parameters.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise ValueError(f"tool {name!r}: 'required' must be a list of names, got {required!r}")
    return {"name": name, "description": str(spec.get("description") or ""), "parameters": parameters}


# ---------------------------------------------------------------------------------------------------- validation

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _type_ok(kind: str, value: object) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":  # bool is an int subclass in Python, never an integer in a schema
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, (list, tuple))
    if kind == "object":
        return isinstance(value, Mapping)
    if kind == "null":
        return value is None
    return True


def _same(a: object, b: object) -> bool:
    """Equality that does not let True match 1 (enum checks)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _format_ok(fmt: str, value: str) -> bool:
    try:
        if fmt == "date":
            return bool(_DATE.match(value)) and _dt.date.fromisoformat(value) is not None
        if fmt == "date-time":
            _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return "T" in value or " " in value
        if fmt == "time":
            _dt.time.fromisoformat(value)
            return True
    except ValueError:
        return False
    return True  # formats we do not know constrain nothing


def _where(path: str) -> str:
    return f"argument {path!r}" if path else "the arguments"


def _check_value(tool: str, schema: Mapping, value: object, path: str) -> ToolError | None:
    """The first way `value` breaks `schema` (normalised JSON schema), as a typed error naming `path`."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        kinds = [k if k in ("string", "integer", "number", "boolean", "array", "object", "null") else
                 json_type(k)[0] for k in kinds]  # fmt: skip
        if None not in kinds and not any(_type_ok(k, value) for k in kinds):
            expected = " or ".join(kinds)
            return ToolError(WRONG_TYPE, f"{_where(path)} must be of type {expected}, got "
                             f"{type(value).__name__} {str(value)[:80]!r}", tool, path)  # fmt: skip
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        # An enum of scalars on an array (a common spec idiom) constrains each item.
        members = value if isinstance(value, (list, tuple)) and not any(isinstance(e, list) for e in enum) else [value]
        for member in members:
            if not any(_same(member, allowed) for allowed in enum):
                return ToolError(INVALID_VALUE, f"{_where(path)} must be one of {enum}, got {member!r}", tool, path)
    if "const" in schema and not _same(value, schema["const"]):
        return ToolError(INVALID_VALUE, f"{_where(path)} must be {schema['const']!r}, got {value!r}", tool, path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _check_number(tool, schema, value, path)
    if isinstance(value, str):
        return _check_string(tool, schema, value, path)
    if isinstance(value, (list, tuple)):
        return _check_array(tool, schema, value, path)
    if isinstance(value, Mapping):
        return _check_object(tool, schema, value, path)
    return None


def _check_number(tool: str, schema: Mapping, value: float, path: str) -> ToolError | None:
    if isinstance(value, float) and not math.isfinite(value):
        return ToolError(INVALID_VALUE, f"{_where(path)} must be a finite number, got {value!r}", tool, path)
    bounds = (("minimum", lambda v, b: v >= b, ">="), ("maximum", lambda v, b: v <= b, "<="),
              ("exclusiveMinimum", lambda v, b: v > b, ">"), ("exclusiveMaximum", lambda v, b: v < b, "<"))  # fmt: skip
    for key, holds, sign in bounds:
        bound = schema.get(key)
        if isinstance(bound, (int, float)) and not isinstance(bound, bool) and not holds(value, bound):
            return ToolError(INVALID_VALUE, f"{_where(path)} must be {sign} {bound}, got {value!r}", tool, path)
    return None


def _check_string(tool: str, schema: Mapping, value: str, path: str) -> ToolError | None:
    if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
        return ToolError(INVALID_VALUE, f"{_where(path)} must have at least {schema['minLength']} characters",
                         tool, path)  # fmt: skip
    if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
        return ToolError(INVALID_VALUE, f"{_where(path)} must have at most {schema['maxLength']} characters",
                         tool, path)  # fmt: skip
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            matched = re.search(pattern, value) is not None
        except re.error:
            matched = True  # a broken pattern in a dataset constrains nothing
        if not matched:
            return ToolError(INVALID_VALUE, f"{_where(path)} must match {pattern!r}, got {value!r}", tool, path)
    fmt = schema.get("format")
    if isinstance(fmt, str) and not _format_ok(fmt, value):
        example = {"date": " (YYYY-MM-DD)", "date-time": " (YYYY-MM-DDTHH:MM:SS)", "time": " (HH:MM:SS)"}.get(fmt, "")
        return ToolError(INVALID_VALUE, f"{_where(path)} must be a {fmt}{example}, got {value!r}", tool, path)
    return None


def _check_array(tool: str, schema: Mapping, value: Sequence, path: str) -> ToolError | None:
    if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
        return ToolError(INVALID_VALUE, f"{_where(path)} must have at least {schema['minItems']} items", tool, path)
    if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
        return ToolError(INVALID_VALUE, f"{_where(path)} must have at most {schema['maxItems']} items", tool, path)
    items = schema.get("items")
    if isinstance(items, Mapping):
        for index, item in enumerate(value):
            error = _check_value(tool, items, item, f"{path}[{index}]")
            if error:
                return error
    return None


def _check_object(tool: str, schema: Mapping, value: Mapping, path: str) -> ToolError | None:
    """Unexpected keys first (a misspelt name explains the 'missing' one), then missing, then each value.

    Undeclared keys are unexpected unless `additionalProperties` allows them; a nested object that declares no
    properties at all ("dict", "HashMap") is free-form.
    """
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties", bool(path) and not properties)
    prefix = f"{path}." if path else ""
    if extra is False:
        unexpected = [key for key in value if key not in properties]
        if unexpected:
            where = prefix + str(unexpected[0])
            return ToolError(UNEXPECTED_ARGUMENT, f"unexpected argument {where!r}; expected "
                             f"{sorted(properties) or 'no arguments'}", tool, where)  # fmt: skip
    for key in schema.get("required") or []:
        if key not in value:
            return ToolError(MISSING_ARGUMENT, f"missing required argument {prefix + key!r}", tool, prefix + key)
    for key, item in value.items():
        sub = properties.get(key)
        if sub is None and isinstance(extra, Mapping):
            sub = extra
        if isinstance(sub, Mapping):
            error = _check_value(tool, sub, item, prefix + str(key))
            if error:
                return error
    return None


def parse_arguments(tool: str, arguments: object) -> tuple[dict | None, ToolError | None]:
    """Arguments as a dict: OpenAI gives a JSON string, BFCL and our agents a dict."""
    if arguments is None:
        return {}, None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return None, ToolError(WRONG_TYPE, f"arguments are not valid JSON ({error.msg} at column {error.colno})",
                                   tool)  # fmt: skip
    if not isinstance(arguments, Mapping):
        return None, ToolError(WRONG_TYPE, f"arguments must be an object, got {type(arguments).__name__}", tool)
    return dict(arguments), None


def validate_call(spec: Mapping, call: Mapping) -> ToolError | None:
    """None if `call` ({"name", "arguments"}) is a valid call of `spec`, else the first error found.

    Checks, in order: the name, that arguments are an object, unexpected then missing arguments, then each value's
    type, enum, range, length, pattern and format (recursively into arrays and objects). Types are strict: `true`
    is not an integer, `"5"` is not a number, `5.0` is not an integer; an integer is a number.
    """
    spec = spec if _is_normalized(spec) else normalize_spec(spec)
    return _validate_normalized(spec, call)


def _is_normalized(spec: Mapping) -> bool:
    return isinstance(spec.get("parameters"), dict) and spec.get("_normalized") is True


def _validate_normalized(spec: Mapping, call: Mapping) -> ToolError | None:
    if not isinstance(call, Mapping):
        return ToolError(WRONG_TYPE, f"a call must be an object with 'name' and 'arguments', got {type(call).__name__}")
    name = call.get("name")
    if name != spec["name"]:
        return ToolError(UNKNOWN_TOOL, f"unknown tool {name!r}; this spec is {spec['name']!r}", _as_name(name))
    arguments, error = parse_arguments(spec["name"], call.get("arguments"))
    if error:
        return error
    return _check_object(spec["name"], spec["parameters"], arguments, "")


def _as_name(name: object) -> str | None:
    return name if isinstance(name, str) else None


# ---------------------------------------------------------------------------------------------------- registry


def canonical_arguments(arguments: Mapping) -> str:
    """One string per argument combination: sorted keys, integral floats as ints, compact JSON.

    Recorded responses are keyed by this, so `{"b": 1.0, "a": "x"}` finds the recording of `{"a": "x", "b": 1}`.
    """

    def plain(value: object) -> object:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(dict(arguments)), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


@dataclass
class Tool:
    """A spec plus how to answer it: a function, recorded responses, or neither (schema-only)."""

    spec: dict
    function: Callable[..., Any] | None = None
    responses: dict[str, str] | None = None
    """canonical_arguments(...) -> recorded output, for simulated tools."""

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def kind(self) -> str:
        return "implemented" if self.function else "simulated" if self.responses is not None else "schema_only"


def _render(output: object) -> str:
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    return json.dumps(output, ensure_ascii=False, default=str)


class ToolRegistry:
    """Named tools; `call` validates, runs (or replays) and always returns a ToolResult, never raises for a bad call.

    Tool functions run in the caller's process: use the sandbox actor (actors/sandbox.py) for timeouts and for
    programs. Functions take the call's arguments as keywords and return a string (anything else is JSON-encoded).
    """

    def __init__(self, tools: Iterable[Tool] = (), max_output_chars: int = 65536):
        self.max_output_chars = max_output_chars
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool.spec, tool.function, tool.responses)

    @classmethod
    def from_functions(cls, specs: Iterable[Mapping], functions: Mapping[str, Callable[..., Any]],
                       **kwargs) -> ToolRegistry:  # fmt: skip
        """Specs with their implementations (e.g. `world.tools()`, `world.tool_functions()`); every spec needs one."""
        specs = list(specs)
        missing = [s.get("name") for s in specs if s.get("name") not in functions]
        if missing:
            raise ValueError(f"no implementation for tool(s) {missing}")
        registry = cls(**kwargs)
        for spec in specs:
            registry.add(spec, functions[spec["name"]])
        return registry

    def add(self, spec: Mapping, function: Callable[..., Any] | None = None,
            responses: Mapping[str, str] | None = None) -> Tool:  # fmt: skip
        spec = dict(spec) if _is_normalized(spec) else {**normalize_spec(spec), "_normalized": True}
        name = spec["name"]
        if name in self._tools and _public(self._tools[name].spec) != _public(spec):
            raise ValueError(f"tool {name!r} is already registered with a different spec")
        tool = Tool(spec, function, dict(responses) if responses is not None else None)
        self._tools[name] = tool
        return tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def tool(self, name: str) -> Tool:
        if name not in self._tools:
            raise KeyError(f"unknown tool {name!r}; known: {sorted(self._tools)[:20]}")
        return self._tools[name]

    def specs(self, names: Iterable[str] | None = None) -> list[dict]:
        """Public specs (what an agent is shown), in registration order or in the order of `names`."""
        chosen = self._tools.values() if names is None else [self.tool(n) for n in names]
        return [_public(t.spec) for t in chosen]

    def subset(self, names: Iterable[str]) -> ToolRegistry:
        registry = ToolRegistry(max_output_chars=self.max_output_chars)
        for name in names:
            tool = self.tool(name)
            registry.add(tool.spec, tool.function, tool.responses)
        return registry

    def validate(self, call: Mapping) -> ToolError | None:
        name = call.get("name") if isinstance(call, Mapping) else None
        if not isinstance(call, Mapping) or name not in self._tools:
            known = ", ".join(sorted(self._tools)[:20])
            return ToolError(UNKNOWN_TOOL, f"unknown tool {name!r}; available: {known}", _as_name(name))
        return _validate_normalized(self._tools[name].spec, call)

    def call(self, call: Mapping) -> ToolResult:
        error = self.validate(call)
        if error:
            return ToolResult(False, None, error)
        tool = self._tools[call["name"]]
        arguments, _ = parse_arguments(tool.name, call.get("arguments"))
        if tool.function is not None:
            try:
                output = _render(tool.function(**arguments))
            except Exception as failure:  # noqa: BLE001  (a tool's failure is an observation, not a crash)
                return ToolResult.failure(EXECUTION_ERROR, f"{type(failure).__name__}: {failure}", tool.name)
        elif tool.responses is not None:
            output = self._replay(tool, arguments)
            if output is None:
                return ToolResult.failure(NO_RECORDED_RESPONSE, f"{tool.name}: no recorded response for arguments "
                                          f"{canonical_arguments(arguments)[:200]}", tool.name)  # fmt: skip
        else:
            return ToolResult.failure(NOT_EXECUTABLE, f"{tool.name} has a schema but no implementation or "
                                      "recorded responses", tool.name)  # fmt: skip
        if len(output) > self.max_output_chars:
            return ToolResult.failure(OUTPUT_TOO_LARGE, f"{tool.name} returned {len(output)} characters; the limit "
                                      f"is {self.max_output_chars}", tool.name)  # fmt: skip
        return ToolResult(True, output)

    @staticmethod
    def _replay(tool: Tool, arguments: dict) -> str | None:
        """The recording for these arguments; also tried without arguments that equal their schema default."""
        found = tool.responses.get(canonical_arguments(arguments))
        if found is None:
            properties = tool.spec["parameters"].get("properties", {})
            trimmed = {k: v for k, v in arguments.items()
                       if not ("default" in properties.get(k, {}) and _same(properties[k]["default"], v))}  # fmt: skip
            if trimmed != arguments:
                found = tool.responses.get(canonical_arguments(trimmed))
        return found


def _public(spec: Mapping) -> dict:
    return {k: v for k, v in spec.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------- datasets


class ToolDataError(ValueError):
    """A dataset file that does not have the shape a loader expects; the message names the file and row."""


@dataclass
class ToolExample:
    """One gold example: the request, the tools offered with it, and the gold calls (concrete arguments)."""

    id: str
    query: str
    tools: list[dict]
    calls: list[dict]
    allowed: list[dict] | None = None
    """BFCL only: the gold as the dataset gives it (every acceptable value per argument; "" = may be omitted)."""


@dataclass
class ToolDataset:
    name: str
    specs: list[dict]
    """Every distinct spec. BFCL repeats a name with different schemas across questions: use an example's tools."""
    examples: list[ToolExample]
    responses: dict[str, dict[str, str]] = field(default_factory=dict)
    """tool name -> canonical arguments -> recorded output (simulated mode)."""

    def registry(self, example: ToolExample | None = None, max_output_chars: int = 65536) -> ToolRegistry:
        """The tools of one example (or of the whole dataset), simulated where responses were recorded."""
        registry = ToolRegistry(max_output_chars=max_output_chars)
        for spec in example.tools if example is not None else self.specs:
            registry.add(spec, responses=self.responses.get(spec["name"]))
        return registry


def _read_json_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, object) from a JSON array or JSON lines (several of these files are JSON lines named .json)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (see the shared data README for its source)")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = [(f"{path} item {i}", row) for i, row in enumerate(json.loads(text))]
        else:
            rows = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as error:
        raise ToolDataError(f"{path}: bad JSON ({error.msg}, line {error.lineno})") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise ToolDataError(f"{where}: expected an object, got {type(row).__name__}")
    return rows


def _field(row: Mapping, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in row:
        raise ToolDataError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise ToolDataError(f"{where}: field {key!r} is {type(row[key]).__name__}, expected {kind}")
    return row[key]


def _flat_spec(name: str, description: str, parameters: Mapping, required: Iterable[str]) -> dict:
    """A spec from the flat {param: {"type", "description", ...}} form Seal-Tools and API-Bank use."""
    properties = {}
    for param, info in parameters.items():
        info = info if isinstance(info, Mapping) else {}
        kind, item = json_type(info.get("type"))
        prop: dict[str, Any] = {"description": str(info.get("description") or "")}
        if kind:
            prop["type"] = kind
        if item:
            prop["items"] = {"type": item}
        for key in ("enum", "default"):
            if key in info:
                prop[key] = info[key]
        properties[str(param)] = prop
    schema = {"type": "object", "properties": properties, "required": [r for r in required if r in properties],
              "additionalProperties": False}  # fmt: skip
    return normalize_spec({"name": name, "description": description, "parameters": schema})


def load_seal_tools(root: Path, splits: Sequence[str] = ("test_in_domain", "test_out_domain")) -> ToolDataset:
    """Seal-Tools: 4,076 tools (tool.jsonl) and gold calls of the chosen splits (dev, test_in/out_domain).

    Gold calls keep the dataset's values as they are: about 3% pass numbers as strings ("age": "63") against an
    integer schema, and validation reports them as wrong_type. Nested calls pass an earlier result by its name
    ("API_call_0") as a string value.
    """
    folder = Path(root) / "seal_tools"
    specs: dict[str, dict] = {}
    for where, row in _read_json_rows(folder / "tool.jsonl"):
        name = _field(row, "api_name", where)
        if name in specs:
            raise ToolDataError(f"{where}: tool {name!r} appears twice")
        specs[name] = _flat_spec(name, row.get("api_description", ""), row.get("parameters") or {},
                                 row.get("required") or [])  # fmt: skip
    examples = []
    for split in splits:
        for where, row in _read_json_rows(folder / f"{split}.jsonl"):
            calls = []
            for index, call in enumerate(_field(row, "calling", where, list)):
                name = _field(call, "api", f"{where} calling[{index}]")
                if name not in specs:
                    raise ToolDataError(f"{where} calling[{index}]: tool {name!r} is not in tool.jsonl")
                calls.append({"name": name, "arguments": dict(call.get("parameters") or {})})
            offered = [specs[n] for n in dict.fromkeys(c["name"] for c in calls)]
            examples.append(ToolExample(str(_field(row, "id", where)), _field(row, "query", where), offered, calls))
    return ToolDataset("seal_tools", list(specs.values()), examples)


_API_BANK_OPTIONAL = re.compile(r"optional|only needed|default is", re.I)


def parse_api_bank_call(text: str, spec: Mapping | None = None) -> dict:
    """`Name(key='value', n=3)` -> {"name", "arguments"}.

    A Python call is what API-Bank writes, so `ast` reads it; some recorded values hold unescaped quotes
    (`health_data='[{'name': ...}]'`), and those are split at the spec's own parameter names instead.
    """
    text = text.strip()
    try:
        node = ast.parse(text, mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("not a call with keyword arguments")
        return {"name": node.func.id, "arguments": {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}}
    except (SyntaxError, ValueError):
        pass
    match = re.match(r"^(\w+)\((.*)\)$", text, re.S)
    if not match or spec is None:
        raise ValueError(f"cannot parse API-Bank call {text[:120]!r}")
    names = list(spec["parameters"].get("properties", {}))
    body, arguments = match.group(2), {}
    starts = sorted((m.start(), m.end(), m.group(1)) for m in
                    re.finditer(r"(?:^|,\s*)(" + "|".join(map(re.escape, names)) + r")=", body))  # fmt: skip
    for index, (_, value_start, key) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(body)
        raw = body[value_start:end].strip()
        try:
            arguments[key] = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            arguments[key] = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    return {"name": match.group(1), "arguments": arguments}


def _split_request(line: str) -> tuple[str, str | None] | None:
    """`API-Request: [Call(...)]->response` -> (call text, response); the response may itself hold brackets."""
    line = line.strip()
    if not line.startswith("API-Request:"):
        return None
    rest = line[len("API-Request:"):].strip()
    if not rest.startswith("[") or "]" not in rest:
        return None
    head, arrow, response = rest.partition("]->")
    if arrow:
        return head[1:], response.strip()
    return rest[1 : rest.rfind("]")], None


def _api_bank_specs(instruction: str, where: str) -> list[dict]:
    """The specs listed after "API descriptions:" (one JSON object per line)."""
    _, _, listing = instruction.partition("API descriptions:")
    specs = []
    for line in listing.strip().splitlines():
        try:
            described = json.loads(line)
        except json.JSONDecodeError:
            raise ToolDataError(f"{where}: API description is not JSON: {line[:120]!r}") from None
        inputs = described.get("input_parameters") or {}
        # API-Bank has no "required" list; parameters are required unless their description says otherwise.
        required = [k for k, v in inputs.items() if not _API_BANK_OPTIONAL.search(str(v.get("description", "")))]
        specs.append(_flat_spec(_field(described, "name", where), described.get("description", ""), inputs, required))
    return specs


def load_api_bank(root: Path, levels: Sequence[int] = (1, 2)) -> ToolDataset:
    """API-Bank level-1/2: specs from the prompts, gold calls from `*-api.json`, recorded responses (simulated
    mode) from the `API-Request: [...]->response` turns of `*-response.json`.

    The same call can be recorded with different responses (time-dependent APIs); the first recording wins.
    """
    folder = Path(root) / "api_bank"
    specs: dict[str, dict] = {}
    examples, responses = [], {}
    for level in levels:
        for kind in ("api", "response"):
            for where, row in _read_json_rows(folder / f"level-{level}-{kind}.json"):
                offered = _api_bank_specs(_field(row, "instruction", where), where)
                for spec in offered:
                    specs.setdefault(spec["name"], spec)
                for line in _field(row, "input", where).splitlines():
                    request = _split_request(line)
                    if request and request[1] is not None:
                        _record(responses, request[0], request[1], specs, where)
                if kind == "api":
                    request = _split_request(_field(row, "expected_output", where))
                    if not request:
                        raise ToolDataError(f"{where}: expected_output holds no API-Request")
                    try:
                        call = parse_api_bank_call(request[0], specs.get(request[0].split("(", 1)[0].strip()))
                    except ValueError as error:
                        raise ToolDataError(f"{where}: {error}") from None
                    examples.append(ToolExample(f"level-{level}-{row.get('id')}", row["input"], offered, [call]))
    for example in examples:  # level 2 finds its API through ToolSearcher: offer the called API's spec too
        offered = {spec["name"] for spec in example.tools}
        example.tools += [specs[c["name"]] for c in example.calls if c["name"] in specs and c["name"] not in offered]
    return ToolDataset("api_bank", list(specs.values()), examples, responses)


def _record(responses: dict, call_text: str, output: str, specs: Mapping[str, dict], where: str) -> None:
    name = call_text.split("(", 1)[0].strip()
    try:
        call = parse_api_bank_call(call_text, specs.get(name))
    except ValueError as error:
        raise ToolDataError(f"{where}: {error}") from None
    responses.setdefault(call["name"], {}).setdefault(canonical_arguments(call["arguments"]), output)


def _resolve_refs(schema: object, document: Mapping, depth: int = 0) -> object:
    """OpenAPI `$ref` pointers replaced by what they point at (depth-capped: schemas can be recursive)."""
    if isinstance(schema, list):
        return [_resolve_refs(item, document, depth) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    if "$ref" in schema and isinstance(schema["$ref"], str) and schema["$ref"].startswith("#/"):
        if depth > 8:
            return {}
        target: Any = document
        for part in schema["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return _resolve_refs(target, document, depth + 1)
    return {key: _resolve_refs(value, document, depth) for key, value in schema.items()}


def _openapi_spec(name: str, operation: Mapping, document: Mapping) -> dict:
    """One OpenAPI operation as a function spec: path/query parameters and JSON-body properties, flattened (the
    way ToolAlpaca's own function descriptions and gold calls present them)."""
    properties, required = {}, []
    for parameter in operation.get("parameters") or []:
        parameter = _resolve_refs(parameter, document)
        if not isinstance(parameter, Mapping) or "name" not in parameter:
            continue
        prop = dict(parameter.get("schema") or {})
        if parameter.get("description"):
            prop.setdefault("description", parameter["description"])
        properties[parameter["name"]] = prop
        if parameter.get("required"):
            required.append(parameter["name"])
    body = (operation.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
    body = _resolve_refs(body, document) if body else None
    if isinstance(body, Mapping):
        properties.update(body.get("properties") or {})
        required += [r for r in body.get("required") or [] if r not in required]
    description = operation.get("summary") or operation.get("description") or ""
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return normalize_spec({"name": name, "description": description, "parameters": _resolve_refs(schema, document)})


def load_toolalpaca(root: Path, files: Sequence[str] = ("eval_real.json", "eval_simulated.json")) -> ToolDataset:
    """ToolAlpaca eval toolsets: one spec per OpenAPI operation (Function_Projection), gold calls from
    Golden_Answers (Action + Action_Input JSON). Action_Input that is not JSON stays a string (-> wrong_type)."""
    folder = Path(root) / "toolalpaca"
    specs: dict[str, dict] = {}
    examples = []
    for file in files:
        for where, row in _read_json_rows(folder / file):
            try:
                document = json.loads(_field(row, "Documentation", where))
            except json.JSONDecodeError:
                raise ToolDataError(f"{where}: Documentation is not JSON") from None
            offered = []
            for name, (path, method) in _field(row, "Function_Projection", where, dict).items():
                operation = document.get("paths", {}).get(path, {}).get(method)
                if not isinstance(operation, Mapping):
                    raise ToolDataError(f"{where}: {name} -> {method.upper()} {path} is not in the OpenAPI paths")
                spec = _openapi_spec(name, operation, document)
                if name in specs and specs[name] != spec:
                    raise ToolDataError(f"{where}: function {name!r} is defined twice with different schemas")
                specs[name] = spec
                offered.append(spec)
            instructions = _field(row, "Instructions", where, list)
            answers = _field(row, "Golden_Answers", where, list)
            for index, (query, gold) in enumerate(zip(instructions, answers, strict=False)):
                calls = []
                for step in gold:
                    arguments = step.get("Action_Input", "{}")
                    try:
                        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                    except json.JSONDecodeError:
                        pass
                    calls.append({"name": step.get("Action"), "arguments": arguments})
                examples.append(ToolExample(f"{row.get('Name')}-{index}", query, offered, calls))
    return ToolDataset("toolalpaca", list(specs.values()), examples)


BFCL_CATEGORIES = ("multiple", "parallel", "parallel_multiple", "live_multiple", "live_parallel",
                   "live_parallel_multiple", "simple_java", "simple_javascript")  # fmt: skip


def bfcl_concrete(allowed: Mapping) -> dict:
    """Concrete arguments from BFCL's possible answers {arg: [acceptable values]}: the first acceptable value of
    each argument; "" (and None) mean "may be omitted", so an argument with nothing else is left out. Values that are
    dicts are themselves {key: [acceptable values]}, also inside lists."""
    out = {}
    for key, options in allowed.items():
        chosen = [o for o in options if o != "" and o is not None] if isinstance(options, list) else [options]
        if chosen:
            out[key] = _bfcl_value(chosen[0])
    return out


def _bfcl_value(option: object) -> object:
    if isinstance(option, Mapping):
        return bfcl_concrete(option)
    if isinstance(option, list):
        return [_bfcl_value(item) for item in option]
    return option


def load_bfcl(root: Path, categories: Sequence[str] = BFCL_CATEGORIES) -> ToolDataset:
    """BFCL v4 questions with possible answers: the specs offered with each question (BFCL's "dict"/"float"/Java
    types normalised) and one concrete gold call per ground-truth entry (`allowed` keeps every acceptable value)."""
    import hashlib

    folder = Path(root) / "bfcl"
    distinct: dict[str, dict] = {}
    examples = []
    for category in categories:
        answers = {_field(row, "id", where): row for where, row in
                   _read_json_rows(folder / "possible_answer" / f"BFCL_v4_{category}.json")}  # fmt: skip
        for where, row in _read_json_rows(folder / f"BFCL_v4_{category}.json"):
            question_id = _field(row, "id", where)
            offered = [normalize_spec(f) for f in _field(row, "function", where, list)]
            for spec in offered:
                key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
                distinct.setdefault(key, spec)
            if question_id not in answers:
                raise ToolDataError(f"{where}: question {question_id!r} has no possible answer")
            ground_truth = _field(answers[question_id], "ground_truth", where, list)
            calls = [{"name": name, "arguments": bfcl_concrete(args)} for entry in ground_truth
                     for name, args in entry.items()]  # fmt: skip
            query = "\n".join(m.get("content", "") for turn in _field(row, "question", where, list) for m in turn
                              if isinstance(m, Mapping) and m.get("role") == "user")  # fmt: skip
            examples.append(ToolExample(question_id, query, offered, calls, ground_truth))
    return ToolDataset("bfcl", list(distinct.values()), examples)


LOADERS: dict[str, Callable[[Path], ToolDataset]] = {
    "seal_tools": load_seal_tools,
    "api_bank": load_api_bank,
    "toolalpaca": load_toolalpaca,
    "bfcl": load_bfcl,
}


def load_tool_dataset(name: str, root: Path) -> ToolDataset:
    """`root` is the shared tools folder (../shared/data/tools)."""
    if name not in LOADERS:
        raise KeyError(f"unknown tool dataset {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](Path(root))
