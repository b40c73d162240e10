"""Ray Serve: trained agents and their policy behind an OpenAI-compatible HTTP API.

`python -m pipelines.serve model.path=<checkpoint>` deploys one Serve application (`serve.app_name`) of five
deployments, each a small class over the components the training job uses:

    Ingress             FastAPI (pipelines/serve_http.py): keys, limits, OpenAI chat, agent runs, retrieval, admin
      -> LLMServer      LLMEngineCore (actors/llm.py) in the replica; @serve.batch groups concurrent prompts
      -> RetrieverServer  the index folder (actors/retriever.py) in the replica: dense FAISS or BM25
      -> SandboxServer  ToolSandboxCore (actors/sandbox.py) over the synthetic world's tools, for the tool agents
      -> CheckpointRegistry  which checkpoint the LLM replicas serve (the hot swap's single source of truth)

Agents run in the ingress as the same plain-Python loops the E-step runs (pipelines/serve_agents.py), over adapters
that send each model turn, search and tool call to its deployment. Serve gives the rest: replicas are restarted
when they die, autoscaled between `serve.<deployment>.num_replicas` and `max_replicas`, and requests queue (never
drop) while no replica is free. The ingress retries a call once when the replica serving it died, so killing a
replica under load costs latency, not errors.

Hot swap (`POST /v1/admin/reload`, admin key): the registry publishes the new checkpoint; every LLM replica follows
the registry (a long poll) and reloads through `LLMEngineCore.reload`, which queues behind the requests already
in flight, so each request is answered by the old weights or the new ones and none is dropped; the endpoint returns
once every running replica reports the new version. A replica started later (autoscaling, a restart after a crash)
loads the registry's current checkpoint. The swap lives as long as the registry replica: redeploy with
`model.path=<new>` to make it the default.

`pipelines.serve:app` is the application builder Serve's config files name (cluster/kuberay/rayservice.yaml): its
`args` are Hydra overrides (`{"model.path": "/mnt/toolseek/runs/x/policy"}`).

Metrics: Serve's own (`ray_serve_*`: requests, latencies, queue lengths, replicas) and ours (`ray_toolseek_http_*`)
are exported in Prometheus format by Ray's metrics agent on every node, at `http://<node>:<metrics port>/metrics`;
the port is `ray start --metrics-export-port=<port>` on a cluster, and printed at start for a local one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import ray
from omegaconf import DictConfig, OmegaConf
from ray import serve

from pipelines import config as _config  # noqa: F401  (registers the schema with Hydra)
from pipelines.serve_agents import AGENTS, SEARCH_AGENTS, TOOL_AGENTS, AgentSettings, run_agent
from pipelines.serve_auth import ADMIN_KEYS_ENV, API_KEYS_ENV, KeyRing, RateLimiter, digest, read_keys
from pipelines.serve_chat import (
    ChatLimits,
    chat_chunks,
    chat_response,
    new_completion_id,
    prepare_chat,
    read_completion,
    sse,
)
from pipelines.serve_schemas import AgentRunRequest, ApiError, ChatRequest, ReloadRequest, RetrieveRequest

log = logging.getLogger("ray.serve")

REPO = Path(__file__).resolve().parents[1]
LLM_DEPLOYMENT = "LLMServer"
FOLLOW_POLL_S = 30.0
"""How long one long poll of an LLM replica waits at the registry before asking again."""
LLM_CONCURRENT_BATCHES = 4
"""@serve.batch batches an LLM replica hands to its engine at once. With one, a batch cut after `serve.batch_wait_ms`
waits for the previous batch to finish, so under load the engine ran batches of one or two (measured: 152 engine
batches for 200 requests at concurrency 16); with several in flight, LLMEngineCore's own batcher merges the waiting
ones into one backend call. `serve.llm.max_ongoing_requests` should be >= this x `serve.batch_max_size`."""


# ---------------------------------------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------------------------------------


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=1.0)  # its long polls never finish by themselves
class CheckpointRegistry:
    """The checkpoint every LLM replica should serve, a version that counts swaps, and who has loaded which."""

    def __init__(self, checkpoint: str):
        self.version, self.checkpoint = 0, checkpoint
        self.loaded: dict[int, dict[str, str | None]] = {}
        self._changed: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def current(self) -> tuple[int, str]:
        return self.version, self.checkpoint

    async def wait_for_change(self, seen: int, timeout_s: float) -> tuple[int, str]:
        """The current (version, checkpoint) as soon as it differs from `seen`, or after `timeout_s`."""
        event = self._event()
        if self.version == seen:
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.version, self.checkpoint

    async def publish(self, checkpoint: str) -> int:
        self.version += 1
        self.checkpoint = checkpoint
        event, self._changed = self._event(), asyncio.Event()
        event.set()  # wakes every replica waiting on the old event
        return self.version

    async def report(self, replica: str, version: int, error: str | None) -> None:
        self.loaded.setdefault(version, {})[replica] = error

    async def reports(self, version: int) -> dict[str, str | None]:
        return dict(self.loaded.get(version, {}))


@serve.deployment
class LLMServer:
    """The policy: LLMEngineCore in this replica, fed by @serve.batch, following the registry's checkpoint."""

    async def __init__(self, engine_cfg: dict, dtype: str, registry, batch_max_size: int, batch_wait_s: float):
        from actors.llm import LLMEngineCore

        self.registry = registry
        self.version, self.checkpoint = await registry.current.remote()
        # @serve.batch already waited for concurrent requests: the engine need not wait again before each batch
        self.core = LLMEngineCore(self.checkpoint, {**engine_cfg, "batch_wait_ms": 0.0}, dtype)
        self.seen = self.version
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.generate_batch.set_max_batch_size(batch_max_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.in_flight = 0
        self.follower = asyncio.get_running_loop().create_task(self._follow())

    async def generate(self, prompt_ids: list[int], sampling: dict) -> tuple[list, int]:
        """Completions of one prompt and the checkpoint version that wrote them (EngineError for a bad request).

        A request that finds the replica idle goes straight to the engine: @serve.batch would hold it for
        `serve.batch_wait_ms` waiting for company (measured: 5 ms of a ~36 ms request at concurrency 1); requests
        that arrive while others are in flight are batched as before."""
        self.in_flight += 1
        try:
            request = (list(prompt_ids), dict(sampling))
            alone = self.in_flight == 1
            result = (await self._generate_group([request]))[0] if alone else await self.generate_batch(request)
        finally:
            self.in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=LLM_CONCURRENT_BATCHES)
    async def generate_batch(self, requests: list[tuple[list[int], dict]]) -> list:
        return await self._generate_group(requests)

    async def _generate_group(self, requests: list[tuple[list[int], dict]]) -> list:
        """One engine call per distinct sampling setting in the group; a bad request fails alone."""
        from actors.llm import EngineError, Sampling

        results: list[Any] = [None] * len(requests)
        groups: dict[Sampling, list[int]] = {}
        for index, (ids, settings) in enumerate(requests):
            try:
                sampling = Sampling(**settings)
                self._check(ids, sampling)
            except (TypeError, ValueError) as error:
                results[index] = error if isinstance(error, EngineError) else EngineError(str(error))
                continue
            groups.setdefault(sampling, []).append(index)

        async def run(sampling: Sampling, members: list[int]) -> None:
            try:
                generations = await self.core.generate([requests[i][0] for i in members], sampling)
            except Exception as error:  # noqa: BLE001  (answered per request below)
                if len(members) == 1:
                    results[members[0]] = error
                else:  # find the culprit: each request alone
                    await asyncio.gather(*(run(sampling, [i]) for i in members))
                return
            for index, generation in zip(members, generations, strict=True):
                results[index] = (generation.completions, self.version)

        await asyncio.gather(*(run(sampling, members) for sampling, members in groups.items()))
        return results

    def _check(self, ids: list[int], sampling) -> None:
        from actors.llm import EngineError

        backend = self.core.backend
        if not ids:
            raise EngineError("prompt_ids: empty prompt")
        if any(not 0 <= t < backend.vocab_size for t in ids):
            raise EngineError(f"prompt_ids: token ids must be in [0, {backend.vocab_size})")
        if len(ids) + sampling.max_tokens > backend.max_model_len:
            raise EngineError(f"prompt_ids: {len(ids)} tokens + max_tokens={sampling.max_tokens} exceed "
                              f"engine.max_model_len={backend.max_model_len}")  # fmt: skip

    async def _follow(self) -> None:
        """Load each checkpoint the registry publishes; report the outcome (or the error) for the admin endpoint."""
        while True:
            try:
                version, checkpoint = await self.registry.wait_for_change.remote(self.seen, FOLLOW_POLL_S)
            except Exception:  # noqa: BLE001  (the registry restarts; keep following)
                log.warning("checkpoint registry unreachable; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if version == self.seen:
                continue
            self.seen, error = version, None
            try:
                if checkpoint != self.checkpoint:
                    await self.core.reload(checkpoint)
                self.version, self.checkpoint = version, checkpoint
                log.info("serving checkpoint version %d: %s", version, checkpoint)
            except Exception as failure:  # noqa: BLE001  (reported; the old weights keep serving)
                error = f"{type(failure).__name__}: {failure}"
                log.error("reload of %s failed: %s", checkpoint, error)
            try:
                await self.registry.report.remote(self.replica, version, error)
            except Exception:  # noqa: BLE001
                log.warning("could not report version %d to the registry", version, exc_info=True)

    def info(self) -> dict:
        return {**self.core.info(), "checkpoint_version": self.version, "replica": self.replica}

    def check_health(self) -> None:
        if self.follower.done():
            raise RuntimeError("the checkpoint follower stopped")


@serve.deployment
class RetrieverServer:
    """An index folder loaded in this replica (every shard), searched in Serve's thread pool."""

    def __init__(self, index_dir: str, retriever_cfg: dict):
        from actors.retriever import LocalRetriever, as_retriever_config, load_index

        cfg = as_retriever_config(retriever_cfg)
        self.searcher = LocalRetriever(load_index(index_dir, cfg))

    def search(self, queries: list[str], k: int, instruction: str | list[str] | None = None) -> list[list[dict]]:
        return self.searcher.search(queries, k, instruction)


@serve.deployment
class SandboxServer:
    """The synthetic world's tools in a ToolSandboxCore: validated calls, and programs in isolated processes."""

    def __init__(self, world_cfg: dict, sandbox_cfg: dict):
        from actors.sandbox import ToolSandboxCore
        from actors.tools import ToolRegistry
        from pipelines.data.world import WorldConfig, build_world

        world = build_world(WorldConfig(**world_cfg))
        self.core = ToolSandboxCore(ToolRegistry.from_functions(world.tools(), world.tool_functions()), sandbox_cfg)

    def call_many(self, calls: list[dict]) -> list:
        return self.core.call_many(calls)

    def run_program(self, code: str, tools: list[str]) -> Any:
        return self.core.run_program(code, tools)

    def specs(self) -> list[dict]:
        return self.core.specs()


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs of the config, as one picklable value."""

    app_name: str
    limits: ChatLimits
    require_api_key: bool = True
    rate_limit_per_minute: int = 600
    rate_limit_burst: int = 60
    max_request_bytes: int = 1_000_000
    cors_origins: tuple[str, ...] = ()
    request_timeout_s: float = 120.0
    agents: tuple[str, ...] = AGENTS
    max_agent_runs: int = 4
    max_queries: int = 64
    max_k: int = 100
    reload_timeout_s: float = 300.0
    agent_settings: AgentSettings = field(default_factory=AgentSettings)


def _cause(error: BaseException) -> BaseException:
    """The exception a replica raised, without Ray's wrapper (whose text carries the remote traceback)."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        return error.cause
    return error


def _refusal(target: str, error: BaseException) -> ApiError:
    """A deployment's exception as the HTTP answer: its own message for a bad request, nothing internal otherwise."""
    from actors.llm import EngineError

    cause = _cause(error)
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, (EngineError, ValueError)):
        return ApiError(400, str(cause), None, "invalid_value")
    request_id = uuid.uuid4().hex[:12]
    log.error("%s failed (request id %s): %r", target, request_id, cause)
    return ApiError(500, f"internal error in {target} (request id {request_id})", None, "internal_error")


