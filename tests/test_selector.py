"""DRO selector against the real retriever (and the real tiny engine): selection, parsing, answers, E-step numbers."""

from __future__ import annotations

import asyncio
import math

import pytest

from actors.config import EngineConfig
from actors.llm import LLMEngineCore
from agents.selector import (
    SelectorAgent,
    SelectorConfig,
    dedupe_permutations,
    generator_scoring_pair,
    parse_permutation,
    permutation_scoring_pair,
)
from pipelines import records
from tests.doubles import ScriptedPolicy, TeacherForcedPolicy, reader_oracle, selector_oracle

CFG = SelectorConfig(n_docs=6, k=3)


@pytest.fixture(scope="module")
def documents(small_world):
    return {doc["id"]: doc for doc in small_world.documents()}


@pytest.fixture(scope="module")
def questions(small_world):
    return [q for q in small_world.questions("dev") if q["kind"] == "bridge" and q["hops"] in (2, 3)]


def example(q):
    """Candidates retrieved with the question and every gold sub-question (DRO's retrieval is not what it learns)."""
    queries = [q["question"]] + [d["question"] for d in q["decomposition"]]
    return {"id": q["id"], "question": q["question"], "queries": queries}


def oracle_agent(questions, documents, tokenizer, searcher, cfg=CFG):
    by_question = {q["question"]: q for q in questions}
    selector = ScriptedPolicy(tokenizer, selector_oracle(by_question, documents, cfg.k))
    reader = ScriptedPolicy(tokenizer, reader_oracle(by_question, documents))
    return SelectorAgent(selector, searcher, tokenizer, cfg, generator_engine=reader), selector, reader


def test_scripted_selector_picks_the_gold_passages_and_the_generator_answers(questions, documents, tokenizer, searcher):
    agent, selector, reader = oracle_agent(questions, documents, tokenizer, searcher)
    selections = agent.run([example(q) for q in questions])
    assert {q["hops"] for q in questions} == {2, 3} and len(selections) == len(questions)
    for q, s in zip(questions, selections, strict=True):
        shown = [d["id"] for d in s.documents]
        assert len(shown) == CFG.n_docs and set(q["supporting_passage_ids"]) <= set(shown)
        assert s.valid and s.invalid == [] and len(s.ranking) == CFG.k
        assert s.selected_ids[: q["hops"]] == q["supporting_passage_ids"]
        assert s.answer_trajectory.finish_reason == "answer" and s.answer == q["answers"][0]
        generator_docs = s.answer_trajectory.steps[0]
        assert generator_docs.role == "documents" and generator_docs.text.split("\n") == s.selected_ids
    # lock-step: one retriever call, one selector call and one generator call for the whole batch
    assert (searcher.calls, selector.calls, reader.calls) == (1, 1, 1)


def test_the_generator_sees_only_the_selected_documents(questions, documents, tokenizer, searcher):
    """A selector that leaves a hop's passage out starves the generator: the answer depends on the selection."""
    by_question = {q["question"]: q for q in questions}
    oracle = selector_oracle(by_question, documents, CFG.n_docs)

    def drop_first_gold(context):
        labels = oracle(context).strip().split(" > ")
        return " " + " > ".join(labels[1:]) + "\n"

    agent = SelectorAgent(ScriptedPolicy(tokenizer, drop_first_gold), searcher, tokenizer, CFG,
                          generator_engine=ScriptedPolicy(tokenizer, reader_oracle(by_question, documents)))
    selections = agent.run([example(q) for q in questions])
    assert all(s.valid and s.answer == "unknown" for s in selections)
    assert all(q["supporting_passage_ids"][0] not in s.selected_ids for q, s in zip(questions, selections, strict=True))


def test_trajectories_mask_the_documents_and_train_on_the_permutation_only(questions, documents, tokenizer, searcher):
    agent, _, _ = oracle_agent(questions[:2], documents, tokenizer, searcher)
    for s in agent.run([example(q) for q in questions[:2]]):
        for t, model_turn in ((s.trajectory, "ranking"), (s.answer_trajectory, "answer")):
            observation = next(step for step in t.steps if step.role == "documents")
            assert observation.start == 0 and set(t.loss_mask[: observation.end]) == {0}
            assert t.loss_mask.count(0) == observation.end and set(t.loss_mask[observation.end :]) == {1}
            assert tokenizer.decode(t.token_ids[: observation.end]).strip().startswith("<documents>")
            turn = next(step for step in t.steps if step.role == model_turn)
            assert (turn.start, turn.end) == (observation.end, len(t.token_ids))  # the scripted turn is all tag
            row = records.to_table([t.to_record()], "trajectory").to_pylist()[0]
            assert row["valid"] and row["finish_reason"] == "answer"
        assert tokenizer.decode(s.trajectory.token_ids[s.trajectory.steps[1].start:]) == \
            " " + s.trajectory.answer + "\n"
        assert tokenizer.decode(s.answer_trajectory.token_ids[s.answer_trajectory.steps[1].start:]) == \
            f"<answer>{s.answer}</answer>"


