"""ExSearch against the real retriever (and, end to end, the real engine): loop logic, malformed turns, masks."""

from __future__ import annotations

import asyncio

import pytest

from actors.config import EngineConfig
from actors.llm import LLMEngineCore
from agents.exsearch import ExSearchAgent, ExSearchConfig, answer_scoring_pair, parse_turn
from pipelines import records
from tests.doubles import ScriptedPolicy, exsearch_oracle

CFG = ExSearchConfig(max_steps=5, top_k=2)


def test_scripted_policy_reaches_the_gold_answer_on_multi_hop_questions(small_world, searcher, tokenizer):
    questions = [q for q in small_world.questions("dev") if q["kind"] == "bridge" and q["hops"] in (2, 3)]
    oracle = ScriptedPolicy(tokenizer, exsearch_oracle({q["question"]: q for q in questions}, CFG))
    agent = ExSearchAgent(oracle, searcher, tokenizer, CFG)
    trajectories = agent.run([{"id": q["id"], "question": q["question"]} for q in questions])
    assert {q["hops"] for q in questions} == {2, 3}
    for q, t in zip(questions, trajectories, strict=True):
        assert t.finish_reason == "answer" and t.answer == q["answers"][0]
        assert [s.text for s in t.steps if s.role == "search"] == [d["question"] for d in q["decomposition"]]
        assert len([s for s in t.steps if s.role == "documents"]) == q["hops"]
    assert oracle.calls == max(q["hops"] for q in questions) + 1  # lock-step rounds, not one call per question


def test_masks_cover_model_tokens_and_exclude_every_observation(small_world, searcher, tokenizer):
    q = next(q for q in small_world.questions("dev") if q["hops"] == 2)
    agent = ExSearchAgent(ScriptedPolicy(tokenizer, exsearch_oracle({q["question"]: q}, CFG)), searcher, tokenizer, CFG)
    t = agent.run([{"id": q["id"], "question": q["question"]}])[0]
    observations = [s for s in t.steps if s.role == "documents"]
    for step in observations:
        assert set(t.loss_mask[step.start:step.end]) == {0}
        assert tokenizer.decode(t.token_ids[step.start:step.end]).strip().startswith("<documents>")
    masked_out = sum(s.end - s.start for s in observations)
    assert t.loss_mask.count(0) == masked_out
    model_text = tokenizer.decode([tok for tok, m in zip(t.token_ids, t.loss_mask, strict=True) if m])
    assert "<documents>" not in model_text and model_text.endswith(f"<answer>{q['answers'][0]}</answer>")
    for role in ("search", "record", "answer"):
        for step in (s for s in t.steps if s.role == role):
            assert tokenizer.decode(t.token_ids[step.start:step.end]).startswith(f"<{role}>")
    row = records.to_table([t.to_record()], "trajectory").to_pylist()[0]
    assert row["valid"] and row["answer"] == q["answers"][0]


@pytest.mark.parametrize("turn,reason", [
    ("I think the answer is", "malformed: no closing search or answer tag within max_tokens"),
    ("<search></search>", "malformed: empty search"),
    ("Kalovren</answer>", "malformed: </answer> without <answer>"),
])
def test_malformed_turns_end_the_run_with_a_reason(searcher, tokenizer, turn, reason):
    agent = ExSearchAgent(ScriptedPolicy(tokenizer, lambda context: turn), searcher, tokenizer, CFG)
    runs = agent.run([{"id": "q1", "question": "Who?"}, {"id": "q2", "question": "Where?"}])
    assert [t.finish_reason for t in runs] == [reason, reason]
    assert all(not t.valid and t.to_record()["finish_reason"] == reason for t in runs)


def test_endless_searching_stops_at_max_steps(searcher, tokenizer):
    agent = ExSearchAgent(ScriptedPolicy(tokenizer, lambda context: "<search>Who founded it?</search>"), searcher,
                          tokenizer, ExSearchConfig(max_steps=3, top_k=1))
    t = agent.run([{"id": "q", "question": "Who?"}])[0]
    assert t.finish_reason == "max_steps"
    assert len([s for s in t.steps if s.role == "documents"]) == 3


