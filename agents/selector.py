"""DRO's listwise selector: the model orders N retrieved documents, and the generator answers from its top k.

Two trajectories per sample, in the same token-in/token-out form as ExSearch:

    selector   Question: Where was the founder of Dravel Systems born?                      <- prompt
               <documents>[1] Kalovren: ... [2] Dravel Systems: ... [3] Mira Tovenka: ...</documents>
               Ranking:                                                              <- shown (masked)
                [2] > [3]\n                                                          <- model: z, the permutation
    generator  Question: Where was the founder of Dravel Systems born?                      <- prompt
               <documents>[1] Dravel Systems: ... [2] Mira Tovenka: ...</documents>  <- z's documents (masked)
               <answer>Kalovren</answer>                                             <- model

The E-step needs two numbers per sampled permutation z of example x (ARCHITECTURE.md, "one idea"):
log p(z | x), the sum of the sampling logprobs over the permutation turn (`Selection.permutation_logprob`, or the
engine's `score` of `permutation_scoring_pair`), and log p(y | x, z), the engine's `score` of
`generator_scoring_pair` summed. The weights are a softmax over the distinct permutations of one example
(`dedupe_permutations`: duplicates share log p(y | x, z), so they are merged and counted rather than scored twice).

Batched like ExSearch: `select` sends every sample of every example to the engine in one call (after one retriever
call for the examples that bring no candidates), and `answer` sends every valid selection to the generator in one
call. A permutation the parser cannot use ends that sample with a recorded `finish_reason`; it never raises.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agents.exsearch import Generator, Searcher, render_documents
from agents.trajectory import Step, Trajectory, token_spans

_ITEM = re.compile(r"\[([^\[\]]*)\]")


@dataclass
class SelectorConfig:
    """Prompts, protocol and sampling of the DRO selector and its generator (Hydra group `agent`)."""

    n_docs: int = 5
    """Candidates shown to the selector, labelled [1]..[N] in retrieval order."""
    k: int = 3
    """Documents kept from the front of the permutation and handed to the generator."""
    selector_template: str = "Question: {question}\n"
    ranking_cue: str = "Ranking:"
    """Shown after the documents (masked); the model continues with " [a] > [b] > ..." and the stop string."""
    ranking_stop: str = "\n"
    """Ends the permutation turn; a turn cut off by max tokens before it is malformed."""
    generator_template: str = "Question: {question}\n"
    documents_tag: str = "documents"
    answer_tag: str = "answer"
    doc_chars: int = 240
    """Characters of each passage shown, to the selector and to the generator alike."""
    max_ranking_tokens: int = 32
    max_answer_tokens: int = 32
    max_context_tokens: int = 1024
    temperature: float = 0.8
    """Selector sampling: the E-step needs diverse permutations."""
    top_p: float = 0.95
    answer_temperature: float = 0.8
    """Generator sampling when `answer(greedy=False)`."""

    def __post_init__(self) -> None:
        for name in ("n_docs", "k", "doc_chars", "max_ranking_tokens", "max_answer_tokens", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"agent.{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.n_docs:
            raise ValueError(f"agent.k={self.k} exceeds agent.n_docs={self.n_docs}")
        if not self.ranking_stop:
            raise ValueError("agent.ranking_stop must be a non-empty stop string")

    def tag(self, name: str) -> tuple[str, str]:
        return f"<{name}>", f"</{name}>"


@dataclass
class Selection:
    """One sampled permutation of one example: the selector's trajectory, what it kept, and the generator's answer."""

    question: str
    documents: list[dict]
    """The N candidates in the order shown: `[i]` is `documents[i - 1]`."""
    trajectory: Trajectory
    ranking: list[int] = field(default_factory=list)
    """Valid, distinct 1-based labels in the model's order, at most k; empty unless the sample is valid."""
    invalid: list[str] = field(default_factory=list)
    """Labels the model wrote that name no shown document ("0", "9" of 5, "x"), as written."""
    answer_trajectory: Trajectory | None = None

    @property
    def example_id(self) -> str:
        return self.trajectory.example_id

    @property
    def sample_index(self) -> int:
        return self.trajectory.sample_index

    @property
    def valid(self) -> bool:
        return self.trajectory.valid

    @property
    def selected(self) -> list[dict]:
        return [self.documents[i - 1] for i in self.ranking]

    @property
    def selected_ids(self) -> list[str]:
        return [str(doc.get("id")) for doc in self.selected]

    @property
    def permutation_logprob(self) -> float:
        """log p(z | x): the sampling logprobs of the permutation turn (its only model tokens), summed."""
        return float(sum(lp for lp, m in zip(self.trajectory.logprobs, self.trajectory.loss_mask, strict=True) if m))

    @property
    def answer(self) -> str | None:
        return self.answer_trajectory.answer if self.answer_trajectory is not None else None


