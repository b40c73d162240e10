"""ATC: the model chains tools in one program; failures are reflected on per tool; undocumented tools are probed.

After Shi et al., 2024 ("Chain of Tools: Large Language Model is an Automatic Multi-tool Learner"). Three parts:

1. **Tool chains as programs.** From the offered tools' documentation the model writes one Python program that calls
   them as functions (each returns the tool's text) and prints the answer; the sandbox runs it with exactly those
   tools granted. One program replaces a turn per call.
2. **Attributable reflection.** When the program fails, the error is mapped to the tool that caused it: the tool
   itself when it raised (`ToolError.tool`), else the tool whose output flowed into the failing line (the line's
   own tool calls, then, through assignments, the calls its variables came from), else the last tool called. The
   error, the failing line, that tool's call and what it returned, and its documentation go back to the model, which
   revises the program; up to `max_reflections` rounds, then `reflection_failed: <code>`.
3. **Black-box probing.** A tool without usage documentation is probed: the model writes test calls, the sandbox
   answers, and what the answers reveal is recorded as documentation — parameter names (an unexpected argument's
   error lists them), required ones (`missing_argument`), types (`wrong_type`), allowed values (`invalid_value`),
   working examples and the observed response schema. **Chain probing**: a tool no direct probe could make work
   (it needs values only another tool produces) is probed by a program that uses already-probed tools as helpers.

The programmer's trajectory (probing has its own, `probe:<tool>/prober`):

    [programmer] Task: How many years after the birth of its founder was Nili Motors founded?
    Tools (...): {"name":"lookup",...} {"name":"calculate",...}
    <program>founder = lookup(entity="Nili Motors", attribute="founder") ... print(...)</program>   <- model
    Error: {"code":"execution_error","message":"ValueError: ... (line 3)"}                          <- sandbox
    Line 3: born = int(born_text)
    Caused by: lookup(...) which returned 'born 1931'. lookup: {doc}                                 (masked)
    <program>...</program>                                                                           <- model
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.tools import (
    EXECUTION_ERROR,
    INVALID_VALUE,
    MISSING_ARGUMENT,
    SYNTAX_ERROR,
    UNEXPECTED_ARGUMENT,
    WRONG_TYPE,
    ToolError,
    normalize_spec,
)
from agents.conagents import PROGRAM_CLOSE, PROGRAM_OPEN, banner, check_task, program_code, tagged
from agents.toolcall import (
    error_fields,
    merge_schemas,
    parse_calls,
    render_errors,
    render_results,
    render_tool,
    response_schema,
    value_schema,
)
from agents.toolrun import (
    CallTools,
    ModelTurn,
    RunProgram,
    ToolAgentConfig,
    ToolRun,
    add_observation,
    add_turn,
    error_record,
    require_at_least,
    run_lockstep,
)


@dataclass
class ATCConfig(ToolAgentConfig):
    """Programs, reflection and probing of ATC (Hydra group `agent`)."""

    max_reflections: int = 3
    """Revisions of a failed program before the run ends (`reflection_failed: <code>`)."""
    max_probes: int = 12
    """Probing turns per tool: a probe reveals about one fact (a name, a type, an allowed value), so a tool with k
    parameters needs about 2k + 2."""
    probe_examples: int = 2
    """Working examples that complete a tool's probing."""
    max_chain_programs: int = 2
    """Chain-probing programs tried per tool that direct probing could not make work."""
    max_program_tokens: int = 384
    max_tokens_per_turn: int = 128
    max_context_tokens: int = 8192
    """Reflections repeat the blamed tool's documentation, so a run needs room for a few of them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 1, ("max_probes", "probe_examples"))
        require_at_least(self, 0, ("max_reflections", "max_chain_programs"))


PROGRAM_INSTRUCTION = ("Write one Python program in <program></program> that calls these tools as functions with "
                       "keyword arguments (each returns the tool's output as a string) and prints the answer.")  # fmt: skip


def undocumented(name: str) -> dict:
    """What the model knows of a tool before probing: its name."""
    return {"name": name, "description": "", "parameters": {"type": "object", "properties": {}}}


# ---------------------------------------------------------------------------------------------------- attribution


@dataclass
class Attribution:
    """Where a failed program went wrong: the failing line and the tool (and its call) the error is blamed on."""

    line: int | None = None
    source: str | None = None
    tool: str | None = None
    call: dict | None = None
    """The tool's last call before the failure: name, arguments, ok, error code (from `ProgramResult.tool_calls`)."""