_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP entry point. Holds the handles, the keys and the limits; the routes are in pipelines/serve_http.py."""

    async def __init__(self, llm, registry, retriever, sandbox, settings: IngressSettings, api_digests: list[str],
                       admin_digests: list[str]):  # fmt: skip
        from transformers import AutoTokenizer

        self.settings = settings
        self.loop = asyncio.get_running_loop()  # the agent threads' calls run here (call_many_sync)
        self.handles = {"llm": llm, "registry": registry, "retriever": retriever, "sandbox": sandbox}
        self.api_keys, self.admin_keys = KeyRing(api_digests), KeyRing(admin_digests)
        self.limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        _, checkpoint = await registry.current.remote()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.started = int(time.time())
        self.agent_threads = ThreadPoolExecutor(max_workers=settings.max_agent_runs, thread_name_prefix="agent")
        self._tool_specs: list[dict] | None = None

    def __serve_build_asgi_app__(self):
        from pipelines.serve_http import build_http_app

        return build_http_app(self)

    # ---- calls to deployments -------------------------------------------------------------------------------------
    def _handle(self, target: str):
        handle = self.handles[target]
        if handle is None:
            raise ApiError(503, f"no {target} is deployed (see serve.retriever and serve.agents)", None,
                           f"{target}_unavailable")  # fmt: skip
        return handle

    async def call(self, target: str, method: str, *args, timeout_s: float | None = None) -> Any:
        """One deployment call with a deadline; once more when the replica serving it died."""
        handle = self._handle(target)
        timeout = timeout_s or self.settings.request_timeout_s

        async def wait(response):
            return await response

        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(wait(getattr(handle, method).remote(*args)), timeout)
            except asyncio.TimeoutError:
                raise ApiError(504, f"{target} did not answer within {timeout:g}s", None, "timeout") from None
            except _REPLICA_GONE:
                if attempt == 2:
                    raise ApiError(503, f"{target} is restarting; retry shortly", None, "replica_unavailable",
                                   {"Retry-After": "1"}) from None  # fmt: skip
                log.warning("%s replica died during %s; retrying once", target, method)
            except Exception as error:  # noqa: BLE001
                raise _refusal(target, error) from None

    def call_sync(self, target: str, method: str, *args) -> Any:
        """`call` for the agent threads (no event loop there)."""
        return self.call_many_sync(target, method, [args])[0]

    def call_many_sync(self, target: str, method: str, arguments: Sequence[tuple]) -> list:
        """Calls from an agent thread, sent together (so @serve.batch can group them), each with `call`'s deadline and
        retry. They run on the replica's event loop: a handle's router lives there (in Ray Serve's throughput-optimized
        mode it may not be used from another thread)."""
        futures = [asyncio.run_coroutine_threadsafe(self.call(target, method, *args), self.loop) for args in arguments]
        return [future.result() for future in futures]

    # ---- endpoints ----------------------------------------------------------------------------------------------
    async def health(self) -> dict:
        info = await self.call("llm", "info", timeout_s=10.0)
        return {"status": "ok", "model": self.settings.limits.model_name, "backend": info["backend"],
                "checkpoint_version": info["checkpoint_version"]}  # fmt: skip

    async def models(self) -> dict:
        version, _ = await self.call("registry", "current")
        return {"object": "list", "data": [{"id": self.settings.limits.model_name, "object": "model",
                                            "created": self.started, "owned_by": "toolseek",
                                            "checkpoint_version": version}]}  # fmt: skip

    async def chat(self, body: ChatRequest):
        plan = prepare_chat(body, self.tokenizer, self.settings.limits)
        completions, version = await self.call("llm", "generate", plan.prompt_ids, plan.sampling)
        choices = [read_completion(plan, c) for c in completions]
        fingerprint, completion_id = f"{self.settings.limits.model_name}-v{version}", new_completion_id()
        if not plan.stream:
            return chat_response(plan, choices, fingerprint, completion_id)

        async def stream() -> AsyncIterator[str]:
            for line in sse(chat_chunks(plan, choices, fingerprint, completion_id, self.tokenizer)):
                yield line

        return stream()

    def tool_specs(self) -> list[dict]:
        if self._tool_specs is None:
            self._tool_specs = self.call_sync("sandbox", "specs")
        return self._tool_specs

    async def agent_run(self, name: str, body: AgentRunRequest):
        if name not in self.settings.agents:
            raise ApiError(404, f"agent {name!r} does not exist; served agents: {list(self.settings.agents)}", "name",
                           "agent_not_found")  # fmt: skip
        if name in SEARCH_AGENTS:
            self._handle("retriever")
            if body.tools is not None:
                raise ApiError(400, f"tools: {name} searches documents and takes no tools", "tools", "invalid_value")
        if name in TOOL_AGENTS:
            self._handle("sandbox")
            known = {spec["name"] for spec in await asyncio.to_thread(self.tool_specs)}
            for index, tool in enumerate(body.tools or []):
                if tool not in known:
                    raise ApiError(400, f"tools[{index}]: unknown tool {tool!r}; known: {sorted(known)}",
                                   f"tools[{index}]", "invalid_value")  # fmt: skip
        run_id = f"run-{uuid.uuid4().hex[:16]}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = functools.partial(run_agent, name, body.question, body.tools, body.greedy, body.seed, run_id,
                                self.tokenizer, self.call_sync,
                                lambda items: self.call_many_sync("llm", "generate", items), emit,
                                self.settings.agent_settings, self.tool_specs)  # fmt: skip
        future = loop.run_in_executor(self.agent_threads, job)
        header = {"id": run_id, "object": "agent.run", "agent": name, "question": body.question}
        if not body.stream:
            return {**header, **(await future)}

        async def stream() -> AsyncIterator[str]:
            yield sse_event({**header, "type": "start"})
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse_event({"id": run_id, **getter.result()})
                    continue
                getter.cancel()
                while not events.empty():
                    yield sse_event({"id": run_id, **events.get_nowait()})
                break
            try:
                yield sse_event({**header, "type": "done", **future.result()})
            except ApiError as error:
                yield sse_event({"id": run_id, "type": "error", **error.body()})
            except Exception:  # noqa: BLE001
                log.exception("agent run %s failed", run_id)
                yield sse_event({"id": run_id, "type": "error",
                                 **ApiError(500, f"internal error (run {run_id})").body()})  # fmt: skip
            yield "data: [DONE]\n\n"

        return stream()

    async def retrieve(self, body: RetrieveRequest) -> dict:
        settings = self.settings
        if len(body.queries) > settings.max_queries:
            raise ApiError(400, f"queries: at most {settings.max_queries} per request", "queries", "invalid_value")
        for index, query in enumerate(body.queries):
            if not query.strip():
                raise ApiError(400, f"queries[{index}]: empty query", f"queries[{index}]", "invalid_value")
        if body.k > settings.max_k:
            raise ApiError(400, f"k: at most {settings.max_k}", "k", "invalid_value")
        if isinstance(body.instruction, list) and len(body.instruction) != len(body.queries):
            raise ApiError(400, f"instruction: {len(body.instruction)} instructions for {len(body.queries)} queries",
                           "instruction", "invalid_value")  # fmt: skip
        hits = await self.call("retriever", "search", body.queries, body.k, body.instruction)
        return {"object": "list", "data": [{"index": i, "query": q, "hits": h}
                                           for i, (q, h) in enumerate(zip(body.queries, hits, strict=True))]}  # fmt: skip

    def _running_llm_replicas(self) -> int:
        application = serve.status().applications[self.settings.app_name]
        states = application.deployments[LLM_DEPLOYMENT].replica_states
        return int(sum(count for state, count in states.items() if str(getattr(state, "value", state)) == "RUNNING"))

    async def reload(self, body: ReloadRequest) -> dict:
        from transformers import AutoTokenizer

        from actors.models import check_model_dir

        try:
            await asyncio.to_thread(check_model_dir, body.checkpoint)
            tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, body.checkpoint, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ApiError(400, f"checkpoint: {error}", "checkpoint", "invalid_checkpoint") from None
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ApiError(400, "checkpoint: its tokenizer differs from the served one (a hot swap keeps the "
                           "tokenizer; redeploy to change it)", "checkpoint", "invalid_checkpoint")  # fmt: skip
        started = time.monotonic()
        version = await self.call("registry", "publish", str(Path(body.checkpoint).resolve()))
        while True:
            reports = await self.call("registry", "reports", version)
            failed = {replica: error for replica, error in reports.items() if error}
            if failed:
                replica, error = next(iter(failed.items()))
                raise ApiError(502, f"replica {replica} could not load the checkpoint: {error[:300]}", "checkpoint",
                               "reload_failed")  # fmt: skip
            running = await asyncio.to_thread(self._running_llm_replicas)
            if running and len(reports) >= running:
                return {"object": "reload", "checkpoint": body.checkpoint, "checkpoint_version": version,
                        "replicas": len(reports), "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
            if time.monotonic() - started > self.settings.reload_timeout_s:
                raise ApiError(504, f"{len(reports)} of {running} LLM replicas loaded version {version} within "
                               f"serve.reload_timeout_s={self.settings.reload_timeout_s:g}", None, "timeout")  # fmt: skip
            await asyncio.sleep(0.1)


def sse_event(event: dict) -> str:
    return next(sse(iter([event])))


# ---------------------------------------------------------------------------------------------------------------------
# Building and deploying the application
# ---------------------------------------------------------------------------------------------------------------------


def scaling_options(scaling: Any, where: str) -> dict:
    """A deployment's replica options from `serve.<where>`: a fixed count, or autoscaling when max > min."""
    if scaling.num_replicas < 1 or scaling.max_ongoing_requests < 1:
        raise ValueError(f"serve.{where}.num_replicas and serve.{where}.max_ongoing_requests must be >= 1")
    options: dict[str, Any] = {"max_ongoing_requests": scaling.max_ongoing_requests}
    if scaling.max_replicas > scaling.num_replicas:
        options["autoscaling_config"] = {"min_replicas": scaling.num_replicas, "max_replicas": scaling.max_replicas,
                                         "target_ongoing_requests": scaling.target_ongoing_requests}  # fmt: skip
    else:
        options["num_replicas"] = scaling.num_replicas
    return options


