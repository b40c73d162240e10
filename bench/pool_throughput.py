"""Engine pool throughput: what "2 engine actors vs 1" names, without the E-step around it.

Several caller threads share one `EnginePool` (as an agent's threads, a Serve replica or a sampler do) and each sends
E-step-shaped requests one after another: a batch of questions, sampled at temperature 1 with a seed per request (the
E-step's setting). The figure is sampled rows per second of wall time over all callers, with the same requests and
seeds on 1 engine and on 2; the E-step figure beside it adds Ray Data, the sampler actors, retrieval and scoring, which
share the same 2 cores.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from bench.generation_throughput import BATCH_SIZE

CALLERS = 4
"""Concurrent callers: twice the engines, so neither engine waits for a caller's next request."""
MAX_TOKENS = 24
"""Tokens per sampled turn: the E-step agent's `max_tokens_per_turn`."""


def pool_rate(engines: list, questions: list[str], requests_per_caller: int, timeout_s: float = 600.0) -> float:
    """Sampled rows per second: CALLERS threads, each sending `requests_per_caller` requests of BATCH_SIZE questions
    through one pool over `engines`."""
    from actors.llm import EnginePool, Sampling

    pool = EnginePool(engines, timeout_s=timeout_s)

    def caller(index: int) -> int:
        rows = 0
        for request in range(requests_per_caller):
            start = (index * requests_per_caller + request) * BATCH_SIZE % len(questions)
            prompts = (questions * 2)[start : start + BATCH_SIZE]
            sampling = Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=index * 1000 + request)
            rows += len(pool.generate(prompts, sampling))
        return rows

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CALLERS) as threads:
        rows = sum(threads.map(caller, range(CALLERS)))
    return rows / (time.perf_counter() - started)
