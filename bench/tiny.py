"""The tiny policy every speed benchmark runs: the default ModelConfig with a BPE trained on the synthetic world."""

from __future__ import annotations

from pathlib import Path


def tiny_policy(folder: Path, model_cfg=None):
    """(model folder, world, model config): a random-init Llama of `model_cfg` (default: ModelConfig()) sizes."""
    from actors.config import ModelConfig
    from actors.models import build_causal_lm, train_bpe_tokenizer
    from pipelines.data.world import WorldConfig, build_world

    world = build_world(WorldConfig())
    model_cfg = model_cfg or ModelConfig()
    tokenizer = train_bpe_tokenizer(world.texts(), model_cfg.vocab_size, model_cfg.max_token_chars,
                                    model_cfg.added_tokens)  # fmt: skip
    return build_causal_lm(model_cfg, tokenizer, folder), world, model_cfg


def parameter_count(model_path) -> str:
    """'0.4M params' for a Hugging Face folder (read from the weights, not guessed from the config)."""
    from actors.models import load_causal_lm

    model, _ = load_causal_lm(str(model_path))
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
