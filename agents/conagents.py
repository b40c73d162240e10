"""ConAgents: three cooperating agents use tools — grounding, execution, observing — calibrated by IterCali.

After Shi et al., 2024 ("Learning to Use Tools via Cooperative and Interactive Agents"). Splitting the work keeps each
context small and each job simple: the grounding agent plans (which tool, to do what), the execution agent writes
the concrete call from that tool's schema, and the observing agent reads the response and passes on only what the
plan needs. Large responses are never pasted into a context: the observing agent is shown the response's type
schema and a preview, writes a small program against the schema, and the sandbox runs it on the full response.

IterCali: when a call fails (a parse failure of the execution agent's text, a schema error, a tool's own error) or
an extraction fails (a program error, an empty result), the typed error from the sandbox goes back to the agent
that made the mistake, which tries again, up to `max_calibrations` times (the paper's 3); then the run ends with
`calibration_failed: <code>`.

Each role has its own token-level trajectory (`ToolRun.trajectories`), in which the other roles' messages and the
tools' answers are masked observations:

    grounding   [grounding] Task: How many years after ... was Nili Motors founded?  Tools: - lookup: ...
                <ground>lookup: the founder of Nili Motors</ground>                  <- model
                Result: Mira Tovenka                                                  <- observing agent (masked)
                ... <answer>73</answer>                                               <- model
    execution   [execution] Task: ...
                Instruction: the founder of Nili Motors  Tool: lookup {"name":"lookup",...}   <- grounding (masked)
                <calls>{"name":"lookup","arguments":{...}}</calls>                   <- model
                <results>{"id":"call_0","name":"lookup","error":{"code":"invalid_value",...}}</results>  <- sandbox
                <calls>{"name":"lookup","arguments":{...}}</calls>                   <- model, calibrated
    observing   [observing] Task: ...
                Instruction: the founder of Nili Motors  Response: Mira Tovenka      <- (masked)
                <extract>Mira Tovenka</extract>                                      <- model
                (large: "Response: 1432 characters of {schema}; it starts ..." then <program>print(...)</program>)

Roles share one engine or use separate ones (`role_engines` maps each role to an engine name). Runs of a batch are
advanced in lock step (`agents/toolrun.run_lockstep`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.tools import EXECUTION_ERROR, SYNTAX_ERROR, UNKNOWN_TOOL, ToolError
from agents.toolcall import (
    parse_calls,
    render_errors,
    render_results,
    render_tools,
    response_schema,
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

ROLES = ("grounding", "execution", "observing")


@dataclass
class ConAgentsConfig(ToolAgentConfig):
    """Roles, IterCali and sampling of ConAgents (Hydra group `agent`)."""

    role_engines: dict[str, str] = field(default_factory=lambda: {role: "policy" for role in ROLES})
    """Engine name per role: one name for all = one shared engine; pass the engines by these names."""
    max_steps: int = 6
    """Tool uses the grounding agent may plan before the run is cut off (`max_steps`)."""
    max_calibrations: int = 3
    """IterCali retries per call and per extraction (the paper's limit is 3)."""
    large_response_chars: int = 240
    """Longer responses are shown as a type schema and a preview, and read by a program run in the sandbox."""
    preview_chars: int = 120

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.role_engines) - set(ROLES))
        missing = [role for role in ROLES if role not in self.role_engines]
        if unknown or missing:
            raise ValueError(f"agent.role_engines must name exactly the roles {ROLES}; unknown {unknown}, "
                             f"missing {missing}")  # fmt: skip
        require_at_least(self, 1, ("max_steps",))
        require_at_least(self, 0, ("max_calibrations",))


GROUND_OPEN, GROUND_CLOSE = "<ground>", "</ground>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
EXTRACT_OPEN, EXTRACT_CLOSE = "<extract>", "</extract>"
PROGRAM_OPEN, PROGRAM_CLOSE = "<program>", "</program>"


def banner(role: str, query: str) -> str:
    """The start of every role's prompt: which agent it is and the user's task."""
    return f"[{role}] Task: {query}\n"


def tagged(text: str, open_tag: str, close_tag: str) -> str | None:
    """The content of the tagged part that ends `text` (None when `text` does not end with `close_tag`)."""
    stripped = text.rstrip()
    if not stripped.endswith(close_tag):
        return None
    start = stripped.rfind(open_tag)
    return None if start < 0 else stripped[start + len(open_tag) : -len(close_tag)].strip()


def program_code(text: str) -> str:
    """A program as models write it: fences (```python) removed."""
    return re.sub(r"^```[a-zA-Z]*\n|\n?```$", "", text.strip()).strip()


def bind_response(outputs: Sequence[str]) -> str:
    """The first line of an observing program: `response` holds the tool's response (its JSON value when it is
    JSON), or the list of responses of a parallel call. One line, so error line numbers shift by exactly one."""

    def value(output: str) -> object:
        try:
            return json.loads(output)
        except json.JSONDecodeError:
            return output

    values = [value(o) for o in outputs]
    return f"import json; response = json.loads({json.dumps(values[0] if len(values) == 1 else values)!r})\n"


