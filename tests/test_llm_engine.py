"""LLMEngine with the HF backend: the token-in/token-out contract, batching, reload, errors, and the Ray actor pool."""

from __future__ import annotations

import asyncio
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from actors.config import EngineConfig
from actors.llm import EngineError, EnginePool, LLMEngineCore, Sampling, finish, start_engines
from actors.models import load_causal_lm

PROMPTS = ["Where was the founder of", "Mira was born in", "Who founded"]


@pytest.fixture(scope="module")
def engine(tiny_policy):
    return LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512))


def run(coroutine):
    return asyncio.run(coroutine)


def test_greedy_is_deterministic_and_matches_transformers(engine, tiny_policy):
    first = run(engine.generate(PROMPTS, Sampling(temperature=0, max_tokens=12)))
    again = run(engine.generate(PROMPTS, {"temperature": 0, "max_tokens": 12}))
    assert [g.completions[0].token_ids for g in first] == [g.completions[0].token_ids for g in again]
    model, tokenizer = load_causal_lm(tiny_policy)
    for generation in first:
        import torch

        ids = torch.tensor([generation.prompt_ids])
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        completion = generation.completions[0]
        assert completion.token_ids == expected[: len(completion.token_ids)]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert generation.prompt_ids == tokenizer(PROMPTS[first.index(generation)])["input_ids"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_reproduces_sampling_logprobs(engine, temperature):
    generations = run(engine.generate(PROMPTS, Sampling(n=3, temperature=temperature, max_tokens=10, seed=7)))
    assert all(len(g.completions) == 3 for g in generations)
    pairs = [(g.prompt_ids, c.token_ids) for g in generations for c in g.completions]
    scored = run(engine.score(pairs))
    recorded = [c.logprobs for g in generations for c in g.completions]
    for got, want in zip(scored, recorded, strict=True):
        assert len(got) == len(want)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


def test_seeded_sampling_repeats_and_unseeded_varies(engine):
    a = run(engine.generate(PROMPTS[:1], Sampling(n=4, temperature=1.0, max_tokens=8, seed=3)))
    b = run(engine.generate(PROMPTS[:1], Sampling(n=4, temperature=1.0, max_tokens=8, seed=3)))
    assert [c.token_ids for c in a[0].completions] == [c.token_ids for c in b[0].completions]
    samples = {tuple(c.token_ids) for c in a[0].completions}
    assert len(samples) > 1  # n samples are distinct draws


def test_stop_string_ends_the_completion_and_stays_in_it(engine):
    generations = run(engine.generate(["Mira"] * 4, Sampling(n=2, temperature=1.0, max_tokens=40, seed=0, stop=("a",))))
    stopped = [c for g in generations for c in g.completions if c.finish_reason == "stop" and c.stop_reason == "a"]
    assert stopped, "a random model emits an 'a' within 40 tokens"
    for completion in stopped:
        assert "a" in completion.text
        assert "a" not in engine.backend.tokenizer.decode(completion.token_ids[:-1], skip_special_tokens=True)


def test_finish_keeps_eos_and_cuts_after_it(engine):
    tokenizer = engine.backend.tokenizer
    eos = tokenizer.eos_token_id
    body = tokenizer("Mira", add_special_tokens=False)["input_ids"]
    done = finish(body + [eos] + body, [-1.0] * (2 * len(body) + 1), tokenizer, {eos}, (), 50)
    assert done.token_ids == body + [eos] and done.finish_reason == "stop" and done.text == "Mira"
    cut = finish(body * 3, [-1.0] * (3 * len(body)), tokenizer, {eos}, (), len(body))
    assert cut.token_ids == body and cut.finish_reason == "length"


def test_top_alternatives_rank_the_vocabulary(engine):
    generation = run(engine.generate(PROMPTS[:1], Sampling(temperature=0, max_tokens=6)))[0]
    pair = (generation.prompt_ids, generation.completions[0].token_ids)
    alternatives = run(engine.top_alternatives([pair], k=4))[0]
    scored = run(engine.score([pair]))[0]
    assert len(alternatives) == len(pair[1])
    for position, options in enumerate(alternatives):
        assert len(options) == 4
        assert [lp for _, lp in options] == sorted((lp for _, lp in options), reverse=True)
        assert options[0][0] == pair[1][position]  # greedy picked the top token
        assert abs(options[0][1] - scored[position]) < 1e-5


def test_concurrent_callers_are_batched(engine):
    async def many():
        calls = [engine.generate([p], Sampling(temperature=0, max_tokens=6)) for p in PROMPTS * 4]
        return await asyncio.gather(*calls)

    before = engine.batches_run
    results = run(many())
    batches = engine.batches_run - before
    assert batches < len(PROMPTS) * 4
    alone = run(engine.generate(PROMPTS, Sampling(temperature=0, max_tokens=6)))
    for index, result in enumerate(results):
        assert result[0].completions[0].token_ids == alone[index % len(PROMPTS)].completions[0].token_ids


def test_reload_swaps_weights_in_place(tiny_policy, tiny_policy_other):
    engine = LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512))
    other = LLMEngineCore(tiny_policy_other, EngineConfig(max_model_len=512))
    greedy = Sampling(temperature=0, max_tokens=8)
    before = run(engine.generate(PROMPTS, greedy))
    version = run(engine.reload(str(tiny_policy_other)))
    after = run(engine.generate(PROMPTS, greedy))
    expected = run(other.generate(PROMPTS, greedy))
    assert version == 1 and engine.info()["model_path"] == str(tiny_policy_other)
    assert [g.completions[0].token_ids for g in after] == [g.completions[0].token_ids for g in expected]
    assert [g.completions[0].token_ids for g in after] != [g.completions[0].token_ids for g in before]


