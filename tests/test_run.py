"""The main job end to end on a local Ray cluster: world -> record folders -> policy -> Ray Data token statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import pipelines.config  # noqa: F401
from actors.models import load_causal_lm
from pipelines import records
from pipelines.data.export import world_folders
from pipelines.run import prepare
from tests.conftest import REPO

SMALL_WORLD = [
    "data.world.people_per_split=30", "data.world.companies_per_split=15", "data.world.cities_per_split=10",
    "data.world.train_questions=40", "data.world.dev_questions=20", "data.world.test_questions=20",
    "data.world.train_tool_tasks=10", "data.world.dev_tool_tasks=5", "data.world.test_tool_tasks=5",
    "model.vocab_size=400", "model.copy_pretrain_steps=20",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*SMALL_WORLD, f"output_dir={out}"])
    return cfg, out, prepare(cfg, out)


def test_every_dataset_is_written_with_a_manifest(prepared):
    cfg, out, result = prepared
    folders = world_folders(out / "data")
    kinds = {"documents": "document", "tools": "tool_spec"}
    for name, folder in folders.items():
        kind = kinds.get(name, "question" if name.startswith("questions") else "tool_task")
        table = records.read_records(folder, kind)
        assert table.num_rows > 0, name
    assert records.read_records(folders["questions/dev"], "question").num_rows == 20
    questions = records.read_records(folders["questions/test"], "question").to_pylist()
    assert all(q["split"] == "test" and q["answers"] for q in questions)
    tools = records.read_records(folders["tools"], "tool_spec").to_pylist()
    assert all(json.loads(t["parameters"])["type"] == "object" for t in tools)


def test_policy_is_a_loadable_hf_folder(prepared):
    _, out, result = prepared
    model, tokenizer = load_causal_lm(result["policy"])
    assert model.config.vocab_size == len(tokenizer) <= 400 + 16
    copy = json.loads((out / "policy-copy-pretrained" / "result.json").read_text())
    assert copy["steps"] == 20 and result["policy"] == Path(copy["checkpoint"])  # recipes start from the copy-trained model


def test_summary_table_counts_tokens(prepared):
    _, out, result = prepared
    rows = {row["dataset"]: row for row in result["datasets"]}
    assert rows["questions/dev"]["rows"] == 20
    assert 5 < rows["questions/dev"]["mean_tokens"] <= rows["questions/dev"]["max_tokens"]
    assert rows["documents"]["max_tokens"] >= rows["documents"]["p95_tokens"] > 0
    assert "| questions/dev | 20 |" in (out / "datasets.md").read_text()
    assert (out / "datasets.csv").read_text().startswith("dataset,rows,")


def test_rerun_reuses_finished_folders(prepared):
    cfg, out, _ = prepared
    manifest = out / "data" / "documents" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = prepare(cfg, out)
    assert manifest.stat().st_mtime_ns == before
    assert again["policy"] == prepared[2]["policy"]  # copy pretraining is not redone


def test_serving_after_the_job_picks_the_kept_iteration_with_the_best_dev_em(tmp_path):
    import json

    from pipelines.run import best_checkpoint

    def write(folder: str, **result):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "result.json").write_text(json.dumps(result))

    with pytest.raises(ValueError, match="no iteration with a checkpoint"):
        best_checkpoint(tmp_path)
    write("iter-00-warm-start", checkpoint="warm", dev={"em": 0.2})
    write("iter-01-importance", checkpoint="imp1", kept=True, dev={"em": 0.3})
    write("iter-02-importance", checkpoint="imp1", kept=False, dev={"em": 0.5})  # rejected: dev EM fell elsewhere
    write("iter-01-uniform", checkpoint="uni1", kept=True, dev={"em": 0.25})
    assert best_checkpoint(tmp_path) == "imp1"
    write("iter-02-uniform", checkpoint="uni2", kept=True, dev={"em": 0.3})
    assert best_checkpoint(tmp_path) == "uni2"  # a tie goes to the later folder
