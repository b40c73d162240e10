"""GenGround against the real retriever (and the real tiny engine): deduce, ground in batches, revise, finish."""

from __future__ import annotations

import asyncio
import random

import pytest

from actors.config import EngineConfig
from actors.llm import LLMEngineCore
from agents.genground import (
    GenGroundAgent,
    GenGroundConfig,
    grounding_examples,
    hops,
    parse_deduction,
    parse_grounding,
)
from pipelines import records
from tests.doubles import ScriptedPolicy, TeacherForcedPolicy, genground_oracle

CFG = GenGroundConfig(docs_per_batch=2, max_batches=2)


@pytest.fixture(scope="module")
def documents(small_world):
    return {doc["id"]: doc for doc in small_world.documents()}


@pytest.fixture(scope="module")
def questions(small_world):
    return [q for q in small_world.questions("dev") if q["kind"] == "bridge" and q["hops"] in (2, 3)]


def examples(questions):
    return [{"id": q["id"], "question": q["question"]} for q in questions]


def run_one(next_turn, searcher, tokenizer, cfg):
    agent = GenGroundAgent(ScriptedPolicy(tokenizer, next_turn), searcher, tokenizer, cfg)
    return agent.run([{"id": "q", "question": "?"}])[0]


def model_turns(t):
    return sum(1 for s in t.steps if s.role in ("question", "grounding", "answer", "malformed"))


def test_scripted_policy_deduces_grounds_revises_and_reaches_the_gold_answer(questions, documents, tokenizer, searcher):
    oracle = ScriptedPolicy(tokenizer, genground_oracle({q["question"]: q for q in questions}, documents, CFG))
    runs = GenGroundAgent(oracle, searcher, tokenizer, CFG).run(examples(questions))
    assert {q["hops"] for q in questions} == {2, 3}
    for q, t in zip(questions, runs, strict=True):
        assert t.finish_reason == "answer" and t.answer == q["answers"][0]
        chain = hops(t, CFG)
        assert [h["question"] for h in chain] == [d["question"] for d in q["decomposition"]]
        assert [h["cited"] for h in chain] == [d["passage_id"] for d in q["decomposition"]]  # grounded in the gold
        assert [h["answer"] for h in chain] == [d["answer"] for d in q["decomposition"]]  # revised ...
        assert all(h["guess"] == "Unknown" != h["answer"] for h in chain)  # ... from a wrong direct answer
    # lock-step: one engine call per round for every run, and the sub-questions of a round searched together
    assert oracle.calls == max(model_turns(t) for t in runs)
    assert searcher.queries == sum(q["hops"] for q in questions) and searcher.calls <= max(q["hops"] for q in questions)


def test_insufficient_batches_keep_the_direct_answer_and_it_propagates(questions, documents, tokenizer, searcher):
    """A model that never finds evidence keeps its own (wrong) answers: revision is what made the previous test pass."""
    oracle = genground_oracle({q["question"]: q for q in questions}, documents, CFG)

    def never_grounds(context):
        return "<record>insufficient</record>" if context.rstrip().endswith("</documents>") else oracle(context)

    q = next(q for q in questions if q["hops"] == 2)
    (t,) = GenGroundAgent(ScriptedPolicy(tokenizer, never_grounds), searcher, tokenizer, CFG).run(examples([q]))
    assert t.finish_reason == "answer" and t.answer == "Unknown"
    chain = hops(t, CFG)
    assert [len(h["shown"]) for h in chain] == [CFG.max_batches] * 2  # every batch was shown before giving up
    assert all(h["cited"] is None and h["answer"] == "Unknown" for h in chain)
    assert chain[1]["question"] == q["decomposition"][1]["question"].replace(q["decomposition"][0]["answer"], "Unknown")


def test_an_insufficient_batch_moves_grounding_to_the_next_batch(tokenizer, searcher):
    def policy(context):
        if "</search>" not in context:
            return "<search>Who founded Nili Motors?</search><think>Unknown</think>"
        if context.rstrip().endswith("</documents>"):
            shown = context.rsplit("</search>", 1)[-1].count("</documents>")
            return "<record>insufficient</record>" if shown == 1 else "<record>[2] Mira Tovenka</record>"
        return "<answer>Mira Tovenka</answer>"

    t = run_one(policy, searcher, tokenizer, CFG)
    (hop,) = hops(t, CFG)
    assert t.finish_reason == "answer" and t.answer == "Mira Tovenka"
    assert len(hop["shown"]) == 2 and hop["cited"] == hop["shown"][1][1] and hop["answer"] == "Mira Tovenka"
    assert [s.text for s in t.steps if s.role == "grounding"] == ["insufficient", "[2] Mira Tovenka"]
    retrieved = searcher.search(["Who founded Nili Motors?"], CFG.docs_per_batch * CFG.max_batches)[0]
    assert hop["shown"] == [[h["id"] for h in retrieved[:2]], [h["id"] for h in retrieved[2:4]]]


