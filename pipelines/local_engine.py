"""The engine in this process, behind the synchronous `generate` the agents call.

Why not the Ray actor: jobs that score a few hundred prompts (the factor study, `task=toolcall predictions=agent`)
spend longer starting a cluster than generating on a small model; `LLMEngineCore` is the same engine without Ray.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any


class InProcessEngine:
    """`LLMEngineCore` with blocking `generate` / `score` (one event loop per call: callers are synchronous)."""

    def __init__(self, model_path: str | Path, engine_cfg: Any, dtype: str = "float32"):
        from actors.llm import LLMEngineCore, as_engine_config

        self.core = LLMEngineCore(str(model_path), as_engine_config(engine_cfg), dtype)
        self.tokenizer = self.core.backend.tokenizer
        self.max_model_len = self.core.backend.max_model_len

    def generate(self, prompts, sampling):
        return asyncio.run(self.core.generate(prompts, sampling))

    def score(self, pairs):
        return asyncio.run(self.core.score(pairs))
