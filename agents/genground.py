"""GenGround: generate an answer from the model's own knowledge first, then ground it in retrieved documents.

Each iteration (Shi et al., 2024, "Generate-then-Ground in Retrieval-Augmented Generation for Multi-hop QA"):
(1) deduce a simpler single-hop question and answer it directly, (2) retrieve for that question and ground the answer
in the documents, a batch at a time: cite the document that supports it and revise the answer from it, or say the
batch is insufficient and see the next one. It ends at the final answer or after `max_iterations` (paper: 7).

The text protocol (tags configurable; the defaults are the tokenizer's atomic protocol tags) in one trajectory:

    Question: Where was the founder of Dravel Systems born?
    <search>Who founded Dravel Systems?</search><think>Tova Mirsen</think>        <- model: sub-question, direct answer
    <documents>[1] Dravel Systems: ... founded by Mira Tovenka ...</documents>    <- retriever, batch 1 (masked)
    <record>[1] Mira Tovenka</record>                                             <- model: citation, revised answer
    <search>Where was Mira Tovenka born?</search><think>Kalovren</think>           <- model
    <documents>[1] Kalovren Group: ...</documents>                                <- batch 1 (masked)
    <record>insufficient</record>                                                 <- model: nothing here
    <documents>[1] Mira Tovenka: ... born in Kalovren ...</documents>             <- batch 2 (masked)
    <record>[1] Kalovren</record>                                                 <- model
    <answer>Kalovren</answer>                                                     <- model: finish marker

When every batch is insufficient the direct answer stands, ungrounded, and the next iteration starts. Runs are
advanced in lock step as in ExSearch: one engine call per round for every live trajectory, whichever phase it is in
(the stop strings are the union of both phases' closing tags; each phase's parser then checks its own), and one
retriever call per round for every sub-question deduced in it. A turn the parser cannot read ends that trajectory
with a recorded reason; it never raises into the batch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agents.exsearch import Generator, Searcher, render_documents
from agents.trajectory import Step, Trajectory, token_spans


@dataclass
class GenGroundConfig:
    """Protocol tags, batching and sampling of the GenGround agent (Hydra group `agent`)."""

    prompt_template: str = "Question: {question}\n"
    question_tag: str = "search"
    """Wraps the deduced single-hop question, which is also the retrieval query."""
    guess_tag: str = "think"
    """Wraps the direct answer from the model's own knowledge, written before any evidence is seen."""
    grounding_tag: str = "record"
    """Wraps "[n] revised answer" (n cites the current batch) or the `insufficient` marker."""
    answer_tag: str = "answer"
    documents_tag: str = "documents"
    insufficient: str = "insufficient"
    max_iterations: int = 7
    """Deduce-and-ground iterations allowed before the run is cut off (`max_steps`); the paper's limit is 7."""
    docs_per_batch: int = 2
    max_batches: int = 2
    """Batches shown per sub-question; its search retrieves docs_per_batch x max_batches passages."""
    max_tokens_per_turn: int = 48
    max_context_tokens: int = 1024
    doc_chars: int = 240
    temperature: float = 0.8
    top_p: float = 0.95

    def __post_init__(self) -> None:
        for name in ("max_iterations", "docs_per_batch", "max_batches", "max_tokens_per_turn", "max_context_tokens",
                     "doc_chars"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"agent.{name} must be >= 1, got {getattr(self, name)}")

    def tag(self, name: str) -> tuple[str, str]:
        return f"<{name}>", f"</{name}>"

    def stops(self) -> tuple[str, ...]:
        return tuple(self.tag(name)[1] for name in (self.guess_tag, self.grounding_tag, self.answer_tag))


@dataclass
class Turn:
    """What the parser read from one model turn."""

    action: str  # "deduce" | "answer" | "ground" | "insufficient" | "malformed"
    argument: str = ""
    """The direct answer (deduce), the final answer (answer) or the revised answer (ground)."""
    question: str | None = None
    citation: int | None = None
    problem: str | None = None
    spans: dict[str, tuple[int, int]] | None = None  # character spans of each tagged part, by step role