def parse_permutation(text: str, n_docs: int, k: int) -> tuple[list[int], list[str], str | None]:
    """Read "[a] > [b] > ..." into (labels, invalid labels, problem); never raises.

    Lenient about separators (RankGPT reads any list of labels), strict about labels: a repeated label keeps its first
    place, a label that is not an integer in 1..n_docs is recorded as invalid and skipped, and the first k valid
    labels are kept. No bracketed label at all is an empty permutation; labels but none valid is a problem too.
    """
    labels, invalid = [], []
    items = [item.strip() for item in _ITEM.findall(text)]
    if not items:
        return [], [], "empty permutation"
    for item in items:
        if not item.isdigit() or not 1 <= int(item) <= n_docs:
            invalid.append(item)
        elif int(item) not in labels:
            labels.append(int(item))
    if not labels:
        return [], invalid, f"no valid document label among {', '.join(f'[{i}]' for i in invalid)} (of {n_docs})"
    return labels[:k], invalid, None


def parse_answer(text: str, cfg: SelectorConfig, finish_reason: str) -> tuple[str, tuple[int, int], str | None]:
    """(answer, character span of the tagged answer, problem) of a generator turn ending "<answer>y</answer>"."""
    answer_open, answer_close = cfg.tag(cfg.answer_tag)
    stripped = text.rstrip()
    if not stripped.endswith(answer_close):
        return "", (0, 0), f"no closing answer tag{' within max_tokens' if finish_reason == 'length' else ''}"
    start = stripped.rfind(answer_open)
    if start < 0:
        return "", (0, 0), f"{answer_close} without {answer_open}"
    answer = stripped[start + len(answer_open) : -len(answer_close)].strip()
    if not answer:
        return "", (0, 0), "empty answer"
    return answer, (start, len(stripped)), None


def format_permutation(labels: Sequence[int]) -> str:
    return " > ".join(f"[{i}]" for i in labels)


def merge_candidates(per_query_hits: Sequence[Sequence[dict]], n_docs: int) -> list[dict]:
    """Round-robin over the queries' rankings (first hits of every query, then second hits, ...), distinct by id.

    With one query per hop, each hop's best passage is among the first (number of queries) candidates.
    """
    seen, out = set(), []
    depth = max((len(hits) for hits in per_query_hits), default=0)
    for rank in range(depth):
        for hits in per_query_hits:
            if rank < len(hits) and hits[rank].get("id") not in seen:
                seen.add(hits[rank].get("id"))
                out.append(hits[rank])
    return out[:n_docs]


def render_ranking_observation(documents: Sequence[dict], cfg: SelectorConfig) -> str:
    """What the selector is shown after its prompt: the numbered candidates, then the cue for the permutation."""
    return render_documents(documents, cfg) + cfg.ranking_cue


