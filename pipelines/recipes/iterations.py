"""Resumable iterations: each iteration's folder ends with `result.json`, written last, so its presence means done."""

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