def test_parse_turn_reads_think_record_and_action():
    turn = parse_turn("<think>need founder</think><record>Mira</record><search>Where was Mira born?</search>", CFG,
                      "stop")
    assert (turn.action, turn.argument, turn.record, turn.think) == ("search", "Where was Mira born?", "Mira",
                                                                   "need founder")


def test_real_engine_trajectories_rescore_to_their_sampling_logprobs(small_world, searcher, tiny_policy):
    engine = LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512))

    class Engine:
        def generate(self, prompts, sampling):
            return asyncio.run(engine.generate(prompts, sampling))

    tokenizer = engine.backend.tokenizer
    cfg = ExSearchConfig(max_steps=2, max_tokens_per_turn=24, max_context_tokens=512)
    agent = ExSearchAgent(Engine(), searcher, tokenizer, cfg)
    questions = small_world.questions("dev")[:4]
    runs = agent.run([{"id": q["id"], "question": q["question"]} for q in questions], samples=3, seed=5)
    assert len(runs) == 12 and [t.sample_index for t in runs[:3]] == [0, 1, 2]
    records.to_table([t.to_record() for t in runs], "trajectory")  # schema-valid whatever the random model wrote
    for t in runs:
        generated = [i for i, m in enumerate(t.loss_mask) if m]
        assert generated, "every run has at least one model turn"
        rescored = asyncio.run(engine.score([(t.prompt_ids, t.token_ids)]))[0]
        assert max(abs(rescored[i] - t.logprobs[i]) for i in generated) < 1e-4
        context, continuation = answer_scoring_pair(t, "Kalovren", tokenizer, cfg)
        assert tokenizer.decode(continuation) == "<answer>Kalovren</answer>" and context[: len(t.prompt_ids)] == t.prompt_ids


class _MissingHop:
    """The real searcher, except that one question's second search returns another passage (a retrieval miss)."""

    def __init__(self, searcher, wrong: dict):
        self.searcher, self.wrong, self.calls = searcher, wrong, 0

    def search(self, queries, k):
        self.calls += 1
        results = self.searcher.search(queries, k)
        return [[self.wrong] if self.calls == 2 and i == 0 else hits for i, hits in enumerate(results)]


def test_gold_runs_keep_only_demonstrations_that_saw_every_gold_passage(small_world, searcher, tokenizer):
    from agents.exsearch import DemonstrationPolicy, grounded

    cfg = ExSearchConfig(max_steps=4, top_k=1, doc_chars=400)
    questions = [q for q in small_world.questions("dev") if q["kind"] == "bridge" and q["hops"] == 2][:3]
    distractor = next(d for d in small_world.documents() if d["is_distractor"])
    agent = ExSearchAgent(DemonstrationPolicy(tokenizer, questions, cfg), _MissingHop(searcher, distractor), tokenizer,
                          cfg)
    runs = agent.run([{"id": q["id"], "question": q["question"]} for q in questions])
    verdicts = [grounded(t, q, cfg) for q, t in zip(questions, runs, strict=True)]
    assert all(t.answer == q["answers"][0] for q, t in zip(questions, runs, strict=True))  # the gold run writes it anyway
    assert verdicts == [False, True, True]


def test_other_worlds_add_gold_runs_with_names_this_world_does_not_have(small_world, tokenizer):
    from pipelines.recipes.exsearch import extra_world_runs

    cfg = ExSearchConfig(max_steps=4, top_k=1, doc_chars=400)
    runs = extra_world_runs(small_world, small_world.cfg, 2, 20, tokenizer, cfg)
    names = {d["title"] for d in small_world.documents()}
    texts = [tokenizer.decode(t.prompt_ids) for t in runs]
    assert 20 <= len(runs) <= 40 and len({t.example_id for t in runs}) == len(runs)
    assert {t.example_id.split('-q-')[0] for t in runs} == {f'world{small_world.cfg.seed + 10_000 + i}' for i in (0, 1)}
    assert not any(name in text for text in texts for name in names)
    assert all(t.valid and t.answer for t in runs)
