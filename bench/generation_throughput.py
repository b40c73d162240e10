"""E-step generation throughput: the Ray Data pipeline against the bare engine on the same questions, and 2 engine
actors against 1.

Baseline: the same ExSearch agent, in this process, over an in-process HF engine and an in-process BM25 index (no Ray
at all) sampling the same questions. Pipeline: `run_exsearch_estep` (Ray Data actor pool -> engine actors ->
retriever actor), which also scores and weights the samples. Figure: sampled trajectories per second of wall time
(the same work on both sides: K samples of the same questions), so scoring and Ray overhead count against the
pipeline; model tokens per second are printed beside it.

    python bench/generation_throughput.py [--questions 48] [--samples 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

AGENT = {"max_steps": 3, "max_tokens_per_turn": 24, "max_context_tokens": 512, "top_k": 2}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    from actors.config import EngineConfig, ModelConfig, RetrieverConfig
    from actors.llm import LLMEngineCore, start_engines
    from actors.models import build_causal_lm, train_bpe_tokenizer
    from actors.retriever import LocalRetriever, ShardedRetriever, build_index_in_process, load_index
    from agents.exsearch import ExSearchAgent, ExSearchConfig
    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from pipelines import records
    from pipelines.data.world import WorldConfig, build_world
    from pipelines.generate import EStepConfig, run_exsearch_estep

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_generation_"))
    world = build_world(WorldConfig())
    model_cfg = ModelConfig()
    tokenizer = train_bpe_tokenizer(world.texts(), model_cfg.vocab_size, model_cfg.max_token_chars,
                                    model_cfg.added_tokens)
    model = build_causal_lm(model_cfg, tokenizer, work / "policy")
    retriever_cfg = RetrieverConfig(kind="bm25", num_cpus=0.1)
    index = build_index_in_process(world.documents(), retriever_cfg, work / "index")
    questions = world.questions("train")[: args.questions]
    examples = [{"id": q["id"], "question": q["question"]} for q in questions]

    core = LLMEngineCore(model, EngineConfig(max_model_len=1024))

    class InProcess:
        def generate(self, prompts, sampling):
            return asyncio.run(core.generate(prompts, sampling))

    agent = ExSearchAgent(InProcess(), LocalRetriever(load_index(index, retriever_cfg)), core.backend.tokenizer,
                          ExSearchConfig(**AGENT))
    started = time.perf_counter()
    runs = agent.run(examples, samples=args.samples, seed=0)
    bare_seconds = time.perf_counter() - started
    bare = len(runs) / bare_seconds
    bare_tokens = sum(sum(t.loss_mask) for t in runs) / bare_seconds

    cluster = ClusterConfig(num_cpus=2, include_dashboard=False)
    cluster.env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    connect(cluster)
    retriever = ShardedRetriever.launch(index, retriever_cfg)
    figures = {}
    for actors in (1, 2):
        engines = start_engines(model, EngineConfig(num_actors=actors, num_cpus=0.5, max_model_len=1024))
        estep = EStepConfig(samples_per_question=args.samples, shard_size=args.questions, batch_size=8,
                            concurrency=2)
        out = work / f"estep{actors}"
        started = time.perf_counter()
        run_exsearch_estep(questions, out, engines, retriever, model, AGENT, estep)
        seconds = time.perf_counter() - started
        table = records.read_records(out, "weighted_sample")
        trained_tokens = sum(sum(m) for m in table.column("loss_mask").to_pylist())
        figures[actors] = (table.num_rows / seconds, seconds, trained_tokens / seconds)
        import ray

        for engine in engines:
            ray.kill(engine)

    time.sleep(1)
    print(f"\n{args.questions} questions x {args.samples} samples, tiny llama, {os.cpu_count()} cores")
    print(f"{'figure':40} {'samples/s':>9} {'tokens/s':>9} {'seconds':>8} {'ratio':>6}")
    print(f"{'bare engine + agent in one process':40} {bare:9.2f} {bare_tokens:9.0f} {bare_seconds:8.1f} {1.0:6.2f}")
    for actors, (rate, seconds, tokens) in figures.items():
        print(f"{f'E-step pipeline, {actors} engine actor(s)':40} {rate:9.2f} {tokens:9.0f} {seconds:8.1f} "
              f"{rate / bare:6.2f}")
    print(f"\npipeline (1 engine) / bare = {figures[1][0] / bare:.2f} (target >= 0.9); "
          f"2 engines / 1 = {figures[2][0] / figures[1][0]:.2f} (target >= 1.8)")


if __name__ == "__main__":
    main()
