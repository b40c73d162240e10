"""What the EM recipes share: resumable iterations (each iteration's folder ends with `result.json`, written last, so
its presence means done) and fresh E-step questions per iteration."""

from __future__ import annotations

import json
from pathlib import Path


def finished_result(folder: Path) -> dict | None:
    """The iteration's result if it finished, else None (then it is run again from its start)."""
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(folder: Path, result: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def estep_questions(pool: list[dict], iteration: int, size: int) -> list[dict]:
    """Iteration `iteration`'s (1-based) E-step questions: the pool's next `size`, wrapping around when it runs out.

    Why fresh questions each iteration: sampling the same questions again mostly re-learns their answers. Measured
    in-process from a 23% warm start (300 questions x 4 samples, importance weights, 300 test questions): with the
    same questions the E-step's correct rate went 20% -> 36% over two iterations while test EM went 25.3% -> 29.0%;
    with fresh questions test EM went 31.7% -> 35.0%.
    """
    if not pool:
        raise ValueError("no training questions are left for the E-step: raise data.world.train_questions above "
                         "recipe.warm_start_questions")
    start = (iteration - 1) * size
    return [pool[(start + i) % len(pool)] for i in range(min(size, len(pool)))]
