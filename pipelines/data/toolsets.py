"""Tool-retrieval tasks built from tool-calling datasets, the way ToolRet builds them: query -> the tools it needs.

Tool-calling datasets already say which tools a request needs (a gold call, a list of relevant APIs); turning that
into BEIR-style qrels over a pool of tool documents lets the same retrievers and metrics that serve passage search
measure tool search. Each adapter reads one dataset under the shared data folder (`../shared/data`, see its
README) and returns a `RetrievalTask`:

- a tool document is {"id", "title": tool name, "text": name + description + compact JSON parameters}, so that every
  dataset's tools look alike to a retriever, whatever its native schema;
- ids are derived from the data (names, or a content hash where names repeat with different schemas), so they are
  stable across runs and across the `max_queries` cap;
- the corpus is every tool of the dataset, not only those of the kept queries: capping queries must not make the
  retrieval problem easier;
- every query gets a default instruction (ToolRet style, worded per dataset) in `instructions`, so instructed and
  plain retrieval can be compared on the same task.

Caps take evenly spaced queries over the whole file (not its head): these files are sorted by difficulty or
category, and the first 500 lines would be all "easy" or all one category.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipelines.data.beir import RetrievalTask, write_beir
from pipelines.records import RecordError

DEFAULT_SHARED_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_MAX_QUERIES = 500

INSTRUCTIONS = {
    "stabletoolbench": (
        "Given a user request that may need several real-world web APIs, retrieve the RapidAPI endpoints that "
        "together can complete it."
    ),
    "seal_tools": "Given a user request, retrieve all the tools (APIs) that must be called to complete it.",
    "apibench_huggingface": (
        "Given a description of a machine-learning task, retrieve the Hugging Face model API that solves it."
    ),
    "apibench_tensorflowhub": (
        "Given a description of a machine-learning task, retrieve the TensorFlow Hub model API that solves it."
    ),
    "apibench_torchhub": (
        "Given a description of a machine-learning task, retrieve the PyTorch Hub model API that solves it."
    ),
    "bfcl": "Given a user request, retrieve the functions that should be called, with arguments, to fulfil it.",
}


# ---------------------------------------------------------------------------------------------------- helpers


def compact_json(value: object) -> str:
    """JSON without spaces or key reordering: short for a retriever's limited input, stable for hashing."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def short_hash(value: object) -> str:
    return hashlib.sha1(compact_json(value).encode("utf-8")).hexdigest()[:8]


def tool_document(doc_id: str, name: str, description: str, parameters: object, **details: str) -> dict:
    """One tool as a BEIR document: the name, then what it does, then how it is called."""
    lines = [name, " ".join(str(description or "").split())]
    lines += [f"{key}: {value}" for key, value in details.items() if value]
    lines.append(f"parameters: {compact_json(parameters)}")
    return {"id": doc_id, "title": name, "text": "\n".join(line for line in lines if line)}


