"""Retriever: dense (all-MiniLM-L6-v2 + FAISS) or BM25 (bm25s) search over an index folder, in-process or as actors.

Three layers, so each can be used and tested alone:

* the in-process cores, `DenseIndex` and `BM25Index`: one shard each, `search(queries, k, instruction)`, save/load;
  no Ray, so a notebook, a test or a Ray Data UDF can hold one directly;
* the `Retriever` Ray actor: loads one shard of an index folder and serves `search`; Ray restarts it when its process
  dies (`max_restarts`) and re-runs an interrupted search on the new process (`max_task_retries`), which is safe
  because search is read-only and idempotent;
* `ShardedRetriever`: a plain class over one actor per shard that fans each search out, with a deadline on every
  remote call, and merges the hits by score. For `flat` the merge equals the unsharded index exactly: every shard
  returns its exact top k, and the global top k is among them.

An index folder (written by `save_index`, or by the Ray Data job in pipelines/index.py) holds per shard a FAISS file
(or a bm25s folder) and a Parquet doc store (`id`, `title`, `text`, `row` = position in the source corpus), plus
`manifest.json`, written last, that says what was built (kind, model, dim, metric, index type, build parameters,
shards, the corpus's fingerprint). A folder is only used when its manifest fits the config: a mismatch fails with
the field named, rather than returning neighbours from the wrong vector space.

Dense encoding follows the all-MiniLM-L6-v2 recipe: mean pooling, L2-normalised vectors, 256 tokens, documents
encoded as `title + " " + text`, and inner product (= cosine on unit vectors). With an instruction a query is encoded
as `"Instruct: {instruction}\\nQuery: {query}"` (MAIR / ToolRet); BM25 has no notion of an instruction, so it just
prepends the instruction's words to the query.

BM25 choices (bm25s): lower-casing, bm25s's word splitter (`\\b\\w\\w+\\b`: words of two or more characters), its
English stopword list, and no stemming unless `retriever.bm25_stemmer` names a Snowball language (needs PyStemmer,
absent here). The default is Lucene's BM25 with k1 = 1.5, b = 0.75. Tokenization is recorded in the manifest and the
vocabulary is saved with the index, so a loaded index tokenizes queries exactly as it tokenized its documents.
Documents with no query term in common score 0 and are not returned, so a BM25 search may return fewer than k hits.
BM25 shards each keep their own document frequencies, so a sharded BM25 index ranks close to, not exactly like,
an unsharded one (dense shards have no corpus statistics, so flat merges are exact).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.config import RetrieverConfig
from cluster.resources import Placement

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("dense", "bm25")
INDEX_TYPES = ("flat", "ivf", "hnsw")
METRIC = "inner_product"
PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DOC_STORE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
    ]
)
IVF_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained

Hit = dict[str, Any]  # {"id", "title", "text", "score"}


class IndexMismatchError(ValueError):
    """An index folder that does not fit the config (or is unfinished); the message names the field."""


# ---------------------------------------------------------------------------------------------------------------------
# Config and text helpers
# ---------------------------------------------------------------------------------------------------------------------


def as_retriever_config(cfg: Any) -> RetrieverConfig:
    """A RetrieverConfig from the dataclass itself, a Hydra node or a dict (actors receive plain dataclasses)."""
    if isinstance(cfg, RetrieverConfig):
        return cfg
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return RetrieverConfig(**OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    return RetrieverConfig(**dict(cfg))


def check_config(cfg: RetrieverConfig) -> None:
    """Fail early, naming the key, on values no index can be built or searched with."""
    if cfg.kind not in KINDS:
        raise ValueError(f"retriever.kind={cfg.kind!r} is not one of {KINDS}")
    if cfg.kind == "dense" and cfg.index not in INDEX_TYPES:
        raise ValueError(f"retriever.index={cfg.index!r} is not one of {INDEX_TYPES}")
    for name in ("num_shards", "batch_size", "max_seq_length", "embed_concurrency", "nlist", "nprobe", "hnsw_m",
                 "ef_construction", "ef_search"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ValueError(f"retriever.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.request_timeout_s <= 0:
        raise ValueError(f"retriever.request_timeout_s must be > 0, got {cfg.request_timeout_s}")
    if "{query}" not in cfg.instruction_template or "{instruction}" not in cfg.instruction_template:
        raise ValueError(
            f"retriever.instruction_template={cfg.instruction_template!r} must contain {{instruction}} and {{query}}"
        )


def model_name(cfg: RetrieverConfig) -> str:
    """What the manifest records as the encoder: the packaged model's hub name, or the resolved folder."""
    return str(Path(cfg.model_path).resolve()) if cfg.model_path else PACKAGED_MODEL


