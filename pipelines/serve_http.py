"""The HTTP surface of the ingress: routes, the key check, the error bodies and the request metrics.

Built per ingress replica (`Ingress.__serve_build_asgi_app__`), so every route closes over that replica's handles
and settings. What a client can rely on:

- every error is JSON in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), including unknown
  routes, wrong methods, bodies that are not JSON and fields of the wrong type (400, never FastAPI's 422);
- an unexpected failure is a 500 that names a request id and nothing else (the traceback goes to the replica log);
- /healthz, /docs and /openapi.json are public; everything under /v1 needs a bearer key (the admin route an admin
  key), and each API key is rate limited (admin keys work everywhere, unlimited);
- no CORS headers unless `serve.cors_origins` lists origins.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serve_auth import BodySizeLimit, authenticate, bearer_token
from pipelines.serve_schemas import (
    AgentRunRequest,
    ApiError,
    ChatRequest,
    ReloadRequest,
    RetrieveRequest,
    validation_error,
)

if TYPE_CHECKING:
    from pipelines.serve import Ingress

log = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class RequestMetrics:
    """Prometheus metrics of the HTTP API, exported by Ray's metrics agent on each node (as `ray_toolseek_*`)."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("toolseek_http_requests", "HTTP requests by route and status.",
                                tag_keys=("route", "status"))  # fmt: skip
        self.latency = Histogram("toolseek_http_latency_s", "Time to the response headers, by route.",
                                 boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))  # fmt: skip

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})


class MeasuredRequests:
    """ASGI middleware: records every request's route, status and time to its headers; an unexpected failure becomes
    a 500 naming a request id (the traceback is logged here, in the replica, and never sent)."""

    def __init__(self, app, metrics: RequestMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, answered = time.perf_counter(), False

        async def recorded(message):
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.record(route, message["status"], time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        except Exception:  # noqa: BLE001  (whatever failed, the client gets JSON and the replica lives on)
            request_id = uuid.uuid4().hex[:12]
            log.exception("request %s %s failed (request id %s)", scope.get("method"), scope.get("path"), request_id)
            if not answered:
                error = ApiError(500, f"internal error (request id {request_id})", None, "internal_error")
                await error_response(error)(scope, receive, recorded)


def build_http_app(svc: Ingress) -> FastAPI:
    settings = svc.settings
    app = FastAPI(title="ToolSeek", version="0.1.0", debug=False,
                  description="Trained ToolSeek agents and their policy: OpenAI-compatible chat with tools, agent "
                              "runs, retrieval.")  # fmt: skip
    metrics = RequestMetrics()

    # ---- errors: one JSON shape for all of them ---------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return error_response(validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(error.detail)
        return error_response(ApiError(error.status_code, message, None, code))

    # ---- guards -------------------------------------------------------------------------------------------------
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, render=error_response)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip

    app.add_middleware(MeasuredRequests, metrics=metrics)

    # async: a sync dependency costs every request a hop to FastAPI's thread pool and back (~5% of the ingress's
    # CPU under load, py-spy); these are a SHA-256 and a locked counter update, fine on the event loop
    async def api_key(request: Request) -> str:
        """The caller's key id; admin keys are accepted too, without the rate limit (operators, load tests)."""
        header = request.headers.get("authorization")
        if svc.admin_keys.digests and svc.admin_keys.match(bearer_token(header)):
            return "admin"
        key_id = authenticate(svc.api_keys, header, settings.require_api_key)
        svc.limiter.check(key_id)
        return key_id

    async def admin_key(request: Request) -> str:
        if not svc.admin_keys.digests:
            raise ApiError(403, "the admin endpoint is off: no admin keys configured (serve.admin_keys_file or "
                           "TOOLSEEK_ADMIN_KEYS)", None, "admin_disabled")  # fmt: skip
        return authenticate(svc.admin_keys, request.headers.get("authorization"), True, admin=True)

    # ---- routes -------------------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz():
        """Ready when the LLM deployment answers; 503 otherwise (public: no key needed)."""
        return await svc.health()

    @app.get("/v1/models", tags=["models"])
    async def models(key: str = Depends(api_key)):
        return await svc.models()

    @app.post("/v1/chat/completions", tags=["chat"])
    async def chat_completions(body: ChatRequest, key: str = Depends(api_key)):
        """OpenAI chat completions, with `tools` / `tool_calls` and `stream` (server-sent events)."""
        result = await svc.chat(body)
        if body.stream:
            return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return result

    @app.get("/v1/agents", tags=["agents"])
    async def agents(key: str = Depends(api_key)):
        return {"object": "list", "data": [{"id": name, "object": "agent"} for name in settings.agents]}

    @app.post("/v1/agents/{name}/runs", tags=["agents"])
    async def agent_run(name: str, body: AgentRunRequest, key: str = Depends(api_key)):
        """Run an agent on a question: its answer and step trace; with `stream`, each step as it happens."""
        result = await svc.agent_run(name, body)
        if body.stream:
            return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return result

    @app.post("/v1/retrieve", tags=["retrieval"])
    async def retrieve(body: RetrieveRequest, key: str = Depends(api_key)):
        return await svc.retrieve(body)

    @app.post("/v1/admin/reload", tags=["admin"])
    async def reload(body: ReloadRequest, key: str = Depends(admin_key)):
        """Hot-swap the policy's weights on every LLM replica; returns once all of them serve the new checkpoint."""
        return await svc.reload(body)

    return app
