"""`task=toolcall predictions=agent`: the configured policy writes the calls, in agents/toolcall.py's format.

Each question becomes one chat turn (the user's request, the offered tools in the system message) rendered by
`agents.toolcall.render_chat`, the format every tool agent and the Serve chat endpoint use; the policy answers
greedily until `</calls>`, and `agents.toolcall.parse_calls` reads its text. So the accuracy measured here is the one
the same policy would get behind the chat endpoint. A prompt longer than the engine allows is retried without tool
descriptions and, if still too long, scored as malformed with the reason (never silently dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actors.tools import ToolExample
from pipelines.toolcall_check import Prediction


def prompt_ids(example: ToolExample, tokenizer: Any, budget: int) -> tuple[list[int] | None, str]:
    """The question's prompt tokens within `budget` (None if even the description-less form is longer), and text."""
    from agents.toolcall import render_chat

    messages = [{"role": "user", "content": example.query}]
    text = ""
    for descriptions in (True, False):
        text = render_chat(messages, example.tools, tokenizer, descriptions=descriptions)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) <= budget:
            return ids, text
    return None, text


def agent_predictions(examples: Sequence[ToolExample], engine: Any, max_new_tokens: int,
                      batch_size: int = 16) -> tuple[dict[str, Prediction], list[dict]]:  # fmt: skip
    """question id -> the policy's Prediction, and one {"id", "text"} row per question (a predictions file: scoring
    it again with `predictions=<file>` gives the same verdicts)."""
    from actors.llm import Sampling
    from agents.toolcall import CALLS_CLOSE, parse_calls

    sampling = Sampling(temperature=0.0, max_tokens=max_new_tokens, stop=(CALLS_CLOSE,))
    budget = engine.max_model_len - max_new_tokens
    predictions: dict[str, Prediction] = {}
    rows: list[dict] = []
    prompts: list[tuple[ToolExample, list[int]]] = []
    for example in examples:
        ids, _ = prompt_ids(example, engine.tokenizer, budget)
        if ids is None:
            predictions[example.id] = Prediction([], f"the prompt (tools and request) exceeds the engine's "
                                                     f"max_model_len={engine.max_model_len} minus {max_new_tokens}")
            rows.append({"id": example.id, "text": "", "problem": predictions[example.id].problem})
        else:
            prompts.append((example, ids))
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generations = engine.generate([ids for _, ids in batch], sampling)
        for (example, _), generation in zip(batch, generations, strict=True):
            text = generation.completions[0].text
            parsed = parse_calls(text, example.tools)
            problem = "; ".join(f"{e.code}: {e.message}" for e in parsed.errors) or None
            predictions[example.id] = Prediction([call.as_call() for call in parsed.calls], problem)
            rows.append({"id": example.id, "text": text})
    return predictions, rows