def document_text(title: str | None, text: str | None) -> str:
    """What a dense index encodes per document: title + " " + text (the BEIR / sentence-transformers convention)."""
    return f"{title or ''} {text or ''}".strip()


def format_query(query: str, instruction: str | None, template: str = RetrieverConfig.instruction_template) -> str:
    """The text a dense encoder sees for an (optionally instructed) query."""
    return template.format(instruction=instruction, query=query) if instruction else query


def per_query_instructions(queries: Sequence[str], instruction: str | Sequence[str] | None) -> list[str | None]:
    """One instruction per query: a single string applies to all, a list gives one each (ToolRet's are per query)."""
    if instruction is None or isinstance(instruction, str):
        return [instruction] * len(queries)
    instructions = list(instruction)
    if len(instructions) != len(queries):
        raise ValueError(f"instruction: got {len(instructions)} instructions for {len(queries)} queries")
    return instructions


# ---------------------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------------------


def doc_table(docs: Iterable[dict] | pa.Table, first_row: int = 0) -> pa.Table:
    """Documents (dicts or a table with id/title/text; `_id` accepted, title optional) as a doc-store table.

    `row` numbers the documents in corpus order; it survives sharding, so shards can always be traced back.
    """
    if isinstance(docs, pa.Table):
        rows = docs.to_pylist()
    else:
        rows = list(docs)
    ids, titles, texts = [], [], []
    for index, doc in enumerate(rows):
        doc_id = doc.get("id", doc.get("_id"))
        if doc_id is None or doc_id == "":
            raise ValueError(f"corpus row {first_row + index}: no 'id'")
        if doc.get("text") is None:
            raise ValueError(f"corpus row {first_row + index} (id={doc_id!r}): no 'text'")
        ids.append(str(doc_id))
        titles.append(str(doc.get("title") or ""))
        texts.append(str(doc["text"]))
    rows_column = np.arange(first_row, first_row + len(ids), dtype=np.int64)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(titles, pa.string()),
                                 pa.array(texts, pa.string()), pa.array(rows_column)], schema=DOC_STORE_SCHEMA)  # fmt: skip


def check_unique_ids(ids: Iterable[str]) -> None:
    """Duplicate ids would make qrels and hits ambiguous: name the first one."""
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise ValueError(f"corpus: document id {doc_id!r} occurs more than once")
        seen.add(doc_id)


def corpus_fingerprint(docs: pa.Table) -> str:
    """A digest of ids, titles and texts in order: two builds from the same corpus share it."""
    digest = hashlib.sha256()
    for doc_id, title, text in zip(*(docs.column(c).to_pylist() for c in ("id", "title", "text")), strict=True):
        digest.update(f"{doc_id}\x1f{title}\x1f{text}\x1e".encode())
    return digest.hexdigest()


def split_shards(count: int, num_shards: int) -> list[np.ndarray]:
    """Row positions per shard, round-robin: balanced, and a streaming build can route row i without knowing count."""
    if num_shards > max(count, 1):
        raise ValueError(f"retriever.num_shards={num_shards} exceeds the corpus size ({count} documents)")
    return [np.arange(shard, count, num_shards) for shard in range(num_shards)]