def attribute_error(code: str, error: ToolError, tool_calls: Sequence[Mapping], tools: Sequence[str]) -> Attribution:
    """Blame a failed program's error on a tool: the one that raised, the one whose output reached the failing line
    (directly or through assignments), or the last one called. No tool for errors before any call (syntax).
    `tool_calls` are the program's calls as `ProgramResult.tool_calls` lists them."""
    match = re.search(r"\(line (\d+)\)", error.message)
    line = int(match.group(1)) if match else None
    lines = code.splitlines()
    source = lines[line - 1].strip() if line and 0 < line <= len(lines) else None
    calls = list(tool_calls)

    def last_call(tool: str | None) -> dict | None:
        return next((c for c in reversed(calls) if c["name"] == tool), None)

    if error.tool in tools:
        return Attribution(line, source, error.tool, last_call(error.tool))
    if line is not None:
        found = _tool_on_line(code, line, set(tools))
        made = [c for c in calls if found and c["name"] == found[0]]
        if made:  # the call from that line: as many calls of the tool before it as call sites above it
            return Attribution(line, source, found[0], made[min(found[1], len(made) - 1)])
    if error.code != SYNTAX_ERROR and calls:
        return Attribution(line, source, calls[-1]["name"], calls[-1])
    return Attribution(line, source)


def _tool_on_line(code: str, line: int, tools: set[str]) -> tuple[str, int] | None:
    """The tool called on `line`, else the tool a variable used there was (transitively) assigned from; with the
    number of that tool's call sites above the calling line (its index among the calls, in straight-line code)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    assigned: dict[str, list[tuple[int, set[str], set[str]]]] = {}  # name -> [(line, tools called, names read)]
    on_line: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and node.lineno <= line <= (node.end_lineno or node.lineno) and not isinstance(
                node, (ast.FunctionDef, ast.For, ast.While, ast.If, ast.With, ast.Try)):  # fmt: skip
            on_line.append(node)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        assigned.setdefault(name.id, []).append((node.lineno, *_reads(node.value, tools)))
    called, read = set(), set()
    for node in on_line:
        node_called, node_read = _reads(node, tools)
        called |= node_called
        read |= node_read
    if called:
        return sorted(called)[0], _sites_before(tree, sorted(called)[0], line)
    seen: set[str] = set()
    frontier = [(name, line) for name in read]
    while frontier:
        name, before = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        earlier = [a for a in assigned.get(name, []) if a[0] < before or a[0] == before]
        if not earlier:
            continue
        at, sources, names = max(earlier, key=lambda a: a[0])
        if sources:
            return sorted(sources)[0], _sites_before(tree, sorted(sources)[0], at)
        frontier.extend((n, at) for n in names)
    return None


def _sites_before(tree: ast.AST, tool: str, line: int) -> int:
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call) and node.lineno < line
               and tool in _reads(node, {tool})[0])  # fmt: skip


def _reads(node: ast.AST, tools: set[str]) -> tuple[set[str], set[str]]:
    """(tools called, variable names read) inside `node`."""
    called, read = set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            if isinstance(sub.func, ast.Name) and sub.func.id in tools:
                called.add(sub.func.id)
            elif isinstance(sub.func, ast.Name) and sub.func.id == "call_tool" and sub.args and isinstance(
                    sub.args[0], ast.Constant) and sub.args[0].value in tools:  # fmt: skip
                called.add(sub.args[0].value)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
            read.add(sub.id)
    return called, read


def format_call(call: Mapping) -> str:
    arguments = ", ".join(f"{k}={v!r}" for k, v in (call.get("arguments") or {}).items())
    return f"{call['name']}({arguments})"


# ---------------------------------------------------------------------------------------------------- probing


@dataclass
class ToolDoc:
    """What probing learned about a tool: its parameters, working examples and the responses' schema."""

    name: str
    properties: dict[str, dict] = field(default_factory=dict)
    required: list[str] = field(default_factory=list)
    closed: bool = False
    """An unexpected argument was refused: only the listed parameters exist."""
    examples: list[dict] = field(default_factory=list)
    """{"arguments", "output"} of calls that worked."""
    returns: dict | None = None
    probes: int = 0
    helpers: list[str] = field(default_factory=list)
    """Tools a chain probe used to make this one work."""

    @property
    def ok(self) -> bool:
        return bool(self.examples)

    def parameters(self) -> dict:
        schema: dict[str, Any] = {"type": "object", "properties": {k: dict(v) for k, v in self.properties.items()},
                                  "required": [k for k in self.properties if k in self.required]}  # fmt: skip
        if self.closed:
            schema["additionalProperties"] = False
        return schema

    def spec(self) -> dict:
        """The documentation an agent is shown from now on: learned schema, return type and examples."""
        shown = "; ".join(f"{format_call({'name': self.name, 'arguments': e['arguments']})} -> "
                          f"{_clip(repr(e['output']), 160)}" for e in self.examples)  # fmt: skip
        returns = json.dumps(self.returns, separators=(",", ":")) if self.returns else "unknown"
        via = f" (made to work through {', '.join(self.helpers)})" if self.helpers else ""
        description = f"Documented by probing{via}. Returns {returns}. Examples: {shown or 'none worked'}."
        return {"name": self.name, "description": description, "parameters": self.parameters()}

    def learn(self, arguments: Mapping, result: Any) -> None:
        """Update from one probe call and its result (the sandbox's output or typed error)."""
        self.probes += 1
        if result.ok:
            self.examples.append({"arguments": dict(arguments), "output": result.output})
            observed = response_schema(result.output)
            self.returns = observed if self.returns is None else merge_schemas(self.returns, observed)
            for key, value in arguments.items():
                self.properties.setdefault(key, {}).setdefault("type", value_schema(value).get("type"))
            return
        self._learn_error(result.error)

    def _learn_error(self, error: ToolError) -> None:
        name = (error.argument or "").split(".")[0].split("[")[0] or None
        if error.code == UNEXPECTED_ARGUMENT:
            self.closed = True
            listed = re.search(r"expected (\[.*\])$", error.message)
            for key in ast.literal_eval(listed.group(1)) if listed else []:
                self.properties.setdefault(key, {})
        elif error.code == MISSING_ARGUMENT and name:
            self.properties.setdefault(name, {})
            if name not in self.required:
                self.required.append(name)
        elif error.code == WRONG_TYPE and name:
            kinds = re.search(r"must be of type (.+?), got", error.message)
            if kinds:
                types = kinds.group(1).split(" or ")
                self.properties.setdefault(name, {})["type"] = types[0] if len(types) == 1 else types
        elif error.code == INVALID_VALUE and name:
            allowed = re.search(r"must be one of (\[.*\]), got", error.message)
            if allowed:
                self.properties.setdefault(name, {})["enum"] = ast.literal_eval(allowed.group(1))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