def _last_tagged(text: str, open_tag: str, close_tag: str) -> tuple[str, tuple[int, int]] | str:
    """The content and span of the tagged part that ends `text`, or the problem when there is none."""
    stripped = text.rstrip()
    start = stripped.rfind(open_tag)
    if start < 0:
        return f"{close_tag} without {open_tag}"
    return stripped[start + len(open_tag) : -len(close_tag)].strip(), (start, len(stripped))


def _cut_off(finish_reason: str) -> str:
    return " within max_tokens" if finish_reason == "length" else ""


def parse_deduction(text: str, cfg: GenGroundConfig, finish_reason: str) -> Turn:
    """Read a deduce turn: "<search>q</search><think>a</think>", or the final "<answer>y</answer>"."""
    question_open, question_close = cfg.tag(cfg.question_tag)
    guess_open, guess_close = cfg.tag(cfg.guess_tag)
    answer_open, answer_close = cfg.tag(cfg.answer_tag)
    stripped = text.rstrip()
    if stripped.endswith(answer_close):
        found = _last_tagged(stripped, answer_open, answer_close)
        if isinstance(found, str):
            return Turn("malformed", problem=found)
        if not found[0]:
            return Turn("malformed", problem="empty answer")
        return Turn("answer", found[0], spans={"answer": found[1]})
    if not stripped.endswith(guess_close):
        return Turn("malformed", problem=f"no closing {guess_close} or {answer_close} tag{_cut_off(finish_reason)}")
    found = _last_tagged(stripped, guess_open, guess_close)
    if isinstance(found, str):
        return Turn("malformed", problem=found)
    guess, guess_span = found
    before = stripped[: guess_span[0]]
    match = re.search(re.escape(question_open) + r"(.*?)" + re.escape(question_close), before, flags=re.S)
    if match is None:
        return Turn("malformed", problem=f"no {question_open} sub-question before the direct answer")
    question = match.group(1).strip()
    if not question:
        return Turn("malformed", problem="empty sub-question")
    if not guess:
        return Turn("malformed", problem="empty direct answer")
    return Turn("deduce", guess, question=question,
                spans={"question": (match.start(), match.end()), "guess": guess_span})


def parse_grounding(text: str, cfg: GenGroundConfig, finish_reason: str, batch_size: int) -> Turn:
    """Read a grounding turn: "<record>[n] revised answer</record>" citing the current batch, or the insufficient
    marker."""
    ground_open, ground_close = cfg.tag(cfg.grounding_tag)
    if not text.rstrip().endswith(ground_close):
        return Turn("malformed", problem=f"no closing {ground_close} tag{_cut_off(finish_reason)}")
    found = _last_tagged(text, ground_open, ground_close)
    if isinstance(found, str):
        return Turn("malformed", problem=found)
    content, span = found
    if content.rstrip(".").strip().lower() == cfg.insufficient.lower():
        return Turn("insufficient", spans={"grounding": span})
    match = re.fullmatch(r"\[\s*(\d+)\s*\]\s*(.*)", content, flags=re.S)
    if match is None:
        return Turn("malformed", problem=f"grounding cites no document (expected [n] answer or {cfg.insufficient})")
    citation, revised = int(match.group(1)), match.group(2).strip()
    if not 1 <= citation <= batch_size:
        return Turn("malformed", problem=f"cited [{citation}] but the batch shows {batch_size} document(s)")
    if not revised:
        return Turn("malformed", problem="empty revised answer")
    return Turn("ground", revised, citation=citation, spans={"grounding": span})


def deduction_text(question: str, guess: str, cfg: GenGroundConfig) -> str:
    question_open, question_close = cfg.tag(cfg.question_tag)
    guess_open, guess_close = cfg.tag(cfg.guess_tag)
    return f"{question_open}{question}{question_close}{guess_open}{guess}{guess_close}"


def grounding_text(citation: int | None, answer: str, cfg: GenGroundConfig) -> str:
    """A grounding turn: "[n] answer" when citing, the insufficient marker when `citation` is None."""
    ground_open, ground_close = cfg.tag(cfg.grounding_tag)
    body = cfg.insufficient if citation is None else f"[{citation}] {answer}"
    return f"{ground_open}{body}{ground_close}"


def answer_text(answer: str, cfg: GenGroundConfig) -> str:
    answer_open, answer_close = cfg.tag(cfg.answer_tag)
    return f"{answer_open}{answer}{answer_close}"