def _hits(docs: pa.Table, positions: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
    """Hit dicts per query from (queries x k) positions and scores; one `take` for the whole batch."""
    valid = positions >= 0  # FAISS pads with -1 when a shard has fewer than k vectors
    rows = docs.select(["id", "title", "text"]).take(pa.array(positions[valid].astype(np.int64))).to_pylist()
    flat_scores = scores[valid].tolist()
    out, cursor = [], 0
    for count in valid.sum(axis=1).tolist():
        out.append([{**row, "score": score} for row, score in
                    zip(rows[cursor:cursor + count], flat_scores[cursor:cursor + count], strict=True)])  # fmt: skip
        cursor += count
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------------------------------


class Embedder:
    """The sentence encoder: unit vectors (mean pooling + L2 norm, as all-MiniLM-L6-v2 was trained), float32."""

    def __init__(self, model_path: str | None = None, max_seq_length: int = 256, device: str | None = None):
        from actors.models import load_embedder

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_embedder(model_path, device=device, max_seq_length=max_seq_length)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)  # fmt: skip
        return np.ascontiguousarray(vectors, dtype=np.float32)


def embedder_for(cfg: RetrieverConfig) -> Embedder:
    return Embedder(cfg.model_path, cfg.max_seq_length)


def _effective_nlist(cfg: RetrieverConfig, count: int) -> int:
    """cfg.nlist, capped so every centroid gets ~39 training vectors (small shards would train garbage cells)."""
    return max(1, min(cfg.nlist, count // IVF_POINTS_PER_CENTROID))


def build_faiss_index(vectors: np.ndarray, cfg: RetrieverConfig):
    """A CPU FAISS index of `cfg.index` type over unit vectors, inner-product metric."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if cfg.index == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.index == "ivf":
        nlist = _effective_nlist(cfg, len(vectors))
        if nlist < cfg.nlist:
            log.info("retriever.nlist=%d capped to %d for a shard of %d vectors", cfg.nlist, nlist, len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        raise ValueError(f"retriever.index={cfg.index!r} is not one of {INDEX_TYPES}")
    index.add(vectors)
    return index


def _apply_search_params(index, cfg: RetrieverConfig) -> None:
    import faiss

    if cfg.index == "ivf":
        faiss.extract_index_ivf(index).nprobe = cfg.nprobe
    elif cfg.index == "hnsw":
        index.hnsw.efSearch = cfg.ef_search


def _to_gpus(index, cfg: RetrieverConfig):
    """faiss-gpu over every visible GPU for flat and IVF (FAISS has no GPU HNSW); the CPU index otherwise."""
    import faiss

    if cfg.index == "hnsw" or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index
    log.info("moving the %s index to %d GPU(s)", cfg.index, faiss.get_num_gpus())
    return faiss.index_cpu_to_all_gpus(index)


class DenseIndex:
    """One shard of a dense index: FAISS over unit vectors + the shard's doc store + the query encoder."""

    kind = "dense"

    def __init__(self, index, docs: pa.Table, cfg: RetrieverConfig, embedder: Embedder | None = None):
        if index.ntotal != docs.num_rows:
            raise IndexMismatchError(f"FAISS index holds {index.ntotal} vectors but the doc store {docs.num_rows} rows")
        self.cpu_index = index
        _apply_search_params(self.cpu_index, cfg)
        self.index = _to_gpus(index, cfg)
        self.docs = docs
        self.cfg = cfg
        self._embedder = embedder

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:  # built lazily: an index built from given vectors may never encode a query
            self._embedder = embedder_for(self.cfg)
        return self._embedder

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, docs: pa.Table, cfg: RetrieverConfig,
                     embedder: Embedder | None = None) -> DenseIndex:  # fmt: skip
        return cls(build_faiss_index(vectors, cfg), docs, cfg, embedder)

    @classmethod
    def build(cls, docs: pa.Table, cfg: RetrieverConfig, embedder: Embedder | None = None) -> DenseIndex:
        """Encode in this process (small corpora, tests); the Ray Data job in pipelines/index.py scales this out."""
        embedder = embedder or embedder_for(cfg)
        texts = [document_text(t, x) for t, x in zip(docs.column("title").to_pylist(), docs.column("text").to_pylist(), strict=True)]
        return cls.from_vectors(embedder.encode(texts, cfg.batch_size), docs, cfg, embedder)

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)

    def encode_queries(self, queries: Sequence[str], instruction: str | Sequence[str] | None = None) -> np.ndarray:
        instructions = per_query_instructions(queries, instruction)
        texts = [format_query(q, i, self.cfg.instruction_template) for q, i in zip(queries, instructions, strict=True)]
        return self.embedder.encode(texts, self.cfg.batch_size)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        if len(vectors) == 0 or k < 1 or self.docs.num_rows == 0:
            return [[] for _ in range(len(vectors))]
        if self.cfg.index == "hnsw":
            self.cpu_index.hnsw.efSearch = max(self.cfg.ef_search, k)  # HNSW cannot return more than efSearch
        scores, positions = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, self.docs.num_rows))
        return _hits(self.docs, positions, scores)

    def search(self, queries: Sequence[str], k: int, instruction: str | Sequence[str] | None = None) -> list[list[Hit]]:
        return self.search_vectors(self.encode_queries(queries, instruction), k)

    def save(self, folder: Path, shard: int) -> dict:
        import faiss

        name = f"shard-{shard:05d}.faiss"
        faiss.write_index(self.cpu_index, str(folder / name))
        return {"index_file": name, **_ivf_info(self.cpu_index)}

    @classmethod
    def load(cls, folder: Path, shard: dict, docs: pa.Table, cfg: RetrieverConfig, dim: int,
             embedder: Embedder | None = None) -> DenseIndex:  # fmt: skip
        import faiss

        path = folder / shard["index_file"]
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise IndexMismatchError(f"{path}: vectors have dim {index.d} but the manifest says dim={dim}")
        return cls(index, docs, cfg, embedder)


