"""The main job's DRO recipe: its data (single-hop questions, shuffled candidates, scripted warm-start rows) and a toy
end-to-end run on Ray (warm start, E-step, M-step, results, resume)."""

from __future__ import annotations

import csv
import math

import pytest
from hydra import compose, initialize_config_dir

import pipelines.config  # noqa: F401
from agents.selector import SelectorConfig
from pipelines.recipes.dro import (
    ShuffledSearcher,
    check_passes,
    informative_rows,
    pass_rows,
    scale_generator_rows,
    single_hop_questions,
    warm_start_rows,
)
from tests.conftest import REPO

TOY = [
    "recipe=dro",
    "data.world.people_per_split=20", "data.world.companies_per_split=10", "data.world.cities_per_split=8",
    "data.world.train_questions=30", "data.world.dev_questions=6", "data.world.test_questions=6",
    "data.world.train_tool_tasks=4", "data.world.dev_tool_tasks=2", "data.world.test_tool_tasks=2",
    "model.vocab_size=400", "model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=2",
    "model.num_key_value_heads=2", "model.copy_pretrain_steps=0",
    "retriever=bm25", "engine.num_cpus=0.5",
    "recipe.iterations=1", "recipe.warm_start_questions=12", "recipe.warm_start_steps=120",
    "recipe.warm_start_lr=1e-2",
    "recipe.warm_start_worlds=1", "recipe.warm_start_world_questions=10",
    "recipe.estep_questions=8", "recipe.estep_worlds=1", "recipe.estep_world_questions=4",
    "recipe.dev_questions=4", "recipe.eval_questions=6",
    "recipe.selector.n_docs=3", "recipe.selector.k=1", "recipe.selector.doc_chars=120",
    "recipe.estep.samples_per_question=2", "recipe.estep.shard_size=4", "recipe.estep.batch_size=4",
    "trainer.batch_size=4", "trainer.micro_batch_size=4",
]


def test_single_hop_questions_are_distinct_steps_with_their_passage(small_world):
    questions = small_world.questions("train")
    singles = single_hop_questions(questions)
    steps = {s["question"]: s for q in questions for s in q["decomposition"]}
    assert len(singles) == len(steps) and len({q["id"] for q in singles}) == len(singles)
    passages = {d["id"]: d for d in small_world.documents()}
    for q in singles:
        step = steps[q["question"]]
        assert q["answers"] == [step["answer"]] and q["supporting_passage_ids"] == [step["passage_id"]]
        assert step["answer"] in passages[step["passage_id"]]["text"]  # the answer is copied from one passage


def test_shuffled_searcher_is_a_fixed_permutation_of_the_hits(searcher):
    queries = ["Who founded Dravel Systems?", "Where was Mira Tovenka born?", "In which country is Kalovren?"]
    plain = searcher.search(queries, 5)
    shuffled = ShuffledSearcher(searcher, seed=3)
    first, again = shuffled.search(queries, 5), shuffled.search(queries, 5)
    assert first == again  # the same order for the same query, every call (E-step and evaluation agree)
    assert all(sorted(h["id"] for h in a) == sorted(h["id"] for h in b) for a, b in zip(first, plain, strict=True))
    orders = [[h["id"] for h in hits] for hits in ShuffledSearcher(searcher, seed=4).search(queries * 4, 5)]
    assert any(o != [h["id"] for h in p] for o, p in zip(orders, plain * 4, strict=True))


def test_warm_start_rows_select_the_gold_passage_and_copy_its_answer(small_world, searcher, tokenizer):
    cfg = SelectorConfig(n_docs=4, k=2, doc_chars=200)
    examples = single_hop_questions(small_world.questions("train"))[:10]
    shuffled = ShuffledSearcher(searcher, seed=0)
    rows = warm_start_rows(examples, shuffled, tokenizer, cfg)
    candidates = shuffled.search([e["question"] for e in examples], cfg.n_docs)
    kept = [(e, c) for e, c in zip(examples, candidates, strict=True)
            if e["supporting_passage_ids"][0] in [d["id"] for d in c]]
    assert kept and len(rows) == 2 * len(kept)
    for (example, documents), selector, generator in zip(kept, rows[::2], rows[1::2], strict=True):
        gold = [d["id"] for d in documents].index(example["supporting_passage_ids"][0]) + 1
        target = [t for t, m in zip(selector["token_ids"], selector["loss_mask"], strict=True) if m]
        assert tokenizer.decode(target).strip().startswith(f"[{gold}] >")
        answer = [t for t, m in zip(generator["token_ids"], generator["loss_mask"], strict=True) if m]
        assert tokenizer.decode(answer).replace(" ", "") == f"<answer>{example['answers'][0]}</answer>".replace(" ", "")
        shown = tokenizer.decode([t for t, m in zip(generator["token_ids"], generator["loss_mask"], strict=True)
                                  if not m])
        assert example["answers"][0].split()[0] in shown  # the generator is shown the passage it copies from


