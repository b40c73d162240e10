"""Records: every kind round-trips through Parquet; bad rows and corrupt files fail with file, row and field named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import records
from pipelines.records import RecordError

TRAJECTORY = {
    "id": "t-1", "example_id": "q-1", "sample_index": 0, "prompt_ids": [1, 2], "token_ids": [5, 6, 7],
    "loss_mask": [1, 0, 1], "logprobs": [-0.5, 0.0, -1.25],
    "steps": [{"role": "search", "start": 0, "end": 1, "text": "x"}, {"role": "answer", "start": 2, "end": 3, "text": None}],
    "answer": "Kalovren", "finish_reason": "stop", "valid": True,
}
EXAMPLES = {
    "question": {
        "id": "q-1", "split": "dev", "question": "Where was the founder of X born?", "answers": ["Kalovren"],
        "kind": "bridge", "hops": 2,
        "decomposition": [{"question": "Who founded X?", "answer": "Mira", "passage_id": "doc-1"},
                          {"question": "Where was Mira born?", "answer": "Kalovren", "passage_id": "doc-2"}],
        "supporting_passage_ids": ["doc-1", "doc-2"], "entity_ids": ["company-1", "person-1"],
    },
    "document": {"id": "doc-1", "title": "X", "text": "X was founded by Mira.", "entity_id": None, "is_distractor": False},
    "tool_spec": {"name": "lookup", "description": "Look up", "parameters": json.dumps({"type": "object"})},
    "tool_task": {"id": "tt-1", "split": "dev", "query": "q", "tools": ["lookup"], "gold_calls": "[]", "answer": "a"},
    "trajectory": TRAJECTORY,
    "weighted_sample": {"example_id": "q-1", "target": "policy", "sample_index": 0, "prompt_ids": [1], "token_ids": [2, 3],
                        "loss_mask": [1, 1], "log_likelihood": -2.0, "weight": 0.25, "answer": "Kalovren",
                        "correct": True, "valid": True},
    "preference_pair": {"id": "p-1", "example_id": "q-1", "prompt_ids": [1], "chosen_ids": [4, 5, 6],
                        "rejected_ids": [4, 9], "prefix_length": 1, "chosen_score": 1.0, "rejected_score": -1.0},
    "metrics_row": {"run": "r", "iteration": 0, "split": "dev", "metric": "em", "value": 0.5},
}


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(records.KINDS)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip(tmp_path, kind):
    folder = records.write_records([EXAMPLES[kind]] * 3, tmp_path / kind, kind, config={"seed": 1})
    table = records.read_records(folder, kind)
    assert table.num_rows == 3
    assert table.to_pylist()[0] == EXAMPLES[kind]
    manifest = records.read_manifest(folder)
    assert manifest["count"] == 3 and manifest["kind"] == kind and manifest["config"] == {"seed": 1}
    assert manifest["schema_version"] == records.SCHEMA_VERSION


def test_bad_value_names_row_and_field():
    rows = [dict(TRAJECTORY), dict(TRAJECTORY, id="t-2", sample_index="first")]
    with pytest.raises(RecordError, match=r"trajectory row 1 field 'sample_index'"):
        records.to_table(rows, "trajectory")


def test_missing_and_unexpected_fields_are_named():
    row = dict(TRAJECTORY)
    del row["valid"]
    with pytest.raises(RecordError, match=r"row 0: missing field\(s\) \['valid'\]"):
        records.to_table([row], "trajectory")
    with pytest.raises(RecordError, match="unexpected.*'reward'"):
        records.to_table([dict(TRAJECTORY, reward=1.0)], "trajectory")


def test_misaligned_mask_is_named():
    with pytest.raises(RecordError, match=r"row 0 \(id='t-1'\): loss_mask has 2 entries but token_ids has 3"):
        records.to_table([dict(TRAJECTORY, loss_mask=[1, 1])], "trajectory")


def _write_raw(folder, table, kind, count):
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    records.write_manifest(folder, kind, count)


def test_corrupt_parquet_row_is_named(tmp_path):
    """A shard written by something else, with a null id in row 2 and a short mask in row 1."""
    good = records.to_table([TRAJECTORY] * 3, "trajectory").to_pylist()
    loose = pa.schema([f.with_nullable(True) for f in records.TRAJECTORY])
    bad_null = [dict(r) for r in good]
    bad_null[2]["id"] = None
    _write_raw(tmp_path / "a", pa.Table.from_pylist(bad_null, schema=loose), "trajectory", 3)
    with pytest.raises(RecordError, match=r"part-00000.parquet: trajectory row 2 .*field 'id' is null"):
        records.read_records(tmp_path / "a", "trajectory")

    bad_mask = [dict(r) for r in good]
    bad_mask[1]["loss_mask"] = [1]
    _write_raw(tmp_path / "b", pa.Table.from_pylist(bad_mask, schema=loose), "trajectory", 3)
    with pytest.raises(RecordError, match=r"part-00000.parquet: trajectory row 1 \(id='t-1'\): loss_mask has 1"):
        records.read_records(tmp_path / "b", "trajectory")


def test_wrong_column_type_is_named(tmp_path):
    table = pa.table({"run": ["r"], "iteration": ["zero"], "split": ["dev"], "metric": ["em"], "value": [1.0]})
    _write_raw(tmp_path / "m", table, "metrics_row", 1)
    with pytest.raises(RecordError, match="field 'iteration' has type string, expected int32"):
        records.read_records(tmp_path / "m", "metrics_row")


def test_garbled_file_is_named(tmp_path):
    folder = records.write_records([EXAMPLES["document"]], tmp_path / "docs", "document")
    (folder / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(RecordError, match=r"part-00000.parquet: unreadable Parquet"):
        records.read_records(folder, "document")


def test_unfinished_or_foreign_folders_are_refused(tmp_path):
    with pytest.raises(RecordError, match="no manifest.json"):
        records.read_records(tmp_path, "document")
    folder = records.write_records([EXAMPLES["document"]], tmp_path / "docs", "document")
    with pytest.raises(RecordError, match="holds 'document' records, not 'question'"):
        records.read_records(folder, "question")
    pq.write_table(records.to_table([EXAMPLES["document"]], "document"), folder / "part-00001.parquet")
    with pytest.raises(RecordError, match="manifest counts 1 rows, files hold 2"):
        records.read_records(folder, "document")