def shift_lines(error: ToolError, by: int) -> ToolError:
    """The error with "(line N)" counted in the model's own program, not the one with the binding line."""
    message = re.sub(r"\(line (\d+)\)", lambda m: f"(line {max(1, int(m.group(1)) - by)})", error.message)
    return ToolError(error.code, message, error.tool, error.argument)


class ConAgents:
    """Runs ConAgents on tool tasks ({"id", "query", "tools": [names]}) against engines and a sandbox.

    `tools` is the catalogue of specs the agents are shown; `sandbox` (ToolSandboxCore or SandboxPool) runs the real
    tools and programs.
    """

    def __init__(self, engines: Any, sandbox: Any, tools: Sequence[Mapping], tokenizer: Any,
                 cfg: ConAgentsConfig | None = None):  # fmt: skip
        self.cfg = cfg or ConAgentsConfig()
        self.sandbox, self.tokenizer = sandbox, tokenizer
        self.specs = {spec["name"]: dict(spec) for spec in tools}
        self.engines = resolve_engines(engines, self.cfg.role_engines)
        self.rounds = 0

    def run(self, tasks: Sequence[Mapping], samples: int = 1, greedy: bool = False,
            seed: int | None = None) -> list[ToolRun]:  # fmt: skip
        """`samples` runs per task, all advanced together, in task order."""
        for task in tasks:
            check_task(task, self.specs)
        runs = [ToolRun(str(task["id"])) for task in tasks for _ in range(samples)]
        coroutines = [self._run(run, task, k) for run, (task, k) in
                      zip(runs, [(t, k) for t in tasks for k in range(samples)], strict=True)]  # fmt: skip
        self.rounds = run_lockstep(coroutines, self.sandbox, self.cfg.decoding(greedy, seed))
        return runs

    # ---- one run ------------------------------------------------------------------------------------------------

    def _prompt(self, role: str, task: Mapping) -> list[int]:
        text = banner(role, task["query"])
        if role == "grounding":
            lines = [f"- {name}: {self.specs[name]['description']}" if self.cfg.descriptions else f"- {name}"
                     for name in task["tools"]]  # fmt: skip
            text += "Tools:\n" + "\n".join(lines) + "\n"
        return list(self.tokenizer(text)["input_ids"])

    def _run(self, run: ToolRun, task: Mapping, sample: int):
        cfg = self.cfg
        grounding, execution, observing = (run.trajectory(role, self._prompt(role, task), sample) for role in ROLES)
        steps = 0
        while True:
            completion = yield ModelTurn(grounding, self.engines["grounding"], (GROUND_CLOSE, ANSWER_CLOSE),
                                         cfg.max_tokens_per_turn)  # fmt: skip
            if completion is None:
                return run.finish("length")
            answer = tagged(completion.text, ANSWER_OPEN, ANSWER_CLOSE)
            if answer:
                add_turn(grounding, completion, "answer", answer)
                return run.finish("answer", answer)
            plan = tagged(completion.text, GROUND_OPEN, GROUND_CLOSE)
            add_turn(grounding, completion, "ground" if plan else "malformed")
            tool, _, intent = (plan or "").partition(":")
            tool, intent = tool.strip(), intent.strip()
            if not plan or not intent:
                return run.finish(f"malformed: expected {GROUND_OPEN}tool: intent{GROUND_CLOSE} or "
                                  f"{ANSWER_OPEN}answer{ANSWER_CLOSE}")  # fmt: skip
            if tool not in task["tools"]:
                run.errors.append(ToolError(UNKNOWN_TOOL, f"grounding chose {tool!r}; offered: {task['tools']}", tool))
                return run.finish(f"malformed: unknown tool {tool!r}")
            if steps == cfg.max_steps:
                return run.finish("max_steps")
            steps += 1
            outputs = yield from self._execute(run, execution, tool, intent)
            if outputs is None:
                return None
            extraction = yield from self._observe(run, observing, intent, outputs)
            if extraction is None:
                return None
            add_observation(grounding, self.tokenizer, "result", f"\nResult: {extraction}\n", extraction)

    def _execute(self, run: ToolRun, t, tool: str, intent: str):
        """The execution agent's call for `intent`, calibrated on errors; the responses, or None if the run ended."""
        shown = any(s.role == "instruction" and s.text == tool for s in t.steps)  # each schema is shown once
        schema = "(as above)" if shown else "\n" + render_tools([self.specs[tool]], self.cfg.descriptions)
        add_observation(t, self.tokenizer, "instruction", f"\nInstruction: {intent}\nTool: {tool} {schema}\n", tool)
        for attempt in range(self.cfg.max_calibrations + 1):
            completion = yield ModelTurn(t, self.engines["execution"], ("</calls>",), self.cfg.max_tokens_per_turn)
            if completion is None:
                run.finish("length")
                return None
            parsed = parse_calls(completion.text, tools=[tool])
            add_turn(t, completion, "calls" if parsed.block and parsed.ok else "malformed")
            if not parsed.block:
                parsed.errors.append(ToolError(SYNTAX_ERROR, "no <calls> block: write the call as <calls>, one JSON "
                                               "object per line, then </calls>", tool))  # fmt: skip
            if parsed.errors:
                run.errors.extend(parsed.errors)
                add_observation(t, self.tokenizer, "tool_error", f"\n{render_errors(parsed.errors)}\n",
                                error_record(parsed.errors[0]))  # fmt: skip
                error = parsed.errors[0]
            else:
                results = yield CallTools([c.as_call() for c in parsed.calls])
                failed = [r.error for r in results if not r.ok]
                block = render_results(zip(parsed.calls, results, strict=True))
                if not failed:
                    run.calls.extend(c.as_call() for c in parsed.calls)
                    add_observation(t, self.tokenizer, "tool_result", f"\n{block}\n",
                                    json.dumps([r.output for r in results], ensure_ascii=False))  # fmt: skip
                    return [r.output for r in results]
                run.errors.extend(failed)
                add_observation(t, self.tokenizer, "tool_error", f"\n{block}\n", error_record(failed[0]))
                error = failed[0]
            if attempt == self.cfg.max_calibrations:
                run.finish(f"calibration_failed: {error.code}")
                return None
        return None

    def _observe(self, run: ToolRun, t, intent: str, outputs: list[str]):
        """The observing agent's extraction, calibrated on failures; the text, or None if the run ended."""
        cfg = self.cfg
        shown = []
        for output in outputs:
            if len(output) <= cfg.large_response_chars:
                shown.append(f"Response: {output}")
            else:
                schema = json.dumps(response_schema(output), separators=(",", ":"))
                shown.append(f"Response: {len(output)} characters of {schema}; it starts {output[:cfg.preview_chars]!r}")
        large = any(len(o) > cfg.large_response_chars for o in outputs)
        hint = "\nWrite a program that prints what the instruction needs from `response`." if large else ""
        add_observation(t, self.tokenizer, "response", f"\nInstruction: {intent}\n" + "\n".join(shown) + hint + "\n",
                        json.dumps(outputs, ensure_ascii=False))  # fmt: skip
        for attempt in range(cfg.max_calibrations + 1):
            completion = yield ModelTurn(t, self.engines["observing"], (EXTRACT_CLOSE, PROGRAM_CLOSE),
                                         cfg.max_program_tokens if large else cfg.max_tokens_per_turn)  # fmt: skip
            if completion is None:
                run.finish("length")
                return None
            extraction = tagged(completion.text, EXTRACT_OPEN, EXTRACT_CLOSE)
            code = tagged(completion.text, PROGRAM_OPEN, PROGRAM_CLOSE)
            if extraction:
                add_turn(t, completion, "extract", extraction)
                return extraction
            if code:
                add_turn(t, completion, "program", code)
                result = yield RunProgram(bind_response(outputs) + program_code(code), [])
                printed = result.stdout.strip() if result.ok else ""
                if printed:
                    add_observation(t, self.tokenizer, "program_output", f"\nOutput: {printed}\n", printed)
                    return printed
                error = (shift_lines(result.error, 1) if not result.ok else
                         ToolError(EXECUTION_ERROR, "the program printed nothing: print the value the instruction "
                                   "needs"))  # fmt: skip
            else:
                add_turn(t, completion, "malformed")
                error = ToolError(SYNTAX_ERROR, f"expected {EXTRACT_OPEN}value{EXTRACT_CLOSE} or "
                                  f"{PROGRAM_OPEN}code{PROGRAM_CLOSE}")  # fmt: skip
            run.errors.append(error)
            add_observation(t, self.tokenizer, "tool_error", f"\nError: {error_record(error)}\n", error_record(error))
            if attempt == cfg.max_calibrations:
                run.finish(f"calibration_failed: {error.code}")
                return None
        return None


def resolve_engines(engines: Any, role_engines: Mapping[str, str]) -> dict[str, Any]:
    """Role -> engine: one engine for every role, or engines by name as `role_engines` maps them."""
    if not isinstance(engines, Mapping):
        return {role: engines for role in role_engines}
    out = {}
    for role, name in role_engines.items():
        if name not in engines:
            raise ValueError(f"agent.role_engines.{role}={name!r}: no engine by that name; given {sorted(engines)}")
        out[role] = engines[name]
    return out


def check_task(task: Mapping, specs: Mapping[str, Mapping]) -> None:
    """A task row the agents can run, or a ValueError naming the task and the field."""
    where = f"task {task.get('id')!r}"
    for key in ("id", "query", "tools"):
        if key not in task:
            raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(task["query"], str) or not task["query"].strip():
        raise ValueError(f"{where}: field 'query' must be a non-empty string")
    unknown = [name for name in task["tools"] if name not in specs]
    if unknown:
        raise ValueError(f"{where}: field 'tools' names unknown tool(s) {unknown}; known: {sorted(specs)}")