def serving_folder(cfg: DictConfig) -> Path:
    """Where a serving job keeps what it builds (a tiny policy, a demo index): `output_dir`, else outputs/serve."""
    folder = Path(cfg.output_dir) if cfg.get("output_dir") else REPO / "outputs" / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prepare_serving(cfg: DictConfig, out: Path) -> tuple[Path, Path | None]:
    """The checkpoint and the index folder to serve; what is not given is built once in `out` (and reused)."""
    from actors.models import ensure_policy
    from actors.retriever import as_retriever_config, check_manifest
    from pipelines.data.world import SYLLABLES, WorldConfig, build_world

    def world_texts():
        world_cfg = OmegaConf.to_object(cfg.data.world)
        assert isinstance(world_cfg, WorldConfig)
        return build_world(world_cfg).texts()

    checkpoint = ensure_policy(cfg.model, world_texts, out / "policy", SYLLABLES)
    if cfg.serve.retriever not in ("auto", "none"):
        raise ValueError(f"serve.retriever={cfg.serve.retriever!r} is not one of ('auto', 'none')")
    if cfg.serve.retriever == "none":
        return Path(checkpoint), None
    retriever_cfg = as_retriever_config(cfg.retriever)
    if cfg.retriever.index_dir:
        check_manifest(cfg.retriever.index_dir, retriever_cfg)
        return Path(checkpoint), Path(cfg.retriever.index_dir)
    from pipelines.index import build_index, corpus_of

    return Path(checkpoint), build_index(corpus_of(cfg.data), retriever_cfg, out / "index")


