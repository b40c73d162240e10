"""ExSearch: the agent thinks of a sub-query, searches, records the evidence it keeps, and repeats until it answers.

The text protocol (tags configurable) in one trajectory:

    Question: Where was the founder of Dravel Systems born?
    <search>Who founded Dravel Systems?</search>                         <- model
    <documents>[1] Dravel Systems: ... founded by Mira Tovenka ...</documents>   <- retriever (masked)
    <record>Mira Tovenka</record><search>Where was Mira Tovenka born?</search>  <- model
    <documents>[1] Mira Tovenka: ... born in Kalovren ...</documents>      <- retriever (masked)
    <record>Kalovren</record><answer>Kalovren</answer>                   <- model

Every model turn ends at a closing `search` or `answer` tag (stop strings), so one engine call per hop. Runs are
advanced in lock step: each round sends every live trajectory's context to the engine in one batch and every
pending query to the retriever in one batch, so a batch of questions costs (hops) engine calls, not (questions x hops).
A turn the parser cannot read ends that trajectory with a recorded reason; it never raises into the batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agents.trajectory import Trajectory, token_spans


class Generator(Protocol):
    """What an agent needs from an engine: `EnginePool`, an `LLMEngine` wrapper, or a scripted test double."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list: ...


class Searcher(Protocol):
    def search(self, queries: Sequence[str], k: int) -> list[list[dict]]: ...


@dataclass
class ExSearchConfig:
    """Protocol tags, prompt and sampling of the ExSearch agent (Hydra group `agent`)."""

    prompt_template: str = "Question: {question}\n"
    search_tag: str = "search"
    record_tag: str = "record"
    answer_tag: str = "answer"
    think_tag: str = "think"
    documents_tag: str = "documents"
    max_steps: int = 4
    """Searches allowed before the run is cut off (`max_steps`)."""
    top_k: int = 2
    max_tokens_per_turn: int = 48
    max_context_tokens: int = 1024
    doc_chars: int = 240
    """Characters of each retrieved passage shown to the model."""
    temperature: float = 0.8
    top_p: float = 0.95

    def tag(self, name: str) -> tuple[str, str]:
        return f"<{name}>", f"</{name}>"


@dataclass
class Turn:
    """What the parser read from one model turn."""

    action: str  # "search" | "answer" | "malformed"
    argument: str = ""
    record: str | None = None
    think: str | None = None
    problem: str | None = None
    spans: dict[str, tuple[int, int]] | None = None  # character spans of each tagged part


def _between(text: str, open_tag: str, close_tag: str) -> tuple[str, tuple[int, int]] | None:
    match = re.search(re.escape(open_tag) + r"(.*?)" + re.escape(close_tag), text, flags=re.S)
    if match is None:
        return None
    return match.group(1).strip(), (match.start(), match.end())


def parse_turn(text: str, cfg: ExSearchConfig, finish_reason: str) -> Turn:
    """Read one model turn: optional think and record, then exactly one search or answer at the end."""
    search_open, search_close = cfg.tag(cfg.search_tag)
    answer_open, answer_close = cfg.tag(cfg.answer_tag)
    if not (text.rstrip().endswith(search_close) or text.rstrip().endswith(answer_close)):
        why = "no closing search or answer tag" + (" within max_tokens" if finish_reason == "length" else "")
        return Turn("malformed", problem=why)
    action, (open_tag, close_tag) = (
        ("answer", (answer_open, answer_close)) if text.rstrip().endswith(answer_close) else ("search", (search_open, search_close))
    )
    last_open = text.rfind(open_tag)
    if last_open < 0:
        return Turn("malformed", problem=f"{close_tag} without {open_tag}")
    argument = text[last_open + len(open_tag) : text.rfind(close_tag)].strip()
    if not argument:
        return Turn("malformed", problem=f"empty {action}")
    spans = {action: (last_open, len(text.rstrip()))}
    record = _between(text[:last_open], *cfg.tag(cfg.record_tag))
    think = _between(text[:last_open], *cfg.tag(cfg.think_tag))
    if record:
        spans["record"] = record[1]
    if think:
        spans["think"] = think[1]
    return Turn(action, argument, record[0] if record else None, think[0] if think else None, spans=spans)