def test_random_warm_start_selection_teaches_the_format_not_the_gold_passage(small_world, searcher, tokenizer):
    cfg = SelectorConfig(n_docs=4, k=1, doc_chars=200)
    examples = single_hop_questions(small_world.questions("train"))[:40]
    shuffled = ShuffledSearcher(searcher, seed=0)
    gold_rows = warm_start_rows(examples, shuffled, tokenizer, cfg, selection="gold")
    rows = warm_start_rows(examples, shuffled, tokenizer, cfg, selection="random", seed=1)
    assert len(rows) == len(gold_rows) and rows == warm_start_rows(examples, shuffled, tokenizer, cfg, "random", 1)

    def written(row):
        return tokenizer.decode([t for t, m in zip(row["token_ids"], row["loss_mask"], strict=True) if m]).strip()

    labels = [written(r) for r in rows[::2]]
    assert all(label in {"[1]", "[2]", "[3]", "[4]"} for label in labels)
    assert len(set(labels)) > 2  # spread over the candidates, not a constant
    differs = sum(a != b for a, b in zip(labels, (written(r) for r in gold_rows[::2]), strict=True))
    assert differs > len(labels) // 3  # not the gold label (which a random label matches a quarter of the time)
    assert rows[1::2] == gold_rows[1::2]  # the generator still answers from the gold passage
    with pytest.raises(ValueError, match="warm_start_selection='best'"):
        warm_start_rows(examples, shuffled, tokenizer, cfg, selection="best")


def test_informative_rows_drops_the_rows_that_weigh_nothing():
    import pyarrow as pa

    table = pa.table({"example_id": ["a", "a", "b", "b"], "weight": [0.9, 1e-6, 0.5, 0.02]})
    assert informative_rows(table, 0.0) is table
    assert informative_rows(table, 0.01)["weight"].to_pylist() == [0.9, 0.5, 0.02]
    assert informative_rows(table, 0.5)["weight"].to_pylist() == [0.9, 0.5]  # relative to the heaviest row
    weak = pa.table({"example_id": ["a", "b"], "weight": [1e-9, 3e-12]})  # a weak policy: every likelihood tiny
    assert informative_rows(weak, 0.01)["weight"].to_pylist() == [1e-9]
    assert informative_rows(table, 0.5, at_least=3)["weight"].to_pylist() == [0.9, 0.5, 0.02]  # one full batch
    assert informative_rows(table, 0.5, at_least=9).num_rows == 4
    with pytest.raises(ValueError, match="every E-step row weighs 0"):
        informative_rows(pa.table({"example_id": ["a"], "weight": [0.0]}), 0.01)


def test_scale_generator_rows_changes_only_the_generator_weights():
    import pyarrow as pa

    table = pa.table({"target": ["selector", "generator", "selector", "generator"], "weight": [0.9, 0.9, 0.1, 0.1]})
    assert scale_generator_rows(table, 1.0) is table
    scaled = scale_generator_rows(table, 0.25)
    assert scaled["weight"].to_pylist() == pytest.approx([0.9, 0.225, 0.1, 0.025])
    assert scaled["target"].to_pylist() == table["target"].to_pylist()


def test_pass_rows_picks_one_targets_rows_or_all():
    import pyarrow as pa

    table = pa.table({"target": ["selector", "generator", "selector"], "weight": [0.9, 0.9, 0.1]})
    assert pass_rows(table, "all") is table
    assert pass_rows(table, "selector")["weight"].to_pylist() == [0.9, 0.1]
    assert pass_rows(table, "generator")["target"].to_pylist() == ["generator"]
    with pytest.raises(ValueError, match="'answers' is not one of"):
        pass_rows(table, "answers")
    assert pass_rows(table.slice(0, 1), "generator").num_rows == 0  # run_mstep skips such a pass
    assert check_passes(("selector", "all")) == ["selector", "all"]
    with pytest.raises(ValueError, match="mstep_passes is empty"):
        check_passes([])


def test_mstep_skips_a_pass_with_less_than_a_batch_of_rows(tmp_path, capsys):
    import pyarrow as pa

    from pipelines.recipes.dro import run_mstep

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["recipe=dro", "trainer.batch_size=4"])
    table = pa.table({"target": ["generator", "selector", "generator"], "weight": [0.9, 0.9, 0.1]})
    assert run_mstep(table, ["selector"], "start-checkpoint", tmp_path, cfg) == ("start-checkpoint", [])
    assert "pass 1 (selector) skipped: the E-step wrote 1 selector rows, fewer than one batch" in capsys.readouterr().out
    assert not (tmp_path / "ray_train").exists()