def _api_digests(cfg: DictConfig) -> tuple[list[str], list[str]]:
    keys = read_keys(cfg.serve.api_keys_file, API_KEYS_ENV, "api_keys")
    admin = read_keys(cfg.serve.admin_keys_file, ADMIN_KEYS_ENV, "admin_keys")
    if cfg.serve.require_api_key and not keys:
        raise ValueError(f"serve.require_api_key=true but no API keys are configured: set {API_KEYS_ENV}=<key>[,...] "
                         "or serve.api_keys_file=<file with one key per line> (or serve.require_api_key=false for a "
                         "local try-out)")  # fmt: skip
    return [digest(k) for k in keys], [digest(k) for k in admin]


def agents_within(max_model_len: int, exsearch: dict) -> AgentSettings:
    """The agents' configs (ExSearch's as the recipe trained it) with contexts no longer than the engine's, so a run
    that fills the context ends with `length` instead of an engine error."""
    from agents.conagents import ConAgentsConfig
    from agents.genground import GenGroundConfig

    def fit(settings: dict, default: int) -> dict:
        return {**settings, "max_context_tokens": min(settings.get("max_context_tokens", default), max_model_len)}

    return AgentSettings(exsearch=fit(exsearch, exsearch.get("max_context_tokens", max_model_len)),
                         genground=fit({}, GenGroundConfig().max_context_tokens),
                         conagents=fit({}, ConAgentsConfig().max_context_tokens))  # fmt: skip


