"""The evaluation job end to end, through Hydra's compose API on the session's Ray cluster.

One BEIR folder written with pipelines.data.beir.write_beir from a tiny synthetic world: split `test` holds the
world's sub-questions (a realistic task), split `dev` each document's own text as its query (perfect retrieval for
a dense index: a text is closest to itself). Both jobs share `retriever.index_dir`, so the second one reuses the
index the first built with the Ray Data job (from the BEIR folder's corpus.jsonl).
"""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from actors.retriever import MANIFEST, document_text
from pipelines.data.beir import RetrievalTask, load_beir, write_beir
from pipelines.data.world import WorldConfig
from pipelines.evaluate import METRIC_ORDER, evenly_spaced, run_job, synthetic_task
from tests.conftest import REPO

TINY_WORLD = WorldConfig(
    people_per_split=12, companies_per_split=6, cities_per_split=5, countries=4, train_questions=2,
    dev_questions=2, test_questions=20, train_tool_tasks=0, dev_tool_tasks=0, test_tool_tasks=0,
)  # fmt: skip


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def beir_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    task = synthetic_task(TINY_WORLD, "test")
    write_beir(task, root / "tiny")
    perfect = RetrievalTask(
        "tiny",
        task.corpus,
        {f"self-{d['id']}": document_text(d["title"], d["text"]) for d in task.corpus[:40]},
        {f"self-{d['id']}": {d["id"]: 1} for d in task.corpus[:40]},
    )
    write_beir(perfect, root / "perfect", split="dev")
    (root / "tiny" / "qrels" / "dev.tsv").write_bytes((root / "perfect" / "qrels" / "dev.tsv").read_bytes())
    with (root / "tiny" / "queries.jsonl").open("a", encoding="utf-8") as out:  # both splits' queries in one file
        out.write((root / "perfect" / "queries.jsonl").read_text(encoding="utf-8"))
    return root / "tiny"


def test_config_groups_compose_and_typos_are_named():
    cfg = _compose("retriever=bm25", "evaluate.use_instructions=true")
    assert cfg.retriever.kind == "bm25" and cfg.evaluate.use_instructions and cfg.task == "retrieval"
    assert cfg.data.source == "auto"
    assert _compose("retriever=dense_ivf").retriever.index == "ivf"
    with pytest.raises(Exception) as caught:
        _compose("evaluate.use_instruction=true")
    assert "use_instruction" in f"{caught.value} {caught.value.__cause__}"


def test_evenly_spaced_cap_is_deterministic_and_spread():
    ids = [str(i) for i in range(10)]
    assert evenly_spaced(ids, 5) == ["0", "2", "4", "6", "8"] and evenly_spaced(ids, None) == ids


def test_evaluate_job_writes_every_metric_and_perfect_retrieval_scores_one(ray_cluster, beir_folder, tmp_path):
    index_dir = tmp_path / "index"
    common = [f"data.path={beir_folder}", "retriever=dense_flat", f"retriever.index_dir={index_dir}",
              "cluster.num_cpus=2", "cluster.include_dashboard=false"]  # fmt: skip

    realistic = run_job(_compose(*common, f"output_dir={tmp_path / 'test'}", "evaluate.use_instructions=true"))
    written = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert written["metrics"] == realistic["metrics"]
    assert set(written["metrics"]) == set(METRIC_ORDER)
    assert all(0.0 <= value <= 1.0 for value in written["metrics"].values())
    task = load_beir(beir_folder, "test")
    assert written["queries"] == len(task.queries) == written["instructed_queries"]
    assert written["metrics"]["recall@100"] >= written["metrics"]["recall@5"] > 0.5
    manifest = json.loads((index_dir / MANIFEST).read_text())
    assert manifest["count"] == len(task.corpus) and manifest["corpus"].startswith("files:")  # built from the file
    lines = (tmp_path / "test" / "run.trec").read_text().splitlines()
    query_id, q0, doc_id, rank, score, tag = lines[0].split()
    assert (q0, rank, tag) == ("Q0", "1", "dense-flat+instr") and doc_id.startswith("doc-") and float(score) > 0
    assert len(lines) == len(task.queries) * min(100, len(task.corpus))

    stamp = (index_dir / MANIFEST).stat().st_mtime_ns
    perfect = run_job(_compose(*common, f"output_dir={tmp_path / 'dev'}", "evaluate.split=dev"))
    assert (index_dir / MANIFEST).stat().st_mtime_ns == stamp  # the index was reused
    assert perfect["queries"] == 40
    assert perfect["metrics"]["ndcg@10"] == pytest.approx(1.0)
    assert perfect["metrics"]["mrr@10"] == pytest.approx(1.0) and perfect["metrics"]["c@5"] == 1.0
