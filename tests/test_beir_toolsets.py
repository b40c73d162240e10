"""BEIR folders round-trip and fail with file:line; tool-retrieval tasks built from the shared datasets hold up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.data.beir import RetrievalTask, load_beir, write_beir
from pipelines.data.toolsets import TOOL_TASKS, load_tool_task, main, read_rows, seal_tools, spread
from pipelines.records import RecordError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def small_task(name: str = "tiny") -> RetrievalTask:
    return RetrievalTask(
        name=name,
        corpus=[
            {"id": "doc 1", "title": "Zürich", "text": "Ein Text\nmit Zeilen"},
            {"id": "d2", "title": "", "text": "plain"},
            {"id": "d3", "title": "t3", "text": "unjudged"},
        ],
        queries={"q1": "first?", "q2": "second, 二"},
        qrels={"q1": {"doc 1": 2, "d2": 0}, "q2": {"d2": 1}},
        instructions={"q1": "Retrieve the passage."},
    )


def write_folder(root: Path, corpus: str, queries: str, qrels: str) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    (root / "queries.jsonl").write_text(queries, encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return root


GOOD_CORPUS = '{"_id": "d1", "title": "T", "text": "x"}\n{"_id": "d2", "text": "y"}\n'
GOOD_QUERIES = '{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b", "instruction": "do"}\n'
GOOD_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\n"


# ------------------------------------------------------------------------------------------------ BEIR format


def test_round_trip_is_equal(tmp_path):
    task = small_task()
    folder = write_beir(task, tmp_path / task.name)
    assert load_beir(folder) == task
    assert (folder / "qrels" / "test.tsv").read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"


def test_round_trip_keeps_other_splits_apart(tmp_path):
    task = small_task()
    write_beir(task, tmp_path / task.name, split="dev")
    assert load_beir(tmp_path / task.name, split="dev") == task
    with pytest.raises(RecordError, match=r"test\.tsv: missing"):
        load_beir(tmp_path / task.name)


def test_only_judged_queries_are_kept(tmp_path):
    folder = write_folder(tmp_path / "f", GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS)
    task = load_beir(folder)
    assert task.queries == {"q1": "a"}
    assert task.instructions == {}  # q2's instruction left with q2
    assert task.corpus[1] == {"id": "d2", "title": "", "text": "y"}


@pytest.mark.parametrize(
    "corpus, queries, qrels, message",
    [
        (GOOD_CORPUS + '{"_id": "d3", "text": \n', GOOD_QUERIES, GOOD_QRELS, r"corpus\.jsonl:3: bad JSON"),
        (GOOD_CORPUS, '{"text": "no id"}\n', GOOD_QRELS, r"queries\.jsonl:1: field '_id'"),
        (GOOD_CORPUS + '{"_id": "d1", "text": "again"}\n', GOOD_QUERIES, GOOD_QRELS, r"corpus\.jsonl:3: duplicate"),
        (GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS + "q2\td2\n", r"test\.tsv:3: expected 3 tab-separated columns"),
        (GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS + "q9\td2\t1\n", r"test\.tsv:3: query id 'q9' is not in"),
        (GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS + "q2\td2\thigh\n", r"test\.tsv:3: score 'high'"),
        (GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS + "q1\td1\t0\n", r"test\.tsv:3: pair .* judged twice"),
    ],
)
def test_bad_files_are_named_with_their_line(tmp_path, corpus, queries, qrels, message):
    folder = write_folder(tmp_path / "f", corpus, queries, qrels)
    with pytest.raises(RecordError, match=message):
        load_beir(folder)


def test_write_rejects_ids_that_break_tsv(tmp_path):
    task = small_task()
    task.corpus[0]["id"] = "doc\t1"
    with pytest.raises(RecordError, match="corpus\\[0\\] id"):
        write_beir(task, tmp_path / "x")
    task = small_task()
    task.qrels["q3"] = {"d2": 1}
    with pytest.raises(RecordError, match="'q3' has no text"):
        write_beir(task, tmp_path / "y")


# ------------------------------------------------------------------------------------------------ adapter helpers


def test_spread_is_even_and_keeps_the_ends_in_view():
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread(list(range(3)), 5) == [0, 1, 2]
    assert spread(list(range(7)), None) == list(range(7))
    assert len(set(spread(list(range(1001)), 500))) == 500


def test_read_rows_names_file_and_line(tmp_path):
    path = tmp_path / "rows.json"  # JSON lines under a .json name, as BFCL and APIBench ship them
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(RecordError, match=r"rows\.json:3: bad JSON"):
        read_rows(path)
    path.write_text('[{"a": 1}, {"a": 2}]')
    assert [row for _, row in read_rows(path)] == [{"a": 1}, {"a": 2}]


def test_adapter_error_names_file_line_and_tool(tmp_path):
    folder = tmp_path / "tools" / "seal_tools"
    folder.mkdir(parents=True)
    tool = {"api_name": "getWeather", "api_description": "Weather now", "parameters": {}, "required": []}
    (folder / "tool.jsonl").write_text(json.dumps(tool) + "\n")
    good = {"id": "a", "query": "weather?", "calling": [{"api": "getWeather", "parameters": {}}]}
    bad = {"id": "b", "query": "time?", "calling": [{"api": "getTime", "parameters": {}}]}
    (folder / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"test\.jsonl:2 calling\[0\]: tool 'getTime'"):
        seal_tools(tmp_path, splits=("test",))
    (folder / "test.jsonl").write_text(json.dumps(good) + "\n")
    task = seal_tools(tmp_path, splits=("test",))
    assert task.qrels == {"a": {"getWeather": 1}}
    assert task.corpus[0]["title"] == "getWeather" and "Weather now" in task.corpus[0]["text"]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="stabletoolbench"):
        load_tool_task("toolbench_v9", SHARED_DATA)


# ------------------------------------------------------------------------------------------------ real tool tasks


@pytest.fixture(scope="module")
def shared_root() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(TOOL_TASKS))
def test_tool_task_is_well_formed(shared_root, name, tmp_path):
    task = load_tool_task(name, shared_root)
    assert task.name == name
    assert task.queries and task.corpus
    doc_ids = [doc["id"] for doc in task.corpus]
    assert len(set(doc_ids)) == len(doc_ids), "document ids must be unique"
    assert all(doc["title"] and doc["text"].startswith(doc["title"]) for doc in task.corpus)
    assert set(task.qrels) == set(task.queries)
    known = set(doc_ids)
    for query_id, judged in task.qrels.items():
        assert any(grade > 0 for grade in judged.values()), query_id
        assert set(judged) <= known, query_id
        assert task.queries[query_id].strip(), query_id
    assert set(task.instructions) == set(task.queries)
    assert all(instruction.strip() for instruction in task.instructions.values())
    assert load_beir(write_beir(task, tmp_path / name)) == task


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["stabletoolbench", "bfcl"])
def test_cap_keeps_ids_and_the_full_corpus(shared_root, name):
    capped = load_tool_task(name, shared_root, max_queries=7)
    full = load_tool_task(name, shared_root, max_queries=None)
    assert len(capped.queries) == 7 and len(full.queries) > 500
    assert capped.corpus == full.corpus
    assert all(full.qrels[query_id] == judged for query_id, judged in capped.qrels.items())


@pytest.mark.shared_data
def test_cli_writes_folders_and_prints_the_table(shared_root, tmp_path, capsys):
    main(["--out", str(tmp_path), "--shared", str(shared_root), "--tasks", "apibench_torchhub", "seal_tools"])
    table = capsys.readouterr().out
    assert "| task" in table and "apibench_torchhub" in table and "seal_tools" in table
    assert len(load_beir(tmp_path / "seal_tools").queries) == 500