def build_app(cfg: DictConfig, out: Path | None = None):
    """The Serve application for a composed config (the checkpoint and index are prepared first)."""
    from actors.config import SandboxConfig
    from actors.llm import as_engine_config
    from actors.retriever import as_retriever_config
    from cluster.resources import Placement

    s = cfg.serve
    unknown = sorted(set(s.agents) - set(AGENTS))
    if unknown:
        raise ValueError(f"serve.agents: unknown agent(s) {unknown}; known: {list(AGENTS)}")
    api_digests, admin_digests = _api_digests(cfg)
    checkpoint, index_dir = prepare_serving(cfg, out or serving_folder(cfg))
    engine = as_engine_config(cfg.engine)
    llm_actor = Placement.of_actor(engine, "engine").actor_options()
    if engine.backend == "vllm":
        llm_actor["runtime_env"] = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(engine.vllm_kv_cache_gb),
                                                 "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}  # fmt: skip
    registry = CheckpointRegistry.bind(str(Path(checkpoint).resolve()))
    llm = LLMServer.options(**scaling_options(s.llm, "llm"), ray_actor_options=llm_actor).bind(
        asdict(engine), cfg.model.dtype, registry, s.batch_max_size, s.batch_wait_ms / 1000)
    retriever = None
    if index_dir is not None:
        retriever_cfg = as_retriever_config(cfg.retriever)
        retriever = RetrieverServer.options(
            **scaling_options(s.retrieval, "retrieval"),
            ray_actor_options=Placement.of_actor(retriever_cfg, "retriever").actor_options(),
        ).bind(str(index_dir), asdict(retriever_cfg))
    sandbox = None
    if any(agent in TOOL_AGENTS for agent in s.agents):
        sandbox_cfg = SandboxConfig(**OmegaConf.to_container(cfg.sandbox, resolve=True))
        sandbox = SandboxServer.options(
            **scaling_options(s.sandbox, "sandbox"),
            ray_actor_options=Placement.of_actor(sandbox_cfg, "sandbox").actor_options(),
        ).bind(OmegaConf.to_container(cfg.data.world, resolve=True), asdict(sandbox_cfg))
    trained = cfg.recipe.name == "exsearch" and "agent" in cfg.recipe  # the protocol the ExSearch recipe trained
    exsearch = OmegaConf.to_container(cfg.recipe.agent, resolve=True) if trained else {}
    agent_settings = agents_within(engine.max_model_len, exsearch)
    settings = IngressSettings(
        app_name=s.app_name,
        limits=ChatLimits(s.model_name, engine.max_model_len, s.max_tokens_limit, s.default_max_tokens, s.max_n),
        require_api_key=s.require_api_key, rate_limit_per_minute=s.rate_limit_per_minute,
        rate_limit_burst=s.rate_limit_burst, max_request_bytes=s.max_request_bytes, cors_origins=tuple(s.cors_origins),
        request_timeout_s=s.request_timeout_s, agents=tuple(s.agents), max_agent_runs=s.max_agent_runs,
        max_queries=s.max_queries, max_k=s.max_k, reload_timeout_s=s.reload_timeout_s, agent_settings=agent_settings,
    )  # fmt: skip
    return Ingress.options(**scaling_options(s.ingress, "ingress"),
                           ray_actor_options={"num_cpus": s.ingress_num_cpus}).bind(
        llm, registry, retriever, sandbox, settings, api_digests, admin_digests)  # fmt: skip


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The job config from conf/ and Hydra overrides, outside `@hydra.main` (what the builder and tests use)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