def test_dro_config_rejects_k_above_n_docs():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["recipe=dro", "recipe.selector.k=9"])
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="agent.k=9 exceeds agent.n_docs"):
        SelectorConfig(**OmegaConf.to_container(cfg.recipe.selector, resolve=True))


@pytest.mark.slow
def test_dro_recipe_runs_end_to_end_and_resumes(ray_cluster, tmp_path):
    from pipelines.recipes.dro import run_dro
    from pipelines.run import prepare

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*TOY, f"output_dir={tmp_path}"])
    results = run_dro(cfg, tmp_path, prepare(cfg, tmp_path))
    assert [r["iteration"] for r in results] == [0, 1]
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {"recall_at_k", "em", "f1", "valid_rate", "dev_em"} <= set(rows[0])
    assert {"estep_gold_selected", "weight_entropy", "mstep_rows"} <= set(rows[1])
    # a softmax over at most 2 distinct permutations (each written as a selector row and a generator row)
    assert 0.0 <= float(rows[1]["weight_entropy"]) <= math.log(2) + 1e-6
    assert all(0.0 <= float(r[m]) <= 1.0 for r in rows for m in ("recall_at_k", "em", "f1"))
    for png in ("curve_recall.png", "curve_em_f1.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "Recall@1" in (tmp_path / "results.md").read_text()
    from pipelines import records

    estep = records.read_records(tmp_path / "iter-01-dro" / "estep", "weighted_sample")
    assert set(estep.column("target").to_pylist()) <= {"selector", "generator"}
    assert {"selector", "generator"} <= set(estep.column("target").to_pylist())  # the warm start taught the format
    # the M-step trains on the rows that weigh at least recipe.mstep_min_weight of the heaviest
    heaviest = max(estep.column("weight").to_pylist())
    informative = sum(w >= cfg.recipe.mstep_min_weight * heaviest for w in estep.column("weight").to_pylist())
    assert float(rows[1]["mstep_rows"]) == max(informative, cfg.trainer.batch_size)
    ids = set(estep.column("example_id").to_pylist())  # this world's questions and another world's
    assert sum(not i.startswith("world") for i in ids) == cfg.recipe.estep_questions
    assert 0 < sum(i.startswith("world") for i in ids) <= cfg.recipe.estep_world_questions
    import json

    import pyarrow.compute as pc
    import torch

    assert list(cfg.recipe.mstep_passes) == ["selector", "all"]  # the default: two Ray Train runs, in order
    trained = json.loads((tmp_path / "iter-01-dro" / "result.json").read_text())["trained_checkpoint"]
    assert "/mstep-2-all/" in trained
    assert json.loads((tmp_path / "iter-01-dro" / "result.json").read_text())["mstep_passes"] == ["selector", "all"]
    state = torch.load(f"{trained}/trainer_state.pt", weights_only=False)
    # Ray Train also writes checkpoint_manager_snapshot.json beside the checkpoint folders
    selector_pass = next(p for p in (tmp_path / "iter-01-dro" / "ray_train" / "mstep-1-selector").glob("checkpoint_*")
                         if p.is_dir())
    first = torch.load(selector_pass / "trainer_state.pt", weights_only=False)
    selector_rows = estep.filter(pc.greater_equal(estep["weight"], cfg.recipe.mstep_min_weight * heaviest))
    selector_rows = sum(t == "selector" for t in selector_rows.column("target").to_pylist())
    assert first["step"] == max(selector_rows, cfg.trainer.batch_size) // cfg.trainer.batch_size  # selector rows only
    # AdamW's own step count includes the warm start's and the first pass's steps: each pass continued the moments
    assert float(first["optimizer"]["state"][0]["step"]) == first["step"] + cfg.recipe.warm_start_steps
    assert float(state["optimizer"]["state"][0]["step"]) == state["step"] + first["step"] + cfg.recipe.warm_start_steps
    warm = json.loads((tmp_path / "iter-00-warm-start" / "result.json").read_text())
    with open(tmp_path / "iter-00-warm-start" / "test_answers.csv") as handle:
        assert len(list(csv.DictReader(handle))) == warm["test"]["questions"] == cfg.recipe.eval_questions

    again = run_dro(cfg, tmp_path, prepare(cfg, tmp_path))  # finished iterations are reused, not rerun
    assert [(r["recall_at_k"], r["em"]) for r in again] == [(r["recall_at_k"], r["em"]) for r in results]
