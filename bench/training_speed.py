"""Training: Ray Train steady-state tokens/s against the plain in-process loop on the same model and rows; start-up
separately; 2 workers against 1. Measuring pieces come from bench/train_throughput.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.suite import Curve, Figure, Result, Target, alternate, ensure_ray, median
from bench.train_throughput import TARGET_RATIO, make_rows, plain_loop, ray_train, tiny_model


def run(quick: bool, repeats: int) -> Result:
    import torch

    from pipelines.train import TrainSettings

    torch.set_num_threads(1)
    hidden, layers, steps, batch, length, warmup = (64, 1, 20, 8, 24, 3) if quick else (256, 4, 60, 16, 56, 5)
    work = Path(tempfile.mkdtemp(prefix="bench_training_"))
    model, vocab = tiny_model(work / "model", hidden, layers)
    rows = make_rows(steps * batch, length, vocab)
    settings = TrainSettings(model_path=str(model), objective="sft", batch_size=batch, micro_batch_size=batch,
                             epochs=1, report_every=10, lr=1e-4)  # fmt: skip
    ensure_ray()
    startups: dict[int, list[float]] = {1: [], 2: []}
    params: list[float] = []
    runs = iter(range(10_000))

    def ray_rate(workers: int):
        def measure() -> float:
            rate, startup = ray_train(rows, settings, work / f"w{workers}-{next(runs)}", workers, warmup)
            startups[workers].append(startup)
            return rate

        return measure

    def plain_rate() -> float:
        rate, millions = plain_loop(rows, settings, warmup)
        params.append(millions)
        return rate

    one, plain = alternate(ray_rate(1), plain_rate, repeats)
    setup = f"llama {hidden}d x {layers}, {params[0]:.1f}M params, batch {batch} x {length + 8} tokens, {steps} steps"
    result = Result()
    result.figures.append(Figure("training", "Ray Train 1 worker vs plain loop, steady state", "tokens/s", one, plain,
                                 setup, Target(TARGET_RATIO)))  # fmt: skip
    two, one_again = alternate(ray_rate(2), ray_rate(1), 1 if quick else repeats)  # each pair costs two start-ups
    result.figures.append(Figure("training", "Ray Train 2 workers vs 1", "tokens/s", two, one_again, setup))
    result.curves.append(Curve("training: tokens/s vs Ray Train workers", "workers", "tokens/s", [1, 2],
                               {"Ray Train": [median(one_again), median(two)]}, setup, ideal_from="Ray Train"))
    result.notes.append("Ray Train start-up and wind-down (worker group, dataset, model load; outside the steady "
                        f"state): 1 worker {median(startups[1]):.1f} s, 2 workers {median(startups[2]):.1f} s "
                        "(median per run); the plain loop has none to speak of.")
    return result