def app(args: dict | None = None):
    """`pipelines.serve:app`, the builder Serve config files name: `args` are Hydra overrides as key: value
    (`{"model.path": "/mnt/toolseek/runs/x/policy", "serve.app_name": "toolseek"}`)."""
    return build_app(compose_config([f"{key}={value}" for key, value in (args or {}).items()]))


def start(cfg: DictConfig, out: Path | None = None) -> str:
    """Start Serve's HTTP proxy as `serve.*` says, deploy the application, return its base URL."""
    s = cfg.serve
    application = build_app(cfg, out)
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    serve.run(application, name=s.app_name, route_prefix="/", logging_config={"enable_access_log": s.access_log})
    return f"http://{s.host}:{s.port}"


def metrics_ports() -> list[int]:
    """The Prometheus ports of the cluster's live nodes (Ray's metrics agents)."""
    return sorted({int(n["MetricsExportPort"]) for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")})


def serve_until_stopped(cfg: DictConfig, out: Path, local: bool) -> None:
    """Deploy, say where, and on a local cluster keep serving until Ctrl-C (on a remote one the app stays up)."""
    url = start(cfg, out)
    print(f"Serving {cfg.serve.model_name} at {url}/v1 (OpenAPI docs at {url}/docs)", flush=True)
    print(f"Prometheus metrics on port(s) {metrics_ports()} of each node: /metrics", flush=True)
    if not local:
        print(f"The application {cfg.serve.app_name!r} keeps running on the cluster (`serve shutdown` ends it).")
        return
    print("Ctrl-C stops the server.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipelines.jobs import start_job

    out, info = start_job(cfg)
    serve_until_stopped(cfg, out, info.local)


if __name__ == "__main__":
    main()