def test_masks_cover_model_tokens_and_exclude_every_observation(questions, documents, tokenizer, searcher):
    q = next(q for q in questions if q["hops"] == 3)
    policy = ScriptedPolicy(tokenizer, genground_oracle({q["question"]: q}, documents, CFG))
    (t,) = GenGroundAgent(policy, searcher, tokenizer, CFG).run(examples([q]))
    observations = [s for s in t.steps if s.role == "documents"]
    assert len(observations) == 3
    for step in observations:
        assert set(t.loss_mask[step.start:step.end]) == {0}
        assert tokenizer.decode(t.token_ids[step.start:step.end]).strip().startswith("<documents>")
    assert t.loss_mask.count(0) == sum(s.end - s.start for s in observations)
    model_text = tokenizer.decode([tok for tok, m in zip(t.token_ids, t.loss_mask, strict=True) if m])
    assert "<documents>" not in model_text and model_text.endswith(f"<answer>{q['answers'][0]}</answer>")
    for role, tag in (("question", "search"), ("guess", "think"), ("grounding", "record"), ("answer", "answer")):
        spans = [s for s in t.steps if s.role == role]
        assert spans and all(tokenizer.decode(t.token_ids[s.start:s.end]).startswith(f"<{tag}>") for s in spans)
    row = records.to_table([t.to_record()], "trajectory").to_pylist()[0]
    assert row["valid"] and row["answer"] == q["answers"][0]


@pytest.mark.parametrize("turn,reason", [
    ("I think it is Kalovren", "malformed: no closing </think> or </answer> tag within max_tokens"),
    ("<think>Kalovren</think>", "malformed: no <search> sub-question before the direct answer"),
    ("<search> </search><think>Kalovren</think>", "malformed: empty sub-question"),
    ("<search>Who founded it?</search><think></think>", "malformed: empty direct answer"),
    ("Kalovren</answer>", "malformed: </answer> without <answer>"),
    ("<answer> </answer>", "malformed: empty answer"),
    ("<record>[1] Kalovren</record>", "malformed: no closing </think> or </answer> tag"),  # grounding out of turn
])
def test_malformed_deductions_end_the_run_with_a_reason(searcher, tokenizer, turn, reason):
    agent = GenGroundAgent(ScriptedPolicy(tokenizer, lambda context: turn), searcher, tokenizer, CFG)
    runs = agent.run([{"id": "q1", "question": "Who?"}, {"id": "q2", "question": "Where?"}])
    assert [t.finish_reason for t in runs] == [reason, reason]
    assert all(not t.valid and t.to_record()["finish_reason"] == reason for t in runs)
    assert searcher.calls == 0


@pytest.mark.parametrize("turn,reason", [
    ("Mira Tovenka", "malformed: no closing </record> tag within max_tokens"),
    ("<record>Mira Tovenka</record>", "malformed: grounding cites no document (expected [n] answer or insufficient)"),
    ("<record>[3] Mira Tovenka</record>", "malformed: cited [3] but the batch shows 2 document(s)"),
    ("<record>[0] Mira Tovenka</record>", "malformed: cited [0] but the batch shows 2 document(s)"),
    ("<record>[1] </record>", "malformed: empty revised answer"),
    ("<answer>Mira Tovenka</answer>", "malformed: no closing </record> tag"),  # must ground before answering
])
def test_malformed_groundings_end_the_run_with_a_reason(searcher, tokenizer, turn, reason):
    def policy(context):
        grounding = context.rstrip().endswith("</documents>")
        return turn if grounding else "<search>Who founded Nili Motors?</search><think>Unknown</think>"

    t = run_one(policy, searcher, tokenizer, CFG)
    assert t.finish_reason == reason and [s.role for s in t.steps] == ["question", "guess", "documents", "malformed"]


def test_endless_deduction_stops_at_max_iterations(searcher, tokenizer):
    def policy(context):
        if context.rstrip().endswith("</documents>"):
            return "<record>insufficient</record>"
        return "<search>Who founded Nili Motors?</search><think>Unknown</think>"

    cfg = GenGroundConfig(docs_per_batch=1, max_batches=2, max_context_tokens=4096)
    assert cfg.max_iterations == 7  # the paper's limit
    t = run_one(policy, searcher, tokenizer, cfg)
    assert t.finish_reason == "max_steps"
    assert len(hops(t, cfg)) == 8 and len([s for s in t.steps if s.role == "documents"]) == 7 * 2


