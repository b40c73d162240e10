"""A trajectory: every token an agent run produced or was shown, with who produced it.

Token-in/token-out: the ids the engine sampled are stored as they came, never re-tokenized from text, and the
environment's insertions (retrieved documents, tool output) are tokenized once, here, and kept beside them. The loss
mask is 1 exactly on the model's own tokens, so training on a trajectory never teaches the model to write documents
it was shown, and re-scoring the same ids reproduces the logprobs recorded at sampling time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Step:
    """A span [start, end) of `Trajectory.token_ids` with its role (search, record, answer, documents, ...)."""

    role: str
    start: int
    end: int
    text: str | None = None


@dataclass
class Trajectory:
    example_id: str
    prompt_ids: list[int]
    sample_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    finish_reason: str = "running"
    """`answer`, `max_steps`, `length` (context full), or `malformed: <what>`; `running` while live."""

    @property
    def done(self) -> bool:
        return self.finish_reason != "running"

    @property
    def valid(self) -> bool:
        return self.finish_reason == "answer"

    def context(self) -> list[int]:
        """What the model conditions on next: the prompt and everything so far."""
        return self.prompt_ids + self.token_ids

    def add_generated(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> tuple[int, int]:
        """Append model-sampled tokens (trained on); returns their span."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} generated tokens but {len(logprobs)} logprobs")
        start = len(self.token_ids)
        self.token_ids.extend(int(t) for t in token_ids)
        self.logprobs.extend(float(x) for x in logprobs)
        self.loss_mask.extend([1] * len(token_ids))
        return start, len(self.token_ids)

    def add_observation(self, role: str, token_ids: Sequence[int], text: str | None = None) -> Step:
        """Append tokens the environment inserted (masked out of training)."""
        start = len(self.token_ids)
        self.token_ids.extend(int(t) for t in token_ids)
        self.logprobs.extend([0.0] * len(token_ids))
        self.loss_mask.extend([0] * len(token_ids))
        step = Step(role, start, len(self.token_ids), text)
        self.steps.append(step)
        return step

    def finish(self, reason: str, answer: str | None = None) -> None:
        self.finish_reason = reason
        if answer is not None:
            self.answer = answer

    def generated_text_steps(self, role: str) -> list[str]:
        return [s.text or "" for s in self.steps if s.role == role]

    def to_record(self) -> dict:
        """A row of the Arrow `trajectory` schema (pipelines/records.py)."""
        return {
            "id": f"{self.example_id}#{self.sample_index}",
            "example_id": self.example_id,
            "sample_index": self.sample_index,
            "prompt_ids": list(self.prompt_ids),
            "token_ids": list(self.token_ids),
            "loss_mask": list(self.loss_mask),
            "logprobs": list(self.logprobs),
            "steps": [{"role": s.role, "start": s.start, "end": s.end, "text": s.text} for s in self.steps],
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "valid": self.valid,
        }


def token_spans(tokenizer, token_ids: Sequence[int], char_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Map character spans of `decode(token_ids)` to token spans covering them.

    Decoding is done prefix by prefix so the mapping follows the tokenizer's own detokenization (byte-level pieces,
    merged spaces), not a guess from token strings.
    """
    ends = []
    for i in range(len(token_ids)):
        ends.append(len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)))
    spans = []
    for c0, c1 in char_spans:
        first = next((i for i, end in enumerate(ends) if end > c0), len(ends))
        last = next((i for i, end in enumerate(ends) if end >= c1), len(ends) - 1)
        spans.append((first, last + 1))
    return spans
