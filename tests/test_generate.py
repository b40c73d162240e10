"""The E-step on Ray Data with real engine and retriever actors: weights, resumption, quarantine, a killed engine."""

from __future__ import annotations

import math
import threading
import time

import pyarrow.compute as pc
import pytest
import ray

from actors.config import EngineConfig, RetrieverConfig
from actors.llm import start_engines
from actors.retriever import ShardedRetriever, build_index_in_process
from pipelines import records
from pipelines.data.world import WorldConfig, build_world
from pipelines.generate import EStepConfig, run_exsearch_estep, softmax_weights, weight_entropy

AGENT = {"max_steps": 2, "max_tokens_per_turn": 16, "max_context_tokens": 512, "top_k": 2}


def test_softmax_weights_and_entropy():
    weights = softmax_weights([-1.0, -2.0, -1000.0])
    assert sum(weights) == pytest.approx(1.0) and weights[0] > weights[1] > weights[2] >= 0
    assert softmax_weights([-1.0, -2.0], temperature=1e6) == pytest.approx([0.5, 0.5], abs=1e-5)
    assert weight_entropy([0.25] * 4) == pytest.approx(1.3862944) and weight_entropy([1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="weight_temperature=0"):
        softmax_weights([0.0], temperature=0)


def test_likelihood_weighting_lets_a_question_whose_samples_all_missed_weigh_almost_nothing():
    missed = [-20.0, -21.0]
    assert sum(EStepConfig().weights(missed)) == pytest.approx(1.0)  # posterior: still weight 1 in all
    likelihood = EStepConfig(weighting="likelihood")
    assert sum(likelihood.weights(missed)) < 1e-8
    assert likelihood.weights([-0.1, 0.2]) == pytest.approx([math.exp(-0.1), 1.0])  # p(y | x, z), capped at 1
    assert weight_entropy([0.1, 0.1]) == pytest.approx(math.log(2))  # entropy of the normalised weights
    with pytest.raises(ValueError, match="recipe.estep.weighting='softmax' is not one of"):
        EStepConfig(weighting="softmax")


@pytest.fixture(scope="module")
def setting(ray_cluster, tiny_policy, tmp_path_factory):
    world = build_world(WorldConfig(people_per_split=20, companies_per_split=10, cities_per_split=8,
                                    train_questions=24, dev_questions=10, test_questions=10))
    cfg = RetrieverConfig(kind="bm25", num_cpus=0.1)
    index = build_index_in_process(world.documents(), cfg, tmp_path_factory.mktemp("index"))
    retriever = ShardedRetriever.launch(index, cfg)
    engines = start_engines(tiny_policy, EngineConfig(num_actors=2, num_cpus=0.25, max_model_len=512))
    yield world, engines, retriever
    for engine in engines:
        ray.kill(engine)
    retriever.close()


def test_estep_weights_every_example_once_and_resumes(setting, tiny_policy, tmp_path):
    world, engines, retriever = setting
    questions = world.questions("train")[:10]
    bad = dict(questions[0], id="q-broken", answers=[])
    estep = EStepConfig(samples_per_question=3, shard_size=4, batch_size=4)
    summary = run_exsearch_estep(questions + [bad], tmp_path, engines, retriever, tiny_policy, AGENT, estep)
    assert (summary.examples, summary.samples, summary.quarantined, summary.shards_written) == (10, 30, 1, 3)
    assert "q-broken" in (tmp_path / "quarantine.jsonl").read_text()
    table = records.read_records(tmp_path, "weighted_sample")
    ids = table.column("example_id").to_pylist()
    assert sorted(set(ids)) == sorted(q["id"] for q in questions) and all(ids.count(i) == 3 for i in set(ids))
    for example_id in set(ids):
        group = table.filter(pc.equal(table.column("example_id"), example_id))
        assert sum(group.column("weight").to_pylist()) == pytest.approx(1.0, abs=1e-5)
        assert sorted(group.column("sample_index").to_pylist()) == [0, 1, 2]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["loss_mask"][-1] == 1 and len(row["loss_mask"]) == len(row["token_ids"])
    assert 0 <= summary.mean_weight_entropy <= 1.0986123 + 1e-6

    (tmp_path / "shard-00001.parquet").unlink()  # as if the job died while writing shard 1
    (tmp_path / "manifest.json").unlink()
    again = run_exsearch_estep(questions + [bad], tmp_path, engines, retriever, tiny_policy, AGENT, estep)
    assert (again.shards_written, again.shards_reused, again.samples) == (1, 2, 30)
    resumed = records.read_records(tmp_path, "weighted_sample").column("example_id").to_pylist()
    assert sorted(resumed) == sorted(ids)


def test_a_killed_engine_does_not_lose_or_duplicate_examples(setting, tiny_policy, tmp_path):
    world, engines, retriever = setting
    questions = world.questions("train")[:16]
    estep = EStepConfig(samples_per_question=2, shard_size=4, batch_size=2)
    box: dict = {}

    def job():
        box["summary"] = run_exsearch_estep(questions, tmp_path, engines, retriever, tiny_policy, AGENT, estep)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not list(tmp_path.glob("shard-*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    ray.kill(engines[0], no_restart=False)  # Ray restarts it; in-flight calls are retried
    thread.join(timeout=300)
    summary = box["summary"]
    assert summary.samples == 32 and summary.shards_written == 4
    ids = records.read_records(tmp_path, "weighted_sample").column("example_id").to_pylist()
    assert sorted(set(ids)) == sorted(q["id"] for q in questions) and all(ids.count(i) == 2 for i in set(ids))
    assert ray.get(engines[0].info.remote(), timeout=60)["backend"] == "hf"  # the restarted engine serves again


def test_dro_estep_merges_duplicate_permutations_and_weights_each_question(setting, tiny_policy, tmp_path):
    import pyarrow as pa
    from transformers import AutoTokenizer

    from pipelines.generate import DROSampler, run_dro_estep
    from tests.doubles import ScriptedPolicy

    world, engines, retriever = setting
    questions = world.questions("train")[:6]
    selector = {"n_docs": 4, "k": 2, "max_context_tokens": 512}
    estep = EStepConfig(samples_per_question=4, shard_size=3, batch_size=3)
    summary = run_dro_estep(questions, tmp_path, engines, retriever, tiny_policy, selector, estep)
    table = records.read_records(tmp_path, "weighted_sample")
    assert sorted(set(table.column("example_id").to_pylist())) == sorted(q["id"] for q in questions)
    assert summary.examples == 6 and set(table.column("target").to_pylist()) <= {"selector", "generator"}

    # The same sampler with a scripted selector turn (the model's part only): two samples draw "[1] > [2]", two draw
    # "[2] > [1]"; the real engine scores the generator. Duplicates merge, weights are a softmax over 2 permutations.
    sampler = DROSampler(engines, retriever, str(tiny_policy), selector, {"samples_per_question": 4, "seed": 0})
    turns = iter(["[1] > [2]\n", "[1] > [2]\n", "[2] > [1]\n", "[2] > [1]\n"] * 3)
    sampler.agent.engine = ScriptedPolicy(AutoTokenizer.from_pretrained(tiny_policy), lambda context: next(turns))
    rows = sampler(pa.Table.from_pylist([{"id": q["id"], "question": q["question"], "answers": q["answers"],
                                          "supporting_passage_ids": q["supporting_passage_ids"]}
                                         for q in questions[:3]])).to_pylist()
    for q in questions[:3]:
        chosen = [r for r in rows if r["example_id"] == q["id"] and r["target"] == "selector"]
        generated = [r for r in rows if r["example_id"] == q["id"] and r["target"] == "generator"]
        assert sorted(r["answer"] for r in chosen) == ["[1] > [2]", "[2] > [1]"]
        assert sum(r["weight"] for r in chosen) == pytest.approx(1.0, abs=1e-5)
        assert [r["weight"] for r in generated] == pytest.approx([r["weight"] for r in chosen])
        first, second = generated
        better = first if first["log_likelihood"] > second["log_likelihood"] else second
        assert better["weight"] > 0.5  # the permutation under which the gold answer is likelier weighs more
        assert all(r["loss_mask"][-1] == 1 and 0 in r["loss_mask"] for r in generated)


def test_dro_estep_ranks_the_candidates_a_question_brings(setting, tiny_policy, tmp_path):
    """Questions of another corpus (DRO's other worlds) bring their candidates; the retriever is not asked."""
    from transformers import AutoTokenizer

    from pipelines.generate import run_dro_estep

    _, engines, retriever = setting
    own = [{"id": "other-1", "title": "Ovel Plinth", "text": "Rasa Kel founded Ovel Plinth in 1901."},
           {"id": "other-2", "title": "Kaba Vell", "text": "Kaba Vell was born in Ovel in 1950."}]
    questions = [{"id": "other-q", "question": "Who founded Ovel Plinth?", "answers": ["Rasa Kel"],
                  "supporting_passage_ids": ["other-1"], "documents": own},
                 {"id": "other-bad", "question": "Who founded it?", "answers": ["Rasa Kel"],
                  "documents": [{"title": "a passage without an id"}]}]
    estep = EStepConfig(samples_per_question=2, shard_size=2, batch_size=2)
    summary = run_dro_estep(questions, tmp_path, engines, retriever, tiny_policy, {"n_docs": 2, "k": 1}, estep)
    assert (summary.examples, summary.quarantined) == (1, 1)
    assert "field 'documents' must be a list of passages" in (tmp_path / "quarantine.jsonl").read_text()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    table = records.read_records(tmp_path, "weighted_sample")
    rows = table.to_pylist()
    assert "generator" in {r["target"] for r in rows}  # (a random policy may write no valid permutation)
    for row in rows:
        shown = tokenizer.decode(row["token_ids"]).replace(" ", "")
        passages = sum(f"]{doc['title']}:{doc['text']}".replace(" ", "") in shown for doc in own)
        assert passages == (2 if row["target"] == "selector" else 1)  # both ranked, the selected one answered from


def test_a_trajectory_that_reaches_the_gold_answer_outweighs_one_that_does_not(small_world, searcher, tiny_policy):
    """With a policy trained (briefly, here) on gold runs, log p(gold | x, z) — the E-step's weight — is higher after
    a run that found the right bridge entity than after one that recorded a wrong one."""
    import asyncio

    from actors.config import EngineConfig
    from actors.llm import LLMEngineCore
    from agents.exsearch import DemonstrationPolicy, ExSearchAgent, ExSearchConfig, answer_scoring_pair
    from pipelines.train import PolicyTrainer, TrainSettings, example_from_row
    from tests.doubles import ScriptedPolicy

    cfg = ExSearchConfig(max_steps=4, top_k=1, doc_chars=120)
    tokenizer = LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512)).backend.tokenizer
    train = [q for q in small_world.questions("train") if q["kind"] == "bridge" and q["hops"] == 2]
    demos = ExSearchAgent(DemonstrationPolicy(tokenizer, train, cfg), searcher, tokenizer, cfg).run(
        [{"id": q["id"], "question": q["question"]} for q in train])
    rows = [{"prompt_ids": t.prompt_ids, "token_ids": t.token_ids, "loss_mask": t.loss_mask} for t in demos]
    trainer = PolicyTrainer(TrainSettings(model_path=str(tiny_policy), objective="sft", batch_size=4,
                                          micro_batch_size=4, epochs=1000, max_steps=150, lr=3e-3),
                            [example_from_row(r, i, "sft") for i, r in enumerate(rows)])
    for _ in range(trainer.total_steps):
        trainer.step()
    trained = trainer.save(tiny_policy.parent / "prefers_gold")
    engine = LLMEngineCore(trained, EngineConfig(max_model_len=512))

    q = train[0]

    def run(record):  # a scripted run whose second search (and record) names `record` as the bridge entity
        first, answer = q["decomposition"][0]["question"], q["answers"][0]
        second = q["decomposition"][1]["question"].replace(q["decomposition"][0]["answer"], record)
        turns = iter([f"<search>{first}</search>", f"<record>{record}</record><search>{second}</search>",
                      f"<record>{answer}</record><answer>{answer}</answer>"])
        agent = ExSearchAgent(ScriptedPolicy(tokenizer, lambda context: next(turns)), searcher, tokenizer, cfg)
        return agent.run([{"id": q["id"], "question": q["question"]}])[0]

    right, wrong = run(q["decomposition"][0]["answer"]), run("Nobody Atall")
    pairs = [answer_scoring_pair(t, q["answers"][0], tokenizer, cfg) for t in (right, wrong)]
    scores = [sum(s) for s in asyncio.run(engine.score(pairs))]
    weights = softmax_weights(scores)
    assert weights[0] > weights[1], (scores, weights)
    untrained = LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512))
    before = [sum(s) for s in asyncio.run(untrained.score(pairs))]
    assert scores[0] - scores[1] > before[0] - before[1] + 1.0  # the preference comes from training
