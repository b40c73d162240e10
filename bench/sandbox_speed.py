"""Sandbox: trivial tool calls/s through the ToolSandbox pool against the same function in-process, and the cost of
one `run_program` (a fresh sandboxed process) against one in-process call. Measuring pieces come from
bench/sandbox_throughput.py.
"""

from __future__ import annotations

from bench.sandbox_throughput import CALL, TARGET_CALLS_PER_S, checked, make_pool, rate
from bench.suite import Figure, Result, Target, alternate, ensure_ray

PROGRAM = "print(calculate(operation='add', a=2, b=3))"


def run(quick: bool, repeats: int) -> Result:
    ensure_ray()
    actors = 2
    calculate, _, pool = make_pool(actors)
    n, programs = (400, 8) if quick else (2000, 40)
    setup = f"{actors} ToolSandbox actors, {pool.info()[0]['isolation']} isolation, {n} calls per repeat"
    try:
        checked(pool.map([CALL] * 100))  # warm up workers and connections

        def in_process() -> float:
            return rate("", n, lambda: [calculate(**CALL["arguments"]) for _ in range(n)])[1]

        result = Result()
        for label, count, path in (("pool.map, all in flight", n, lambda: checked(pool.map([CALL] * n))),
                                   ("pool.call, one at a time", n // 4,
                                    lambda: checked([pool.call(CALL) for _ in range(n // 4)]))):
            pooled, bare = alternate(lambda count=count, path=path: rate("", count, path)[1], in_process, repeats)
            result.figures.append(Figure("sandbox", f"{label} vs in-process", "calls/s", pooled, bare, setup,
                                         Target(TARGET_CALLS_PER_S, on="toolseek")))  # fmt: skip
        assert all(p.ok and p.stdout == "5\n" for p in pool.run_programs([PROGRAM] * 2, tools=["calculate"]))

        def program_ms() -> float:
            return 1e3 / rate("", programs, lambda: pool.run_programs([PROGRAM] * programs, tools=["calculate"]))[1]

        sandboxed, bare = alternate(program_ms, lambda: 1e3 / in_process(), repeats)
        result.figures.append(Figure("sandbox", "run_program vs in-process call", "ms per program", sandboxed, bare,
                                     setup))  # fmt: skip
        result.notes.append("run_program starts a fresh sandboxed process per program; its ratio is the overhead "
                            "factor over one bare in-process call.")
        return result
    finally:
        pool.shutdown()
