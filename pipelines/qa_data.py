"""QA sets as published (HotpotQA, MuSiQue, NQ-open, Bamboogle), read into one shape, and the QA predictions format.

Why one shape: the evaluation job scores answers (EM / F1 / accuracy, `pipelines/qa_metrics.py`) and supporting
passages the same way whichever set they come from. The format is recognised from the file itself:

- hotpotqa: a JSON array with `_id`, `question`, `answer`, `context`, `supporting_facts` (the supporting passages
  are the titles named there); corpus: `<stem>_corpus.json` ({title: [sentences]}) beside it, else the contexts.
- musique: JSON array or lines with `id`, `question`, `answer`, `answer_aliases` (acceptable too), `paragraphs`
  (`is_supporting` marks the supporting ones), `question_decomposition` (its length is the hop count); corpus:
  `<stem>_corpus.json` ([{"title", "text"}]) beside it, else the questions' paragraphs.
- nq_open: JSON lines with `question` and `answer` (a list of acceptable answers); no passages.
- bamboogle: CSV with columns `Question` and `Answer`; no passages.

A folder holding one question file may be given instead of the file (`*_corpus.json` files are not questions).

Passages get ids that a person can read and a predictions file can quote: the title, or `<title> #<k>` when several
distinct passages share a title (MuSiQue's corpus has such titles). Two identical passages are one passage.
NQ-open and Bamboogle ship no ids: theirs are `<format>-<row number from 0>`.

Predictions file (`predictions=<file>`), JSON lines, one row per question id:

    {"id": "5a77ec115542992a6e59dff7", "answer": "a spirit", "passages": ["Alû", "Lilu (mythology)"]}

`passages` (optional) are passage ids, best first; they are scored against the supporting passages where the set
has them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.data.toolsets import need, read_rows
from pipelines.records import RecordError

QA_FORMATS = ("hotpotqa", "musique", "nq_open", "bamboogle")
CORPUS_SUFFIX = "_corpus.json"


class QADataError(RecordError):
    """A QA file that does not have the shape its format needs; the message names the file, row and field (as the
    shared readers' RecordError does for a missing field or bad JSON)."""


@dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    """Every acceptable answer (metrics take the best match over them)."""
    supporting: list[str] = field(default_factory=list)
    """Ids of the gold supporting passages; empty when the set gives none."""
    kind: str = ""
    """HotpotQA's question type (bridge / comparison), MuSiQue's hop count (`3hop`); empty otherwise."""


@dataclass
class QADataset:
    name: str
    """`<format>:<file stem>`, e.g. `bamboogle:test`."""
    format: str
    examples: list[QAExample]
    corpus: list[dict] = field(default_factory=list)
    """{"id", "title", "text"} passages, in first-seen order; empty when the set has none."""
    corpus_source: str = ""
    """Where the corpus came from: the corpus file, or the questions' own paragraphs (a distractor corpus)."""


@dataclass
class QAPrediction:
    answer: str | None
    passages: list[str] | None = None


# ---------------------------------------------------------------------------------------------------- passages


class _Passages:
    """Distinct (title, text) passages in first-seen order; ids are assigned once all are known."""

    def __init__(self) -> None:
        self._order: dict[tuple[str, str], None] = {}

    def add(self, title: str, text: str) -> tuple[str, str]:
        key = (title, text)
        self._order.setdefault(key, None)
        return key

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._order

    def ids(self) -> dict[tuple[str, str], str]:
        per_title: dict[str, int] = {}
        for title, _ in self._order:
            per_title[title] = per_title.get(title, 0) + 1
        ids, seen = {}, {}
        for title, text in self._order:
            if per_title[title] == 1:
                ids[(title, text)] = title
            else:
                seen[title] = seen.get(title, 0) + 1
                ids[(title, text)] = f"{title} #{seen[title]}"
        return ids

    def corpus(self) -> list[dict]:
        return [{"id": pid, "title": title, "text": text} for (title, text), pid in self.ids().items()]


# ---------------------------------------------------------------------------------------------------- reading


def question_file(path: str | Path) -> Path:
    """The question file at `path`, or the only one in the folder `path`."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such QA file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".csv")
                   and not p.name.endswith(CORPUS_SUFFIX))  # fmt: skip
    if len(files) != 1:
        raise QADataError(f"{path}: {len(files)} question files ({[p.name for p in files]}); pass one of them")
    return files[0]


def detect_format(path: Path, first: dict | None) -> str:
    if path.suffix == ".csv":
        return "bamboogle"
    if first is None:
        raise QADataError(f"{path}: no rows")
    if "supporting_facts" in first and "context" in first:
        return "hotpotqa"
    if "paragraphs" in first:
        return "musique"
    if "question" in first and isinstance(first.get("answer"), list):
        return "nq_open"
    raise QADataError(f"{path}: rows with keys {sorted(first)} match none of the QA formats {QA_FORMATS}")


def _corpus_file(path: Path) -> list[tuple[str, str]] | None:
    """(title, text) passages of `<stem>_corpus.json` beside the questions: HotpotQA's {title: [sentences]} or
    MuSiQue's [{"title", "text"}]."""
    corpus = path.with_name(path.stem + CORPUS_SUFFIX)
    if not corpus.is_file():
        return None
    data = json.loads(corpus.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return [(str(title), "".join(sentences) if isinstance(sentences, list) else str(sentences))
                for title, sentences in data.items()]  # fmt: skip
    if isinstance(data, list) and all(isinstance(d, dict) and "title" in d and "text" in d for d in data):
        return [(str(d["title"]), str(d["text"])) for d in data]
    raise QADataError(f"{corpus}: expected {{title: [sentences]}} or [{{'title', 'text'}}]")


def _hotpotqa(rows: list[tuple[str, dict]], passages: _Passages) -> list[tuple[QAExample, list[tuple[str, str]]]]:
    out = []
    for where, row in rows:
        context = {}
        for item in need(row, "context", where, list):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
                raise QADataError(f"{where}: a context entry must be [title, [sentences]], got {str(item)[:80]}")
            context[str(item[0])] = passages.add(str(item[0]), "".join(item[1]))
        supporting = []
        for fact in need(row, "supporting_facts", where, list):
            title = str(fact[0]) if isinstance(fact, list) and fact else None
            if title not in context:
                raise QADataError(f"{where}: supporting fact {fact!r} names no context paragraph")
            supporting.append(context[title])
        example = QAExample(str(need(row, "_id", where)), need(row, "question", where), [need(row, "answer", where)],
                            kind=str(row.get("type", "")))  # fmt: skip
        out.append((example, list(dict.fromkeys(supporting))))
    return out


def _musique(rows: list[tuple[str, dict]], passages: _Passages) -> list[tuple[QAExample, list[tuple[str, str]]]]:
    out = []
    for where, row in rows:
        supporting = []
        for index, paragraph in enumerate(need(row, "paragraphs", where, list)):
            at = f"{where} paragraphs[{index}]"
            key = passages.add(need(paragraph, "title", at), need(paragraph, "paragraph_text", at))
            if paragraph.get("is_supporting"):
                supporting.append(key)
        answers = [need(row, "answer", where)] + [str(a) for a in row.get("answer_aliases") or []]
        hops = len(row.get("question_decomposition") or [])
        example = QAExample(str(need(row, "id", where)), need(row, "question", where), answers,
                            kind=f"{hops}hop" if hops else "")  # fmt: skip
        out.append((example, supporting))
    return out


def _nq_open(rows: list[tuple[str, dict]]) -> list[QAExample]:
    examples = []
    for index, (where, row) in enumerate(rows):
        answers = [str(a) for a in need(row, "answer", where, list)]
        if not answers:
            raise QADataError(f"{where}: empty 'answer' list")
        examples.append(QAExample(f"nq_open-{index}", need(row, "question", where), answers))
    return examples


def _bamboogle(path: Path) -> list[QAExample]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"Question", "Answer"} - set(reader.fieldnames or [])
        if missing:
            raise QADataError(f"{path}: missing column(s) {sorted(missing)} (header: {reader.fieldnames})")
        examples = []
        for index, row in enumerate(reader):
            if not (row["Question"] or "").strip() or not (row["Answer"] or "").strip():
                raise QADataError(f"{path} row {index + 2}: empty Question or Answer")
            examples.append(QAExample(f"bamboogle-{index}", row["Question"].strip(), [row["Answer"].strip()]))
    return examples


def load_qa(path: str | Path) -> QADataset:
    """The QA set at `path` (a question file, or a folder holding one); see the module docstring for formats."""
    path = question_file(path)
    rows = [] if path.suffix == ".csv" else read_rows(path)
    fmt = detect_format(path, rows[0][1] if rows else None)
    if fmt == "bamboogle":
        return QADataset(f"{fmt}:{path.stem}", fmt, _bamboogle(path))
    if fmt == "nq_open":
        return QADataset(f"{fmt}:{path.stem}", fmt, _nq_open(rows))
    from_paragraphs = _Passages()
    read = _hotpotqa(rows, from_paragraphs) if fmt == "hotpotqa" else _musique(rows, from_paragraphs)
    from_file = _corpus_file(path)
    passages = from_paragraphs
    if from_file is not None:  # the corpus is the file's: paragraphs of the questions outside it are not indexed
        passages = _Passages()
        for title, text in from_file:
            passages.add(title, text)
        for example, supporting in read:
            absent = [key[0] for key in supporting if key not in passages]
            if absent:
                raise QADataError(f"{path.with_name(path.stem + CORPUS_SUFFIX)}: lacks supporting passage(s) "
                                  f"{absent} of question {example.id!r}")  # fmt: skip
    ids = passages.ids()
    for example, supporting in read:
        example.supporting = [ids[key] for key in supporting]
    source = f"{path.stem}{CORPUS_SUFFIX}" if from_file is not None else "the questions' own paragraphs"
    return QADataset(f"{fmt}:{path.stem}", fmt, [example for example, _ in read], passages.corpus(), source)


# ---------------------------------------------------------------------------------------------------- predictions


def read_qa_predictions(path: str | Path) -> dict[str, QAPrediction]:
    """question id -> QAPrediction from the JSON-lines format in the module docstring; a bad row fails with its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions={path}: no such file (or use predictions=gold|retrieval)")
    predictions: dict[str, QAPrediction] = {}
    for where, row in read_rows(path):
        if need(row, "id", where) in predictions:
            raise QADataError(f"{where}: question {row['id']!r} appears twice")
        answer, passages = row.get("answer"), row.get("passages")
        if answer is not None and not isinstance(answer, str):
            raise QADataError(f"{where}: 'answer' must be a string or null, got {type(answer).__name__}")
        if passages is not None and not (isinstance(passages, list) and all(isinstance(p, str) for p in passages)):
            raise QADataError(f"{where}: 'passages' must be a list of passage ids")
        if answer is None and passages is None:
            raise QADataError(f"{where}: needs 'answer' and/or 'passages'")
        predictions[row["id"]] = QAPrediction(answer, passages)
    return predictions


def gold_predictions(dataset: QADataset) -> dict[str, QAPrediction]:
    """The gold itself as predictions (the first answer, the supporting passages): a self-check that scores 1.0."""
    return {e.id: QAPrediction(e.answers[0], list(e.supporting) or None) for e in dataset.examples}
