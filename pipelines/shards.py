"""Resumable output folders shared by the generation jobs: fixed slices of the input, each written atomically.

A job splits its (validated) inputs into shards of a fixed size, in input order; a shard's file exists only once
it is complete (written under a temporary name, then renamed), so a rerun does exactly the shards that are missing and
an interrupted job never leaves half a shard behind. Inputs that cannot be used are listed in `quarantine.jsonl`
with the row, id and reason, and the job goes on without them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

QUARANTINE = "quarantine.jsonl"


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.parquet"


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file beside `final`, then rename it: readers see the whole file or none."""
    temporary = final.with_name(final.name + ".tmp")
    write(temporary)
    os.replace(temporary, final)


def write_quarantine(folder: Path, items: Sequence[dict], what: str = "row") -> None:
    """`quarantine.jsonl`: one {"row", "id", "reason"} per unusable input (rewritten on every run)."""
    with open(folder / QUARANTINE, "w") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")
    if items:
        log.warning("%d %s(s) quarantined, see %s", len(items), what, folder / QUARANTINE)


def plan_shards(items: Sequence[dict], size: int, folder: Path) -> tuple[list[list[dict]], list[int]]:
    """(every shard's items, the indices of the shards not yet written)."""
    shards = [list(items[i : i + size]) for i in range(0, len(items), size)]
    return shards, [i for i in range(len(shards)) if not shard_path(folder, i).exists()]
