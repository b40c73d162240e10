"""Build a retrieval index as a Ray Data job: corpus -> Dataset -> embedding actor pool -> FAISS shards on disk.

`python -m pipelines.index data.path=<corpus> retriever=dense_flat` (or `retriever=bm25`, `retriever.num_shards=4`)
writes an index folder that Retriever actors load (see actors/retriever.py for its layout). The folder is
`retriever.index_dir` when given, else `index/` in the Hydra run directory. Without `data.path` the synthetic world's
passages are indexed; `data.source=toolset data.path=seal_tools` indexes a shared tool-retrieval task's tools.

A corpus is any of: a list of {"id", "title", "text"} dicts, a JSONL or Parquet file with those fields (`_id` is
accepted for `id`), a BEIR folder (its corpus.jsonl), or a records "document" folder (pipelines/records.py).

Why Ray Data: encoding is the expensive step and is embarrassingly parallel; `map_batches` with a callable class
gives a pool of embedding actors that each load the encoder once, streams batches through them with backpressure,
retries failed tasks, and shows its progress — nothing here schedules work by hand. Row order is preserved, so the
same corpus always gives the same shards.

A folder whose manifest matches the config and the corpus (a fingerprint of its contents, or of the files' paths,
sizes and modification times) is reused as it is: rebuilding an unchanged index is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from actors.retriever import (
    Embedder,
    as_retriever_config,
    build_core,
    check_config,
    check_unique_ids,
    corpus_fingerprint,
    doc_table,
    document_text,
    manifest_mismatch,
    read_index_manifest,
    save_index,
    split_shards,
)
from pipelines import config as _config  # noqa: F401  (registers the schema with Hydra)
from pipelines import records

log = logging.getLogger(__name__)

BEIR_CORPUS = "corpus.jsonl"


# ---------------------------------------------------------------------------------------------------------------------
# Corpus sources
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSource:
    """Where documents come from, and a fingerprint that changes when they do (for reusing a built index)."""

    docs: pa.Table | None
    files: tuple[Path, ...]
    format: str  # "memory", "json" or "parquet"
    fingerprint: str

    @classmethod
    def of(cls, docs_or_path: Any) -> CorpusSource:
        if isinstance(docs_or_path, (str, Path)):
            return cls.from_path(Path(docs_or_path))
        table = doc_table(docs_or_path)
        check_unique_ids(table.column("id").to_pylist())
        return cls(table, (), "memory", corpus_fingerprint(table))

    @classmethod
    def from_path(cls, path: Path) -> CorpusSource:
        if path.is_dir() and (path / BEIR_CORPUS).is_file():
            files, fmt = (path / BEIR_CORPUS,), "json"
        elif path.is_dir() and (path / records.MANIFEST).is_file():
            manifest = records.read_manifest(path)
            if manifest.get("kind") != "document":
                raise ValueError(f"{path}: holds {manifest.get('kind')!r} records, an index needs 'document' records")
            files, fmt = tuple(sorted(path.glob("*.parquet"))), "parquet"
        elif path.is_file() and path.suffix in (".jsonl", ".json"):
            files, fmt = (path,), "json"
        elif path.is_file() and path.suffix == ".parquet":
            files, fmt = (path,), "parquet"
        elif not path.exists():
            raise FileNotFoundError(f"data.path={str(path)!r} does not exist")
        else:
            raise ValueError(
                f"data.path={str(path)!r} is not a corpus: expected a BEIR folder ({BEIR_CORPUS}), a records "
                f"'document' folder, or a .jsonl / .parquet file"
            )
        if not files:
            raise ValueError(f"{path}: no corpus files")
        digest = hashlib.sha256()
        for file in files:
            stat = file.stat()
            digest.update(f"{file.resolve()}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\x1e".encode())
        return cls(None, files, fmt, "files:" + digest.hexdigest())

    def dataset(self, num_cpus: float):
        """The documents as a Ray Dataset with string columns id, title, text."""
        import ray.data

        if self.docs is not None:
            return ray.data.from_arrow(self.docs.select(["id", "title", "text"]))
        paths = [str(f) for f in self.files]
        if self.format == "json":
            raw = ray.data.read_json(paths, lines=True, num_cpus=num_cpus)
        else:
            raw = ray.data.read_parquet(paths, num_cpus=num_cpus)
        return raw.map_batches(_id_title_text, batch_format="pyarrow", num_cpus=num_cpus)


def _id_title_text(batch: pa.Table) -> pa.Table:
    """Keep id (or BEIR's `_id`), title (empty when absent) and text, all as strings; name a row that lacks one."""
    names = batch.column_names
    id_column = "id" if "id" in names else "_id" if "_id" in names else None
    if id_column is None or "text" not in names:
        raise ValueError(f"corpus: rows need 'id' (or '_id') and 'text' fields, found {names}")
    ids = batch.column(id_column).cast(pa.string())
    texts = batch.column("text").cast(pa.string())
    for name, column in (("id", ids), ("text", texts)):
        if column.null_count:
            row = column.to_pylist().index(None)
            raise ValueError(f"corpus: a row (id={ids[row].as_py()!r}) has no {name!r}")
    titles = batch.column("title").cast(pa.string()).fill_null("") if "title" in names else pa.array([""] * len(batch))
    return pa.table({"id": ids, "title": titles, "text": texts})


# ---------------------------------------------------------------------------------------------------------------------
# The embedding stage
# ---------------------------------------------------------------------------------------------------------------------


class EmbedDocuments:
    """A Ray Data callable class: each actor of the pool loads the encoder once and encodes many batches."""

    def __init__(self, model_path: str | None, max_seq_length: int, batch_size: int):
        self.embedder = Embedder(model_path, max_seq_length)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [document_text(t, x) for t, x in zip(batch["title"], batch["text"], strict=True)]
        batch["vector"] = self.embedder.encode(texts, self.batch_size)
        return batch


def _collect(batches: Iterable[dict[str, np.ndarray]]) -> tuple[pa.Table, np.ndarray | None]:
    ids, titles, texts, vectors = [], [], [], []
    for batch in batches:
        ids.extend(str(x) for x in batch["id"])
        titles.extend(str(x) for x in batch["title"])
        texts.extend(str(x) for x in batch["text"])
        if "vector" in batch:
            vectors.append(np.asarray(batch["vector"], dtype=np.float32))
    table = doc_table({"id": i, "title": t, "text": x} for i, t, x in zip(ids, titles, texts, strict=True))
    return table, (np.concatenate(vectors) if vectors else None)


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------


def reusable(out_dir: Path, cfg, fingerprint: str) -> bool:
    """A finished index in `out_dir` built with this config from this corpus (the reason is logged otherwise)."""
    if not (out_dir / "manifest.json").is_file():
        return False
    problem = manifest_mismatch(read_index_manifest(out_dir), cfg, corpus=fingerprint)
    if problem:
        print(f"[index] rebuilding {out_dir}: its manifest has {problem}", flush=True)
        return False
    return True


def build_index(docs_or_path: Any, cfg: Any, out_dir: str | Path) -> Path:
    """Build (or reuse) the index of a corpus in `out_dir` with Ray Data; returns the folder.

    Needs a Ray connection (jobs get one from pipelines.jobs.start_job). Dense corpora are encoded by a pool of
    `retriever.embed_concurrency` actors with `retriever.num_cpus` each, `retriever.batch_size` rows per batch.
    """
    cfg = as_retriever_config(cfg)
    check_config(cfg)
    out = Path(out_dir)
    source = CorpusSource.of(docs_or_path)
    if reusable(out, cfg, source.fingerprint):
        print(f"[index] reusing {out} (manifest matches the config and the corpus)", flush=True)
        return out

    started = time.perf_counter()
    dataset = source.dataset(cfg.num_cpus)
    if cfg.kind == "dense":
        import ray.data

        dataset = dataset.map_batches(
            EmbedDocuments,
            fn_constructor_kwargs={"model_path": cfg.model_path, "max_seq_length": cfg.max_seq_length,
                                   "batch_size": cfg.batch_size},  # fmt: skip
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.embed_concurrency),
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
        )
    dataset.context.execution_options.preserve_order = True  # same corpus, same rows per shard (a copy: not global)
    docs, vectors = _collect(dataset.iter_batches(batch_format="numpy", batch_size=None))
    encoded = time.perf_counter()
    if docs.num_rows == 0:
        raise ValueError(f"corpus {docs_or_path if isinstance(docs_or_path, (str, Path)) else '(in memory)'} is empty")
    check_unique_ids(docs.column("id").to_pylist())

    cores = []
    for positions in split_shards(docs.num_rows, cfg.num_shards):
        shard_vectors = vectors[positions] if vectors is not None else None
        cores.append(build_core(docs.take(pa.array(positions)), cfg, shard_vectors))
    seconds = time.perf_counter() - started
    rate = docs.num_rows / max(seconds, 1e-9)
    save_index(out, cores, cfg, source.fingerprint, build_seconds=round(seconds, 2),
               encode_seconds=round(encoded - started, 2), docs_per_second=round(rate, 1))  # fmt: skip
    print(f"[index] {docs.num_rows} documents -> {cfg.num_shards} {cfg.kind}"
          f"{'/' + cfg.index if cfg.kind == 'dense' else ''} shard(s) in {seconds:.1f}s ({rate:.0f} docs/s): {out}",
          flush=True)  # fmt: skip
    return out


def corpus_of(data: Any) -> Any:
    """What `data.*` names as a corpus: a path, a shared tool task's tools, or the synthetic world's passages."""
    from omegaconf import OmegaConf

    source = data.source
    if source == "toolset":
        from pipelines.data.toolsets import load_tool_task

        if not data.path:
            raise ValueError("data.source=toolset needs data.path=<tool task name>")
        return load_tool_task(data.path).corpus
    if data.path:
        return Path(data.path)
    if source not in ("synthetic", "auto"):
        raise ValueError(f"data.source={source!r} needs data.path")
    from pipelines.data.world import WorldConfig, build_world

    world_cfg = OmegaConf.to_object(data.world) if isinstance(data.world, DictConfig) else data.world
    assert isinstance(world_cfg, WorldConfig)
    return build_world(world_cfg).documents()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipelines.jobs import start_job

    out, _ = start_job(cfg)
    target = Path(cfg.retriever.index_dir) if cfg.retriever.index_dir else out / "index"
    folder = build_index(corpus_of(cfg.data), cfg.retriever, target)
    print(f"Index folder: {folder}", flush=True)


if __name__ == "__main__":
    main()
