"""The factor study: aggregation math on known numbers, the grid, and a tiny study end to end on real components
(world, BM25 index, the tiny policy SFT-trained in-process, LLMEngineCore) through Hydra's compose API."""

from __future__ import annotations

import csv
import math
from dataclasses import astuple

import pytest
from hydra import compose, initialize_config_dir

from pipelines.config import StudyConfig, StudyLevels, StudySettings
from pipelines.study import (
    OrderedSearcher,
    aggregate,
    corpus_subset,
    factor_effects,
    run_study,
    study_grid,
    summarize,
)
from tests.conftest import REPO


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="study", overrides=list(overrides))


def test_summarize_on_known_numbers():
    summary = summarize([0.2, 0.4, 0.6], tolerance=0.1)
    assert summary["mean"] == pytest.approx(0.4)
    assert summary["std"] == pytest.approx(0.2)  # sample std: sqrt((0.04 + 0 + 0.04) / 2)
    assert summary["stability"] == pytest.approx(1 / 3)  # only 0.4 lies within ±0.1 of the mean
    assert summarize([0.2, 0.4, 0.6], tolerance=0.2)["stability"] == 1.0  # the band's edge counts as inside
    assert summarize([0.7], tolerance=0.0) == {"mean": 0.7, "std": 0.0, "stability": 1.0}
    with pytest.raises(ValueError, match="no values"):
        summarize([], 0.1)


def test_aggregate_and_factor_effects_on_known_runs():
    study = StudyConfig(factors=["temperature"], baseline=StudySettings(temperature=0.5),
                        levels=StudyLevels(temperature=[0.0, 0.5]))
    grid = study_grid(study)
    metrics = {"em": 0.0, "acc": 0.0, "valid_rate": 1.0, "mean_searches": 2.0}
    runs = {}
    for (_, _, settings), values in zip(grid, ([0.3, 0.3], [0.1, 0.5]), strict=True):
        for seed, value in zip((0, 1), values, strict=True):
            runs[(astuple(settings), seed)] = {**metrics, "f1": value, "fingerprint": f"{settings.temperature}-{value}"}
    table = aggregate(grid, runs, [0, 1], "f1", tolerance=0.1)
    assert [(row["factor"], row["level"]) for row in table] == [("temperature", 0.0), ("temperature", 0.5)]
    greedy, sampled = table
    assert (greedy["f1_mean"], greedy["f1_std"], greedy["stability"], greedy["distinct_outputs"]) == (0.3, 0.0, 1.0, 1)
    assert sampled["f1_mean"] == pytest.approx(0.3) and sampled["f1_std"] == pytest.approx(math.sqrt(0.08))
    assert sampled["stability"] == 0.0 and sampled["distinct_outputs"] == 2
    assert sampled["valid_rate_mean"] == 1.0 and sampled["mean_searches_std"] == 0.0
    (effect,) = factor_effects(table, "f1")
    assert effect["f1 spread"] == pytest.approx(0.0)
    assert effect["mean seed std"] == pytest.approx(math.sqrt(0.08) / 2)
    assert effect["mean stability"] == 0.5


def test_grid_varies_one_factor_at_a_time_and_names_bad_levels():
    study = StudyConfig(factors=["top_k", "prompt"], levels=StudyLevels(top_k=[1, 3], prompt=["plain", "instructed"]))
    grid = study_grid(study)
    assert [(factor, level) for factor, level, _ in grid] == [("top_k", 1), ("top_k", 3), ("prompt", "plain"),
                                                               ("prompt", "instructed")]
    base = StudySettings()
    for factor, level, settings in grid:
        assert getattr(settings, factor) == level
        assert all(getattr(settings, f) == getattr(base, f) for f in ("temperature", "max_steps", "doc_order"))
    with pytest.raises(ValueError, match="paraphrase='shouting' is not one of"):
        study_grid(StudyConfig(factors=["paraphrase"], levels=StudyLevels(paraphrase=["shouting"])))
    with pytest.raises(ValueError, match="study.factors: 'seed' is not one of"):
        study_grid(StudyConfig(factors=["seed"]))