@pytest.mark.parametrize("text,n_docs,k,expected", [
    ("[2] > [1] > [3]", 5, 3, ([2, 1, 3], [], None)),
    ("[2] > [2] > [1] > [2]", 5, 3, ([2, 1], [], None)),  # duplicates keep their first place
    ("[2] > [9] > [0] > [x] > [4]", 5, 3, ([2, 4], ["9", "0", "x"], None)),  # out of range / not a label: invalid
    ("[5] > [4] > [3] > [2] > [1]", 5, 2, ([5, 4], [], None)),  # the top k only
    ("[3]>[1] ,[ 2 ]", 5, 3, ([3, 1, 2], [], None)),  # separators and spaces are not the point
    ("", 5, 3, ([], [], "empty permutation")),
    ("the second one", 5, 3, ([], [], "empty permutation")),
    ("[7] > [0]", 5, 3, ([], ["7", "0"], "no valid document label among [7], [0] (of 5)")),
])
def test_parse_permutation(text, n_docs, k, expected):
    assert parse_permutation(text, n_docs, k) == expected


@pytest.mark.parametrize("turn,reason,invalid", [
    ("\n", "malformed: empty permutation", []),
    (" [9] > [12]\n", "malformed: no valid document label among [9], [12] (of 6)", ["9", "12"]),
    (" [2] > [1] > [3]", "malformed: no '\\n' within max_tokens", []),  # cut off before the stop string
    (" [2] > [2] > [8] > [1]\n", "answer", ["8"]),
])
def test_malformed_permutations_are_recorded_per_sample(questions, documents, tokenizer, searcher, turn, reason,
                                                        invalid):
    reader = ScriptedPolicy(tokenizer, reader_oracle({q["question"]: q for q in questions}, documents))
    agent = SelectorAgent(ScriptedPolicy(tokenizer, lambda context: turn), searcher, tokenizer, CFG,
                          generator_engine=reader)
    selections = agent.run([example(q) for q in questions[:2]], samples=2)
    assert [s.trajectory.finish_reason for s in selections] == [reason] * 4
    assert all(s.invalid == invalid for s in selections)
    rows = records.to_table([s.trajectory.to_record() for s in selections], "trajectory").to_pylist()
    assert all(row["finish_reason"] == reason for row in rows)
    if reason == "answer":
        assert all(s.ranking == [2, 1] and s.trajectory.answer == "[2] > [1]" for s in selections)
        assert all([st.text for st in s.trajectory.steps if st.role == "invalid"] == ["[8]"] for s in selections)
        assert reader.calls == 1
    else:
        assert all(s.answer_trajectory is None and s.selected == [] for s in selections)
        assert reader.calls == 0  # nothing to answer from: the generator is not called
        assert dedupe_permutations(selections) == []


def test_duplicate_permutations_merge_with_their_count(questions, documents, tokenizer, searcher):
    turns = iter([" [1] > [2]\n", " [2] > [1]\n", " [1]>[2]\n", " [1] > [2]\n", "\n", " [3]\n"] * 2)
    agent = SelectorAgent(ScriptedPolicy(tokenizer, lambda context: next(turns)), searcher, tokenizer, CFG)
    selections = agent.select([example(q) for q in questions[:2]], samples=6)
    distinct = dedupe_permutations(selections)
    assert [(s.example_id, s.ranking, count) for s, count in distinct] == [
        (questions[0]["id"], [1, 2], 3), (questions[0]["id"], [2, 1], 1), (questions[0]["id"], [3], 1),
        (questions[1]["id"], [1, 2], 3), (questions[1]["id"], [2, 1], 1), (questions[1]["id"], [3], 1),
    ]
    assert [s.sample_index for s, _ in distinct[:3]] == [0, 1, 5]  # the first draw represents its duplicates


