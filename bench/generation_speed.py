"""Generation pipeline: the E-step (Ray Data -> engine actors -> retriever actor, plus scoring and weighting) against
the same sampler with its engine and index in one process, on the same batches of questions with the same seeds;
2 engine actors against 1, as the engine pool's own throughput under concurrent callers (bench/pool_throughput.py:
the target's figure) and as the E-step's. Steady state (the sampler actor's first batch to its last) and whole runs
are reported apart, and the start-up (Ray Data, the sampler actor's construction) in seconds, as for Ray Train.
Measuring pieces come from bench/generation_throughput.py and bench/pool_throughput.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.generation_throughput import BATCH_SIZE, Rate, bare_rate, bare_sampler, pipeline_rate, prepare
from bench.pool_throughput import CALLERS, MAX_TOKENS, pool_rate
from bench.suite import Curve, Figure, Result, Target, alternate, ensure_ray, median
from bench.tiny import parameter_count

TARGET_PIPELINE = 0.9
TARGET_TWO_ENGINES = 1.8

PROFILE = (
    "where the time goes (py-spy at 50 Hz over 6 s of steady state, 400 questions x 2, 1 engine; per-process CPU "
    "seconds of 64-question runs; 2026-11-25, load ~3 on 2 cores from another job): the steady state is engine-bound "
    "- the engine actor is busy 94% of the time (HF generate 72%, score 17%: torch Linear, top-p, attention), the "
    "sampler actor ~8% (Ray calls and serialisation), so the pipeline's per-batch overhead is ~5-10%. The whole run "
    "was dominated by start-up, ~8-10 s per run: the sampler actor used 6.5 s CPU, ~5 s of it `from transformers "
    "import AutoTokenizer` (transformers 5 imports torch, torch._dynamo and sklearn through transformers.generation) "
    "in a fresh Ray worker. Fixed: the tokenizer is loaded once by the caller and handed to the sampler (unpickling "
    "it takes <1 s and imports neither torch nor sklearn): start-up 9.7 -> 2.7 s, whole run 10.7 -> 3.5 s on the "
    "quick size; and no more sampler actors than batches. Left: a fresh sampler process per E-step run (Ray Data "
    "builds its actor pool per dataset); the engines and retriever stay up across runs."
)

TWO_ENGINES = (
    "2 engines vs 1: EnginePool used to cut every request evenly over the engines, but HF generate on the tiny model "
    "costs 0.055 s for 8 rows vs 0.086 s for 16 (per-step overhead) and seeded requests from different callers are "
    "not merged, so the cut gained at most ~1.56x. It now cuts a request only over engines with nothing in flight "
    "(a lone caller: the same cut as before) and otherwise sends it whole to the least-busy engine. The target's "
    "figure is the engine pool's own: 4 caller threads sharing one pool, E-step-shaped seeded requests, 1 vs 2 "
    "engines. A/B at load ~5 (two other jobs' nice-0 processes on both cores, ours at nice 10), 4 interleaved "
    "repeats: 1.70-1.90x of one engine (median 242 vs 141 rows/s), the old cut 0.88-1.39x (153 rows/s). The "
    "E-step with the recipes' one sampler actor: 1.30-1.35x (the old cut 1.33-1.82x, same load). The E-step figure "
    "with 2 sampler actors stays near 1.1-1.2x for reasons outside the engines (per-process CPU of whole quick runs, "
    "2026-11-25, load ~6): the engines use 0.6-0.7 s CPU of a run, the sampler actors 4.2-4.4 s (mostly their "
    "start-up: a Ray worker, our imports, the tokenizer), the driver and Ray's processes ~0.6 s; the steady state is "
    "~0.6 s long (2 batches per sampler), during which 1 engine is ~100% busy and 2 engines ~55% each (measured "
    "while seeded requests were sent whole), since each sampler alternates engine calls with its own work and "
    "retrieval; and each sampler's pool sees only its own requests, so it cuts them over both engines. 4 sampler "
    "actors were slower (49-52 samples/s against 85-115 with 2): their start-up takes the CPU the second engine "
    "would use. Re-measured at load 18-30 (the final rule): engines 0.9-1.3 s CPU, samplers 5-6 s."
)


def run(quick: bool, repeats: int) -> Result:
    import ray
    import torch

    from actors.config import EngineConfig
    from actors.llm import start_engines
    from actors.retriever import ShardedRetriever

    torch.set_num_threads(1)
    questions, samples = (32, 2) if quick else (48, 4)
    work = Path(tempfile.mkdtemp(prefix="bench_generation_"))
    bench = prepare(work, questions)
    sampler = bare_sampler(bench, samples)
    ensure_ray()
    retriever = ShardedRetriever.launch(bench.index, bench.retriever_cfg)
    # Both engine groups stay up (0.5 + 1.0 CPU, samplers 0.2, retriever 0.1: within 2 CPUs) so runs can interleave.
    one = start_engines(bench.model, EngineConfig(num_actors=1, num_cpus=0.5, max_model_len=1024))
    two = start_engines(bench.model, EngineConfig(num_actors=2, num_cpus=0.5, max_model_len=1024))
    runs = iter(range(10_000))
    rates: dict[str, list[Rate]] = {}
    setup = (f"{questions} questions x {samples} samples in batches of {BATCH_SIZE}, tiny llama "
             f"({parameter_count(bench.model)}), BM25")  # fmt: skip

    def side(name: str, measure_once):
        def measure() -> float:
            rate = measure_once()
            rates.setdefault(name, []).append(rate)
            return rate.steady_samples_per_s

        return measure

    def pipeline(engines: list, concurrency: int = 1):
        return lambda: pipeline_rate(bench, engines, retriever, samples, work / f"estep-{next(runs)}", concurrency)

    def bare():
        return bare_rate(sampler, bench)

    def whole(name: str) -> list[float]:
        return [r.samples_per_s for r in rates[name]]

    try:
        pipeline(one)()  # warm-up: the engines' and the retriever's first calls
        bare()
        texts = [q["question"] for q in bench.questions]
        requests = 6 if quick else 12
        pool_setup = (f"{CALLERS} caller threads x {requests} requests of {BATCH_SIZE} questions, temperature 1, "
                      f"seeded, max_tokens {MAX_TOKENS}, tiny llama ({parameter_count(bench.model)})")  # fmt: skip
        pool_rate(two, texts, 1)  # warm-up: the second engine's first calls
        pooled_two, pooled_one = alternate(lambda: pool_rate(two, texts, requests),
                                           lambda: pool_rate(one, texts, requests), repeats)  # fmt: skip
        piped, alone = alternate(side("one", pipeline(one)), side("bare", bare), repeats)
        result = Result()
        result.figures.append(Figure("generation", "E-step pipeline (1 engine) vs bare engine, steady state",
                                     "samples/s", piped, alone, setup, Target(TARGET_PIPELINE)))  # fmt: skip
        result.figures.append(Figure("generation", "E-step pipeline (1 engine) vs bare engine, whole run",
                                     "samples/s", whole("one"), whole("bare"), setup))  # fmt: skip
        # 2 sampler actors on both sides: the scaled-out E-step's setting, so only the engines differ
        doubled, single = alternate(side("two", pipeline(two, 2)), side("one again", pipeline(one, 2)),
                                    repeats)  # fmt: skip
        result.figures.append(Figure("generation", "engine pool, 2 engine actors vs 1, concurrent requests",
                                     "rows/s", pooled_two, pooled_one, pool_setup,
                                     Target(TARGET_TWO_ENGINES)))  # fmt: skip
        result.figures.append(Figure("generation", "E-step, 2 engine actors vs 1, steady state", "samples/s", doubled,
                                     single, setup))  # fmt: skip
        result.figures.append(Figure("generation", "E-step, 2 engine actors vs 1, whole run", "samples/s", whole("two"),
                                     whole("one again"), setup))  # fmt: skip
        result.curves.append(Curve("generation: E-step steady-state samples/s vs engine actors", "engine actors",
                                   "samples/s", [1, 2], {"E-step": [median(single), median(doubled)]}, setup,
                                   ideal_from="E-step"))  # fmt: skip
        result.curves.append(Curve("generation: engine pool rows/s vs engine actors", "engine actors", "rows/s",
                                   [1, 2], {"engine pool": [median(pooled_one), median(pooled_two)]}, pool_setup,
                                   ideal_from="engine pool"))  # fmt: skip
        startup = {c: median([r.startup_s for r in rs]) for c, rs in
                   ((1, rates["one"]), (2, rates["two"] + rates["one again"]))}  # fmt: skip
        result.notes.append("samples/s counts weighted samples (sampled, scored, weighted): both sides run "
                            "ExSearchSampler on the same batches with the same seeds, so they sample the same "
                            "trajectories, search the same queries and score the same pairs; the pipeline also "
                            "writes its shard. Steady state: samples / seconds from the start of the sampler actor's "
                            "first batch to the end of its last (the bare sampler has no start-up: its whole run).")
        result.notes.append(f"median seconds per run: E-step pipeline {median([r.seconds for r in rates['one']]):.1f} s "
                            f"with 1 sampler actor, of which start-up {startup[1]:.1f} s (Ray Data planning, the "
                            "sampler actor's start: a Ray worker process, our imports, unpickling the tokenizer); "
                            f"start-up with 2 sampler actors {startup[2]:.1f} s; bare sampler "
                            f"{median([r.seconds for r in rates['bare']]):.2f} s.")
        result.notes.append(PROFILE)
        result.notes.append(TWO_ENGINES)
        return result
    finally:
        for engine in one + two:
            ray.kill(engine)
        retriever.close()