def test_doc_order_and_corpus_size_change_what_the_agent_sees(searcher, small_world):
    query = [small_world.questions("dev")[0]["decomposition"][0]["question"]]
    retrieved = searcher.search(query, 4)[0]
    assert [h["id"] for h in OrderedSearcher(searcher, "reversed", 0).search(query, 4)[0]] == \
        [h["id"] for h in reversed(retrieved)]
    shuffles = {tuple(h["id"] for h in OrderedSearcher(searcher, "shuffled", seed).search(query, 4)[0])
                for seed in range(6)}
    assert len(shuffles) > 1 and all(sorted(s) == sorted(h["id"] for h in retrieved) for s in shuffles)
    with pytest.raises(ValueError, match="doc_order='sideways'"):
        OrderedSearcher(searcher, "sideways", 0)
    documents = small_world.documents()
    needed = {documents[3]["id"], documents[7]["id"]}
    kept = corpus_subset(documents, needed, 0.25, seed=0)
    assert needed <= {d["id"] for d in kept}
    assert len(kept) == len(needed) + round((len(documents) - len(needed)) * 0.25)


def test_a_tiny_study_writes_the_table_runs_and_plots(tmp_path):
    cfg = _compose(
        f"output_dir={tmp_path}", "study.seeds=[0,1]", "study.questions=6",
        "study.factors=[temperature,paraphrase]", "study.levels.temperature=[0.0,1.0]",
        "study.levels.paraphrase=[none,lowercase]", "study.baseline.temperature=1.0",
        "study.warm_start_questions=16", "study.warm_start_steps=3", "study.warm_start_batch_size=4",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
        "model.num_key_value_heads=2", "model.vocab_size=400", "recipe.agent.max_tokens_per_turn=16",
        "data.world.people_per_split=12", "data.world.companies_per_split=6", "data.world.cities_per_split=5",
        "data.world.train_questions=20", "data.world.dev_questions=4", "data.world.test_questions=8",
    )
    result = run_study(cfg)
    table = result["table"]
    assert [(row["factor"], row["level"]) for row in table] == [
        ("temperature", 0.0), ("temperature", 1.0), ("paraphrase", "none"), ("paraphrase", "lowercase")]
    for column in ("seeds", "em_mean", "em_std", "f1_mean", "f1_std", "stability", "valid_rate_mean",
                   "mean_searches_mean", "distinct_outputs"):
        assert all(column in row for row in table), column
    assert all(row["seeds"] == 2 and 0 <= row["stability"] <= 1 for row in table)
    # temperature 1.0 with paraphrase none is the baseline: listed under both factors, run once per seed
    assert len(result["runs"]) == 3 * 2
    greedy = [r for r in result["runs"] if r["temperature"] == 0.0]
    sampled = [r for r in result["runs"] if r["temperature"] == 1.0 and r["paraphrase"] == "none"]
    assert len({r["fingerprint"] for r in greedy}) == 1, "greedy decoding does not depend on the seed"
    assert len({r["fingerprint"] for r in sampled}) == 2, "sampling seeds give different runs"
    assert not {r["fingerprint"] for r in greedy} & {r["fingerprint"] for r in sampled}, "temperature changes outputs"
    for name in ("study_table.md", "study_table.csv", "study_runs.csv", "study_factors.md", "study.json",
                 "study_temperature.png", "study_paraphrase.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "study_table.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (tmp_path / "warm_start" / "config.json").is_file()


def test_study_config_typos_are_named():
    with pytest.raises(Exception, match="study.seed"):
        _compose("study.seed=[1]")
    with pytest.raises(ValueError, match="study.metric='bleu'"):
        run_study(_compose("study.metric=bleu"))