@dataclass
class _Progress:
    """Where one run is between turns: the phase, iterations used, and the batches of the current sub-question."""

    phase: str = "deduce"  # "deduce" | "ground"
    iterations: int = 0
    batches: list[list[dict]] = field(default_factory=list)
    batch: int = 0


class GenGroundAgent:
    """Runs GenGround trajectories against a generator (engine) and a searcher (retriever)."""

    def __init__(self, generator: Generator, searcher: Searcher, tokenizer, cfg: GenGroundConfig | None = None):
        self.generator, self.searcher, self.tokenizer = generator, searcher, tokenizer
        self.cfg = cfg or GenGroundConfig()

    def prompt_ids(self, question: str) -> list[int]:
        return list(self.tokenizer(self.cfg.prompt_template.format(question=question))["input_ids"])

    def sampling(self, greedy: bool = False, seed: int | None = None):
        from actors.llm import Sampling

        cfg = self.cfg
        return Sampling(n=1, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
                        max_tokens=cfg.max_tokens_per_turn, stop=cfg.stops(), seed=seed)

    def run(self, examples: Sequence[dict], samples: int = 1, greedy: bool = False,
            seed: int | None = None) -> list[Trajectory]:
        """`samples` trajectories per example ({"id", "question"}), all advanced together, in example order."""
        cfg = self.cfg
        trajectories = [
            Trajectory(example["id"], self.prompt_ids(example["question"]), sample_index=k)
            for example in examples
            for k in range(samples)
        ]
        progress = {id(t): _Progress() for t in trajectories}
        round_index = 0
        while True:
            for t in trajectories:
                if not t.done and len(t.context()) + cfg.max_tokens_per_turn > cfg.max_context_tokens:
                    t.finish("length")
            live = [t for t in trajectories if not t.done]
            if not live:
                return trajectories
            sampling = self.sampling(greedy, None if seed is None else seed + round_index)
            generations = self.generator.generate([t.context() for t in live], sampling)
            round_index += 1
            pending: list[tuple[Trajectory, str]] = []
            for t, generation in zip(live, generations, strict=True):
                completion = generation.completions[0]
                state = progress[id(t)]
                if state.phase == "deduce":
                    turn = parse_deduction(completion.text, cfg, completion.finish_reason)
                else:
                    shown = len(state.batches[state.batch])
                    turn = parse_grounding(completion.text, cfg, completion.finish_reason, shown)
                self._record_turn(t, completion, turn)
                if turn.action == "malformed":
                    t.finish(f"malformed: {turn.problem}")
                elif turn.action == "answer":
                    t.finish("answer", turn.argument)
                elif turn.action == "deduce":
                    if state.iterations >= cfg.max_iterations:
                        t.finish("max_steps")
                    else:
                        state.iterations += 1
                        pending.append((t, turn.question or ""))
                elif turn.action == "insufficient" and state.batch + 1 < len(state.batches):
                    state.batch += 1
                    self._show_batch(t, state)
                else:  # grounded, or every batch insufficient: the direct answer stands
                    state.phase = "deduce"
            if pending:
                results = self.searcher.search([query for _, query in pending], cfg.docs_per_batch * cfg.max_batches)
                for (t, _), hits in zip(pending, results, strict=True):
                    state = progress[id(t)]
                    state.batches = [list(hits[i : i + cfg.docs_per_batch])
                                     for i in range(0, len(hits), cfg.docs_per_batch)] or [[]]
                    state.batch, state.phase = 0, "ground"
                    self._show_batch(t, state)

    def _show_batch(self, t: Trajectory, state: _Progress) -> None:
        hits = state.batches[state.batch]
        ids = self.tokenizer(render_documents(hits, self.cfg), add_special_tokens=False)["input_ids"]
        t.add_observation(self.cfg.documents_tag, ids, "\n".join(str(h.get("id")) for h in hits))

    def _record_turn(self, t: Trajectory, completion, turn: Turn) -> None:
        start, end = t.add_generated(completion.token_ids, completion.logprobs)
        if not turn.spans:
            t.steps.append(Step("malformed", start, end, completion.text))
            return
        parts = sorted(turn.spans.items(), key=lambda item: item[1][0])
        spans = token_spans(self.tokenizer, completion.token_ids, [span for _, span in parts])
        grounding = self.cfg.insufficient if turn.action == "insufficient" else f"[{turn.citation}] {turn.argument}"
        texts = {"question": turn.question, "guess": turn.argument, "answer": turn.argument, "grounding": grounding}
        for (role, _), (a, b) in zip(parts, spans, strict=True):
            t.steps.append(Step(role, start + a, start + b, texts[role]))


