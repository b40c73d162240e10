"""Throughput of trivial tool calls through the ToolSandbox pool, against calling the tool in-process.

Agents make many tiny tool calls (a lookup, an addition), so the price of going through validated, timed, remote
actor calls must stay small next to LLM decoding. This prints calls/s for:

- the bare Python function (the baseline), and `ToolRegistry.call` (the same plus schema validation);
- the pool one call at a time (`pool.call`: what a single agent loop sees, one round trip per call);
- the pool with many calls in flight, one actor task each (`pool.map`: many agents at once);
- the pool with calls batched per actor (`pool.call_many`);
- and trivial programs per second (`pool.run_program`: a new sandboxed process each).

Ratios are against the bare function measured in the same run. Target: >= 200 trivial calls/s through the pool.

    python bench/sandbox_throughput.py [--calls 2000] [--actors 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

TARGET_CALLS_PER_S = 200.0
CALL = {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}


def rate(label: str, count: int, run: Callable[[], object]) -> tuple[str, float]:
    started = time.perf_counter()
    run()
    return label, count / (time.perf_counter() - started)


def checked(results: list) -> None:
    """Every pooled answer must be right: a fast wrong answer is no throughput."""
    bad = [r for r in results if not (r.ok and r.output == "5")]
    assert not bad, f"{len(bad)} calls failed, e.g. {bad[0]}"


def make_pool(actors: int):
    """(the bare `calculate` function, its ToolRegistry, a SandboxPool of `actors` actors) on a connected Ray."""
    from actors.config import SandboxConfig
    from actors.sandbox import SandboxPool
    from actors.tools import ToolRegistry
    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from pipelines.data.world import build_world

    world = build_world()
    functions = world.tool_functions()
    registry = ToolRegistry.from_functions(world.tools(), functions)
    connect(ClusterConfig(num_cpus=2, include_dashboard=False))
    return functions["calculate"], registry, SandboxPool(registry, SandboxConfig(num_actors=actors))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--actors", type=int, default=2, help="ToolSandbox actors in the pool")
    parser.add_argument("--programs", type=int, default=40, help="trivial programs to run")
    args = parser.parse_args(argv)

    calculate, registry, pool = make_pool(args.actors)
    n = args.calls
    info = pool.info()
    assert pool.call(CALL).output == "5", "the pool does not answer correctly"
    pool.map([CALL] * 200)  # warm up workers and connections

    rows = [
        rate("in-process function", n, lambda: [calculate(**CALL["arguments"]) for _ in range(n)]),
        rate("in-process ToolRegistry.call (validated)", n, lambda: checked([registry.call(CALL) for _ in range(n)])),
        rate("pool.call, one at a time", n // 4, lambda: checked([pool.call(CALL) for _ in range(n // 4)])),
        rate("pool.map, all in flight", n, lambda: checked(pool.map([CALL] * n))),
        rate("pool.call_many, batched per actor", n, lambda: checked(pool.call_many([CALL] * n))),
    ]
    program = "print(calculate(operation='add', a=2, b=3))"
    programs = pool.run_programs([program] * args.programs, tools=["calculate"])
    assert all(p.ok and p.stdout == "5\n" for p in programs), programs[0]
    started = time.perf_counter()
    pool.run_programs([program] * args.programs, tools=["calculate"])
    program_rate = args.programs / (time.perf_counter() - started)
    pool.shutdown()

    baseline = rows[0][1]
    print(f"sandbox pool: {args.actors} actor(s), isolation={info[0]['isolation']}, {n} calls per measurement\n")
    print(f"| {'path':44} | {'calls/s':>10} | {'vs in-process':>13} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 15}|")
    for label, value in rows:
        print(f"| {label:44} | {value:10.0f} | {value / baseline:13.5f} |")
    print(f"| {'pool.run_program (trivial program)':44} | {program_rate:10.1f} | {program_rate / baseline:13.5f} |")
    pooled = {label: value for label, value in rows[2:]}
    worst = min(pooled.values())
    print(f"\nratio in-process / pool.call (one at a time): {baseline / pooled['pool.call, one at a time']:.0f}x slower")
    print(f"ratio in-process / pool.map (in flight):      {baseline / pooled['pool.map, all in flight']:.0f}x slower")
    verdict = "PASS" if worst >= TARGET_CALLS_PER_S else "FAIL"
    print(f"target >= {TARGET_CALLS_PER_S:.0f} trivial calls/s through the pool (slowest pooled path {worst:.0f}/s): "
          f"{verdict}")


if __name__ == "__main__":
    main()
