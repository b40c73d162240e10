"""360°REA: a leader splits a tool task among a crew, 360° assessments score every piece, experience accumulates.

After Gao et al., 2024 ("360°REA: Towards A Reusable Experience Accumulation with 360° Assessment for Multi-Agent
System"), on tool tasks:

1. **Leader and crew.** The leader plans the task as numbered subtasks (a subtask may name an earlier result as
   `#n`); they go round-robin to the crew agents, each of which writes the subtask's call (the function-calling
   format of `agents/toolcall.py`), sees the sandbox's answer and reports the result. The leader then aggregates the
   results into the answer.
2. **360° assessment.** Every finished subtask is assessed three ways — by the crew agent that did it (self), by
   another crew agent (peer) and by the leader — each a 1-5 score with feedback, written by the model. The weighted
   mean (`assessment_weights`) decides whether the subtask is redone (below `revise_below`, up to `max_revisions`);
   every score is kept per subtask, assessor and round (`REARun.assessments`).
3. **Dual-level experience** (`actors/experience.py`). *Local*: each assessment's feedback is stored for the running
   task, and a revision is shown the feedback most similar to its subtask. *Global*: after answering, the leader
   writes a lesson, stored with the task's mean assessed score; before a task, the lessons of the most similar
   earlier tasks are put in the leader's and the crew's prompts, and the task's own mean score is averaged into the
   score of every lesson it was given. The pool is an actor shared by concurrent agents and persisted on disk.

Trajectories (token-level, as every agent's): `leader` (plan, assessments, answer and lesson) and `crew-<k>` (calls,
reports, assessments); everything another agent or a tool said is a masked observation.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.tools import SYNTAX_ERROR, ToolError
from agents.conagents import banner, check_task, resolve_engines, tagged
from agents.toolcall import (
    parse_calls,
    render_errors,
    render_results,
    render_tools,
)
from agents.toolrun import (
    CallTools,
    ModelTurn,
    ToolAgentConfig,
    ToolRun,
    add_observation,
    add_turn,
    error_record,
    require_at_least,
    run_lockstep,
)

ROLES = ("leader", "crew")
ASSESSORS = ("self", "peer", "leader")


@dataclass
class REAConfig(ToolAgentConfig):
    """Crew, assessment and experience of 360°REA (Hydra group `agent`)."""

    role_engines: dict[str, str] = field(default_factory=lambda: {role: "policy" for role in ROLES})
    """Engine name of the leader and of the crew (every crew agent uses the crew's)."""
    crew_size: int = 2
    max_subtasks: int = 6
    max_revisions: int = 1
    """Times a subtask is redone after a low assessment."""
    revise_below: float = 3.0
    """A subtask whose weighted assessment (1-5) is below this is redone."""
    assessment_weights: dict[str, float] = field(default_factory=lambda: {"self": 0.2, "peer": 0.3, "leader": 0.5})
    global_k: int = 2
    """Lessons of similar earlier tasks put in the prompts."""
    local_k: int = 3
    """Pieces of this task's feedback shown to a revision."""
    max_context_tokens: int = 8192
    """Crew contexts hold every offered tool's schema, subtasks, revisions and assessments."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if set(self.role_engines) != set(ROLES):
            raise ValueError(f"agent.role_engines must name exactly {ROLES}, got {sorted(self.role_engines)}")
        require_at_least(self, 1, ("crew_size", "max_subtasks", "global_k", "local_k"))
        require_at_least(self, 0, ("max_revisions",))
        weights = self.assessment_weights
        if set(weights) != set(ASSESSORS) or any(w < 0 for w in weights.values()) or not sum(weights.values()):
            raise ValueError(f"agent.assessment_weights needs non-negative weights for exactly {ASSESSORS} (not all "
                             f"zero), got {dict(weights)}")  # fmt: skip


@dataclass
class REARun(ToolRun):
    """A ToolRun with what 360°REA adds: per-subtask assessments, the lessons it was given, the lesson it wrote."""

    plan: list[str] = field(default_factory=list)
    assessments: list[dict] = field(default_factory=list)
    """Per subtask and round: crew agent, each assessor's score and feedback, the weighted score."""
    given: list[str] = field(default_factory=list)
    """Ids of the global experiences in this run's prompts."""
    lesson: str | None = None
    local_id: str = ""
    """The key of this run's local experience in the pool (unique per run, so a rerun starts with none)."""


PLAN_OPEN, PLAN_CLOSE = "<plan>", "</plan>"
REPORT_OPEN, REPORT_CLOSE = "<report>", "</report>"
ASSESS_OPEN, ASSESS_CLOSE = "<assess>", "</assess>"
EXPERIENCE_OPEN, EXPERIENCE_CLOSE = "<experience>", "</experience>"
PLAN_INSTRUCTION = (f"Split the task into subtasks for the crew, one per line in {PLAN_OPEN}{PLAN_CLOSE}; a subtask "
                    "may use an earlier result as #n.")  # fmt: skip
ASSESS_INSTRUCTION = f'Score it from 1 to 5 in {ASSESS_OPEN}{{"score": n, "feedback": "..."}}{ASSESS_CLOSE}.'
FINAL_INSTRUCTION = ("Answer the task in <answer></answer>, then write one lesson for similar tasks in "
                     f"{EXPERIENCE_OPEN}{EXPERIENCE_CLOSE}.")  # fmt: skip


def parse_plan(text: str) -> list[str]:
    """Subtasks, one per non-empty line, with list numbering ("1.", "2)", "-") removed."""
    return [re.sub(r"^\s*(?:\d+[.)]|[-*])\s*", "", line).strip() for line in text.splitlines() if line.strip()]


def parse_assessment(text: str) -> tuple[int | None, str, ToolError | None]:
    """(score 1-5, feedback, None) from an assessment turn, or (None, "", typed error)."""
    body = tagged(text, ASSESS_OPEN, ASSESS_CLOSE)
    if body is None:
        return None, "", ToolError(SYNTAX_ERROR, f"no {ASSESS_OPEN}...{ASSESS_CLOSE} assessment")
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return None, "", ToolError(SYNTAX_ERROR, f"the assessment is not JSON ({error.msg})")
    score = value.get("score") if isinstance(value, dict) else None
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        return None, "", ToolError(SYNTAX_ERROR, f"the assessment's score must be an integer from 1 to 5, got {score!r}")
    return score, str(value.get("feedback") or "").strip(), None


def weighted_score(scores: Mapping[str, int | None], weights: Mapping[str, float]) -> float:
    """The weighted mean of the scores given (an assessor that wrote no valid score does not count); 0 if none."""
    given = {k: v for k, v in scores.items() if v is not None and weights.get(k, 0) > 0}
    total = sum(weights[k] for k in given)
    return round(sum(weights[k] * v for k, v in given.items()) / total, 4) if total else 0.0


def experience_lines(experiences: Sequence[Mapping], title: str) -> str:
    if not experiences:
        return ""
    return title + "\n" + "".join(f"- {e['text']} (score {e['score']:.1f})\n" for e in experiences)


@dataclass
class _Outcome:
    """One attempt at a subtask: the calls that worked, what the crew agent was shown, its report."""

    calls: list[dict] = field(default_factory=list)
    shown: str = ""
    error: ToolError | None = None
    report: str | None = None


class REAAgent:
    """Runs 360°REA on tool tasks ({"id", "query", "tools": [names]}) with a shared experience pool.

    `pool` is an `ExperiencePoolCore` or an `ExperienceClient` over the actor (same methods).
    """

    def __init__(self, engines: Any, sandbox: Any, tools: Sequence[Mapping], tokenizer: Any, pool: Any,
                 cfg: REAConfig | None = None):  # fmt: skip
        self.cfg = cfg or REAConfig()
        self.sandbox, self.tokenizer, self.pool = sandbox, tokenizer, pool
        self.specs = {spec["name"]: dict(spec) for spec in tools}
        self.engines = resolve_engines(engines, self.cfg.role_engines)
        self.rounds = 0

    def run(self, tasks: Sequence[Mapping], samples: int = 1, greedy: bool = False,
            seed: int | None = None) -> list[REARun]:  # fmt: skip
        for task in tasks:
            check_task(task, self.specs)
        pairs = [(task, k) for task in tasks for k in range(samples)]
        lessons = self.pool.query([task["query"] for task in tasks], self.cfg.global_k, "global") if tasks else []
        given = {task["id"]: found for task, found in zip(tasks, lessons, strict=True)}
        runs = [REARun(str(task["id"])) for task, _ in pairs]
        coroutines = [self._run(run, task, k, given[task["id"]]) for run, (task, k) in zip(runs, pairs, strict=True)]
        self.rounds = run_lockstep(coroutines, self.sandbox, self.cfg.decoding(greedy, seed))
        return runs

    # ---- one run ------------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def _run(self, run: REARun, task: Mapping, sample: int, lessons: list[dict]):
        cfg = self.cfg
        run.given = [e["id"] for e in lessons]
        memory = experience_lines(lessons, "Experience from similar tasks:")
        crew_names = [f"crew-{k + 1}" for k in range(cfg.crew_size)]
        tools = "\n".join(f"- {n}: {self.specs[n]['description']}" if cfg.descriptions else f"- {n}"
                          for n in task["tools"])  # fmt: skip
        leader = run.trajectory("leader", self._ids(banner("leader", task["query"]) + f"Tools:\n{tools}\nCrew: "
                                                    f"{', '.join(crew_names)}\n{memory}{PLAN_INSTRUCTION}\n"), sample)
        schemas = render_tools([self.specs[n] for n in task["tools"]], cfg.descriptions)
        crew = [run.trajectory(name, self._ids(banner(name, task["query"]) + memory + schemas + "\n"), sample)
                for name in crew_names]  # fmt: skip
        completion = yield ModelTurn(leader, self.engines["leader"], (PLAN_CLOSE,), cfg.max_program_tokens)
        if completion is None:
            return run.finish("length")
        plan = parse_plan(tagged(completion.text, PLAN_OPEN, PLAN_CLOSE) or "")
        add_turn(leader, completion, "plan" if plan else "malformed", "\n".join(plan) if plan else None)
        if not plan or len(plan) > cfg.max_subtasks:
            return run.finish(f"malformed: expected 1 to {cfg.max_subtasks} subtasks in {PLAN_OPEN}{PLAN_CLOSE}, "
                              f"got {len(plan)}")  # fmt: skip
        run.plan = plan
        run.local_id = local_id = f"{task['id']}#{sample}@{uuid.uuid4().hex[:8]}"
        results: list[str] = []
        combined: list[float] = []
        for index, subtask in enumerate(plan, 1):
            member = (index - 1) % cfg.crew_size
            outcome = None
            for revision in range(cfg.max_revisions + 1):
                feedback = self.pool.query([subtask], cfg.local_k, "local", local_id)[0] if revision else []
                outcome = yield from self._attempt(run, task, crew[member], index, subtask, results, feedback,
                                                   revision)  # fmt: skip
                if outcome is None:
                    return None
                score = yield from self._assess(run, leader, crew, member, index, subtask, outcome, revision, local_id)
                if score is None:
                    return None
                if score >= cfg.revise_below or revision == cfg.max_revisions:
                    break
            combined.append(score)
            run.calls.extend(outcome.calls)
            results.append(outcome.report or "")
        final = "; ".join(f"#{i} = {r}" for i, r in enumerate(results, 1))
        add_observation(leader, self.tokenizer, "results", f"\nResults: {final}\n{FINAL_INSTRUCTION}\n", final)
        completion = yield ModelTurn(leader, self.engines["leader"], (EXPERIENCE_CLOSE,), cfg.max_tokens_per_turn)
        if completion is None:
            return run.finish("length")
        answer = re.search(r"<answer>(.*?)</answer>", completion.text, re.S)
        lesson = tagged(completion.text, EXPERIENCE_OPEN, EXPERIENCE_CLOSE)
        add_turn(leader, completion, "answer" if answer else "malformed", answer.group(1).strip() if answer else None)
        if not answer or not answer.group(1).strip():
            return run.finish("malformed: no <answer> in the leader's final turn")
        mean = round(sum(combined) / len(combined), 4)
        if lesson:
            run.lesson = lesson
            self.pool.add([{"level": "global", "key": task["query"], "text": lesson, "score": mean,
                            "task_id": local_id, "author": "leader"}])  # fmt: skip
        if run.given:
            self.pool.update({experience: mean for experience in run.given}, assessment=local_id)
        return run.finish("answer", answer.group(1).strip())

    def _attempt(self, run: REARun, task: Mapping, t, index: int, subtask: str, results: list[str],
                 feedback: list[dict], revision: int):  # fmt: skip
        """A crew agent does one subtask: writes the call, sees the answer, reports. None if the run ended."""
        cfg = self.cfg
        known = "; ".join(f"#{i} = {r}" for i, r in enumerate(results, 1)) or "none"
        head = "Revise subtask" if revision else "Subtask"
        text = (f"\n{head} {index}: {subtask}\nKnown results: {known}\n"
                f"{experience_lines(feedback, 'Feedback:')}Write the call in <calls></calls>.\n")  # fmt: skip
        add_observation(t, self.tokenizer, "subtask", text, subtask)
        completion = yield ModelTurn(t, self.engines["crew"], ("</calls>",), cfg.max_tokens_per_turn)
        if completion is None:
            run.finish("length")
            return None
        parsed = parse_calls(completion.text, tools=task["tools"])
        add_turn(t, completion, "calls" if parsed.block and parsed.ok else "malformed")
        outcome = _Outcome()
        if not parsed.block:
            parsed.errors.append(ToolError(SYNTAX_ERROR, "no <calls> block"))
        if parsed.errors:
            outcome.error, outcome.shown = parsed.errors[0], render_errors(parsed.errors)
            run.errors.extend(parsed.errors)
            add_observation(t, self.tokenizer, "tool_error", f"\n{outcome.shown}\n", error_record(outcome.error))
        else:
            answers = yield CallTools([c.as_call() for c in parsed.calls])
            outcome.shown = render_results(zip(parsed.calls, answers, strict=True))
            failed = [r.error for r in answers if not r.ok]
            outcome.calls = [c.as_call() for c, r in zip(parsed.calls, answers, strict=True) if r.ok]
            run.errors.extend(failed)
            outcome.error = failed[0] if failed else None
            add_observation(t, self.tokenizer, "tool_error" if failed else "tool_result", f"\n{outcome.shown}\n",
                            error_record(failed[0]) if failed else json.dumps([r.output for r in answers]))  # fmt: skip
        add_observation(t, self.tokenizer, "instruction", f"Report the result in {REPORT_OPEN}{REPORT_CLOSE}.\n")
        completion = yield ModelTurn(t, self.engines["crew"], (REPORT_CLOSE,), cfg.max_tokens_per_turn)
        if completion is None:
            run.finish("length")
            return None
        outcome.report = tagged(completion.text, REPORT_OPEN, REPORT_CLOSE)
        add_turn(t, completion, "report" if outcome.report is not None else "malformed", outcome.report)
        return outcome

    def _assess(self, run: REARun, leader, crew: list, member: int, index: int, subtask: str, outcome: _Outcome,
                revision: int, local_id: str):  # fmt: skip
        """Self, peer and leader assessments of one attempt, in one round; stores their feedback as local
        experience and returns the weighted score."""
        cfg = self.cfg
        name = f"crew-{member + 1}"
        summary = f"{outcome.shown}\nReport: {outcome.report}"
        assessors = [("self", crew[member], "crew", "your"), ("leader", leader, "leader", f"{name}'s")]
        if cfg.crew_size > 1:
            assessors.insert(1, ("peer", crew[(member + 1) % cfg.crew_size], "crew", f"{name}'s"))
        turns = []
        for _, t, engine, whose in assessors:
            add_observation(t, self.tokenizer, "assessment_request",
                            f"\nAssess {whose} subtask {index}: {subtask}\n{summary}\n{ASSESS_INSTRUCTION}\n",
                            subtask)  # fmt: skip
            turns.append(ModelTurn(t, self.engines[engine], (ASSESS_CLOSE,), cfg.max_tokens_per_turn))
        completions = yield turns
        record: dict[str, Any] = {"subtask": index, "crew": name, "round": revision, "error": outcome.error.code
                                  if outcome.error else None, "feedback": {}}  # fmt: skip
        scores: dict[str, int | None] = dict.fromkeys(ASSESSORS)
        local = []
        for (kind, t, _, _), completion in zip(assessors, completions, strict=True):
            if completion is None:
                run.finish("length")
                return None
            score, feedback, error = parse_assessment(completion.text)
            add_turn(t, completion, "assessment" if error is None else "malformed")
            if error is not None:
                run.errors.append(error)
                continue
            scores[kind] = score
            record["feedback"][kind] = feedback
            if feedback:
                local.append({"level": "local", "key": subtask, "text": feedback, "score": score,
                              "task_id": local_id, "author": f"{kind}:{t.example_id.split('/')[-1]}"})  # fmt: skip
        record.update(scores)
        record["combined"] = weighted_score(scores, cfg.assessment_weights)
        run.assessments.append(record)
        if local:
            self.pool.add(local)
        return record["combined"]
