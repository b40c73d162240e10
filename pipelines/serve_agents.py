"""Agent runs behind HTTP: our agents' loops, unchanged, over the Serve deployments instead of Ray actors.

The agents (agents/exsearch.py, genground.py, conagents.py) are plain Python over anything with `generate`,
`search`, `call_many` and `run_program`; here those are thin adapters that send each call to a deployment and wait
with a deadline. Every call an adapter makes is also reported as an event (`model`, `search`, `tool_calls`,
`program`), which is what a streamed run sends as it happens; the finished run adds the parsed step trace.

The loops are synchronous, so a run occupies one thread of the ingress; `call` (given by the ingress) owns the
deadline and the retry after a replica died.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from actors.llm import Generation

Call = Callable[..., Any]
"""`call(deployment, method, *args)`: the result of one deployment call (raises on failure or after the deadline)."""
Emit = Callable[[dict], None]

SEARCH_AGENTS = ("exsearch", "genground")
TOOL_AGENTS = ("conagents",)
AGENTS = SEARCH_AGENTS + TOOL_AGENTS


class DeploymentGenerator:
    """An agent's engine: every prompt of a round goes to the LLM deployment as its own request, so @serve.batch
    regroups them with whatever else is in flight."""

    def __init__(self, submit: Callable[..., Any], emit: Emit):
        self.submit, self.emit = submit, emit

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list[Generation]:
        settings = asdict(sampling) if is_dataclass(sampling) else dict(sampling)
        results = self.submit([(list(p), settings) for p in prompts])
        generations = []
        for prompt, (completions, _) in zip(prompts, results, strict=True):
            generations.append(Generation(list(prompt), list(completions)))
            for completion in completions:
                self.emit({"type": "model", "text": completion.text, "tokens": len(completion.token_ids),
                           "finish_reason": completion.finish_reason})  # fmt: skip
        return generations


class DeploymentSearcher:
    def __init__(self, call: Call, emit: Emit):
        self.call, self.emit = call, emit

    def search(self, queries: Sequence[str], k: int, instruction: Any = None) -> list[list[dict]]:
        hits = self.call("retriever", "search", list(queries), k, instruction)
        for query, found in zip(queries, hits, strict=True):
            self.emit({"type": "search", "query": query, "hits": [h.get("id") for h in found]})
        return hits


class DeploymentSandbox:
    def __init__(self, call: Call, emit: Emit):
        self.call, self.emit = call, emit

    def call_many(self, calls: Sequence[Mapping]) -> list:
        results = self.call("sandbox", "call_many", [dict(c) for c in calls])
        self.emit({"type": "tool_calls", "calls": [dict(c) for c in calls],
                   "results": [r.observation() for r in results]})  # fmt: skip
        return results

    def run_program(self, code: str, tools: Sequence[str] = ()) -> Any:
        result = self.call("sandbox", "run_program", code, list(tools))
        self.emit({"type": "program", "code": code, "ok": result.ok, "stdout": result.stdout[:2000]})
        return result


@dataclass
class AgentSettings:
    """The agents' protocol configs, as the policy was trained with them (the recipe's agent config)."""

    exsearch: dict = field(default_factory=dict)
    genground: dict = field(default_factory=dict)
    conagents: dict = field(default_factory=dict)


def _steps(trajectory) -> list[dict]:
    return [{"role": s.role, "text": s.text} for s in trajectory.steps]


def run_agent(name: str, question: str, tools: list[str] | None, greedy: bool, seed: int | None, run_id: str,
              tokenizer, call: Call, submit: Callable[..., Any], emit: Emit, settings: AgentSettings,
              tool_specs: Callable[[], list[dict]]) -> dict:  # fmt: skip
    """One run of agent `name` on `question`; returns the answer, finish reason, step trace and token usage."""
    generator = DeploymentGenerator(submit, emit)
    if name in SEARCH_AGENTS:
        searcher = DeploymentSearcher(call, emit)
        if name == "exsearch":
            from agents.exsearch import ExSearchAgent, ExSearchConfig

            agent = ExSearchAgent(generator, searcher, tokenizer, ExSearchConfig(**settings.exsearch))
        else:
            from agents.genground import GenGroundAgent, GenGroundConfig

            agent = GenGroundAgent(generator, searcher, tokenizer, GenGroundConfig(**settings.genground))
        trajectory = agent.run([{"id": run_id, "question": question}], greedy=greedy, seed=seed)[0]
        return {"answer": trajectory.answer, "finish_reason": trajectory.finish_reason, "steps": _steps(trajectory),
                "usage": {"prompt_tokens": len(trajectory.prompt_ids),
                          "completion_tokens": int(sum(trajectory.loss_mask)),
                          "observation_tokens": len(trajectory.loss_mask) - int(sum(trajectory.loss_mask))}}  # fmt: skip
    from agents.conagents import ConAgents, ConAgentsConfig

    specs = tool_specs()
    names = tools if tools is not None else [spec["name"] for spec in specs]
    agent = ConAgents(generator, DeploymentSandbox(call, emit), specs, tokenizer, ConAgentsConfig(**settings.conagents))
    run = agent.run([{"id": run_id, "query": question, "tools": names}], greedy=greedy, seed=seed)[0]
    steps = [{"agent": role, **step} for role, t in run.trajectories.items() for step in _steps(t)]
    generated = sum(int(sum(t.loss_mask)) for t in run.trajectories.values())
    return {"answer": run.answer, "finish_reason": run.finish_reason, "steps": steps, "calls": run.calls,
            "errors": [e.to_dict() for e in run.errors],
            "usage": {"prompt_tokens": sum(len(t.prompt_ids) for t in run.trajectories.values()),
                      "completion_tokens": generated}}  # fmt: skip