def test_examples_may_bring_their_own_candidates(documents, tokenizer, searcher):
    docs = list(documents.values())[:4]
    agent = SelectorAgent(ScriptedPolicy(tokenizer, lambda context: " [4] > [2]\n"), searcher, tokenizer,
                          SelectorConfig(n_docs=4, k=2))
    (s,) = agent.select([{"id": "x", "question": "Who?", "documents": docs}])
    assert searcher.calls == 0 and s.selected_ids == [docs[3]["id"], docs[1]["id"]]
    with pytest.raises(ValueError, match="k=5 exceeds agent.n_docs=4"):
        SelectorConfig(n_docs=4, k=5)


def test_generator_scoring_pair_is_the_generator_context_and_the_gold_answer(questions, documents, tokenizer, searcher):
    agent, _, _ = oracle_agent(questions[:1], documents, tokenizer, searcher)
    (s,) = agent.run([example(questions[0])])
    context, continuation = generator_scoring_pair(s.question, s.selected, "Kalovren", tokenizer, CFG)
    t = s.answer_trajectory
    answer = next(step for step in t.steps if step.role == "answer")
    assert context == t.prompt_ids + t.token_ids[: answer.start]
    assert tokenizer.decode(continuation) == "<answer>Kalovren</answer>"


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


SMALL = SelectorConfig(n_docs=3, k=2, doc_chars=100, max_ranking_tokens=16, max_answer_tokens=16,
                       max_context_tokens=512)


def rescored(engine, t):
    return engine.score([(t.prompt_ids, t.token_ids)])[0]


def test_real_engine_permutation_logprob_is_the_engine_score_of_its_tokens(questions, engine, searcher):
    agent = SelectorAgent(engine, searcher, engine.tokenizer, SMALL)
    selections = agent.run([example(q) for q in questions[:3]], samples=3, seed=7)
    assert len(selections) == 9 and [s.sample_index for s in selections[:3]] == [0, 1, 2]
    records.to_table([s.trajectory.to_record() for s in selections], "trajectory")  # whatever the random model wrote
    for s in selections:
        t = s.trajectory
        generated = [i for i, m in enumerate(t.loss_mask) if m]
        assert generated and t.loss_mask[: t.steps[0].end] == [0] * t.steps[0].end
        scores = rescored(engine, t)
        assert max(abs(scores[i] - t.logprobs[i]) for i in generated) < 1e-4
        context, continuation = permutation_scoring_pair(s)
        assert math.isclose(sum(engine.score([(context, continuation)])[0]), s.permutation_logprob, abs_tol=1e-4)


def test_real_engine_generator_trajectories_rescore_and_score_the_gold_answer(questions, documents, engine, searcher):
    """Valid permutations (scripted, scored by the real model) feed the real generator, which answers on its own."""
    by_question = {q["question"]: q for q in questions}
    selector = TeacherForcedPolicy(engine, engine.tokenizer, selector_oracle(by_question, documents, SMALL.k))
    agent = SelectorAgent(selector, searcher, engine.tokenizer, SMALL, generator_engine=engine)
    picked = questions[:3]
    selections = agent.run([example(q) for q in picked], samples=2, seed=3, greedy_answer=False)
    assert all(s.valid and len(s.ranking) == SMALL.k for s in selections)
    answers = [s.answer_trajectory for s in selections]
    records.to_table([t.to_record() for t in answers] + [s.trajectory.to_record() for s in selections], "trajectory")
    for s in selections:
        for t in (s.trajectory, s.answer_trajectory):
            observation = t.steps[0]
            assert observation.role == "documents" and set(t.loss_mask[observation.start:observation.end]) == {0}
            generated = [i for i, m in enumerate(t.loss_mask) if m]
            assert generated and generated[0] == observation.end
            scores = rescored(engine, t)
            assert max(abs(scores[i] - t.logprobs[i]) for i in generated) < 1e-4
        assert math.isclose(sum(engine.score([permutation_scoring_pair(s)])[0]), s.permutation_logprob, abs_tol=1e-4)
        gold = by_question[s.question]["answers"][0]
        context, continuation = generator_scoring_pair(s.question, s.selected, gold, engine.tokenizer, SMALL)
        t = s.answer_trajectory
        assert context == t.prompt_ids + t.token_ids[: t.steps[0].end]
        assert math.isfinite(sum(engine.score([(context, continuation)])[0]))
