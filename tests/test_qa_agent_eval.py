"""`task=qa predictions=agent`: the configured agent (ExSearch, GenGround) answers a QA set, searching the set's
passages with the real in-process BM25 retriever; the answers table adds the valid rate and mean searches.

A scripted policy (tests/doubles.py: the model's part only) proves the wiring reaches the gold answers and counts the
retrieved supporting passages; the real tiny policy (random, ~0 EM) proves the command runs end to end.
"""

from __future__ import annotations

import json

import pytest

from agents.exsearch import ExSearchConfig
from agents.genground import GenGroundConfig
from pipelines.evaluate import run_job, run_qa
from tests.doubles import ScriptedPolicy, exsearch_oracle, genground_oracle
from tests.test_qa_eval_data import _compose, hotpot_folder  # noqa: F401  (the hand-built HotpotQA set fixture)

# How a gold run of each question of tests/test_qa_eval_data.py's HOTPOT set goes: the scripted policy's script.
SCRIPT = {
    "Which river flows through the capital of Norvania?": {
        "answers": ["the Silver River"],
        "decomposition": [{"question": "What is the capital of Norvania?", "answer": "Lindholm", "passage_id": "Norvania"},
                          {"question": "Which river flows through Lindholm?", "answer": "the Silver River",
                           "passage_id": "Lindholm"}]},
    "Is Oxbury older than Lindholm?": {
        "answers": ["yes"],
        "decomposition": [{"question": "When was the town Oxbury founded?", "answer": "Oxbury", "passage_id": "Oxbury"},
                          {"question": "When was the city Lindholm founded?", "answer": "yes",
                           "passage_id": "Lindholm"}]},
}  # fmt: skip


@pytest.mark.parametrize("agent", ["exsearch", "genground"])
def test_scripted_policy_reaches_the_gold_answers_through_the_job(agent, tmp_path, hotpot_folder, tokenizer):  # noqa: F811
    from pipelines.qa_data import load_qa

    cfg = _compose("task=qa", f"data.path={hotpot_folder}", "predictions=agent", f"evaluate.agent={agent}",
                   "retriever=bm25", f"output_dir={tmp_path}")  # fmt: skip
    documents = {d["id"]: d for d in load_qa(hotpot_folder).corpus}
    if agent == "exsearch":
        next_turn = exsearch_oracle(SCRIPT, ExSearchConfig())
    else:
        next_turn = genground_oracle(SCRIPT, documents, GenGroundConfig())
    policy = ScriptedPolicy(tokenizer, next_turn)
    result = run_qa(cfg, tmp_path, engine=policy)

    table = {row["kind"]: row for row in result["answers"]}
    assert table["all"]["questions"] == 2 and table["all"]["em"] == table["all"]["f1"] == 1.0
    assert table["all"]["valid_rate"] == 1.0 and table["all"]["mean_searches"] == 2.0
    assert table["all"]["support_recall"] == 1.0, "every supporting passage was retrieved by BM25 at its hop"
    assert result["agent"] == agent and policy.calls >= 3  # lock step: one engine call per round, not per question
    markdown = (tmp_path / "qa_answers.md").read_text()
    assert "valid_rate" in markdown and "mean_searches" in markdown and "support_recall" in markdown
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").open()]
    assert {r["finish_reason"] for r in rows} == {"answer"}
    assert set(rows[0]["passages"]) >= {"Norvania", "Lindholm"}

    # the answers file is a predictions file: scoring it again gives the same EM / support recall
    again = run_job(_compose("task=qa", f"data.path={hotpot_folder}", f"predictions={tmp_path / 'answers.jsonl'}",
                             f"output_dir={tmp_path / 'again'}"))  # fmt: skip
    again_all = {row["kind"]: row for row in again["answers"]}["all"]
    assert again_all["em"] == 1.0 and again_all["support_recall"] == 1.0


def test_unknown_agent_is_named(tmp_path, hotpot_folder, tokenizer):  # noqa: F811
    cfg = _compose("task=qa", f"data.path={hotpot_folder}", "predictions=agent", "evaluate.agent=react",
                   "retriever=bm25", f"output_dir={tmp_path}")  # fmt: skip
    with pytest.raises(ValueError, match="evaluate.agent='react'"):
        run_qa(cfg, tmp_path, engine=ScriptedPolicy(tokenizer, lambda context: "<answer>x</answer>"))


def test_tiny_policy_runs_end_to_end_on_three_questions(tmp_path, hotpot_folder):  # noqa: F811
    rows = [{"_id": f"x{i}", "question": f"Which river flows past town {i}?", "answer": "the Grey River",
             "type": "bridge", "supporting_facts": [["Oxbury", 0]],
             "context": [["Oxbury", ["Oxbury is a town on the Grey River."]]]} for i in range(3)]  # fmt: skip
    data = json.loads((hotpot_folder / "tiny.json").read_text()) + rows
    (hotpot_folder / "tiny.json").write_text(json.dumps(data))
    result = run_job(_compose(
        "task=qa", f"data.path={hotpot_folder}", "predictions=agent", "evaluate.agent=exsearch", "retriever=bm25",
        "evaluate.max_queries=3", "recipe.agent.max_steps=2", "recipe.agent.max_tokens_per_turn=16", f"output_dir={tmp_path}",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
        "model.num_key_value_heads=2", "model.vocab_size=400", "data.world.people_per_split=10",
        "data.world.companies_per_split=5", "data.world.cities_per_split=4"))  # fmt: skip
    assert (tmp_path / "policy" / "config.json").is_file(), "no model.path: the tiny policy is built"
    (line,) = [row for row in result["answers"] if row["kind"] == "all"] or result["answers"]
    assert line["questions"] == result["questions"] == 3
    assert 0.0 <= line["em"] <= 1.0 and 0.0 <= line["valid_rate"] <= 1.0 and 0.0 <= line["mean_searches"] <= 2.0
    answers = [json.loads(row) for row in (tmp_path / "answers.jsonl").open()]
    assert len(answers) == 3 and all(r["finish_reason"] for r in answers)
    assert (tmp_path / "qa_answers.md").is_file() and (tmp_path / "qa_answers.csv").is_file()