def render_documents(hits: Sequence[dict], cfg: ExSearchConfig) -> str:
    """The observation the retriever's hits become: numbered passages inside the documents tag."""
    open_tag, close_tag = cfg.tag(cfg.documents_tag)
    lines = [f"[{i + 1}] {hit.get('title') or ''}: {(hit.get('text') or '')[: cfg.doc_chars]}" for i, hit in enumerate(hits)]
    return f"\n{open_tag}\n" + "\n".join(lines) + f"\n{close_tag}\n"


class ExSearchAgent:
    """Runs ExSearch trajectories against a generator (engine) and a searcher (retriever)."""

    def __init__(self, generator: Generator, searcher: Searcher, tokenizer, cfg: ExSearchConfig | None = None):
        self.generator, self.searcher, self.tokenizer = generator, searcher, tokenizer
        self.cfg = cfg or ExSearchConfig()

    def prompt_ids(self, question: str) -> list[int]:
        return list(self.tokenizer(self.cfg.prompt_template.format(question=question))["input_ids"])

    def sampling(self, greedy: bool = False, seed: int | None = None):
        from actors.llm import Sampling

        cfg = self.cfg
        stops = (cfg.tag(cfg.search_tag)[1], cfg.tag(cfg.answer_tag)[1])
        return Sampling(n=1, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
                        max_tokens=cfg.max_tokens_per_turn, stop=stops, seed=seed)

    def run(self, examples: Sequence[dict], samples: int = 1, greedy: bool = False,
            seed: int | None = None) -> list[Trajectory]:
        """`samples` trajectories per example ({"id", "question"}), all advanced together, in example order."""
        trajectories = [
            Trajectory(example["id"], self.prompt_ids(example["question"]), sample_index=k)
            for example in examples
            for k in range(samples)
        ]
        searches = {id(t): 0 for t in trajectories}
        round_index = 0
        while True:
            live = [t for t in trajectories if not t.done]
            if not live:
                return trajectories
            for t in live:
                if len(t.context()) + self.cfg.max_tokens_per_turn > self.cfg.max_context_tokens:
                    t.finish("length")
            live = [t for t in live if not t.done]
            if not live:
                return trajectories
            sampling = self.sampling(greedy, None if seed is None else seed + round_index)
            generations = self.generator.generate([t.context() for t in live], sampling)
            round_index += 1
            pending: list[tuple[Trajectory, str]] = []
            for t, generation in zip(live, generations, strict=True):
                completion = generation.completions[0]
                turn = parse_turn(completion.text, self.cfg, completion.finish_reason)
                self._record_turn(t, completion, turn)
                if turn.action == "malformed":
                    t.finish(f"malformed: {turn.problem}")
                elif turn.action == "answer":
                    t.finish("answer", turn.argument)
                elif searches[id(t)] >= self.cfg.max_steps:
                    t.finish("max_steps")
                else:
                    searches[id(t)] += 1
                    pending.append((t, turn.argument))
            if pending:
                results = self.searcher.search([query for _, query in pending], self.cfg.top_k)
                for (t, _), hits in zip(pending, results, strict=True):
                    text = render_documents(hits, self.cfg)
                    ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    t.add_observation(self.cfg.documents_tag, ids, "\n".join(str(h.get("id")) for h in hits))

    def _record_turn(self, t: Trajectory, completion, turn: Turn) -> None:
        start, _ = t.add_generated(completion.token_ids, completion.logprobs)
        from agents.trajectory import Step

        if not turn.spans:
            t.steps.append(Step("malformed", start, start + len(completion.token_ids), completion.text))
            return
        parts = sorted(turn.spans.items(), key=lambda item: item[1][0])
        spans = token_spans(self.tokenizer, completion.token_ids, [span for _, span in parts])
        texts = {"search": turn.argument, "answer": turn.argument, "record": turn.record, "think": turn.think}
        for (role, _), (a, b) in zip(parts, spans, strict=True):
            t.steps.append(Step(role, start + a, start + b, texts.get(role)))


