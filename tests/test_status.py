"""`python -m pipelines.status`: a run folder built with the writers the main job uses (config as start_job saves it,
the world export, a BM25 index, result.json via the recipe, E-step shards and manifests, Ray Train's metrics callback,
the recipe's report), read back while unfinished and once complete."""

from __future__ import annotations

import csv
import shutil
from dataclasses import asdict

import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from pipelines import records
from pipelines.data.export import world_folders
from pipelines.generate import EStepSummary, _write_shard
from pipelines.recipes.exsearch import _group_row, _row, report
from pipelines.recipes.iterations import write_result
from pipelines.report import write_table
from pipelines.shards import write_quarantine
from pipelines.status import WARM_START, NotARunFolderError, main, render, summarize
from pipelines.train import _metrics_callback
from tests.conftest import REPO


def _config(out, overrides):
    from hydra import compose, initialize_config_dir

    from pipelines import config as _schema  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # as pipelines.jobs.start_job saves it
    return cfg


def _result(em: float, estep: bool = True) -> dict:
    result = {"checkpoint": "ckpt", "kept": True, "dev": {"em": em - 0.05, "f1": em},
              "test": {"em": em, "f1": em + 0.1, "acc": em + 0.05, "valid_rate": 0.9, "mean_searches": 1.5}}  # fmt: skip
    if estep:
        summary = EStepSummary(examples=80, samples=320, quarantined=1, shards_written=2, shards_reused=0,
                               valid_rate=0.8, correct_rate=em, mean_weight_entropy=0.7, tokens_per_s=100.0,
                               seconds=10.0)  # fmt: skip
        result.update(estep=asdict(summary), mstep_rows=320, trained_checkpoint="ckpt")
    return result


def _train_log(folder, name: str, steps: int) -> None:
    """`<name>_metrics.csv` as Ray Train's callback writes it, and a checkpoint folder of the run."""
    rows = [{"step": s, "loss": 2.0 / s, "tokens": 100} for s in range(1, steps + 1)]
    _metrics_callback(folder / f"{name}_metrics.csv").after_report(None, [{"history": rows, "node_id": "n"}], None)
    (folder / "ray_train" / name / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)


def _samples(example: str, count: int) -> pa.Table:
    rows = [{"example_id": example, "target": "policy", "sample_index": i, "prompt_ids": [1, 2], "token_ids": [3, 4],
             "loss_mask": [1, 1], "log_likelihood": -1.0, "weight": 1.0 / count, "answer": "x", "correct": i == 0,
             "valid": True} for i in range(count)]  # fmt: skip
    return records.to_table(rows, "weighted_sample")


def _estep(folder, shards: int, complete: bool) -> None:
    estep = folder / "estep"
    estep.mkdir(parents=True)
    write_quarantine(estep, [{"row": 7, "id": "q7", "reason": "no gold answer"}], "example")
    for index in range(shards):
        _write_shard(estep, index, _samples(f"q{index}", 4))
    if complete:
        records.write_manifest(estep, "weighted_sample", 4 * shards, {"variant": "importance"})


def _finished_iteration(out, variant: str, iteration: int, em: float) -> dict:
    folder = out / f"iter-{iteration:02d}-{variant}"
    _estep(folder, 2, complete=True)
    _train_log(folder, "mstep", 3)
    result = _result(em)
    write_result(folder, result)
    return result


@pytest.fixture
def run(tmp_path, small_world, tiny_policy):
    """A run stopped in the middle of `importance` iteration 2, before `uniform` began."""
    from actors.config import RetrieverConfig
    from actors.retriever import build_index_in_process
    from pipelines.data.export import export_world

    out = tmp_path / "run"
    out.mkdir()
    cfg = _config(out, ["recipe.iterations=2", "recipe.variants=[importance,uniform]", "recipe.estep_questions=80",
                        "recipe.estep.shard_size=40"])  # 2 shards planned per E-step
    counts = export_world(small_world, out / "data", {})
    write_table([{"dataset": name, "rows": n} for name, n in counts.items()], out, "datasets")
    shutil.copytree(tiny_policy, out / "policy")
    build_index_in_process(small_world.documents(), RetrieverConfig(kind="bm25"), out / "index")
    warm_dir = out / WARM_START
    warm_dir.mkdir()
    _train_log(warm_dir, "sft", cfg.recipe.warm_start_steps)
    warm = write_result(warm_dir, _result(0.30, estep=False))
    first = _finished_iteration(out, "importance", 1, 0.40)
    _estep(out / "iter-02-importance", 1, complete=False)  # the E-step wrote one of its shards, then the job stopped
    return {"out": out, "cfg": cfg, "warm": warm, "importance": [first]}