PROBE_INSTRUCTION = ("Its documentation is missing. Write test calls in <calls></calls> (one JSON object per line) to "
                     "learn its arguments and what it returns; the answers show what works.")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the agent


class ATC:
    """Runs ATC on tool tasks ({"id", "query", "tools": [names]}) and probes undocumented tools.

    `tools` is what the model is shown per tool (use `undocumented(name)` for a tool without docs); the sandbox holds
    the real tools. `probe` replaces a tool's shown documentation with what probing learned.
    """

    def __init__(self, engine: Any, sandbox: Any, tools: Sequence[Mapping], tokenizer: Any,
                 cfg: ATCConfig | None = None):  # fmt: skip
        self.engine, self.sandbox, self.tokenizer = engine, sandbox, tokenizer
        self.cfg = cfg or ATCConfig()
        self.docs = {spec["name"]: dict(spec) for spec in tools}
        self.rounds = 0

    def _doc_lines(self, names: Sequence[str]) -> str:
        """One JSON documentation line per tool (programs call tools as functions, so no call-block header)."""
        return "\n".join(render_tool(self.docs[name], self.cfg.descriptions) for name in names)

    # ---- tool chains ----------------------------------------------------------------------------------------------

    def run(self, tasks: Sequence[Mapping], samples: int = 1, greedy: bool = False,
            seed: int | None = None) -> list[ToolRun]:  # fmt: skip
        for task in tasks:
            check_task(task, self.docs)
        pairs = [(task, k) for task in tasks for k in range(samples)]
        runs = [ToolRun(str(task["id"])) for task, _ in pairs]
        coroutines = [self._chain(run, task, k) for run, (task, k) in zip(runs, pairs, strict=True)]
        self.rounds = run_lockstep(coroutines, self.sandbox, self.cfg.decoding(greedy, seed))
        return runs

    def _chain(self, run: ToolRun, task: Mapping, sample: int):
        cfg, tools = self.cfg, list(task["tools"])
        prompt = banner("programmer", task["query"]) + f"Tools:\n{self._doc_lines(tools)}\n{PROGRAM_INSTRUCTION}\n"
        t = run.trajectory("programmer", self.tokenizer(prompt)["input_ids"], sample)
        for attempt in range(cfg.max_reflections + 1):
            completion = yield ModelTurn(t, self.engine, (PROGRAM_CLOSE,), cfg.max_program_tokens)
            if completion is None:
                return run.finish("length")
            code = tagged(completion.text, PROGRAM_OPEN, PROGRAM_CLOSE)
            add_turn(t, completion, "program" if code else "malformed", code)
            if code:
                code = program_code(code)
                result = yield RunProgram(code, tools)
                answer = result.stdout.strip().splitlines()[-1].strip() if result.ok and result.stdout.strip() else ""
                if answer:
                    run.calls = [{"name": c["name"], "arguments": c["arguments"]} for c in result.tool_calls if c["ok"]]
                    add_observation(t, self.tokenizer, "program_output", f"\nOutput: {answer}\n", answer)
                    return run.finish("answer", answer)
                error = result.error or ToolError(EXECUTION_ERROR, "the program printed nothing: print the answer")
                blame = attribute_error(code, error, result.tool_calls, tools)
                feedback = yield from self._reflection(error, blame)
            else:
                error = ToolError(SYNTAX_ERROR, f"no {PROGRAM_OPEN}...{PROGRAM_CLOSE} program")
                blame, feedback = Attribution(), f"\nError: {json.dumps(error_fields(error))}\n"
            run.errors.append(error)
            record = json.dumps({**error.to_dict(), "line": blame.line, "attributed_tool": blame.tool,
                                 "call": blame.call}, ensure_ascii=False)  # fmt: skip
            add_observation(t, self.tokenizer, "tool_error", feedback, record)
            if attempt == cfg.max_reflections:
                return run.finish(f"reflection_failed: {error.code}")
        return None

    def _reflection(self, error: ToolError, blame: Attribution):
        """The feedback text: the error, the failing line, and the blamed tool's call, result and documentation."""
        parts = [f"\nError: {json.dumps(error_fields(error), ensure_ascii=False)}"]
        if blame.line is not None and blame.source:
            parts.append(f"Line {blame.line}: {blame.source}")
        if blame.tool:
            if blame.call and blame.call.get("ok"):
                (again,) = yield CallTools([{"name": blame.call["name"], "arguments": blame.call["arguments"]}])
                outcome = f"which returned {again.output!r}" if again.ok else f"which failed ({again.error.code})"
            elif blame.call:
                outcome = f"which failed ({blame.call.get('error')})"
            else:
                outcome = "which was not called"
            call = format_call(blame.call) if blame.call else blame.tool
            parts.append(f"Caused by: {call} {outcome}. Its documentation: {self._doc_lines([blame.tool])}")
        parts.append("Revise the program.")
        return "\n".join(parts) + "\n"

    # ---- probing --------------------------------------------------------------------------------------------------

    def probe(self, names: Sequence[str], greedy: bool = False, seed: int | None = None,
              ) -> tuple[dict[str, ToolDoc], list[ToolRun]]:  # fmt: skip
        """Probe `names` directly, then chain-probe the ones that never worked with the ones that did as helpers.

        Documented tools replace their shown documentation (`self.docs`); returns every tool's notes and the prober
        runs (one trajectory each, `probe:<tool>`).
        """
        unknown = [name for name in names if name not in self.docs]
        if unknown:
            raise ValueError(f"cannot probe unknown tool(s) {unknown}; known: {sorted(self.docs)}")
        docs = {name: ToolDoc(name) for name in names}
        runs = {name: ToolRun(f"probe:{name}") for name in names}
        decoding = self.cfg.decoding(greedy, seed)
        rounds = run_lockstep([self._probe(runs[n], docs[n]) for n in names], self.sandbox, decoding)
        self.docs.update((name, doc.spec()) for name, doc in docs.items() if doc.ok)
        helpers = [name for name in names if docs[name].ok] + [n for n in self.docs if n not in docs and self._known(n)]
        failed = [name for name in names if not docs[name].ok]
        if failed and helpers and self.cfg.max_chain_programs:
            rounds += run_lockstep([self._chain_probe(runs[n], docs[n], helpers) for n in failed], self.sandbox,
                                   decoding)  # fmt: skip
            self.docs.update((name, docs[name].spec()) for name in failed if docs[name].ok)
        for name, doc in docs.items():
            runs[name].finish("documented" if doc.ok else "undocumented")
        self.rounds = rounds
        return docs, [runs[name] for name in names]

    def _known(self, name: str) -> bool:
        spec = self.docs[name]
        return bool(spec.get("description")) or bool(normalize_spec(spec)["parameters"].get("properties"))

    def _probe(self, run: ToolRun, doc: ToolDoc):
        cfg = self.cfg
        prompt = f"[prober] Tool: {doc.name}\n{PROBE_INSTRUCTION}\n"
        t = run.trajectory("prober", self.tokenizer(prompt)["input_ids"])
        first_id = 0
        for _ in range(cfg.max_probes):
            completion = yield ModelTurn(t, self.engine, ("</calls>",), cfg.max_tokens_per_turn)
            if completion is None:
                return None
            parsed = parse_calls(completion.text, tools=[doc.name], first_id=first_id)
            add_turn(t, completion, "probe" if parsed.calls else "malformed")
            if not parsed.block:
                return None  # the model has nothing more to try
            run.errors.extend(parsed.errors)
            if not parsed.calls:
                add_observation(t, self.tokenizer, "tool_error", f"\n{render_errors(parsed.errors)}\n",
                                error_record(parsed.errors[0]))  # fmt: skip
                continue
            first_id += len(parsed.calls)
            results = yield CallTools([c.as_call() for c in parsed.calls])
            for call, result in zip(parsed.calls, results, strict=True):
                doc.learn(call.arguments, result)
                if not result.ok:
                    run.errors.append(result.error)
            role = "tool_result" if all(r.ok for r in results) else "tool_error"
            block = render_results(zip(parsed.calls, results, strict=True))
            failed = next((r.error for r in results if not r.ok), None)
            add_observation(t, self.tokenizer, role, f"\n{block}\n", error_record(failed) if failed else
                            json.dumps([r.output for r in results], ensure_ascii=False))  # fmt: skip
            if len(doc.examples) >= cfg.probe_examples:
                return None
        return None

    def _chain_probe(self, run: ToolRun, doc: ToolDoc, helpers: Sequence[str]):
        """Probe `doc.name` with a program that gets valid inputs from already-probed helper tools."""
        t = run.trajectories["prober"]
        known = render_tool({"name": doc.name, "description": "", "parameters": doc.parameters()}, False)
        add_observation(t, self.tokenizer, "instruction",
                        f"\nNo call of {doc.name} worked. What is known of it:\n{known}\nHelpers:\n"
                        f"{self._doc_lines(helpers)}\nWrite a program in <program></program> that uses the helpers to "
                        f"get valid arguments and calls {doc.name}, printing its result.\n",
                        json.dumps(list(helpers)))  # fmt: skip
        for _ in range(self.cfg.max_chain_programs):
            completion = yield ModelTurn(t, self.engine, (PROGRAM_CLOSE,), self.cfg.max_program_tokens)
            if completion is None:
                return None
            code = tagged(completion.text, PROGRAM_OPEN, PROGRAM_CLOSE)
            add_turn(t, completion, "program" if code else "malformed", code)
            if not code:
                return None
            result = yield RunProgram(program_code(code), [*helpers, doc.name])
            worked = [c for c in result.tool_calls if c["name"] == doc.name and c["ok"]]
            if worked:
                outputs = yield CallTools([{"name": c["name"], "arguments": c["arguments"]} for c in worked])
                for call, output in zip(worked, outputs, strict=True):
                    doc.learn(call["arguments"], output)
                used = [h for h in helpers if any(c["name"] == h for c in result.tool_calls)]
                doc.helpers = used
                add_observation(t, self.tokenizer, "program_output", f"\nOutput: {result.stdout.strip()}\n",
                                json.dumps([o.output for o in outputs], ensure_ascii=False))  # fmt: skip
                return None
            error = result.error or ToolError(EXECUTION_ERROR, f"the program never called {doc.name} successfully")
            run.errors.append(error)
            add_observation(t, self.tokenizer, "tool_error", f"\nError: {json.dumps(error_fields(error))}\n",
                            error_record(error))  # fmt: skip
        return None
