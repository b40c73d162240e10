"""The plumbing the tool agents (ConAgents, ATC, 360°REA) share: the lock-step driver and the run record.

Each agent writes one run as a plain generator that yields what it needs next (a model turn, tool calls, a program)
and receives the answer; `run_lockstep` advances every run of a batch together and sends each kind of request in one
call per round (one engine call per engine and stop set, one sandbox call for all tool calls), so a batch of tasks
costs (turns) engine calls, not (tasks x turns), as in ExSearch. Standard library only: engines and sandboxes are
whatever object has `generate` / `call_many` / `run_program`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.tools import ToolError
from agents.trajectory import Step, Trajectory


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
