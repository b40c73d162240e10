"""Serving: delegated to bench/serve_latency.py (the Serve app over loopback HTTP against the same engine called
directly, at concurrency 1, 4, 16); this module only turns its numbers into suite figures and a scaling curve.
"""

from __future__ import annotations

from bench.serve_latency import measure, parse_args
from bench.suite import Curve, Figure, Result, Target, ensure_ray

TARGET_P50_RATIO = 1.15


def run(quick: bool, repeats: int) -> Result:
    args = parse_args(["--requests", "32" if quick else "200", "--max-tokens", "8" if quick else "16"])
    ensure_ray()  # our own local cluster, before serve_latency's connect() could join another job's
    direct, served, model_cfg = measure(args)
    setup = (f"tiny llama {model_cfg.hidden_size}d x {model_cfg.num_layers}, max_tokens {args.max_tokens}, "
             f"{args.requests} requests per row, loopback")
    result = Result()
    for c in args.concurrency:
        result.figures.append(Figure("serving", f"/v1/chat/completions p50 vs direct call, concurrency {c}", "ms",
                                     [served[c]["p50"] * 1e3], [direct[c]["p50"] * 1e3], setup,
                                     Target(TARGET_P50_RATIO, op="<=")))  # fmt: skip
        result.figures.append(Figure("serving", f"p99 vs direct call, concurrency {c}", "ms",
                                     [served[c]["p99"] * 1e3], [direct[c]["p99"] * 1e3], setup))  # fmt: skip
        result.figures.append(Figure("serving", f"throughput vs direct call, concurrency {c}", "requests/s",
                                     [served[c]["rps"]], [direct[c]["rps"]], setup))  # fmt: skip
    errors = sum(len(served[c]["errors"]) + len(direct[c]["errors"]) for c in args.concurrency)
    result.curves.append(Curve("serving: requests/s vs concurrency", "concurrent requests", "requests/s",
                               list(args.concurrency), {"Serve (HTTP)": [served[c]["rps"] for c in args.concurrency],
                                                        "direct engine": [direct[c]["rps"] for c in args.concurrency]},
                               setup, ideal_from="direct engine"))  # fmt: skip
    result.notes.append(f"one pass per side (serve_latency.py measures direct first, then served; not interleaved), "
                        f"so n=1 and no spread; errors: {errors}.")
    return result
