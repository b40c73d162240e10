"""Test doubles of the *model only* (never of our own components): scripted policies that emit fixed turns.

They prove an agent's loop logic (parsing, searching, inserting observations, stopping) independently of what a
tiny random model happens to write. Everything around them — tokenizer, retriever, trajectories — is real.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from actors.llm import Completion, Generation


class ScriptedPolicy:
    """Answers each prompt with `next_turn(decoded_context)`, tokenized by the real tokenizer."""

    def __init__(self, tokenizer, next_turn: Callable[[str], str]):
        self.tokenizer, self.next_turn = tokenizer, next_turn
        self.calls = 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling) -> list[Generation]:
        self.calls += 1
        out = []
        for ids in prompts:
            text = self.next_turn(self.tokenizer.decode(list(ids), skip_special_tokens=True))
            tokens = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            stop = next((s for s in sampling.stop if text.endswith(s)), None)
            reason = "stop" if stop else "length"
            completion = Completion(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True),
                                    [0.0] * len(tokens), reason, stop)
            out.append(Generation(list(ids), [completion]))
        return out


def exsearch_oracle(questions: dict[str, dict], cfg) -> Callable[[str], str]:
    """The next ExSearch turn of a gold run, found from the question in the context and the searches made so far."""
    from agents.exsearch import demonstration_turns

    def next_turn(context: str) -> str:
        question = re.search(r"Question: (.*)\n", context).group(1)
        record = questions[question]
        done = context.count(cfg.tag(cfg.search_tag)[1])
        return demonstration_turns(record["decomposition"], record["answers"][0], cfg)[done]

    return next_turn
