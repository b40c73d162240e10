"""BEIR-format retrieval tasks: read and write the three files every retrieval benchmark of this field ships.

BEIR's layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) is what MTEB, MAIR and ToolRet use too, so one
reader lets us evaluate on all of them and one writer lets anything we build (e.g. tool-retrieval tasks from
tool-calling datasets) be read by their tooling. Instructed tasks (MAIR, ToolRet) add an "instruction" field to
each query line; it is kept separately from the query text so that a retriever can be run with and without it.

The reader is strict and names the file and line of the first problem: a malformed qrels line that was silently
skipped would change which queries count and move every reported number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.records import RecordError

CORPUS = "corpus.jsonl"
QUERIES = "queries.jsonl"
QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclass
class RetrievalTask:
    """One retrieval benchmark: documents, queries, graded judgements and optional per-query instructions."""

    name: str
    corpus: list[dict]  # {"id", "title", "text"}, in file order (retrievers index by position)
    queries: dict[str, str]  # query id -> query text
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> graded relevance (> 0 = relevant)
    instructions: dict[str, str] = field(default_factory=dict)  # query id -> instruction; {} when the task has none


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line fails with its number."""
    if not path.is_file():
        raise RecordError(f"{path}: missing (a BEIR folder holds {CORPUS}, {QUERIES} and qrels/<split>.tsv)")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}:{number}: bad JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise RecordError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _text_field(row: dict, key: str, where: str, required: bool) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # some BEIR corpora store numeric ids; they are compared as strings everywhere
    if not isinstance(value, str) or (key == "_id" and not value):
        raise RecordError(
            f"{where}: field {key!r} must be a {'non-empty ' if key == '_id' else ''}string, got {value!r}"
        )
    return value


def _read_corpus(path: Path) -> list[dict]:
    corpus, seen = [], {}
    for number, row in _json_lines(path):
        where = f"{path}:{number}"
        doc_id = _text_field(row, "_id", where, required=True)
        if doc_id in seen:
            raise RecordError(f"{where}: duplicate document id {doc_id!r} (first on line {seen[doc_id]})")
        seen[doc_id] = number
        title = _text_field(row, "title", where, required=False)
        corpus.append({"id": doc_id, "title": title, "text": _text_field(row, "text", where, required=True)})
    return corpus


def _read_queries(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    queries, instructions, seen = {}, {}, {}
    for number, row in _json_lines(path):
        where = f"{path}:{number}"
        query_id = _text_field(row, "_id", where, required=True)
        if query_id in seen:
            raise RecordError(f"{where}: duplicate query id {query_id!r} (first on line {seen[query_id]})")
        seen[query_id] = number
        queries[query_id] = _text_field(row, "text", where, required=True)
        if row.get("instruction") is not None:
            instructions[query_id] = _text_field(row, "instruction", where, required=True)
    return queries, instructions


def _read_qrels(path: Path, queries: dict[str, str]) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise RecordError(f"{path}: missing (no qrels for this split)")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            columns = line.split("\t")
            where = f"{path}:{number}"
            if len(columns) != 3:
                raise RecordError(f"{where}: expected 3 tab-separated columns {QRELS_HEADER}, got {len(columns)}")
            if number == 1 and not columns[2].strip().lstrip("-").isdigit():
                continue  # the header line ("query-id corpus-id score" in BEIR's files)
            query_id, doc_id, score = columns  # ids verbatim: an id may legitimately hold spaces
            try:
                grade = int(score.strip())
            except ValueError:
                raise RecordError(f"{where}: score {score!r} is not an integer grade") from None
            if query_id not in queries:
                raise RecordError(f"{where}: query id {query_id!r} is not in {path.parent.parent / QUERIES}")
            judged = qrels.setdefault(query_id, {})
            if doc_id in judged:
                raise RecordError(f"{where}: pair ({query_id!r}, {doc_id!r}) is judged twice")
            judged[doc_id] = grade
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> RetrievalTask:
    """Read a BEIR folder; only queries judged in qrels/<split>.tsv are kept (BEIR ships queries of all splits).

    Qrels may name documents that the corpus lacks: that is not an error here, because such a pair can only lower a
    retriever's score, never break evaluation. Task builders of this project test that it never happens.
    """
    folder = Path(folder)
    corpus = _read_corpus(folder / CORPUS)
    all_queries, all_instructions = _read_queries(folder / QUERIES)
    qrels = _read_qrels(folder / "qrels" / f"{split}.tsv", all_queries)
    queries = {query_id: text for query_id, text in all_queries.items() if query_id in qrels}
    instructions = {query_id: text for query_id, text in all_instructions.items() if query_id in qrels}
    return RetrievalTask(name=folder.name, corpus=corpus, queries=queries, qrels=qrels, instructions=instructions)


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "\t\r\n"):
        raise RecordError(f"{what} {value!r} must be a non-empty string without tabs or line breaks (qrels are TSV)")
    return value


def write_beir(task: RetrievalTask, folder: str | Path, split: str = "test") -> Path:
    """Write `task` as a BEIR folder (UTF-8, instructions as a query field) and return the folder."""
    folder = Path(folder)
    doc_ids = [
        _check_id(doc.get("id"), f"task {task.name!r}: corpus[{index}] id") for index, doc in enumerate(task.corpus)
    ]
    if len(set(doc_ids)) != len(doc_ids):
        duplicate = next(doc_id for doc_id in doc_ids if doc_ids.count(doc_id) > 1)
        raise RecordError(f"task {task.name!r}: document id {duplicate!r} appears more than once in the corpus")
    for query_id, judged in task.qrels.items():
        if query_id not in task.queries:
            raise RecordError(f"task {task.name!r}: qrels query {query_id!r} has no text in queries")
        for doc_id in judged:
            _check_id(doc_id, f"task {task.name!r}: qrels of query {query_id!r} name doc id")
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with (folder / CORPUS).open("w", encoding="utf-8") as out:
        for doc in task.corpus:
            row = {"_id": doc["id"], "title": doc.get("title", ""), "text": doc["text"]}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (folder / QUERIES).open("w", encoding="utf-8") as out:
        for query_id, text in task.queries.items():
            row = {"_id": _check_id(query_id, f"task {task.name!r}: query id"), "text": text}
            if query_id in task.instructions:
                row["instruction"] = task.instructions[query_id]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (folder / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as out:
        out.write("\t".join(QRELS_HEADER) + "\n")
        for query_id, judged in task.qrels.items():
            for doc_id, grade in judged.items():
                out.write(f"{query_id}\t{doc_id}\t{int(grade)}\n")
    return folder
