"""Serving: delegated to bench/serve_latency.py (the Serve app over loopback HTTP against the same engine called
directly, at concurrency 1, 4, 16, the sides alternating); this module only turns its numbers into suite figures and
a scaling curve.
"""

from __future__ import annotations

from bench.serve_latency import measure, parse_args
from bench.suite import Curve, Figure, Result, Target, ensure_ray, median

TARGET_P50_RATIO = 1.15

PROFILE = (
    "where the time goes (per-process CPU seconds and py-spy at 50 Hz, 200-300 requests at concurrency 16, "
    "2026-11-25, another job using ~1 of the 2 cores): the direct engine call costs ~2.3 ms CPU per request at "
    "concurrency 16 (batches of 16); served, a request cost ~29 ms CPU across four processes before the fix - LLM "
    "replica 17 ms (engine batches of 1.3 requests), ingress ~9 ms, Serve's HTTP proxy ~6 ms, the client 2 ms. In "
    "the ingress our code (auth, chat template, tokenizing, response) is ~10% of its samples; the rest is Ray "
    "Serve's ASGI bridge, its router thread and actor calls. Fixed: @serve.batch held one batch at a time, so "
    "batches cut every 5 ms queued behind each other and the engine never saw more than one or two requests; the "
    "LLM replica now hands up to 4 batches to its engine at once and LLMEngineCore merges them (3.2 requests per "
    "engine batch at concurrency 16, LLM replica CPU per request 17 -> 11.5 ms); no second 2 ms batch wait in the "
    "engine; the key check no longer hops to a thread pool. Left: the HTTP proxy and ingress hops are Ray Serve's "
    "own cost (~15 ms CPU per request here), which on 2 cores shared with the engine caps throughput and sets "
    "the latency floor; at concurrency 1 @serve.batch also waits serve.batch_wait_ms (5 ms) for company that "
    "never comes."
)


def run(quick: bool, repeats: int) -> Result:
    args = parse_args(["--requests", "32" if quick else "200", "--max-tokens", "8" if quick else "16"])
    ensure_ray()  # our own local cluster, before serve_latency's connect() could join another job's
    direct, served, model_cfg = measure(args, repeats)
    setup = (f"tiny llama {model_cfg.hidden_size}d x {model_cfg.num_layers}, max_tokens {args.max_tokens}, "
             f"{args.requests} requests per row, loopback")
    result = Result()

    def values(side: dict, c: int, key: str, scale: float = 1.0) -> list[float]:
        return [run[key] * scale for run in side[c]]

    for c in args.concurrency:
        result.figures.append(Figure("serving", f"/v1/chat/completions p50 vs direct call, concurrency {c}", "ms",
                                     values(served, c, "p50", 1e3), values(direct, c, "p50", 1e3), setup,
                                     Target(TARGET_P50_RATIO, op="<=")))  # fmt: skip
        result.figures.append(Figure("serving", f"p99 vs direct call, concurrency {c}", "ms",
                                     values(served, c, "p99", 1e3), values(direct, c, "p99", 1e3), setup))
        result.figures.append(Figure("serving", f"throughput vs direct call, concurrency {c}", "requests/s",
                                     values(served, c, "rps"), values(direct, c, "rps"), setup))  # fmt: skip
    errors = sum(len(run["errors"]) for side in (served, direct) for c in args.concurrency for run in side[c])
    result.curves.append(Curve("serving: requests/s vs concurrency", "concurrent requests", "requests/s",
                               list(args.concurrency),
                               {"Serve (HTTP)": [median(values(served, c, "rps")) for c in args.concurrency],
                                "direct engine": [median(values(direct, c, "rps")) for c in args.concurrency]},
                               setup, ideal_from="direct engine"))  # fmt: skip
    result.notes.append(f"{repeats} repeats; in each, per concurrency, the direct engine and then the Serve app "
                        f"answer the same requests (the direct side's prompts are rendered and tokenized beforehand, "
                        f"the server does that per request); errors: {errors}.")
    result.notes.append(PROFILE)
    return result