def spread(items: Sequence, limit: int | None) -> list:
    """At most `limit` items, evenly spaced over the whole sequence, deterministic (None = all)."""
    if limit is None or len(items) <= limit:
        return list(items)
    if limit < 1:
        raise ValueError(f"max_queries must be >= 1 or None, got {limit}")
    return [items[index * len(items) // limit] for index in range(limit)]


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, object) pairs from a JSON array or a JSON-lines file; the location names file and line/index.

    Several of these datasets are JSON lines saved with a .json suffix (BFCL, APIBench's eval files), so the format
    is told from the first character, not from the name.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (see the shared data README for where it comes from)")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecordError(f"{path}:{error.lineno}: bad JSON ({error.msg})") from None
        located = [(f"{path} item {index}", row) for index, row in enumerate(rows)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}:{number}: bad JSON ({error.msg} at column {error.colno})") from None
    for where, row in located:
        if not isinstance(row, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return located


def need(row: dict, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """row[key], or an error that names the row and the field."""
    if key not in row:
        raise RecordError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RecordError(f"{where}: field {key!r} has type {type(value).__name__}, expected {expected}")
    return value


def clean(text: str) -> str:
    """Whitespace runs to one space: names in these datasets carry stray double and trailing spaces."""
    return " ".join(text.split())


def build_task(
    name: str,
    corpus: Iterable[dict],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    instruction: str,
) -> RetrievalTask:
    """Assemble a task and check what every consumer relies on, naming the offending query or document."""
    corpus = list(corpus)
    doc_ids = set()
    for doc in corpus:
        if doc["id"] in doc_ids:
            raise RecordError(f"{name}: document id {doc['id']!r} is not unique")
        doc_ids.add(doc["id"])
    for query_id, judged in qrels.items():
        if query_id not in queries:
            raise RecordError(f"{name}: qrels query {query_id!r} has no text")
        if not any(grade > 0 for grade in judged.values()):
            raise RecordError(f"{name}: query {query_id!r} has no relevant tool")
        unknown = sorted(set(judged) - doc_ids)
        if unknown:
            raise RecordError(f"{name}: query {query_id!r} is judged on tools missing from the corpus: {unknown[:3]}")
    missing = [query_id for query_id in queries if query_id not in qrels]
    if missing:
        raise RecordError(f"{name}: queries without qrels: {missing[:3]}")
    instructions = {query_id: instruction for query_id in queries}
    return RetrievalTask(name=name, corpus=corpus, queries=queries, qrels=qrels, instructions=instructions)


# ---------------------------------------------------------------------------------------------------- adapters

STABLETOOLBENCH_GROUPS = ("G1_instruction", "G1_category", "G1_tool", "G2_instruction", "G2_category", "G3_instruction")


def _rapidapi_parameters(parameters: list | None) -> list[dict]:
    """name, type and (when given) description of each RapidAPI parameter."""
    return [
        {key: parameter[key] for key in ("name", "type", "description") if parameter.get(key)}
        for parameter in parameters or []
        if isinstance(parameter, dict)
    ]


def stabletoolbench(shared_root: Path, max_queries: int | None = DEFAULT_MAX_QUERIES) -> RetrievalTask:
    """StableToolBench solvable queries -> their "relevant APIs"; the corpus is every API offered to any query.

    Relevant APIs are named by (tool, api) only, and RapidAPI tool names repeat across categories with different
    endpoints ("👋 Demo Project"), so each is resolved inside the query's own api_list, which carries the category;
    the document id is "category::tool::api". Parameter defaults are dropped from the text: they are the example
    values the queries were generated from (a tracking number, a user id), a lexical shortcut no real request has.
    """
    folder = Path(shared_root) / "tools" / "stabletoolbench"
    corpus: dict[str, dict] = {}
    candidates: list[tuple[str, str, set[str]]] = []
    for group in STABLETOOLBENCH_GROUPS:
        for where, row in read_rows(folder / f"{group}.json"):
            offered: dict[tuple[str, str], str] = {}
            for index, api in enumerate(need(row, "api_list", where, list)):
                at = f"{where} api_list[{index}]"
                tool, endpoint = need(api, "tool_name", at), need(api, "api_name", at)
                doc_id = "::".join(clean(part) for part in (need(api, "category_name", at), tool, endpoint))
                offered[(tool, endpoint)] = doc_id
                if doc_id not in corpus:
                    parameters = {
                        "required": _rapidapi_parameters(api.get("required_parameters")),
                        "optional": _rapidapi_parameters(api.get("optional_parameters")),
                    }
                    corpus[doc_id] = tool_document(
                        doc_id,
                        f"{clean(tool)}: {clean(endpoint)}",
                        api.get("api_description", ""),
                        parameters,
                        category=clean(api["category_name"]),
                        method=api.get("method", ""),
                    )
            relevant = set()
            for pair in need(row, "relevant APIs", where, list):
                if not (isinstance(pair, list) and len(pair) == 2 and tuple(pair) in offered):
                    raise RecordError(f"{where}: relevant API {pair!r} is not in the query's api_list")
                relevant.add(offered[tuple(pair)])
            query_id = f"{group}-{need(row, 'query_id', where, (int, str))}"
            candidates.append((query_id, need(row, "query", where).strip(), relevant))
    kept = spread(candidates, max_queries)
    return build_task(
        "stabletoolbench",
        corpus.values(),
        {query_id: text for query_id, text, _ in kept},
        {query_id: dict.fromkeys(sorted(relevant), 1) for query_id, _, relevant in kept},
        INSTRUCTIONS["stabletoolbench"],
    )


def seal_tools(
    shared_root: Path,
    max_queries: int | None = DEFAULT_MAX_QUERIES,
    splits: Sequence[str] = ("test_in_domain", "test_out_domain"),
) -> RetrievalTask:
    """Seal-Tools test queries -> the tools their gold calls use; the corpus is its whole tool list (tool.jsonl).

    A "difficult" query calls several tools, some more than once (nested calls); each tool counts once.
    """
    folder = Path(shared_root) / "tools" / "seal_tools"
    corpus: dict[str, dict] = {}
    for where, tool in read_rows(folder / "tool.jsonl"):
        name = need(tool, "api_name", where)
        if name in corpus:
            raise RecordError(f"{where}: tool name {name!r} appears twice")
        parameters = {"properties": tool.get("parameters") or {}, "required": tool.get("required") or []}
        corpus[name] = tool_document(
            name, name, tool.get("api_description", ""), parameters, field=tool.get("field", "")
        )
    candidates = []
    for split in splits:
        for where, row in read_rows(folder / f"{split}.jsonl"):
            called = set()
            for index, call in enumerate(need(row, "calling", where, list)):
                name = need(call, "api", f"{where} calling[{index}]")
                if name not in corpus:
                    raise RecordError(f"{where} calling[{index}]: tool {name!r} is not in tool.jsonl")
                called.add(name)
            candidates.append((need(row, "id", where), need(row, "query", where).strip(), called))
    kept = spread(candidates, max_queries)
    return build_task(
        "seal_tools",
        corpus.values(),
        {query_id: text for query_id, text, _ in kept},
        {query_id: dict.fromkeys(sorted(called), 1) for query_id, _, called in kept},
        INSTRUCTIONS["seal_tools"],
    )


APIBENCH_FILES = {  # source -> (API database, evaluation queries)
    "huggingface": ("huggingface_api.jsonl", "huggingface_eval.json"),
    "tensorflowhub": ("tensorflowhub_api.jsonl", "tensorflow_eval.json"),
    "torchhub": ("torchhub_api.jsonl", "torchhub_eval.json"),
}
_INSTRUCTION_TEXT = re.compile(r"#{3}\s*Instruction:\s*(.*?)\s*(?:#{3}\s*Output|<<<|\Z)", re.S)


def _api_call_key(api_call: str) -> str:
    """The call with all whitespace removed: the same API is written with and without spaces after commas."""
    return "".join(api_call.split())


def _apibench_document(api: dict, where: str) -> dict:
    api_call = need(api, "api_call", where)
    name = clean(str(api.get("api_name") or api_call))
    return tool_document(
        f"{name}#{short_hash(_api_call_key(api_call))}",
        name,
        api.get("description", ""),
        api.get("api_arguments"),
        domain=clean(str(api.get("domain") or "")),
        functionality=clean(str(api.get("functionality") or "")),
        api_call=api_call,
    )


def apibench(shared_root: Path, source: str, max_queries: int | None = DEFAULT_MAX_QUERIES) -> RetrievalTask:
    """Gorilla APIBench: an evaluation instruction -> the API its gold api_call names, one task per source.

    One document per distinct api_call: the API database repeats a call in several records (TF-Hub: ~700 records,
    80 calls), and the gold label is the call, so near-duplicate records would make every query ambiguous. The
    document text comes from the first record of that call. Some gold calls are absent from the database
    (HuggingFace: 77 of 911); their eval row carries the API record (api_data), which then joins the corpus.
    """
    if source not in APIBENCH_FILES:
        raise KeyError(f"unknown APIBench source {source!r}; known: {sorted(APIBENCH_FILES)}")
    folder = Path(shared_root) / "tools" / "apibench"
    database, evaluation = APIBENCH_FILES[source]
    corpus: dict[str, dict] = {}
    for where, api in read_rows(folder / database):
        corpus.setdefault(_api_call_key(need(api, "api_call", where)), _apibench_document(api, where))
    candidates = []
    for index, (where, row) in enumerate(read_rows(folder / evaluation)):
        key = _api_call_key(need(row, "api_call", where))
        if key not in corpus:
            corpus[key] = _apibench_document(need(row, "api_data", where, dict), f"{where} api_data")
        match = _INSTRUCTION_TEXT.search(need(row, "code", where))
        if not match or not match.group(1):
            raise RecordError(f"{where}: field 'code' holds no '###Instruction:' text")
        candidates.append((f"{source}-{index}", match.group(1), corpus[key]["id"]))
    kept = spread(candidates, max_queries)
    name = f"apibench_{source}"
    return build_task(
        name,
        corpus.values(),
        {query_id: text for query_id, text, _ in kept},
        {query_id: {doc_id: 1} for query_id, _, doc_id in kept},
        INSTRUCTIONS[name],
    )


BFCL_CATEGORIES = (
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "simple_java",
    "simple_javascript",
)


def bfcl(
    shared_root: Path,
    max_queries: int | None = DEFAULT_MAX_QUERIES,
    categories: Sequence[str] = BFCL_CATEGORIES,
) -> RetrievalTask:
    """BFCL v4 questions -> the functions their gold calls use; the corpus is every function of the categories used.

    Only categories with a possible_answer file can give gold (so not "irrelevance"). The same function name comes
    with different schemas in different questions (live data), so a document is one distinct definition, with id
    "name#hash of its JSON"; a gold name is resolved in the question's own function list. The query is the user
    turns only: system prompts are agent instructions, not part of the request.
    """
    folder = Path(shared_root) / "tools" / "bfcl"
    corpus: dict[str, dict] = {}
    candidates = []
    for category in categories:
        answers = {}
        for where, row in read_rows(folder / "possible_answer" / f"BFCL_v4_{category}.json"):
            answers[need(row, "id", where)] = (where, need(row, "ground_truth", where, list))
        for where, row in read_rows(folder / f"BFCL_v4_{category}.json"):
            question_id = need(row, "id", where)
            offered = {}
            for index, function in enumerate(need(row, "function", where, list)):
                name = need(function, "name", f"{where} function[{index}]")
                doc_id = f"{clean(name)}#{short_hash(function)}"
                offered[name] = doc_id
                corpus.setdefault(
                    doc_id,
                    tool_document(doc_id, clean(name), function.get("description", ""), function.get("parameters")),
                )
            if question_id not in answers:
                raise RecordError(f"{where}: question {question_id!r} has no entry in possible_answer/")
            answer_where, ground_truth = answers[question_id]
            relevant = set()
            for call in ground_truth:
                for name in call:
                    if name not in offered:
                        raise RecordError(
                            f"{answer_where}: gold function {name!r} is not among {question_id!r}'s functions"
                        )
                    relevant.add(offered[name])
            turns = need(row, "question", where, list)
            text = "\n".join(
                message["content"].strip()
                for turn in turns
                for message in turn
                if message.get("role") == "user" and message.get("content")
            )
            if not text:
                raise RecordError(f"{where}: question {question_id!r} has no user message")
            candidates.append((question_id, text, relevant))
    kept = spread(candidates, max_queries)
    return build_task(
        "bfcl",
        corpus.values(),
        {query_id: text for query_id, text, _ in kept},
        {query_id: dict.fromkeys(sorted(relevant), 1) for query_id, _, relevant in kept},
        INSTRUCTIONS["bfcl"],
    )


TOOL_TASKS: dict[str, Callable[[Path], RetrievalTask]] = {
    "stabletoolbench": stabletoolbench,
    "seal_tools": seal_tools,
    "apibench_huggingface": functools.partial(apibench, source="huggingface"),
    "apibench_tensorflowhub": functools.partial(apibench, source="tensorflowhub"),
    "apibench_torchhub": functools.partial(apibench, source="torchhub"),
    "bfcl": bfcl,
}


def load_tool_task(
    name: str, shared_root: Path = DEFAULT_SHARED_ROOT, max_queries: int | None = DEFAULT_MAX_QUERIES
) -> RetrievalTask:
    """The named tool-retrieval task, read from `shared_root` (the shared data folder, holding tools/)."""
    if name not in TOOL_TASKS:
        raise KeyError(f"unknown tool task {name!r}; known: {sorted(TOOL_TASKS)}")
    return TOOL_TASKS[name](Path(shared_root), max_queries=max_queries)


# ---------------------------------------------------------------------------------------------------- CLI


def summary_row(task: RetrievalTask) -> tuple[str, int, int, float]:
    relevant = [sum(grade > 0 for grade in judged.values()) for judged in task.qrels.values()]
    return task.name, len(task.queries), len(task.corpus), sum(relevant) / max(len(relevant), 1)


def format_table(rows: Sequence[tuple[str, int, int, float]]) -> str:
    """A Markdown table: names left-aligned, numbers right-aligned."""
    header = ("task", "queries", "corpus docs", "mean relevant/query")
    cells = [header] + [(name, str(queries), str(docs), f"{mean:.2f}") for name, queries, docs, mean in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in cells[1:]])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write tool-retrieval tasks as BEIR folders (OUT/<task>/).")
    parser.add_argument("--out", type=Path, required=True, help="folder that receives one BEIR folder per task")
    parser.add_argument(
        "--shared", type=Path, default=DEFAULT_SHARED_ROOT, help="the shared data folder (holds tools/)"
    )
    parser.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES, help="cap per task; 0 = no cap")
    parser.add_argument("--tasks", nargs="*", default=sorted(TOOL_TASKS), choices=sorted(TOOL_TASKS), metavar="TASK")
    args = parser.parse_args(argv)
    rows = []
    for name in args.tasks:
        task = load_tool_task(name, args.shared, max_queries=args.max_queries or None)
        write_beir(task, args.out / name)
        rows.append(summary_row(task))
    print(format_table(rows))
    print(f"\nwritten under {args.out}")


if __name__ == "__main__":
    main()
