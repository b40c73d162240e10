"""What the HTTP API accepts and how it refuses: typed request bodies and OpenAI-style error bodies.

Why strict models: a client that sends `"temperature": "hot"` or `"max_tokens": "10"` made a mistake, and the answer
should say so with the field's name (`param`), as OpenAI's API does, rather than coerce it. Unknown fields are refused
for the same reason (a misspelt `max_token` would otherwise be silently ignored).

Every refusal is an `ApiError`: a status, a message, the field (`param`), a machine-readable `code`, rendered as
`{"error": {"message", "type", "param", "code"}}`. The official `openai` client turns those into its typed
exceptions (BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """A request the API refuses (4xx) or could not serve (5xx); the message is safe to show (no internals)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def field_path(location: Sequence[Any]) -> str:
    """A pydantic error location as the field a client wrote: ("body", "messages", 0, "role") -> messages[0].role."""
    path = ""
    for part in location:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def validation_error(errors: Sequence[dict]) -> ApiError:
    """The first pydantic / FastAPI validation error as a 400 naming its field (invalid JSON included)."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        context = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({context})".replace(" ()", ""), None,
                        "invalid_json")  # fmt: skip
    param = field_path(first.get("loc", ())) or None
    kind = first.get("type", "")
    if param is None:  # the body as a whole: absent, not JSON (wrong Content-Type), or not an object
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)", None,
                        "invalid_body")  # fmt: skip
    if kind == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument: {param}", param, "unknown_parameter")
    message = first.get("msg", "invalid value")
    return ApiError(400, f"{param}: {message}" if param else message, param, "invalid_value")


class StrictBody(BaseModel):
    """Request bodies: no type coercion, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(StrictBody):
    include_usage: bool = False


class ChatRequest(StrictBody):
    """POST /v1/chat/completions: the OpenAI chat fields we serve (messages and tools are checked further by
    agents/toolcall.py, which names the message and field it refuses)."""

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None


class AgentRunRequest(StrictBody):
    """POST /v1/agents/{name}/runs: one question for one agent run."""

    question: str = Field(min_length=1, max_length=4000)
    tools: list[str] | None = None
    """conagents: the tools it may use (default: every tool of the sandbox)."""
    greedy: bool = True
    seed: int | None = None
    stream: bool = False


class RetrieveRequest(StrictBody):
    """POST /v1/retrieve: top-k documents per query, optionally with an instruction (one, or one per query)."""

    queries: list[str] = Field(min_length=1)
    k: int = Field(5, ge=1)
    instruction: str | list[str] | None = None


class ReloadRequest(StrictBody):
    """POST /v1/admin/reload: a Hugging Face folder with the same tokenizer as the one being served."""

    checkpoint: str = Field(min_length=1)
