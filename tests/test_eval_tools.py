"""The evaluation job on tools: instructed retrieval (with vs without the instruction, MAIR / ToolRet task format)
and the tool-call loaders beyond BFCL (Seal-Tools, API-Bank level 1) with gold and agent predictions.

Everything here runs in-process (real BM25 index, real tiny policy through LLMEngineCore); the shared-data tests skip
cleanly on a clone without ../shared/data."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from pipelines.data.beir import RetrievalTask, write_beir
from pipelines.data.world import WorldConfig
from pipelines.evaluate import run_job, synthetic_task
from tests.conftest import REPO

TINY_WORLD = WorldConfig(people_per_split=10, companies_per_split=5, cities_per_split=4, train_questions=10,
                         dev_questions=6, test_questions=12)  # fmt: skip


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="evaluate", overrides=list(overrides))


# ---------------------------------------------------------------------------------------------------- instructed


def test_instructed_retrieval_on_a_mair_style_folder_scores_both_ways(tmp_path):
    task = synthetic_task(TINY_WORLD, "test")
    write_beir(task, tmp_path / "instructed")
    assert all("instruction" in json.loads(line) for line in (tmp_path / "instructed" / "queries.jsonl").open())
    result = run_job(_compose("task=instructed", "retriever=bm25", f"data.path={tmp_path / 'instructed'}",
                              f"output_dir={tmp_path / 'out'}"))  # fmt: skip
    (row,) = result["rows"]
    assert row["task"] == "instructed" and row["queries"] == row["instructed"] == len(task.queries)
    for metric in ("ndcg@10", "recall@10", "mrr@10"):
        assert 0 <= row[metric] <= 1 and 0 <= row[f"{metric} +instr"] <= 1
        assert row[f"{metric} delta"] == pytest.approx(row[f"{metric} +instr"] - row[metric])
    assert row["recall@10"] > 0.3  # sub-questions name their subject: BM25 finds most passages
    assert (tmp_path / "out" / "instructed_retrieval.md").is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"] == result["rows"]


def test_instructed_retrieval_refuses_tasks_without_instructions_or_unknown_names(tmp_path):
    task = synthetic_task(TINY_WORLD, "test")
    write_beir(RetrievalTask("plain", task.corpus, task.queries, task.qrels), tmp_path / "plain")
    with pytest.raises(ValueError, match="carry no instruction"):
        run_job(_compose("task=instructed", "retriever=bm25", f"data.path={tmp_path / 'plain'}",
                         f"output_dir={tmp_path / 'out'}"))  # fmt: skip
    with pytest.raises(ValueError, match=r"evaluate.tool_tasks: \['toolbench'\]"):
        run_job(_compose("task=instructed", "evaluate.tool_tasks=[toolbench]", f"output_dir={tmp_path / 'out'}"))


@pytest.mark.shared_data
def test_instructed_table_over_shared_tool_tasks(shared_data, tmp_path):
    result = run_job(_compose("task=instructed", "retriever=bm25", "evaluate.max_queries=60",
                              "evaluate.tool_tasks=[seal_tools,apibench_tensorflowhub]",
                              f"evaluate.shared_root={shared_data}", f"output_dir={tmp_path}"))  # fmt: skip
    rows = {row["task"]: row for row in result["rows"]}
    assert set(rows) == {"seal_tools", "apibench_tensorflowhub"}
    for row in rows.values():
        assert row["queries"] == row["instructed"] == 60 and row["corpus"] > 50
    # the instruction is part of the query text BM25 scores: it must change some ranking
    assert any(row[f"{m} delta"] != 0 for row in rows.values() for m in ("ndcg@10", "mrr@10"))
    assert rows["seal_tools"]["recall@10"] > 0.5  # Seal-Tools queries name their tools' purposes closely
