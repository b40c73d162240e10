"""Training tokens/s through Ray Train against a plain single-process torch loop on the same model and data.

The plain loop is `PolicyTrainer` stepping in this process (the same code each Ray Train worker runs), so the ratio is
what Ray Train itself costs: per-step reporting, DDP hooks, and the worker process. Steady state is measured from the
per-step wall-clock stamps in the run's metrics CSV, after a warm-up; start-up (worker group, dataset, model load) is
reported separately. Also 2 workers against 1 (DDP over gloo on this machine's 2 cores).

    python bench/train_throughput.py [--steps 60] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

TARGET_RATIO = 0.9


def make_rows(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_ids": [rng.randrange(10, vocab) for _ in range(8)],
             "token_ids": [rng.randrange(10, vocab) for _ in range(length)],
             "loss_mask": [1] * length, "weight": 1.0} for _ in range(n)]


def steady_tokens_per_s(history: list[dict], warmup: int) -> float:
    rows = history[warmup:]
    tokens = sum(r["tokens"] for r in rows[1:])
    return tokens / (rows[-1]["time"] - rows[0]["time"])


def tiny_model(folder: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """(model folder, vocabulary size): a random-init llama of `hidden` width and `layers` layers."""
    from actors.config import ModelConfig
    from actors.models import build_causal_lm, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([f"word{i} " * 5 for i in range(400)], vocab_size=512)
    model = build_causal_lm(ModelConfig(hidden_size=hidden, num_layers=layers, num_attention_heads=hidden // 64,
                                        num_key_value_heads=hidden // 64, intermediate_size=4 * hidden),
                            tokenizer, folder)  # fmt: skip
    return model, len(tokenizer)


def plain_loop(rows: list[dict], settings, warmup: int) -> tuple[float, float]:
    """(steady tokens/s, parameters in millions) of PolicyTrainer stepping in this process: the baseline."""
    from pipelines.train import PolicyTrainer, example_from_row

    plain = PolicyTrainer(settings, [example_from_row(r, i, "sft") for i, r in enumerate(rows)])
    history = [plain.step() for _ in range(plain.total_steps)]
    return steady_tokens_per_s(history, warmup), sum(p.numel() for p in plain.base.parameters()) / 1e6


def ray_train(rows: list[dict], settings, folder: Path, workers: int, warmup: int) -> tuple[float, float]:
    """(steady tokens/s, start-up and wind-down seconds) of one Ray Train run on a connected Ray."""
    from pipelines.train import run_training

    started = time.time()
    run = run_training(rows, settings, folder, num_workers=workers, name=folder.name)
    total = time.time() - started
    training = run.history[-1]["time"] - run.history[0]["time"]
    return steady_tokens_per_s(run.history, warmup), total - training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=56)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from pipelines.train import TrainSettings

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model, vocab = tiny_model(work / "model", args.hidden, args.layers)
    rows = make_rows(args.steps * args.batch, args.length, vocab)
    settings = TrainSettings(model_path=str(model), objective="sft", batch_size=args.batch, micro_batch_size=args.batch,
                             epochs=1, report_every=10, lr=1e-4)
    warmup = 5
    plain_rate, n_params = plain_loop(rows, settings, warmup)

    cluster = ClusterConfig(num_cpus=2, include_dashboard=False)
    cluster.env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    connect(cluster)
    results = {workers: ray_train(rows, settings, work / f"ray{workers}", workers, warmup) for workers in (1, 2)}

    time.sleep(2)  # let Ray's forwarded worker logs drain before the table
    print(f"\nmodel: llama {n_params:.1f}M params, {args.length + 8} tokens/sequence, batch {args.batch}, "
          f"{args.steps} steps, {os.cpu_count()} cores")
    print(f"{'figure':38} {'tokens/s':>10} {'ratio':>7}")
    print(f"{'plain torch loop (baseline)':38} {plain_rate:10.0f} {1.0:7.2f}")
    for workers, (rate, startup) in results.items():
        print(f"{f'Ray Train, {workers} worker(s), steady state':38} {rate:10.0f} {rate / plain_rate:7.2f}"
              f"   (start-up and wind-down {startup:.1f}s)")
    ratio = results[1][0] / plain_rate
    print(f"\nRay Train 1 worker / plain loop = {ratio:.2f} (target >= {TARGET_RATIO}); "
          f"2 workers / 1 worker = {results[2][0] / results[1][0]:.2f}")


if __name__ == "__main__":
    main()