def hops(trajectory: Trajectory, cfg: GenGroundConfig) -> list[dict]:
    """Per deduced sub-question: {question, guess, shown (doc ids per batch), cited (doc id or None), answer}.

    `answer` is the revised answer when a document was cited, else the direct answer (ungrounded).
    """
    out: list[dict] = []
    for step in trajectory.steps:
        if step.role == "question":
            out.append({"question": step.text, "guess": None, "shown": [], "cited": None, "answer": None})
        elif not out:
            continue
        elif step.role == "guess":
            out[-1]["guess"] = out[-1]["answer"] = step.text
        elif step.role == cfg.documents_tag:
            out[-1]["shown"].append([i for i in (step.text or "").split("\n") if i])
        elif step.role == "grounding" and step.text != cfg.insufficient:
            match = re.fullmatch(r"\[(\d+)\] (.*)", step.text or "", flags=re.S)
            if match and out[-1]["shown"]:
                out[-1]["cited"] = out[-1]["shown"][-1][int(match.group(1)) - 1]
                out[-1]["answer"] = match.group(2)
    return out


def grounding_examples(question_record: dict, documents_by_id: dict[str, dict], noise_docs: Sequence[dict],
                       rng: random.Random, cfg: GenGroundConfig | None = None,
                       insufficient: bool = False) -> list[dict]:
    """Instructional grounding distillation data: per hop, the agent's context up to a grounding turn and its target.

    Each hop shows one batch: the gold passage among docs_per_batch - 1 noise passages (never a supporting passage of
    the question) at a random position, after a deduce turn whose direct answer is the gold one or a noise title
    (so the target must be read from the document, not copied from the guess). The target cites the gold passage
    and states the hop's answer. Earlier hops appear grounded, exactly as the agent renders them, so the prompt is
    what the model will see at that turn. With `insufficient`, each hop also gets a batch of noise alone whose target
    is the insufficient marker.
    """
    cfg = cfg or GenGroundConfig()
    qid = question_record["id"]
    supporting = {step["passage_id"] for step in question_record["decomposition"]}
    pool = [doc for doc in noise_docs if doc["id"] not in supporting]
    need = cfg.docs_per_batch if insufficient else cfg.docs_per_batch - 1
    if len(pool) < need:
        raise ValueError(f"question {qid}: {len(pool)} noise documents outside its supporting passages, need {need}")
    context = cfg.prompt_template.format(question=question_record["question"])
    examples = []
    for hop, step in enumerate(question_record["decomposition"]):
        gold = documents_by_id.get(step["passage_id"])
        if gold is None:
            raise ValueError(f"question {qid}, hop {hop}: passage {step['passage_id']!r} is not in documents_by_id")
        noise = rng.sample(pool, cfg.docs_per_batch - 1)
        batch = list(noise)
        position = rng.randrange(len(batch) + 1)
        batch.insert(position, gold)
        guess = step["answer"] if not noise or rng.random() < 0.5 else rng.choice(noise)["title"]
        context += deduction_text(step["question"], guess, cfg)
        if insufficient:
            only_noise = rng.sample(pool, cfg.docs_per_batch)
            examples.append({"id": f"{qid}#ground{hop}-insufficient", "example_id": qid, "hop": hop,
                             "prompt": context + render_documents(only_noise, cfg),
                             "target": grounding_text(None, "", cfg), "documents": [d["id"] for d in only_noise],
                             "cited": None, "passage_id": None})  # fmt: skip
        context += render_documents(batch, cfg)
        target = grounding_text(position + 1, step["answer"], cfg)
        examples.append({"id": f"{qid}#ground{hop}", "example_id": qid, "hop": hop, "prompt": context,
                         "target": target, "documents": [d["id"] for d in batch], "cited": position + 1,
                         "passage_id": gold["id"]})  # fmt: skip
        context += target
    return examples
