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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.tiny import tiny_policy  # noqa: E402  (after the path insert above)

AGENT = {"max_steps": 3, "max_tokens_per_turn": 24, "max_context_tokens": 512, "top_k": 2}


@dataclass
class Bench:
    """What both sides share: the tiny policy, the BM25 index of the world, the questions."""

    model: Path
    index: Path
    retriever_cfg: object
    questions: list[dict]


def prepare(work: Path, questions: int) -> Bench:
    from actors.config import RetrieverConfig
    from actors.retriever import build_index_in_process

    model, world, _ = tiny_policy(work / "policy")
    retriever_cfg = RetrieverConfig(kind="bm25", num_cpus=0.1)
    index = build_index_in_process(world.documents(), retriever_cfg, work / "index")
    return Bench(model, index, retriever_cfg, world.questions("train")[:questions])


def bare_agent(bench: Bench):
    """The baseline: the ExSearch agent over an in-process HF engine and in-process BM25, no Ray."""
    from actors.config import EngineConfig
    from actors.llm import LLMEngineCore
    from actors.retriever import LocalRetriever, load_index
    from agents.exsearch import ExSearchAgent, ExSearchConfig

    core = LLMEngineCore(bench.model, EngineConfig(max_model_len=1024))

    class InProcess:
        def generate(self, prompts, sampling):
            return asyncio.run(core.generate(prompts, sampling))

    return ExSearchAgent(InProcess(), LocalRetriever(load_index(bench.index, bench.retriever_cfg)),
                         core.backend.tokenizer, ExSearchConfig(**AGENT))  # fmt: skip


def bare_rate(agent, bench: Bench, samples: int) -> tuple[float, float, float]:
    """(trajectories/s, trained tokens/s, seconds) of the bare agent on the questions."""
    examples = [{"id": q["id"], "question": q["question"]} for q in bench.questions]
    started = time.perf_counter()
    runs = agent.run(examples, samples=samples, seed=0)
    seconds = time.perf_counter() - started
    return len(runs) / seconds, sum(sum(t.loss_mask) for t in runs) / seconds, seconds


def pipeline_rate(bench: Bench, engines: list, retriever, samples: int, out: Path) -> tuple[float, float, float]:
    """(weighted samples/s, trained tokens/s, seconds) of one E-step run into a fresh `out`."""
    from pipelines import records
    from pipelines.generate import EStepConfig, run_exsearch_estep

    estep = EStepConfig(samples_per_question=samples, shard_size=len(bench.questions), batch_size=8, concurrency=2)
    started = time.perf_counter()
    run_exsearch_estep(bench.questions, out, engines, retriever, bench.model, AGENT, estep)
    seconds = time.perf_counter() - started
    table = records.read_records(out, "weighted_sample")
    trained_tokens = sum(sum(m) for m in table.column("loss_mask").to_pylist())
    return table.num_rows / seconds, trained_tokens / seconds, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)

    import ray
    import torch

    from actors.config import EngineConfig
    from actors.llm import start_engines
    from actors.retriever import ShardedRetriever
    from cluster.config import ClusterConfig
    from cluster.connect import connect

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_generation_"))
    bench = prepare(work, args.questions)
    bare, bare_tokens, bare_seconds = bare_rate(bare_agent(bench), bench, args.samples)

    cluster = ClusterConfig(num_cpus=2, include_dashboard=False)
    cluster.env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    connect(cluster)
    retriever = ShardedRetriever.launch(bench.index, bench.retriever_cfg)
    figures = {}
    for actors in (1, 2):
        engines = start_engines(bench.model, EngineConfig(num_actors=actors, num_cpus=0.5, max_model_len=1024))
        rate, tokens, seconds = pipeline_rate(bench, engines, retriever, args.samples, work / f"estep{actors}")
        figures[actors] = (rate, seconds, tokens)
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
