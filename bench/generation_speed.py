"""Generation pipeline: the E-step (Ray Data -> engine actors -> retriever actor, plus scoring and weighting) against
the bare agent and engine in one process on the same questions; 2 engine actors against 1. Measuring pieces come from
bench/generation_throughput.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.generation_throughput import bare_agent, bare_rate, pipeline_rate, prepare
from bench.suite import Curve, Figure, Result, Target, alternate, ensure_ray, median
from bench.tiny import parameter_count

TARGET_PIPELINE = 0.9
TARGET_TWO_ENGINES = 1.8


def run(quick: bool, repeats: int) -> Result:
    import ray
    import torch

    from actors.config import EngineConfig
    from actors.llm import start_engines
    from actors.retriever import ShardedRetriever

    torch.set_num_threads(1)
    questions, samples = (8, 2) if quick else (48, 4)
    work = Path(tempfile.mkdtemp(prefix="bench_generation_"))
    bench = prepare(work, questions)
    agent = bare_agent(bench)
    ensure_ray()
    retriever = ShardedRetriever.launch(bench.index, bench.retriever_cfg)
    # Both engine groups stay up (0.5 + 1.0 CPU, samplers 0.2, retriever 0.1: within 2 CPUs) so runs can interleave.
    one = start_engines(bench.model, EngineConfig(num_actors=1, num_cpus=0.5, max_model_len=1024))
    two = start_engines(bench.model, EngineConfig(num_actors=2, num_cpus=0.5, max_model_len=1024))
    runs = iter(range(10_000))
    tokens: dict[str, list[float]] = {"bare": [], "one": []}
    seconds: dict[str, list[float]] = {"bare": [], "pipeline": []}
    setup = f"{questions} questions x {samples} samples, tiny llama ({parameter_count(bench.model)}), BM25"

    def pipeline(engines: list, name: str = ""):
        def measure() -> float:
            rate, trained, took = pipeline_rate(bench, engines, retriever, samples, work / f"estep-{next(runs)}")
            tokens.setdefault(name, []).append(trained)
            seconds["pipeline"].append(took)
            return rate

        return measure

    def bare() -> float:
        rate, trained, took = bare_rate(agent, bench, samples)
        tokens["bare"].append(trained)
        seconds["bare"].append(took)
        return rate

    try:
        pipeline(one)()  # warm-up: Ray Data start-up and the engines' first batches
        piped, alone = alternate(pipeline(one, "one"), bare, repeats)
        result = Result()
        result.figures.append(Figure("generation", "E-step pipeline (1 engine) vs bare engine", "samples/s", piped,
                                     alone, setup, Target(TARGET_PIPELINE)))  # fmt: skip
        result.figures.append(Figure("generation", "E-step pipeline (1 engine) vs bare engine", "trained tokens/s",
                                     tokens["one"], tokens["bare"], setup))  # fmt: skip
        doubled, single = alternate(pipeline(two), pipeline(one), repeats)
        result.figures.append(Figure("generation", "2 engine actors vs 1", "samples/s", doubled, single, setup,
                                     Target(TARGET_TWO_ENGINES)))  # fmt: skip
        result.curves.append(Curve("generation: E-step samples/s vs engine actors", "engine actors", "samples/s",
                                   [1, 2], {"E-step": [median(single), median(doubled)]}, setup,
                                   ideal_from="E-step"))  # fmt: skip
        result.notes.append("samples/s counts weighted samples written (pipeline) or trajectories sampled (bare): the "
                            "same K samples of the same questions, so scoring and Ray overhead count against the "
                            "pipeline. On 2 cores, 2 engine actors compete with the samplers for the same CPUs.")
        result.notes.append(f"median seconds per run: E-step pipeline {median(seconds['pipeline']):.1f} s, bare agent "
                            f"{median(seconds['bare']):.2f} s. A run's fixed cost (Ray Data start-up, scoring, writing "
                            "records) is paid once per run, so on few questions (--quick) it dominates the ratio; the "
                            "full size (48 questions x 4 samples) amortises it.")
        return result
    finally:
        for engine in one + two:
            ray.kill(engine)
        retriever.close()
