"""Held-out tool-call accuracy of a policy on TTPA turn tasks: greedy calls, scored by the error-oriented scorer.

Why the TTPA scorer (`pipelines/ttpa.py` `score_calls`) and not only an exact match: the same scorer chose the
preference pairs, so the error counts here say directly whether the errors the pairs were built against fell. The
exact-match accuracies are the strict reading of the same verdicts (a turn is correct when the scorer finds no error).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.tools import ToolResult
from pipelines.ttpa import END_TAG, TTPAConfig, parse_calls, render_calls, same_value, score_calls, task_prompt


@dataclass
class CallEvaluation:
    metrics: dict[str, float]
    """`turn_accuracy` (turns with no error), `task_accuracy` (tasks whose every turn has none), `call_accuracy`
    (gold calls matched without error), `tool_accuracy` (gold calls answered by a call to the same tool, whatever its
    arguments), `score` (mean error-oriented score of a turn), `turns`, `tasks`."""
    errors: dict[str, int]
    """Error code -> how often the scorer found it over all turns (a turn can have several)."""
    rows: list[dict] = field(default_factory=list)
    """One per turn: id, the gold call text, the policy's output, its score and errors."""
    arguments: dict[str, list[int]] = field(default_factory=dict)
    """`tool.argument` -> [right, asked]: each gold argument of a call made to the right tool, judged alone. Says what
    the error codes cannot: whether the values a policy must choose (an attribute, a unit) or copy (a name, a number
    from the query or a result) are the wrong ones."""


def cached(execute: Callable[[Mapping], ToolResult]) -> Callable[[Mapping], ToolResult]:
    """Tools are deterministic: a call the policy repeats across turns and rounds runs once."""
    results: dict[str, ToolResult] = {}

    def run(call: Mapping) -> ToolResult:
        key = json.dumps(call, sort_keys=True, default=str)
        if key not in results:
            results[key] = execute(call)
        return results[key]

    return run


def evaluate_calls(turns: Sequence[Mapping], engine: Any, tokenizer: Any, specs: Mapping[str, Mapping],
                   cfg: TTPAConfig, execute: Callable[[Mapping], ToolResult] | None,
                   chunk: int = 64) -> CallEvaluation:  # fmt: skip
    """Greedy calls for every turn (`engine` is an `EnginePool`), each scored against the turn's gold calls.

    `execute` runs schema-valid calls so run-time failures count (`execution_error`); None skips execution.
    """
    from actors.llm import Sampling

    if not turns:
        raise ValueError("no turns to evaluate")
    started = time.perf_counter()
    sampling = Sampling(temperature=0, max_tokens=cfg.max_new_tokens, stop=(END_TAG,))
    prompts = [tokenizer(task_prompt(turn, specs, cfg.tool_schemas))["input_ids"] for turn in turns]
    outputs = []
    for start in range(0, len(prompts), chunk):  # bounded requests: each has the pool's deadline
        outputs += [g.completions[0].text for g in engine.generate(prompts[start : start + chunk], sampling)]
    errors: Counter = Counter()
    arguments: dict[str, list[int]] = {}
    rows, calls_right, tools_right, calls_total, by_task = [], 0, 0, 0, {}
    for turn, text in zip(turns, outputs, strict=True):
        gold = json.loads(turn["gold_calls"]) if isinstance(turn["gold_calls"], str) else list(turn["gold_calls"])
        calls, problem = parse_calls(text)
        offered = {name: specs[name] for name in turn["tools"]}
        verdict = score_calls(calls, problem, gold, offered, cfg, execute)
        errors.update(verdict.errors)
        correct = not verdict.errors
        calls_right += sum(score == 1.0 for score in verdict.per_call)
        for call, want in zip(calls, gold, strict=False):
            if call.get("name") != want["name"]:
                continue
            tools_right += 1
            given = call.get("arguments") if isinstance(call.get("arguments"), Mapping) else {}
            for key, value in (want.get("arguments") or {}).items():
                tally = arguments.setdefault(f"{want['name']}.{key}", [0, 0])
                tally[0] += key in given and same_value(given[key], value)
                tally[1] += 1
        calls_total += len(gold)
        task = turn.get("task_id", turn["id"])
        by_task[task] = by_task.get(task, True) and correct
        rows.append({"id": turn["id"], "gold": render_calls(gold), "output": text, "score": verdict.score,
                     "errors": " ".join(verdict.errors), "correct": correct})  # fmt: skip
    metrics = {
        "turn_accuracy": sum(r["correct"] for r in rows) / len(rows),
        "task_accuracy": sum(by_task.values()) / len(by_task),
        "call_accuracy": calls_right / calls_total,
        "tool_accuracy": tools_right / calls_total,
        "score": sum(r["score"] for r in rows) / len(rows),
        "turns": len(rows),
        "tasks": len(by_task),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return CallEvaluation(metrics, dict(errors.most_common()), rows, dict(sorted(arguments.items())))
