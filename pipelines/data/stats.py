"""Token-length statistics of record folders, computed with Ray Data.

Why: the policy's context (`engine.max_model_len`) and the trainer's batch sizes must fit the longest prompt plus
retrieved passages; measuring with the policy's own tokenizer beats guessing from characters.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

TEXT_FIELD = {"document": "text", "question": "question", "tool_task": "query"}


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str):
    """One tokenizer per worker process: Ray reuses workers, so later batches and later calls skip the load."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _count_tokens(batch: pa.Table, tokenizer_dir: str) -> pa.Table:
    ids = _tokenizer(tokenizer_dir)(batch.column("text").to_pylist(), add_special_tokens=False)["input_ids"]
    return pa.table({"dataset": batch.column("dataset"), "tokens": pa.array([len(x) for x in ids], pa.int32())})


def token_stats(folders: dict[str, tuple[str | Path, str]], tokenizer_dir: str | Path) -> dict[str, dict]:
    """`folders` maps a dataset name to (folder, record kind); returns rows/mean/p95/max tokens per dataset.

    The folders are read (and validated) in the driver and tokenized in one Ray Data pass: one pipeline however
    many folders, because per-folder pipelines cost seconds each in start-up alone.
    """
    import ray.data

    from pipelines import records

    parts = []
    for name, (folder, kind) in folders.items():
        column = records.read_records(folder, kind).column(TEXT_FIELD[kind])
        parts.append(pa.table({"dataset": pa.array([name] * len(column), pa.string()), "text": column}))
    if not parts:
        return {}
    counted = (
        ray.data.from_arrow(pa.concat_tables(parts))
        .map_batches(_count_tokens, fn_kwargs={"tokenizer_dir": str(tokenizer_dir)}, batch_format="pyarrow",
                     batch_size=512, num_cpus=0.5)
        .to_pandas()
    )
    stats = {}
    for name in folders:
        values = counted.loc[counted["dataset"] == name, "tokens"].to_numpy()
        stats[name] = {
            "rows": int(values.size),
            "mean_tokens": float(values.mean()) if values.size else 0.0,
            "p95_tokens": int(np.percentile(values, 95)) if values.size else 0,
            "max_tokens": int(values.max()) if values.size else 0,
        }
    return stats