def test_unfinished_run_shows_progress_metrics_and_what_is_left(run):
    status = summarize(run["out"])
    assert (status.recipe, status.variants, status.iterations) == ("exsearch", ["importance", "uniform"], 2)
    by_folder = {s.folder: s for s in status.steps}
    assert by_folder[WARM_START].done and by_folder[WARM_START].train_steps == run["cfg"].recipe.warm_start_steps
    done = by_folder["iter-01-importance"]
    assert done.done and done.estep == "complete (8 samples)" and done.train_steps == 3 and done.checkpoints == 1
    assert done.quarantined == 1
    partial = by_folder["iter-02-importance"]
    assert not partial.done and partial.estep == "1 shard(s), up to 2 planned" and partial.train_steps == 0
    assert [(m["variant"], m["iteration"]) for m in status.metrics] == [("importance", 0), ("uniform", 0),
                                                                        ("importance", 1)]  # fmt: skip
    assert status.metrics[0]["em"] == status.metrics[1]["em"] == run["warm"]["test"]["em"]  # one warm start for both
    assert status.metrics[2]["em"] == run["importance"][0]["test"]["em"]
    assert status.unfinished == [
        "importance: iteration 2 of 2 unfinished (E-step 1 shard(s), up to 2 planned, M-step 0 step(s) logged, "
        "0 checkpoint(s))",
        "uniform: iterations 1-2 of 2 not started",
    ]
    assert not status.done
    assert status.artefacts["index/"].startswith("bm25 index, ") and status.artefacts["policy/"]
    datasets = len(world_folders(run["out"] / "data"))
    assert status.artefacts["data/"] == f"{datasets} of {datasets} dataset folders complete"
    assert status.artefacts["results.md"] is None
    text = render(status)
    assert "Done: 1 of 4 iterations, warm start done" in text
    assert "| importance | 2 | no | 1 shard(s), up to 2 planned | 0 | 0 | 1 |" in text
    assert "- uniform: iterations 1-2 of 2 not started" in text


def test_complete_run_agrees_with_the_recipes_results_table(run, capsys):
    out = run["out"]
    shutil.rmtree(out / "iter-02-importance")
    chains = {"importance": [*run["importance"], _finished_iteration(out, "importance", 2, 0.45)],
              "uniform": [_finished_iteration(out, "uniform", i, em) for i, em in ((1, 0.35), (2, 0.38))]}  # fmt: skip
    # the rows run_exsearch builds and reports: the warm start once per variant, then each variant's iterations
    expected = [{"variant": v, "iteration": 0, **_row(run["warm"])} for v in chains]
    expected += [{"variant": v, "iteration": i, **_row(r)} for v, rs in chains.items() for i, r in enumerate(rs, 1)]
    by_group = [_group_row(v, 0, run["warm"]) for v in chains]
    by_group += [_group_row(v, i, r) for v, rs in chains.items() for i, r in enumerate(rs, 1)]
    report(expected, by_group, out, 60.0)
    status = summarize(out)
    assert status.metrics == expected
    assert status.done and status.unfinished == []
    assert all(status.artefacts[name] == "written" for name in ("results.md", "results.csv", "curve_em.png"))
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["variant"], int(r["iteration"]), float(r["em"])) for r in table] == [
        (m["variant"], m["iteration"], m["em"]) for m in status.metrics]
    assert main([str(out)]) == 0
    assert "Nothing: the run is complete." in capsys.readouterr().out
    assert main([str(out), "--json"]) == 0
    assert '"done": true' in capsys.readouterr().out


def test_everything_done_but_the_report_is_named(run):
    out = run["out"]
    shutil.rmtree(out / "iter-02-importance")
    _finished_iteration(out, "importance", 2, 0.45)
    for iteration in (1, 2):
        _finished_iteration(out, "uniform", iteration, 0.35)
    (out / "iter-05-rejection").mkdir()  # left by an earlier config with another variant
    status = summarize(out)
    assert status.unfinished[0].startswith("iter-05-rejection: not in this config's plan")
    shutil.rmtree(out / "iter-05-rejection")
    (line,) = summarize(out).unfinished
    assert line.startswith("report: results.md, results.csv, curve_em.png, curve_f1.png missing")


def test_the_demonstrations_control_has_no_estep_to_wait_for(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _config(out, ["recipe.iterations=2", "recipe.variants=[demonstrations]"])
    (out / WARM_START).mkdir()
    write_result(out / WARM_START, _result(0.30, estep=False))
    (out / "iter-01-demonstrations").mkdir()
    _train_log(out / "iter-01-demonstrations", "mstep", 2)  # the control's M-step began, then the job stopped
    status = summarize(out)
    control = {s.folder: s for s in status.steps}["iter-01-demonstrations"]
    assert control.estep == "-" and control.train_steps == 2 and not control.done
    assert status.unfinished == ["demonstrations: iteration 1 of 2 unfinished (M-step 2 step(s) logged, "
                                 "1 checkpoint(s)); iteration 2 of 2 not started"]


def test_not_a_run_folder_is_named(tmp_path, capsys):
    with pytest.raises(NotARunFolderError, match=f"{tmp_path}: no config.yaml"):
        summarize(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("recipe:\n  name: ttpa\n")
    with pytest.raises(NotARunFolderError, match="recipe.name='ttpa'"):
        summarize(tmp_path)