def generator_prompt_parts(question: str, selected_docs: Sequence[dict], tokenizer,
                           cfg: SelectorConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, documents ids) of the generator: the question, then the selected documents in selected order.

    Tokenized in two pieces, exactly as the generator trajectory holds them (prompt, then a masked observation), so
    `generator_scoring_pair` scores the same ids the generator conditioned on.
    """
    prompt = list(tokenizer(cfg.generator_template.format(question=question))["input_ids"])
    documents = list(tokenizer(render_documents(selected_docs, cfg), add_special_tokens=False)["input_ids"])
    return prompt, documents


def generator_scoring_pair(question: str, selected_docs: Sequence[dict], gold: str, tokenizer,
                           cfg: SelectorConfig) -> tuple[list[int], list[int]]:
    """(context, continuation) whose `score` summed is log p(y | x, z): the gold answer given the selected documents."""
    prompt, documents = generator_prompt_parts(question, selected_docs, tokenizer, cfg)
    answer_open, answer_close = cfg.tag(cfg.answer_tag)
    continuation = list(tokenizer(f"{answer_open}{gold}{answer_close}", add_special_tokens=False)["input_ids"])
    return prompt + documents, continuation


def permutation_scoring_pair(selection: Selection) -> tuple[list[int], list[int]]:
    """(context, continuation) whose `score` summed is log p(z | x) under whatever weights the engine now holds."""
    t = selection.trajectory
    turn = next((s for s in t.steps if s.role in ("ranking", "malformed")), None)
    if turn is None:
        raise ValueError(f"selection {t.example_id}#{t.sample_index} has no permutation turn ({t.finish_reason})")
    return t.prompt_ids + t.token_ids[: turn.start], t.token_ids[turn.start : turn.end]


def dedupe_permutations(selections: Sequence[Selection]) -> list[tuple[Selection, int]]:
    """The distinct valid permutations per example, each with how many samples drew it, in first-drawn order.

    Identity is the selected documents in order (what the generator sees), so two samples that wrote the same
    permutation with different spacing merge too; the first one's trajectory represents them. Invalid samples select
    nothing the generator could score and are left out.
    """
    counts: dict[tuple[str, tuple[str, ...]], list] = {}
    for selection in selections:
        if not selection.valid:
            continue
        key = (selection.example_id, tuple(selection.selected_ids))
        if key in counts:
            counts[key][1] += 1
        else:
            counts[key] = [selection, 1]
    return [(selection, count) for selection, count in counts.values()]


class SelectorAgent:
    """Samples permutations with a selector engine and answers from them with a generator engine (may be the same)."""

    def __init__(self, engine: Generator, searcher: Searcher | None, tokenizer, cfg: SelectorConfig | None = None,
                 generator_engine: Generator | None = None):
        self.engine, self.searcher, self.tokenizer = engine, searcher, tokenizer
        self.generator_engine = generator_engine or engine
        self.cfg = cfg or SelectorConfig()

    def _sampling(self, stop: str, max_tokens: int, temperature: float, greedy: bool, seed: int | None):
        from actors.llm import Sampling

        return Sampling(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else self.cfg.top_p,
                        max_tokens=max_tokens, stop=(stop,), seed=seed)

    def candidates(self, examples: Sequence[dict]) -> list[list[dict]]:
        """The N documents per example: its own `documents` if given, else one batched search over its `queries`
        (default: the question), merged round-robin."""
        cfg = self.cfg
        need = [e for e in examples if e.get("documents") is None]
        queries = [(index, query) for index, e in enumerate(need) for query in (e.get("queries") or [e["question"]])]
        per_example: list[list[list[dict]]] = [[] for _ in need]
        if queries:
            if self.searcher is None:
                raise ValueError(f"example {need[0]['id']!r} brings no documents and the agent has no searcher")
            results = self.searcher.search([query for _, query in queries], cfg.n_docs)
            for (index, _), hits in zip(queries, results, strict=True):
                per_example[index].append(hits)
        merged = iter([merge_candidates(hits, cfg.n_docs) for hits in per_example])
        return [list(e["documents"])[: cfg.n_docs] if e.get("documents") is not None else next(merged)
                for e in examples]

    def select(self, examples: Sequence[dict], samples: int = 1, greedy: bool = False,
               seed: int | None = None) -> list[Selection]:
        """`samples` permutations per example ({"id", "question"}, optional "documents" or "queries"), in example
        order, from one engine call."""
        cfg = self.cfg
        selections = []
        for example, documents in zip(examples, self.candidates(examples), strict=True):
            prompt = list(self.tokenizer(cfg.selector_template.format(question=example["question"]))["input_ids"])
            observation = render_ranking_observation(documents, cfg)
            shown = list(self.tokenizer(observation, add_special_tokens=False)["input_ids"])
            for k in range(samples):
                t = Trajectory(example["id"], list(prompt), sample_index=k)
                t.add_observation(cfg.documents_tag, shown, "\n".join(str(d.get("id")) for d in documents))
                if not documents:
                    t.finish("malformed: no documents to rank")
                elif len(t.context()) + cfg.max_ranking_tokens > cfg.max_context_tokens:
                    t.finish("length")
                selections.append(Selection(example["question"], list(documents), t))
        live = [s for s in selections if not s.trajectory.done]
        if not live:
            return selections
        sampling = self._sampling(cfg.ranking_stop, cfg.max_ranking_tokens, cfg.temperature, greedy, seed)
        generations = self.engine.generate([s.trajectory.context() for s in live], sampling)
        for selection, generation in zip(live, generations, strict=True):
            self._record_permutation(selection, generation.completions[0])
        return selections

    def _record_permutation(self, selection: Selection, completion) -> None:
        cfg, t = self.cfg, selection.trajectory
        start, end = t.add_generated(completion.token_ids, completion.logprobs)
        if completion.finish_reason == "length" and cfg.ranking_stop not in completion.text:
            t.steps.append(Step("malformed", start, end, completion.text))
            t.finish(f"malformed: no {cfg.ranking_stop!r} within max_tokens")
            return
        text = completion.text.split(cfg.ranking_stop)[0]
        labels, invalid, problem = parse_permutation(text, len(selection.documents), cfg.k)
        selection.invalid = invalid
        if problem is not None:
            t.steps.append(Step("malformed", start, end, completion.text))
            t.finish(f"malformed: {problem}")
            return
        selection.ranking = labels
        ranking = format_permutation(labels)
        t.steps.append(Step("ranking", start, end, ranking))
        if invalid:
            t.steps.append(Step("invalid", start, end, " ".join(f"[{i}]" for i in invalid)))
        t.finish("answer", ranking)

    def answer(self, selections: Sequence[Selection], greedy: bool = True, seed: int | None = None) -> list[Selection]:
        """The generator's answer from each valid selection's documents (in selected order), from one engine call."""
        cfg = self.cfg
        pending = []
        for selection in selections:
            if not selection.valid:
                continue
            prompt, documents = generator_prompt_parts(selection.question, selection.selected, self.tokenizer, cfg)
            t = Trajectory(selection.example_id, prompt, sample_index=selection.sample_index)
            t.add_observation(cfg.documents_tag, documents, "\n".join(selection.selected_ids))
            selection.answer_trajectory = t
            if len(t.context()) + cfg.max_answer_tokens > cfg.max_context_tokens:
                t.finish("length")
            else:
                pending.append(t)
        if pending:
            sampling = self._sampling(cfg.tag(cfg.answer_tag)[1], cfg.max_answer_tokens, cfg.answer_temperature,
                                      greedy, seed)
            generations = self.generator_engine.generate([t.context() for t in pending], sampling)
            for t, generation in zip(pending, generations, strict=True):
                self._record_answer(t, generation.completions[0])
        return list(selections)

    def _record_answer(self, t: Trajectory, completion) -> None:
        start, end = t.add_generated(completion.token_ids, completion.logprobs)
        answer, span, problem = parse_answer(completion.text, self.cfg, completion.finish_reason)
        if problem is not None:
            t.steps.append(Step("malformed", start, end, completion.text))
            t.finish(f"malformed: {problem}")
            return
        [(a, b)] = token_spans(self.tokenizer, completion.token_ids, [span])
        t.steps.append(Step("answer", start + a, start + b, answer))
        t.finish("answer", answer)

    def run(self, examples: Sequence[dict], samples: int = 1, greedy: bool = False, greedy_answer: bool = True,
            seed: int | None = None) -> list[Selection]:
        """Select, then answer: two engine calls for the whole batch."""
        selections = self.select(examples, samples, greedy, seed)
        return self.answer(selections, greedy_answer, None if seed is None else seed + 1)

