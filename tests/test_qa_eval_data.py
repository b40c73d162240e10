"""QA evaluation on real formats: the loaders (HotpotQA, MuSiQue, NQ-open, Bamboogle), the predictions format, and
`task=qa` of the evaluation job with gold, a predictions file, and in-process retrieval (BM25, LocalRetriever).

Small hand-written files in each format run everywhere; the shared-data tests (skipped without ../shared/data)
run the same code on the published sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipelines.evaluate import QA_CUTOFFS, run_job, score_answers
from pipelines.qa_data import QADataError, gold_predictions, load_qa, read_qa_predictions
from pipelines.qa_metrics import normalize_answer
from tests.conftest import REPO

HOTPOT = [
    {"_id": "h1", "question": "Which river flows through the capital of Norvania?", "answer": "the Silver River",
     "type": "bridge", "supporting_facts": [["Norvania", 0], ["Lindholm", 1]],
     "context": [["Norvania", ["Norvania is a country.", " Its capital is Lindholm."]],
                 ["Lindholm", ["Lindholm is a city.", " The Silver River flows through Lindholm."]],
                 ["Oxbury", ["Oxbury is a town on the Grey River."]]]},
    {"_id": "h2", "question": "Is Oxbury older than Lindholm?", "answer": "yes", "type": "comparison",
     "supporting_facts": [["Oxbury", 0], ["Lindholm", 0]],
     "context": [["Oxbury", ["Oxbury is a town on the Grey River."]],
                 ["Lindholm", ["Lindholm is a city.", " The Silver River flows through Lindholm."]]]},
]  # fmt: skip
MUSIQUE = [
    {"id": "2hop__1_2", "question": "Where was the founder of Acme born?", "answer": "Brill", "answer_aliases": ["Brill town"],
     "question_decomposition": [{"question": "who founded Acme"}, {"question": "where was #1 born"}],
     "paragraphs": [{"idx": 0, "title": "Acme", "paragraph_text": "Acme was founded by Dora Vance.", "is_supporting": True},
                    {"idx": 1, "title": "Dora Vance", "paragraph_text": "Dora Vance was born in Brill.", "is_supporting": True},
                    {"idx": 2, "title": "Acme", "paragraph_text": "Acme sells anvils.", "is_supporting": False}]},
]  # fmt: skip


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="evaluate", overrides=list(overrides))


def _write_json_lines(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def hotpot_folder(tmp_path) -> Path:
    folder = tmp_path / "hotpot"
    folder.mkdir()
    (folder / "tiny.json").write_text(json.dumps(HOTPOT))
    corpus = {title: sentences for row in HOTPOT for title, sentences in row["context"]}
    corpus["Elsewhere"] = ["A passage no question uses, about the Blue River."]
    (folder / "tiny_corpus.json").write_text(json.dumps(corpus))
    return folder


def test_each_format_loads_into_one_shape(tmp_path, hotpot_folder):
    hotpot = load_qa(hotpot_folder)
    assert hotpot.format == "hotpotqa" and hotpot.name == "hotpotqa:tiny" and hotpot.corpus_source == "tiny_corpus.json"
    assert [e.supporting for e in hotpot.examples] == [["Norvania", "Lindholm"], ["Oxbury", "Lindholm"]]
    assert len(hotpot.corpus) == 4 and hotpot.corpus[0] == {"id": "Norvania", "title": "Norvania",
                                                            "text": "Norvania is a country. Its capital is Lindholm."}  # fmt: skip
    assert [e.kind for e in hotpot.examples] == ["bridge", "comparison"]

    musique = load_qa(_write_json_lines(tmp_path / "musique" / "m.jsonl", MUSIQUE))
    example = musique.examples[0]
    assert musique.format == "musique" and example.kind == "2hop" and example.answers == ["Brill", "Brill town"]
    assert example.supporting == ["Acme #1", "Dora Vance"], "two passages titled Acme get numbered ids"
    assert [d["id"] for d in musique.corpus] == ["Acme #1", "Dora Vance", "Acme #2"]
    assert musique.corpus_source == "the questions' own paragraphs"

    nq = load_qa(_write_json_lines(tmp_path / "nq" / "nq.jsonl", [{"question": "q?", "answer": ["a", "b"]}]))
    assert nq.format == "nq_open" and nq.examples[0].id == "nq_open-0" and nq.examples[0].answers == ["a", "b"]
    (tmp_path / "bamboogle").mkdir()
    (tmp_path / "bamboogle" / "test.csv").write_text('Question,Answer\n"Who, then?",Ada\n')
    bamboogle = load_qa(tmp_path / "bamboogle")
    assert bamboogle.examples[0].question == "Who, then?" and bamboogle.corpus == []


def test_bad_files_fail_naming_file_row_and_field(tmp_path, hotpot_folder):
    broken = [dict(HOTPOT[0], supporting_facts=[["Atlantis", 0]])]
    (hotpot_folder / "tiny.json").write_text(json.dumps(broken))
    with pytest.raises(QADataError, match=r"tiny.json item 0: supporting fact \['Atlantis', 0\] names no context"):
        load_qa(hotpot_folder)
    (hotpot_folder / "tiny.json").write_text(json.dumps([dict(HOTPOT[0], context=[["Norvania", ["x"]],
                                                                                  ["Lindholm", ["y"]]])]))  # fmt: skip
    with pytest.raises(QADataError, match="tiny_corpus.json: lacks supporting passage"):
        load_qa(hotpot_folder)
    path = _write_json_lines(tmp_path / "other" / "rows.jsonl", [{"query": "q", "answers": ["a"]}])
    with pytest.raises(QADataError, match=r"rows with keys \['answers', 'query'\]"):
        load_qa(path)
    _write_json_lines(tmp_path / "other" / "second.jsonl", [{"question": "q", "answer": ["a"]}])
    with pytest.raises(QADataError, match="2 question files"):
        load_qa(tmp_path / "other")
    path = _write_json_lines(tmp_path / "musique" / "m.jsonl", [dict(MUSIQUE[0], paragraphs=[{"title": "Acme"}])])
    with pytest.raises(ValueError, match=r"m.jsonl:1 paragraphs\[0\]: missing field 'paragraph_text'"):
        load_qa(path)


def test_predictions_file_rows_are_checked(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "h1", "answer": "x", "passages": ["Norvania"]}\n{"id": "h2", "answer": 3}\n')
    with pytest.raises(QADataError, match=r"p.jsonl:2: 'answer' must be a string"):
        read_qa_predictions(path)
    path.write_text('{"id": "h1"}\n')
    with pytest.raises(QADataError, match=r"p.jsonl:1: needs 'answer'"):
        read_qa_predictions(path)


def test_job_scores_gold_and_a_predictions_file(tmp_path, hotpot_folder):
    result = run_job(_compose("task=qa", f"data.path={hotpot_folder}", "predictions=gold",
                              f"output_dir={tmp_path / 'gold'}"))  # fmt: skip
    overall = result["answers"][-1]
    assert overall["kind"] == "all" and overall["questions"] == 2
    assert all(overall[m] == 1.0 for m in ("em", "f1", "acc", "support_recall", "all_supporting"))
    assert (tmp_path / "gold" / "qa_answers.md").is_file() and (tmp_path / "gold" / "answers.jsonl").is_file()

    rows = [{"id": "h1", "answer": "It is the Silver River.", "passages": ["Lindholm", "Oxbury"]},
            {"id": "h2", "answer": "Yes"}]  # fmt: skip
    predictions = _write_json_lines(tmp_path / "predictions.jsonl", rows)
    result = run_job(_compose("task=qa", f"data.path={hotpot_folder}", f"predictions={predictions}",
                              f"output_dir={tmp_path / 'file'}"))  # fmt: skip
    table = {row["kind"]: row for row in result["answers"]}
    assert table["bridge"]["em"] == 0.0 and table["bridge"]["acc"] == 1.0 and 0 < table["bridge"]["f1"] < 1
    assert table["bridge"]["support_recall"] == 0.5 and table["bridge"]["all_supporting"] == 0.0
    assert table["comparison"]["em"] == 1.0 and "support_recall" not in table["comparison"]
    assert table["all"]["em"] == 0.5

    _write_json_lines(predictions, rows + [{"id": "h9", "answer": "?"}])
    with pytest.raises(ValueError, match=r"1 id\(s\) not in data.path \['h9'\]"):
        run_job(_compose("task=qa", f"data.path={hotpot_folder}", f"predictions={predictions}",
                         f"output_dir={tmp_path / 'file'}"))  # fmt: skip


def test_retrieval_mode_indexes_in_process_and_scores_supporting_passages(tmp_path, hotpot_folder):
    result = run_job(_compose("task=qa", f"data.path={hotpot_folder}", "predictions=retrieval", "retriever=bm25",
                              f"output_dir={tmp_path}"))  # fmt: skip
    rows = {row["k"]: row for row in result["retrieval"]}
    assert sorted(rows) == list(QA_CUTOFFS)
    # 4 passages: from k=5 on, everything is retrieved; "yes" (the comparison's answer) is in no passage at all
    assert rows[5]["support recall@k"] == rows[5]["all supporting@k"] == 1.0 and rows[5]["answer in top k"] == 0.5
    assert rows[2]["support recall@k"] >= 0.5
    assert (tmp_path / "index" / "manifest.json").is_file() and (tmp_path / "qa_retrieval.md").is_file()
    nq = _write_json_lines(tmp_path / "nq" / "nq.jsonl", [{"question": "q?", "answer": ["a"]}])
    with pytest.raises(ValueError, match="ships no passages"):
        run_job(_compose("task=qa", f"data.path={nq}", "predictions=retrieval", f"output_dir={tmp_path / 'nq'}"))


# ---------------------------------------------------------------------------------------------------- shared data

SHARED_QA = ("qa/hotpotqa_train", "qa/musique/musique_train.json", "qa/musique/musique_qa_100.jsonl", "qa/nq_open",
             "qa/bamboogle")  # fmt: skip


@pytest.mark.shared_data
@pytest.mark.parametrize("where", SHARED_QA)
def test_shared_sets_load_and_gold_scores_itself(where, shared_data):
    dataset = load_qa(shared_data / where)
    assert dataset.examples and all(e.question and e.answers for e in dataset.examples)
    assert len({e.id for e in dataset.examples}) == len(dataset.examples)
    if dataset.format in ("hotpotqa", "musique"):
        ids = {d["id"] for d in dataset.corpus}
        assert all(e.supporting and set(e.supporting) <= ids for e in dataset.examples)
        assert len(ids) == len(dataset.corpus)
    if dataset.format == "musique":  # answerable MuSiQue: one supporting paragraph per hop
        assert all(e.kind == f"{len(e.supporting)}hop" for e in dataset.examples)
    rows = score_answers(dataset, gold_predictions(dataset))
    assert all(r["em"] == 1.0 and r["f1"] == 1.0 for r in rows)
    # accuracy (gold contained) is 1 except where a gold answer normalises to nothing ("---", "A+" -> "")
    assert all(r["acc"] == 1.0 for r in rows if normalize_answer(r["answer"]))
    assert all(r.get("support_recall", 1.0) == 1.0 for r in rows)


@pytest.mark.shared_data
def test_bm25_on_hotpotqa_finds_supporting_passages_far_above_chance(shared_data, tmp_path):
    result = run_job(_compose("task=qa", f"data.path={shared_data / 'qa' / 'hotpotqa_train'}", "predictions=retrieval",
                              "retriever=bm25", f"output_dir={tmp_path}"))  # fmt: skip
    rows = result["retrieval"]
    recall = [row["support recall@k"] for row in rows]
    answer = [row["answer in top k"] for row in rows]
    assert recall == sorted(recall) and answer == sorted(answer), "deeper cut-offs never find less"
    chance = QA_CUTOFFS[-1] / result["corpus"]  # expected recall@20 of a random ranking
    assert recall[-1] > 10 * chance, (recall, chance)
    assert result["retrieval_metrics"]["queries"] == result["questions"] == 100