def test_parsers_read_each_part():
    turn = parse_deduction("<search>Who founded X?</search><think>Mira</think>", CFG, "stop")
    assert (turn.action, turn.question, turn.argument) == ("deduce", "Who founded X?", "Mira")
    assert parse_grounding("<record>Insufficient.</record>", CFG, "stop", 2).action == "insufficient"
    turn = parse_grounding("<record>[2] Mira Tovenka</record>", CFG, "stop", 2)
    assert (turn.action, turn.citation, turn.argument) == ("ground", 2, "Mira Tovenka")


def test_grounding_examples_cite_the_gold_passage_among_noise(questions, documents):
    q = next(q for q in questions if q["hops"] == 3)
    noise = [d for d in documents.values() if d["is_distractor"]]
    cfg = GenGroundConfig(docs_per_batch=3)
    rows = grounding_examples(q, documents, noise, random.Random(0), cfg, insufficient=True)
    assert rows == grounding_examples(q, documents, noise, random.Random(0), cfg, insufficient=True)  # seeded
    cited = [r for r in rows if r["cited"] is not None]
    insufficient = [r for r in rows if r["cited"] is None]
    assert len(cited) == len(insufficient) == 3 and len({r["id"] for r in rows}) == 6
    for hop, (row, step) in enumerate(zip(cited, q["decomposition"], strict=True)):
        assert row["passage_id"] == step["passage_id"] == row["documents"][row["cited"] - 1]
        noise_shown = set(row["documents"]) - {step["passage_id"]}
        assert len(row["documents"]) == 3 and not noise_shown & set(q["supporting_passage_ids"])
        turn = parse_grounding(row["target"], cfg, "stop", len(row["documents"]))
        assert (turn.action, turn.citation, turn.argument) == ("ground", row["cited"], step["answer"])
        assert row["prompt"].startswith(f"Question: {q['question']}\n")
        assert f"<search>{step['question']}</search>" in row["prompt"] and row["prompt"].endswith("</documents>\n")
        assert row["prompt"].count("<record>[") == hop  # earlier hops appear grounded
    assert {r["target"] for r in insufficient} == {"<record>insufficient</record>"}
    assert all(not set(r["documents"]) & set(q["supporting_passage_ids"]) for r in insufficient)
    positions = {r["cited"] for seed in range(4)
                 for r in grounding_examples(q, documents, noise, random.Random(seed), cfg)}
    assert len(positions) > 1  # the gold passage is not always in the same place


@pytest.fixture(scope="module")
def engine(tiny_policy):
    core = LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512))

    class Engine:
        tokenizer = core.backend.tokenizer

        def generate(self, prompts, sampling):
            return asyncio.run(core.generate(prompts, sampling))

        def score(self, pairs):
            return asyncio.run(core.score(pairs))

    return Engine()


SMALL = GenGroundConfig(docs_per_batch=1, max_batches=2, max_iterations=2, max_tokens_per_turn=24,
                        max_context_tokens=512, doc_chars=100)


def assert_rescored(engine, t):
    generated = [i for i, m in enumerate(t.loss_mask) if m]
    assert generated, "every run has at least one model turn"
    rescored = engine.score([(t.prompt_ids, t.token_ids)])[0]
    assert max(abs(rescored[i] - t.logprobs[i]) for i in generated) < 1e-4
    observations = [s for s in t.steps if s.role == "documents"]
    assert t.loss_mask.count(0) == sum(s.end - s.start for s in observations)
    assert all(set(t.loss_mask[s.start:s.end]) == {0} for s in observations)


def test_real_engine_trajectories_rescore_to_their_sampling_logprobs(questions, engine, searcher):
    runs = GenGroundAgent(engine, searcher, engine.tokenizer, SMALL).run(examples(questions[:4]), samples=3, seed=5)
    assert len(runs) == 12 and [t.sample_index for t in runs[:3]] == [0, 1, 2]
    records.to_table([t.to_record() for t in runs], "trajectory")  # schema-valid whatever the random model wrote
    for t in runs:
        assert_rescored(engine, t)


def test_real_engine_turns_after_retrieved_documents_rescore(questions, documents, engine, searcher):
    """Scripted deductions (scored by the real model), then the real model grounds on its own after the documents."""
    oracle = genground_oracle({q["question"]: q for q in questions}, documents, SMALL)

    def deduce_then_sample(context):
        return None if context.rstrip().endswith("</documents>") else oracle(context)

    policy = TeacherForcedPolicy(engine, engine.tokenizer, deduce_then_sample)
    runs = GenGroundAgent(policy, searcher, engine.tokenizer, SMALL).run(examples(questions[:4]), samples=2, seed=1)
    records.to_table([t.to_record() for t in runs], "trajectory")
    for t in runs:
        first_observation = next(s for s in t.steps if s.role == "documents")
        assert t.loss_mask[first_observation.end] == 1  # the real model wrote a turn after the documents
        assert_rescored(engine, t)
