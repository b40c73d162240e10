"""Serving latency on loopback: the Ray Serve app (HTTP -> ingress -> @serve.batch -> engine) against calling the
same engine directly, at several concurrencies.

Baseline: `LLMEngineCore` in this process (its own micro-batching, no Ray, no HTTP) answering the same chat prompts
(rendered and tokenized exactly as the server does) with the same sampling, at the same concurrency. Served: the
application `pipelines.serve` deploys on a local Ray cluster, called over HTTP with bearer keys on 127.0.0.1.
Figures: p50 / p99 latency per request and requests per second, and the ratios served / direct (latency above 1 and
throughput below 1 are the serving overhead). Errors must be zero: the script exits 1 otherwise. The sides alternate per concurrency (direct, served).

    python bench/serve_latency.py [--requests 200] [--concurrency 1 4 16] [--max-tokens 16] [--repeats 1] [--json F]

Ray Serve's own switches come from the environment, as on a cluster: e.g. RAY_SERVE_ENABLE_HA_PROXY=1 serves through
HAProxy (the suite's serving benchmark measures that variant too, in a process of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.tiny import tiny_policy  # noqa: E402  (after the path insert above)

KEY = "bench-key-0123456789abcdef"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def drive(send, requests: int, concurrency: int) -> dict:
    """`requests` calls of `send(i)` with at most `concurrency` in flight; latencies, errors, wall time."""
    semaphore, latencies, errors = asyncio.Semaphore(concurrency), [], []

    async def one(i: int) -> None:
        async with semaphore:
            started = time.perf_counter()
            try:
                await send(i)
                latencies.append(time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001  (counted; the bench reports them)
                errors.append(f"{type(error).__name__}: {str(error)[:120]}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - started
    return {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99), "rps": len(latencies) / wall,
            "errors": errors, "n": requests}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--access-log", action="store_true", help="keep Serve's per-request log lines")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved direct/served rounds")
    parser.add_argument("--json", type=Path, default=None, help="also write every round's figures here")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, repeats: int = 1):
    """(direct, served, model config): per concurrency, one dict per repeat of p50 / p99 seconds, requests/s and
    errors. The Serve app is started first; then each repeat runs, per concurrency, the direct side and then the
    served side, so drift in the machine's load hits both alike."""
    import httpx
    import torch
    from ray import serve

    from actors.config import EngineConfig
    from actors.llm import LLMEngineCore, Sampling
    from actors.models import load_causal_lm
    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from pipelines.serve import compose_config, start
    from pipelines.serve_chat import ChatLimits, prepare_chat
    from pipelines.serve_schemas import ChatRequest

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    policy, world, model_cfg = tiny_policy(work / "policy")
    _, tokenizer = load_causal_lm(policy)
    questions = [q["question"] for q in world.questions("train")[:64]]
    bodies = [{"model": "toolseek-policy", "messages": [{"role": "user", "content": q}], "temperature": 0,
               "max_tokens": args.max_tokens} for q in questions]  # fmt: skip

    # ---- direct: the engine in this process, same prompts and sampling as the server builds --------------------------
    engine_cfg = EngineConfig(max_model_len=1024)
    plans = [prepare_chat(ChatRequest(**b), tokenizer, ChatLimits("toolseek-policy", 1024)) for b in bodies]

    async def run_direct(concurrency: int) -> dict:
        core = LLMEngineCore(policy, engine_cfg)

        async def send(i: int):
            plan = plans[i % len(plans)]
            await core.generate([plan.prompt_ids], Sampling(**plan.sampling))

        await drive(send, min(16, args.requests), concurrency)  # warm-up
        return await drive(send, args.requests, concurrency)

    # ---- served: the Serve app on loopback -----------------------------------------------------------------------
    os.environ["TOOLSEEK_API_KEYS"] = KEY
    connect(ClusterConfig(num_cpus=2, include_dashboard=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = compose_config([f"model.path={policy}", f"serve.port={port}", "serve.retriever=none", "serve.agents=[]",
                          "serve.rate_limit_per_minute=0", f"output_dir={work / 'serve'}",
                          "engine.max_model_len=1024", f"serve.access_log={args.access_log}"])  # fmt: skip
    url = start(cfg)

    async def run_served(concurrency: int) -> dict:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:  # fmt: skip

            async def send(i: int):
                response = await client.post("/v1/chat/completions", json=bodies[i % len(bodies)])
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:120]}")

            await drive(send, min(16, args.requests), concurrency)  # warm-up
            return await drive(send, args.requests, concurrency)

    direct: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    served: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    try:
        for _ in range(repeats):
            for concurrency in args.concurrency:
                direct[concurrency].append(asyncio.run(run_direct(concurrency)))
                served[concurrency].append(asyncio.run(run_served(concurrency)))
    finally:
        serve.shutdown()
    return direct, served, model_cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs_direct, runs_served, model_cfg = measure(args, args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"direct": runs_direct, "served": runs_served}))
    direct = {c: runs[-1] for c, runs in runs_direct.items()}
    served = {c: runs[-1] for c, runs in runs_served.items()}
    print(f"\n{args.requests} chat requests per row, max_tokens={args.max_tokens}, greedy, tiny policy "
          f"({model_cfg.hidden_size}d x {model_cfg.num_layers} layers), 2 CPUs, loopback\n")
    print("| concurrency | served p50 ms | served p99 ms | served req/s | direct p50 ms | direct p99 ms | direct req/s "
          "| p50 ratio | throughput ratio | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    errors = 0
    for c in args.concurrency:
        s, d = served[c], direct[c]
        errors += len(s["errors"]) + len(d["errors"])
        print(f"| {c} | {s['p50'] * 1e3:.1f} | {s['p99'] * 1e3:.1f} | {s['rps']:.1f} | {d['p50'] * 1e3:.1f} | "
              f"{d['p99'] * 1e3:.1f} | {d['rps']:.1f} | {s['p50'] / d['p50']:.2f} | {s['rps'] / d['rps']:.2f} | "
              f"{len(s['errors']) + len(d['errors'])} |")  # fmt: skip
    for c in args.concurrency:
        for error in sorted(set(served[c]["errors"]))[:5]:
            print(f"  error at concurrency {c}: {error}")
    print(f"\nerrors: {errors}  (p50 ratio = served / direct latency; throughput ratio = served / direct req/s)")
    print(f"median p50 ratio over concurrencies: "
          f"{statistics.median(served[c]['p50'] / direct[c]['p50'] for c in args.concurrency):.2f}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