def test_bad_requests_name_the_request_and_field(engine):
    with pytest.raises(EngineError, match="request 1: empty prompt"):
        run(engine.generate([[5, 6], []]))
    with pytest.raises(EngineError, match="request 0: token id 99999 is outside the vocabulary"):
        run(engine.score([([1, 2], [99999])]))
    with pytest.raises(EngineError, match=r"request 0: .* exceed engine.max_model_len=512"):
        run(engine.generate([[5] * 500], Sampling(max_tokens=20)))
    with pytest.raises(EngineError, match="unknown sampling field"):
        run(engine.generate(["x"], {"temprature": 0.5}))
    with pytest.raises(ValueError, match="top_p=0 must be in"):
        Sampling(top_p=0)
    # the engine still serves after bad requests
    assert run(engine.generate(["x"], Sampling(max_tokens=2)))[0].completions


@pytest.fixture(scope="module")
def two_engines(ray_cluster, tiny_policy):
    engines = start_engines(tiny_policy, EngineConfig(num_actors=2, num_cpus=0.5, max_model_len=512))
    yield engines
    for engine in engines:
        ray.kill(engine)


def batches_run(engines) -> list[int]:
    return [info["batches_run"] for info in ray.get([e.info.remote() for e in engines])]


def test_pool_splits_a_lone_big_request_and_keeps_order(two_engines, tiny_policy):
    pool = EnginePool(two_engines, timeout_s=120)
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]
    before = batches_run(two_engines)
    pooled = pool.generate(prompts, Sampling(temperature=0, max_tokens=6))
    direct = run(LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512)).generate(
        prompts, Sampling(temperature=0, max_tokens=6)))
    assert [g.completions[0].token_ids for g in pooled] == [g.completions[0].token_ids for g in direct]
    assert all(after > b for after, b in zip(batches_run(two_engines), before, strict=True))  # both engines did work
    scores = pool.score([(g.prompt_ids, g.completions[0].token_ids) for g in pooled])
    assert len(scores) == len(prompts)
    # a lone caller's seeded request is cut the same way every time, so its samples repeat
    seeded = Sampling(n=2, temperature=1.0, max_tokens=8, seed=11)
    first, again = pool.generate(prompts, seeded), pool.generate(prompts, seeded)
    assert [[c.token_ids for c in g.completions] for g in first] == [[c.token_ids for c in g.completions] for g in again]
    assert pool.in_flight == [0, 0]


def test_pool_sends_a_concurrent_request_to_the_idle_engine(two_engines):
    """While one request is in flight on an engine, the next goes whole to the other one."""
    pool = EnginePool(two_engines, timeout_s=120)
    before = batches_run(two_engines)
    long_sampling = Sampling(n=7, temperature=1.0, max_tokens=400, seed=1)  # 7 rows: too few to cut, one batch
    with ThreadPoolExecutor(max_workers=1) as threads:
        long = threads.submit(pool.generate, PROMPTS[:1], long_sampling)
        while sum(pool.in_flight) == 0 and not long.done():
            time.sleep(0.001)
        busy = pool.in_flight
        short = pool.generate(PROMPTS, Sampling(temperature=1.0, max_tokens=2, seed=2))
        assert not long.done(), "the long request ended before the short one was routed; make it longer"
        long.result()
    assert sorted(busy) == [0, 1]
    assert [after - b for after, b in zip(batches_run(two_engines), before, strict=True)] == [1, 1]
    assert len(short) == len(PROMPTS) and pool.in_flight == [0, 0]


def test_pool_serves_threads_at_once_in_request_order(two_engines, tiny_policy):
    pool = EnginePool(two_engines, timeout_s=120)
    core = LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512))
    requests = [[f"{p} {caller}" for p in PROMPTS] for caller in range(6)]
    sampling = Sampling(temperature=1.0, max_tokens=8, seed=5)
    before = batches_run(two_engines)
    with ThreadPoolExecutor(max_workers=6) as threads:
        pooled = list(threads.map(lambda prompts: pool.generate(prompts, sampling), requests))
    spread = [after - b for after, b in zip(batches_run(two_engines), before, strict=True)]
    assert all(count >= 1 for count in spread) and sum(spread) == len(requests)  # seeded: each batch runs alone
    for prompts, got in zip(requests, pooled, strict=True):
        # 3 rows are never cut, so each caller gets what one engine alone samples for it
        alone = run(core.generate(prompts, sampling))
        assert [g.completions[0].token_ids for g in got] == [g.completions[0].token_ids for g in alone]
    assert pool.in_flight == [0, 0]


def test_pool_releases_engines_after_errors_and_timeouts(two_engines):
    pool = EnginePool(two_engines, timeout_s=120)
    with pytest.raises(EngineError, match="request 0: token id 99999 is outside the vocabulary"):
        pool.score([([1, 2], [99999])] * 8)
    with pytest.raises(EngineError, match="unknown sampling field"):
        pool.generate(PROMPTS, {"temprature": 0.5})
    assert pool.in_flight == [0, 0]
    slow = EnginePool(two_engines, timeout_s=0.001)
    with pytest.raises(TimeoutError, match=r"generate of 24 request\(s\) took longer than"):
        slow.generate(PROMPTS * 8, Sampling(temperature=1.0, max_tokens=200))
    assert slow.in_flight == [0, 0]
    assert len(pool.generate(PROMPTS, Sampling(temperature=0, max_tokens=2))) == len(PROMPTS)  # still serving
    shipped = pickle.loads(pickle.dumps(pool))  # as a Ray task's argument: its own lock and counts
    assert shipped.in_flight == [0, 0] and len(shipped.score([([1, 2], [3])])) == 1