def _ivf_info(index) -> dict:
    import faiss

    try:
        return {"nlist": int(faiss.extract_index_ivf(index).nlist)}
    except RuntimeError:  # not an IVF index
        return {}


# ---------------------------------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------------------------------


def _bm25_tokenizer(stopwords: str, stemmer: str | None):
    from bm25s.tokenization import Tokenizer

    stem = None
    if stemmer:
        try:
            import Stemmer  # PyStemmer
        except ImportError:
            raise ValueError(f"retriever.bm25_stemmer={stemmer!r} needs PyStemmer, which is not installed") from None
        stem = Stemmer.Stemmer(stemmer)
    return Tokenizer(lower=True, stopwords=[] if stopwords in ("none", "") else stopwords, stemmer=stem)


class BM25Index:
    """One shard of a BM25 index (bm25s): its scorer, the tokenizer vocabulary it was built with, its doc store."""

    kind = "bm25"

    def __init__(self, model, tokenizer, docs: pa.Table, cfg: RetrieverConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.docs = docs
        self.cfg = cfg

    @classmethod
    def build(cls, docs: pa.Table, cfg: RetrieverConfig) -> BM25Index:
        import bm25s

        tokenizer = _bm25_tokenizer(cfg.bm25_stopwords, cfg.bm25_stemmer)
        texts = [document_text(t, x) for t, x in zip(docs.column("title").to_pylist(), docs.column("text").to_pylist(), strict=True)]
        tokens = tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
        model = bm25s.BM25(method=cfg.bm25_method, k1=cfg.bm25_k1, b=cfg.bm25_b)
        model.index(tokens, show_progress=False)
        return cls(model, tokenizer, docs, cfg)

    def search(self, queries: Sequence[str], k: int, instruction: str | Sequence[str] | None = None) -> list[list[Hit]]:
        instructions = per_query_instructions(queries, instruction)
        texts = [f"{i} {q}" if i else q for q, i in zip(queries, instructions, strict=True)]
        if not texts or k < 1 or self.docs.num_rows == 0:
            return [[] for _ in texts]
        tokens = self.tokenizer.tokenize(texts, update_vocab=False, return_as="ids", show_progress=False)
        positions, scores = self.model.retrieve(tokens, k=min(k, self.docs.num_rows), show_progress=False, n_threads=0)
        positions = np.where(scores > 0, positions, -1)  # no query term in common: not a match, whatever its rank
        return _hits(self.docs, positions, scores)

    def save(self, folder: Path, shard: int) -> dict:
        name = f"bm25-{shard:05d}"
        self.model.save(str(folder / name), show_progress=False)
        self.tokenizer.save_vocab(str(folder / name))
        return {"index_file": name}

    @classmethod
    def load(cls, folder: Path, shard: dict, docs: pa.Table, cfg: RetrieverConfig, build: dict) -> BM25Index:
        import bm25s

        path = folder / shard["index_file"]
        model = bm25s.BM25.load(str(path), show_progress=False, verbosity=0)
        tokenizer = _bm25_tokenizer(build["bm25_stopwords"], build["bm25_stemmer"])
        tokenizer.load_vocab(str(path))
        return cls(model, tokenizer, docs, cfg)


SearchCore = DenseIndex | BM25Index


# ---------------------------------------------------------------------------------------------------------------------
# Index folders: manifest, save, load
# ---------------------------------------------------------------------------------------------------------------------


def build_params(cfg: RetrieverConfig) -> dict:
    """The config fields that shape what is on disk (search-time fields such as nprobe are left out)."""
    if cfg.kind == "bm25":
        return {"bm25_method": cfg.bm25_method, "bm25_k1": cfg.bm25_k1, "bm25_b": cfg.bm25_b,
                "bm25_stopwords": cfg.bm25_stopwords, "bm25_stemmer": cfg.bm25_stemmer}  # fmt: skip
    params: dict = {"max_seq_length": cfg.max_seq_length}
    if cfg.index == "ivf":
        params["nlist"] = cfg.nlist
    elif cfg.index == "hnsw":
        params.update(hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction)
    return params


def make_manifest(cfg: RetrieverConfig, shards: list[dict], dim: int | None, corpus: str | None, **extra) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "index": cfg.index if cfg.kind == "dense" else None,
        "model": model_name(cfg) if cfg.kind == "dense" else None,
        "dim": dim,
        "metric": METRIC if cfg.kind == "dense" else "bm25",
        "count": int(sum(s["count"] for s in shards)),
        "num_shards": len(shards),
        "shards": shards,
        "build": build_params(cfg),
        "corpus": corpus,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def read_index_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexMismatchError(f"{folder}: no {MANIFEST} (not an index folder, or its build did not finish)")
    return json.loads(path.read_text())


def manifest_mismatch(manifest: dict, cfg: RetrieverConfig, dim: int | None = None, corpus: str | None = None) -> str | None:
    """The first field where a manifest does not fit the config (or the encoder's dim / the corpus), else None."""
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format_version={manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
    kind = manifest.get("kind")
    if kind not in KINDS:
        return f"kind={kind!r} is not a known kind {KINDS}"
    if kind != cfg.kind:
        return f"kind={kind!r} but retriever.kind={cfg.kind!r}"
    if kind == "dense":
        if manifest.get("index") not in INDEX_TYPES:
            return f"index={manifest.get('index')!r} is not a known index type {INDEX_TYPES}"
        if manifest.get("index") != cfg.index:
            return f"index={manifest.get('index')!r} but retriever.index={cfg.index!r}"
        if manifest.get("metric") != METRIC:
            return f"metric={manifest.get('metric')!r}, expected {METRIC!r}"
        if manifest.get("model") != model_name(cfg):
            return f"model={manifest.get('model')!r} but the configured encoder is {model_name(cfg)!r}"
        if dim is not None and manifest.get("dim") != dim:
            return f"dim={manifest.get('dim')!r} but the encoder produces dim={dim}"
    if manifest.get("num_shards") != cfg.num_shards or len(manifest.get("shards", [])) != cfg.num_shards:
        return f"num_shards={manifest.get('num_shards')!r} but retriever.num_shards={cfg.num_shards}"
    for key, value in build_params(cfg).items():
        if manifest.get("build", {}).get(key) != value:
            return f"build.{key}={manifest.get('build', {}).get(key)!r} but retriever.{key}={value!r}"
    if corpus is not None and manifest.get("corpus") != corpus:
        return f"corpus={manifest.get('corpus')!r} differs from this corpus's fingerprint {corpus!r}"
    return None


def check_manifest(folder: str | os.PathLike, cfg: RetrieverConfig, dim: int | None = None,
                   corpus: str | None = None) -> dict:  # fmt: skip
    """The folder's manifest, or IndexMismatchError naming the first field that does not fit."""
    manifest = read_index_manifest(folder)
    problem = manifest_mismatch(manifest, cfg, dim, corpus)
    if problem:
        raise IndexMismatchError(f"{Path(folder) / MANIFEST}: {problem}")
    return manifest


def build_core(docs: pa.Table, cfg: RetrieverConfig, vectors: np.ndarray | None = None,
               embedder: Embedder | None = None) -> SearchCore:  # fmt: skip
    """One shard's core from its documents (and their vectors, when a Ray Data job already computed them)."""
    if cfg.kind == "bm25":
        return BM25Index.build(docs, cfg)
    if vectors is not None:
        return DenseIndex.from_vectors(vectors, docs, cfg, embedder)
    return DenseIndex.build(docs, cfg, embedder)


def save_index(folder: str | os.PathLike, cores: Sequence[SearchCore], cfg: RetrieverConfig, corpus: str,
               **extra) -> Path:  # fmt: skip
    """Write each shard (index file + doc store), then the manifest last: a folder with a manifest is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # an overwrite in progress must not look complete
    for stale in [*folder.glob("shard-*.faiss"), *folder.glob("docs-*.parquet"), *folder.glob("bm25-*")]:
        if stale.is_dir():  # a previous build's shards (there may have been more of them)
            shutil.rmtree(stale)
        else:
            stale.unlink()
    shards = []
    for number, core in enumerate(cores):
        docs_name = f"docs-{number:05d}.parquet"
        pq.write_table(core.docs, folder / docs_name)
        shards.append({"shard": number, "docs_file": docs_name, "count": core.docs.num_rows, **core.save(folder, number)})
    dim = cores[0].dim if cfg.kind == "dense" else None
    manifest = make_manifest(cfg, shards, dim, corpus, **extra)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return folder


def build_index_in_process(docs: Iterable[dict] | pa.Table, cfg: RetrieverConfig, folder: str | os.PathLike,
                           embedder: Embedder | None = None, vectors: np.ndarray | None = None) -> Path:  # fmt: skip
    """Build and save an index without Ray (small corpora, tests); `vectors` (in corpus order) skips encoding."""
    check_config(cfg)
    table = doc_table(docs)
    check_unique_ids(table.column("id").to_pylist())
    cores = []
    for positions in split_shards(table.num_rows, cfg.num_shards):
        shard_docs = table.take(pa.array(positions))
        shard_vectors = vectors[positions] if vectors is not None else None
        cores.append(build_core(shard_docs, cfg, shard_vectors, embedder))
    return save_index(folder, cores, cfg, corpus_fingerprint(table))


def load_shard(folder: str | os.PathLike, shard: int, cfg: RetrieverConfig, embedder: Embedder | None = None) -> SearchCore:
    """One shard's core, after checking that the manifest fits `cfg` (and, for dense, the encoder's dim)."""
    check_config(cfg)
    folder = Path(folder)
    manifest = check_manifest(folder, cfg)
    if not 0 <= shard < manifest["num_shards"]:
        raise IndexMismatchError(f"{folder}: shard {shard} requested, the index has {manifest['num_shards']}")
    entry = manifest["shards"][shard]
    docs = pq.read_table(folder / entry["docs_file"])
    if docs.num_rows != entry["count"]:
        raise IndexMismatchError(f"{folder / entry['docs_file']}: {docs.num_rows} rows, the manifest says {entry['count']}")
    if cfg.kind == "bm25":
        return BM25Index.load(folder, entry, docs, cfg, manifest["build"])
    embedder = embedder or embedder_for(cfg)
    if embedder.dim != manifest["dim"]:
        raise IndexMismatchError(f"{folder / MANIFEST}: dim={manifest['dim']} but the encoder produces dim={embedder.dim}")
    return DenseIndex.load(folder, entry, docs, cfg, manifest["dim"], embedder)


def load_index(folder: str | os.PathLike, cfg: RetrieverConfig, embedder: Embedder | None = None) -> list[SearchCore]:
    """Every shard in this process (one encoder shared by all)."""
    if cfg.kind == "dense" and embedder is None:
        embedder = embedder_for(cfg)
    return [load_shard(folder, shard, cfg, embedder) for shard in range(cfg.num_shards)]


def merge_hits(per_shard: Sequence[list[list[Hit]]], k: int) -> list[list[Hit]]:
    """Per query, the k best hits over all shards by score (ties keep shard order, so results are deterministic)."""
    if not per_shard:
        return []
    merged = []
    for hits in zip(*per_shard, strict=True):
        pooled = [hit for shard_hits in hits for hit in shard_hits]
        pooled.sort(key=lambda hit: -hit["score"])
        merged.append(pooled[:k])
    return merged


def search_shards(cores: Sequence[SearchCore], queries: Sequence[str], k: int,
                  instruction: str | Sequence[str] | None = None) -> list[list[Hit]]:  # fmt: skip
    """In-process counterpart of ShardedRetriever.search."""
    return merge_hits([core.search(queries, k, instruction) for core in cores], k)


class LocalRetriever:
    """The in-process counterpart of ShardedRetriever (same `search`), for single-process runs, tests and baselines."""

    def __init__(self, cores: Sequence[SearchCore]):
        self.cores = list(cores)
        self.calls = self.queries = 0  # batched calls and queries served: what agents' batching is judged by

    def search(self, queries: Sequence[str], k: int, instruction: str | Sequence[str] | None = None) -> list[list[Hit]]:
        self.calls += 1
        self.queries += len(queries)
        return search_shards(self.cores, queries, k, instruction)


# ---------------------------------------------------------------------------------------------------------------------
# Ray actors
# ---------------------------------------------------------------------------------------------------------------------


@ray.remote
class Retriever:
    """Serves one shard of an index folder. Stateless between calls, so Ray may restart it and retry a search."""

    def __init__(self, index_dir: str, shard: int, cfg: RetrieverConfig):
        started = time.perf_counter()
        self.shard = shard
        self.core = load_shard(index_dir, shard, cfg)
        self.load_seconds = time.perf_counter() - started

    def search(self, queries: list[str], k: int, instruction: str | list[str] | None = None) -> list[list[Hit]]:
        return self.core.search(queries, k, instruction)

    def info(self) -> dict:
        return {"shard": self.shard, "kind": self.core.kind, "count": self.core.docs.num_rows,
                "load_seconds": self.load_seconds, "pid": os.getpid()}  # fmt: skip


class RetrieverTimeoutError(TimeoutError):
    """A shard did not answer within retriever.request_timeout_s; the message names the request."""


@dataclass
class ShardedRetriever:
    """One Retriever actor per shard behind a single `search`; every remote call carries a deadline."""

    handles: list
    cfg: RetrieverConfig
    index_dir: str

    @classmethod
    def launch(cls, index_dir: str | os.PathLike, cfg: Any, wait: bool = True) -> ShardedRetriever:
        """Start one actor per shard (after checking the manifest here, so a mismatch fails before any actor starts)."""
        cfg = as_retriever_config(cfg)
        check_config(cfg)
        check_manifest(index_dir, cfg)
        placed = Placement.of_actor(cfg, "retriever").reserve(cfg.num_shards)
        options = {"max_restarts": cfg.max_restarts, "max_task_retries": cfg.max_task_retries}
        handles = [Retriever.options(**where, **options).remote(str(index_dir), shard, cfg)
                   for shard, where in enumerate(placed.options)]  # fmt: skip
        retriever = cls(handles, cfg, str(index_dir))
        if wait:
            retriever.wait_ready()
        return retriever

    def _get(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.cfg.request_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RetrieverTimeoutError(
                f"{what} on {self.index_dir} ({len(refs)} shard(s)) took longer than "
                f"retriever.request_timeout_s={self.cfg.request_timeout_s}"
            ) from None

    def wait_ready(self) -> list[dict]:
        """Each shard's info once loaded; a shard that cannot load raises here with its reason."""
        return self._get([handle.info.remote() for handle in self.handles], "loading the index")

    def search(self, queries: Sequence[str], k: int, instruction: str | Sequence[str] | None = None) -> list[list[Hit]]:
        queries = list(queries)
        if not queries:
            return []
        instructions = per_query_instructions(queries, instruction)
        argument = instruction if instruction is None or isinstance(instruction, str) else instructions
        refs = [handle.search.remote(queries, k, argument) for handle in self.handles]
        return merge_hits(self._get(refs, f"search of {len(queries)} queries (first: {queries[0][:60]!r})"), k)

    def close(self) -> None:
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        self.handles = []