def answer_scoring_pair(trajectory: Trajectory, gold: str, tokenizer, cfg: ExSearchConfig) -> tuple[list[int], list[int]]:
    """(context, continuation) whose score is log p(gold answer | x, z): the E-step's importance weight.

    The context is the trajectory up to where its answer starts (or its whole context when it never answered), and
    the continuation is the gold answer written in the protocol, so every sample is scored on the same target.
    """
    answer_open, answer_close = cfg.tag(cfg.answer_tag)
    answers = [s for s in trajectory.steps if s.role == "answer"]
    context = trajectory.prompt_ids + trajectory.token_ids[: answers[-1].start] if answers else trajectory.context()
    continuation = list(tokenizer(f"{answer_open}{gold}{answer_close}", add_special_tokens=False)["input_ids"])
    return context, continuation


def demonstration_turns(decomposition: Sequence[dict], answer: str, cfg: ExSearchConfig) -> list[str]:
    """The model turns of a scripted ExSearch run from a gold decomposition (warm-start data and test double)."""
    search_open, search_close = cfg.tag(cfg.search_tag)
    record_open, record_close = cfg.tag(cfg.record_tag)
    answer_open, answer_close = cfg.tag(cfg.answer_tag)
    turns = []
    previous = None
    for step in decomposition:
        record = f"{record_open}{previous}{record_close}" if previous is not None else ""
        turns.append(f"{record}{search_open}{step['question']}{search_close}")
        previous = step["answer"]
    record = f"{record_open}{previous}{record_close}" if previous is not None else ""
    turns.append(f"{record}{answer_open}{answer}{answer_close}")
    return turns


def grounded(trajectory: Trajectory, question: dict, cfg: ExSearchConfig) -> bool:
    """Whether a gold run saw every hop's gold passage: the retriever returned it (by id) at that hop.

    A demonstration whose retriever missed still records the gold fact, which teaches the model to write facts it was
    not shown (memorising instead of reading); the warm start keeps grounded runs only.
    """
    seen = [set((s.text or "").split("\n")) for s in trajectory.steps if s.role == cfg.documents_tag]
    hops = question["decomposition"]
    return trajectory.valid and len(seen) >= len(hops) and all(
        step["passage_id"] in ids for step, ids in zip(hops, seen, strict=False))


class DemonstrationPolicy:
    """A scripted policy that writes the gold run of each question: the warm start's demonstrations.

    It plays the model's part only — the retriever, the observations and the trajectory bookkeeping are the real
    agent's — so a demonstration has exactly the token layout (and the retrieved passages) a sampled run would have.
    Questions are recognised by their prompt; the turn to write is chosen by the searches already made.
    """

    def __init__(self, tokenizer, questions: Sequence[dict], cfg: ExSearchConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.turns = {
            tuple(tokenizer(cfg.prompt_template.format(question=q["question"]))["input_ids"]):
                demonstration_turns(q["decomposition"], q["answers"][0], cfg)
            for q in questions
        }

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list:
        from actors.llm import Completion, Generation

        search_close = self.cfg.tag(self.cfg.search_tag)[1]
        out = []
        for ids in prompts:
            ids = list(ids)
            turns = next(t for prompt, t in self.turns.items() if tuple(ids[: len(prompt)]) == prompt)
            done = self.tokenizer.decode(ids, skip_special_tokens=True).count(search_close)
            text = turns[min(done, len(turns) - 1)]
            tokens = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            out.append(Generation(ids, [Completion(tokens, text, [0.0] * len(tokens), "stop")]))
        return out
