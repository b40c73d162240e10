"""The records that flow between stages, as Arrow schemas, with writers and validating readers.

One module owns every schema so that generation, training, evaluation and serving agree on field names and types.
Every output folder holds Parquet files plus `manifest.json` (kind, schema version, counts, config, git sha), so a
person or a resumed job can tell what a folder is without reading it. Readers validate and name the file, row and
field of the first bad value: a corrupt shard fails loudly instead of training on garbage.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class RecordError(ValueError):
    """A record that does not fit its schema; the message names where."""


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


STEP = pa.struct([_f("role", pa.string()), _f("start", pa.int32()), _f("end", pa.int32()), _f("text", pa.string(), True)])
DECOMPOSITION_STEP = pa.struct([_f("question", pa.string()), _f("answer", pa.string()), _f("passage_id", pa.string())])
TOKENS = pa.list_(pa.int32())

QUESTION = pa.schema(
    [
        _f("id", pa.string()),
        _f("split", pa.string()),
        _f("question", pa.string()),
        _f("answers", pa.list_(pa.string())),
        _f("kind", pa.string()),
        _f("hops", pa.int32()),
        _f("decomposition", pa.list_(DECOMPOSITION_STEP)),
        _f("supporting_passage_ids", pa.list_(pa.string())),
        _f("entity_ids", pa.list_(pa.string())),
    ]
)
DOCUMENT = pa.schema(
    [
        _f("id", pa.string()),
        _f("title", pa.string()),
        _f("text", pa.string()),
        _f("entity_id", pa.string(), nullable=True),
        _f("is_distractor", pa.bool_()),
    ]
)
TOOL_SPEC = pa.schema(
    [_f("name", pa.string()), _f("description", pa.string()), _f("parameters", pa.string())]  # JSON schema as text
)
TOOL_TASK = pa.schema(
    [
        _f("id", pa.string()),
        _f("split", pa.string()),
        _f("query", pa.string()),
        _f("tools", pa.list_(pa.string())),
        _f("gold_calls", pa.string()),  # JSON list of {"name", "arguments"}: argument types vary per tool
        _f("answer", pa.string()),
    ]
)
TRAJECTORY = pa.schema(
    [
        _f("id", pa.string()),
        _f("example_id", pa.string()),
        _f("sample_index", pa.int32()),
        _f("prompt_ids", TOKENS),
        _f("token_ids", TOKENS),  # everything after the prompt: model tokens and inserted observations
        _f("loss_mask", pa.list_(pa.int8())),  # 1 on tokens the model generated, 0 on observations
        _f("logprobs", pa.list_(pa.float32())),  # sampling-time logprob per token (0 where masked)
        _f("steps", pa.list_(STEP)),
        _f("answer", pa.string(), nullable=True),
        _f("finish_reason", pa.string()),
        _f("valid", pa.bool_()),
    ]
)
WEIGHTED_SAMPLE = pa.schema(
    [
        _f("example_id", pa.string()),
        _f("target", pa.string()),  # what the sample trains: `policy` (ExSearch), `selector` or `generator` (DRO)
        _f("sample_index", pa.int32()),
        _f("prompt_ids", TOKENS),
        _f("token_ids", TOKENS),
        _f("loss_mask", pa.list_(pa.int8())),
        _f("log_likelihood", pa.float32()),  # log p(gold answer | x, z) used for the weight
        _f("weight", pa.float32()),
        _f("answer", pa.string(), nullable=True),  # what the sampled trajectory answered (None: it did not)
        _f("correct", pa.bool_()),  # that answer matches a gold answer (exact match): rejection sampling keeps these
        _f("valid", pa.bool_()),  # the trajectory followed the protocol to an answer
    ]
)
PREFERENCE_PAIR = pa.schema(
    [
        _f("id", pa.string()),
        _f("example_id", pa.string()),
        _f("prompt_ids", TOKENS),
        _f("chosen_ids", TOKENS),
        _f("rejected_ids", TOKENS),
        _f("prefix_length", pa.int32()),  # tokens shared by chosen and rejected after the prompt
        _f("chosen_score", pa.float32()),
        _f("rejected_score", pa.float32()),
    ]
)
METRICS_ROW = pa.schema(
    [
        _f("run", pa.string()),
        _f("iteration", pa.int32()),
        _f("split", pa.string()),
        _f("metric", pa.string()),
        _f("value", pa.float64()),
    ]
)


def _same_length(*fields: str) -> Callable[[pa.Table], tuple[int, str] | None]:
    """A table check: the list fields have equal lengths in every row (token ids, mask and logprobs align)."""

    def check(table: pa.Table):
        lengths = [pc.list_value_length(table.column(f)) for f in fields]
        for other, name in zip(lengths[1:], fields[1:], strict=True):
            bad = pc.not_equal(lengths[0], other)
            if pc.any(bad).as_py():
                row = pc.index(bad, True).as_py()
                return row, f"{name} has {other[row].as_py()} entries but {fields[0]} has {lengths[0][row].as_py()}"
        return None

    return check


def _prefix_within(table: pa.Table):
    short = pc.min_element_wise(pc.list_value_length(table.column("chosen_ids")), pc.list_value_length(table.column("rejected_ids")))
    bad = pc.greater(table.column("prefix_length"), short)
    if pc.any(bad).as_py():
        return pc.index(bad, True).as_py(), "prefix_length is longer than chosen_ids or rejected_ids"
    return None


@dataclass(frozen=True)
class RecordKind:
    name: str
    schema: pa.Schema
    key: str | None  # the field that identifies a row in error messages
    check: Callable[[pa.Table], tuple[int, str] | None] | None = None


KINDS: dict[str, RecordKind] = {
    kind.name: kind
    for kind in [
        RecordKind("question", QUESTION, "id"),
        RecordKind("document", DOCUMENT, "id"),
        RecordKind("tool_spec", TOOL_SPEC, "name"),
        RecordKind("tool_task", TOOL_TASK, "id"),
        RecordKind("trajectory", TRAJECTORY, "id", _same_length("token_ids", "loss_mask", "logprobs")),
        RecordKind("weighted_sample", WEIGHTED_SAMPLE, "example_id", _same_length("token_ids", "loss_mask")),
        RecordKind("preference_pair", PREFERENCE_PAIR, "id", _prefix_within),
        RecordKind("metrics_row", METRICS_ROW, "metric"),
    ]
}


def kind_of(name: str) -> RecordKind:
    try:
        return KINDS[name]
    except KeyError:
        raise RecordError(f"unknown record kind {name!r}; known: {sorted(KINDS)}") from None


def _row_label(kind: RecordKind, table: pa.Table, row: int, source: str) -> str:
    where = f"{source}: " if source else ""
    key = ""
    if kind.key and kind.key in table.column_names:
        key = f" ({kind.key}={table.column(kind.key)[row].as_py()!r})"
    return f"{where}{kind.name} row {row}{key}"


def _first_bad_value(kind: RecordKind, rows: Sequence[dict], source: str) -> str:
    """Slow path, only after a fast conversion failed: find the first row and field that do not convert."""
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"{source}{kind.name} row {index}: expected a mapping, got {type(row).__name__}"
        for field in kind.schema:
            try:
                pa.array([row.get(field.name)], type=field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as error:
                return f"{source}{kind.name} row {index} field {field.name!r}: {error}"
    return f"{source}{kind.name}: rows do not convert to the schema"


def validate_table(table: pa.Table, kind_name: str, source: str = "") -> pa.Table:
    """Check a table against its kind: fields present with the right types, no nulls where not allowed, row checks."""
    kind = kind_of(kind_name)
    missing = [name for name in kind.schema.names if name not in table.column_names]
    if missing:
        raise RecordError(f"{source + ': ' if source else ''}{kind.name} records lack field(s) {missing}")
    table = table.select(kind.schema.names)
    for field in kind.schema:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
                raise RecordError(
                    f"{source + ': ' if source else ''}{kind.name} field {field.name!r} has type {column.type}, "
                    f"expected {field.type} ({error})"
                ) from None
            table = table.set_column(table.schema.get_field_index(field.name), field, column)
        if not field.nullable and column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            raise RecordError(f"{_row_label(kind, table, row, source)} field {field.name!r} is null")
    if kind.check is not None and table.num_rows:
        failure = kind.check(table)
        if failure is not None:
            row, reason = failure
            raise RecordError(f"{_row_label(kind, table, row, source)}: {reason}")
    return table.cast(kind.schema)


def to_table(rows: Sequence[dict], kind_name: str, source: str = "") -> pa.Table:
    """Rows (dicts) to a validated Arrow table of the kind's schema."""
    kind = kind_of(kind_name)
    prefix = f"{source}: " if source else ""
    rows = list(rows)
    try:
        table = pa.Table.from_pylist(rows, schema=kind.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, AttributeError):
        raise RecordError(_first_bad_value(kind, rows, prefix)) from None
    names = set(kind.schema.names)
    for index, row in enumerate(rows):  # from_pylist silently drops unknown keys and fills missing ones with null
        missing, unexpected = sorted(names - set(row)), sorted(set(row) - names)
        if missing or unexpected:
            raise RecordError(f"{prefix}{kind.name} row {index}: missing field(s) {missing}, unexpected {unexpected}")
    return validate_table(table, kind_name, source)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_manifest(folder: str | Path, kind_name: str, count: int, config: dict | None = None, **extra) -> Path:
    """Describe a finished output folder. Written last, so a folder with a manifest is complete."""
    kind = kind_of(kind_name)
    manifest = {
        "kind": kind.name,
        "schema_version": SCHEMA_VERSION,
        "schema": [f"{f.name}: {f.type}" for f in kind.schema],
        "count": int(count),
        "files": sorted(p.name for p in Path(folder).glob("*.parquet")),
        "git_sha": git_sha(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config or {},
        **extra,
    }
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def write_records(
    rows: Iterable[dict] | pa.Table, folder: str | Path, kind_name: str, config: dict | None = None, **extra
) -> Path:
    """Validate, write one Parquet file and the manifest. For large outputs, Ray Data writes shards and the caller
    writes the manifest with `write_manifest`."""
    folder = Path(folder)
    table = validate_table(rows, kind_name) if isinstance(rows, pa.Table) else to_table(list(rows), kind_name)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet")
    write_manifest(folder, kind_name, table.num_rows, config, **extra)
    return folder


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise RecordError(f"{folder}: no {MANIFEST} (an unfinished or foreign output folder)")
    return json.loads(path.read_text())


def read_records(folder: str | Path, kind_name: str) -> pa.Table:
    """Read every Parquet file of an output folder, validating each; errors name the file, row and field."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("kind") != kind_name:
        raise RecordError(f"{folder}: holds {manifest.get('kind')!r} records, not {kind_name!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"{folder}: schema version {manifest.get('schema_version')}, this code reads {SCHEMA_VERSION}")
    files = sorted(folder.glob("*.parquet"))
    tables = []
    for path in files:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise RecordError(f"{path}: unreadable Parquet ({error})") from None
        tables.append(validate_table(table, kind_name, source=str(path)))
    table = pa.concat_tables(tables) if tables else kind_of(kind_name).schema.empty_table()
    if table.num_rows != manifest.get("count"):
        raise RecordError(f"{folder}: manifest counts {manifest.get('count')} rows, files hold {table.num_rows}")
    return table
