"""OpenAI chat completions on our engine: request -> prompt tokens and sampling; completions -> response or SSE chunks.

The function-calling format is agents/toolcall.py's, the one our policies are trained on: offered tools go into the
system message, an assistant's `tool_calls` become its call block, `tool` messages become a results block, and the
model's call block is parsed back into OpenAI `tool_calls`. The prompt is rendered by the tokenizer's chat template
(`render_chat`), so a served policy sees exactly the layout it was trained on.

`tool_choice` is honoured by prefilling the assistant turn: `required` starts it with the call block's opening tag,
a named function with the start of that function's call; `none` offers no tools. Plain Python (no Ray, no HTTP),
so the translation is tested on its own.

Streaming sends a completion as OpenAI chunks, one per token, once the engine has written it: our engines return
whole completions (batched generation), so a stream starts later than a token-by-token one would, and its content is
exactly the non-streamed completion's.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.toolcall import CALLS_CLOSE, CALLS_OPEN, openai_tool, parse_calls, render_chat
from pipelines.serve_schemas import ApiError, ChatRequest

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class ChatLimits:
    """What a chat request may ask for (from ServeConfig) and what the engine can hold."""

    model_name: str
    max_model_len: int
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_n: int = 4


@dataclass
class ChatPlan:
    """A validated chat request, ready for the engine."""

    model: str
    prompt_ids: list[int]
    sampling: dict
    tools: list[dict] = field(default_factory=list)
    prefill: str = ""
    """Text the assistant turn starts with (tool_choice), part of the prompt and of every completion's text."""
    user_stops: tuple[str, ...] = ()
    first_call_id: int = 0
    parallel_tool_calls: bool = True
    stream: bool = False
    include_usage: bool = False


# ---------------------------------------------------------------------------------------------------- requests


def check_tools(tools: Sequence[Any]) -> list[dict]:
    """OpenAI `tools` entries, each checked (type, name, JSON schema), as normalized OpenAI entries."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    checked, names = [], set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if tool.get("type") != "function":
            raise ApiError(400, f"{where}.type: must be 'function'", f"{where}.type", "invalid_tool")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ApiError(400, f"{where}.function: expected an object", f"{where}.function", "invalid_tool")
        unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise ApiError(400, f"{where}.function: unknown field(s) {unknown}", f"{where}.function.{unknown[0]}",
                           "invalid_tool")  # fmt: skip
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ApiError(400, f"{where}.function.name: must be 1-64 letters, digits, '_' or '-'",
                           f"{where}.function.name", "invalid_tool")  # fmt: skip
        if name in names:
            raise ApiError(400, f"{where}.function.name: {name!r} is offered twice", f"{where}.function.name",
                           "invalid_tool")  # fmt: skip
        names.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ApiError(400, f"{where}.function.description: expected a string", f"{where}.function.description",
                           "invalid_tool")  # fmt: skip
        parameters = function.get("parameters")
        if parameters is not None:
            param = f"{where}.function.parameters"
            if not isinstance(parameters, Mapping):
                raise ApiError(400, f"{param}: expected a JSON schema object", param, "invalid_tool")
            if parameters.get("type", "object") != "object":
                raise ApiError(400, f"{param}.type: the parameters schema must be of type 'object'", f"{param}.type",
                               "invalid_tool")  # fmt: skip
            try:
                Draft202012Validator.check_schema(parameters)
            except SchemaError as error:
                path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
                raise ApiError(400, f"{param}{path}: not a valid JSON schema ({error.message})", f"{param}{path}",
                               "invalid_tool") from None  # fmt: skip
            required = parameters.get("required", [])
            properties = parameters.get("properties", {})
            missing = [r for r in required if r not in properties]
            if missing:
                raise ApiError(400, f"{param}.required: {missing} are not among the properties", f"{param}.required",
                               "invalid_tool")  # fmt: skip
        checked.append(openai_tool(function))
    return checked


def _tool_choice(choice: Any, tools: list[dict]) -> tuple[list[dict], str]:
    """(tools to offer, prefill of the assistant turn) for a `tool_choice`."""
    names = [t["function"]["name"] for t in tools]
    if choice is not None and not tools:
        raise ApiError(400, "tool_choice: given without tools", "tool_choice", "invalid_value")
    if choice is None or choice == "auto":
        return tools, ""
    if choice == "none":
        return [], ""
    if choice == "required":
        return tools, CALLS_OPEN + "\n"
    if isinstance(choice, Mapping) and choice.get("type") == "function" and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if name not in names:
            raise ApiError(400, f"tool_choice.function.name: {name!r} is not among the offered tools {names}",
                           "tool_choice.function.name", "invalid_value")  # fmt: skip
        return tools, CALLS_OPEN + "\n" + '{"name":' + json.dumps(name) + ',"arguments":'
    raise ApiError(400, "tool_choice: expected 'none', 'auto', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}", "tool_choice", "invalid_value")  # fmt: skip


def _text_content(messages: Sequence[dict]) -> list[dict]:
    """Messages with list-of-parts content (`[{"type": "text", "text": ...}]`) joined into one string."""
    out = []
    for index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                where = f"messages[{index}].content[{part_index}]"
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are served",
                                   where, "invalid_value")  # fmt: skip
                texts.append(part["text"])
            message = {**message, "content": "".join(texts)}
        out.append(message)
    return out


def _param_of(message: str) -> str | None:
    """The field named at the start of a toolcall.py error ("messages[2].tool_call_id: ...")."""
    head = message.split(":", 1)[0]
    return head if head.startswith("messages[") else None


def _prior_calls(messages: Sequence[dict]) -> int:
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def prepare_chat(request: ChatRequest, tokenizer, limits: ChatLimits) -> ChatPlan:
    """Check a chat request against the served model and the limits; render and tokenize its prompt."""
    if request.model != limits.model_name:
        raise ApiError(404, f"model {request.model!r} does not exist; this server serves {limits.model_name!r}",
                       "model", "model_not_found")  # fmt: skip
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise ApiError(400, f"{name}: not supported (send 0 or leave it out)", name, "unsupported_parameter")
    if request.logprobs:
        raise ApiError(400, "logprobs: not supported", "logprobs", "unsupported_parameter")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format.type: only 'text' is served", "response_format.type",
                       "unsupported_parameter")  # fmt: skip
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options: only allowed with stream=true", "stream_options", "invalid_value")
    n = request.n or 1
    if n > limits.max_n:
        raise ApiError(400, f"n: at most {limits.max_n} completions per request", "n", "invalid_value")
    name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"{name}: {max_tokens} exceeds this server's limit of {limits.max_tokens_limit}", name,
                       "invalid_value")  # fmt: skip
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop: up to {MAX_STOP_STRINGS} non-empty strings", "stop", "invalid_value")
    tools = check_tools(request.tools) if request.tools else []
    offered, prefill = _tool_choice(request.tool_choice, tools)
    messages = _text_content(request.messages)
    try:
        prompt = render_chat(messages, [t["function"] for t in offered], tokenizer)
    except ValueError as error:
        raise ApiError(400, str(error), _param_of(str(error)), "invalid_value") from None
    prompt_ids = list(tokenizer(prompt + prefill, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) + max_tokens > limits.max_model_len:
        raise ApiError(400, f"messages: the prompt has {len(prompt_ids)} tokens; with {name}={max_tokens} that "
                       f"exceeds the model's context of {limits.max_model_len} tokens", "messages",
                       "context_length_exceeded")  # fmt: skip
    engine_stops = tuple(stops) + ((CALLS_CLOSE,) if offered else ())
    sampling = {"n": n, "temperature": 1.0 if request.temperature is None else request.temperature,
                "top_p": 1.0 if request.top_p is None else request.top_p, "max_tokens": max_tokens,
                "stop": engine_stops, "seed": request.seed}  # fmt: skip
    return ChatPlan(request.model, prompt_ids, sampling, offered, prefill, tuple(stops), _prior_calls(messages),
                    request.parallel_tool_calls is not False, bool(request.stream),
                    bool(request.stream_options and request.stream_options.include_usage))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- responses


@dataclass
class Choice:
    message: dict
    finish_reason: str
    completion_tokens: int
    token_ids: list[int]


def read_completion(plan: ChatPlan, completion: Any) -> Choice:
    """A completion as an assistant message: tool calls when it wrote a readable call block, else its text (cut
    before a user stop string, as OpenAI returns it)."""
    text = plan.prefill + completion.text
    tokens = len(completion.token_ids)
    if plan.tools and CALLS_OPEN in text:
        parsed = parse_calls(text, plan.tools, plan.first_call_id)
        if parsed.calls and parsed.ok:
            calls = parsed.calls if plan.parallel_tool_calls else parsed.calls[:1]
            message = {"role": "assistant", "content": parsed.content or None,
                       "tool_calls": [call.to_openai() for call in calls]}  # fmt: skip
            return Choice(message, "tool_calls", tokens, list(completion.token_ids))
    cut = min((text.find(s) for s in plan.user_stops if s in text), default=-1)
    content = text[:cut] if cut >= 0 else text
    reason = "length" if completion.finish_reason == "length" else "stop"
    return Choice({"role": "assistant", "content": content}, reason, tokens, list(completion.token_ids))


def _usage(plan: ChatPlan, choices: Sequence[Choice]) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": len(plan.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(plan.prompt_ids) + completion}  # fmt: skip


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_response(plan: ChatPlan, choices: Sequence[Choice], fingerprint: str, completion_id: str) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": i, "message": c.message, "finish_reason": c.finish_reason, "logprobs": None}
                    for i, c in enumerate(choices)],  # fmt: skip
        "usage": _usage(plan, choices),
    }


def _content_pieces(content: str, token_ids: Sequence[int], prefill: str, tokenizer) -> Iterator[str]:
    """The content as the model produced it, one delta per token (the prefill first), together exactly `content`.

    A prefix that decodes to a partial UTF-8 character waits for the token that completes it.
    """
    sent = 0
    if prefill:
        piece = prefill[: len(content)]
        sent = len(piece)
        if piece:
            yield piece
    for end in range(1, len(token_ids) + 1):
        if sent >= len(content):
            return
        decoded = tokenizer.decode(list(token_ids[:end]), skip_special_tokens=True)
        if decoded.endswith("\ufffd"):
            continue
        text = (prefill + decoded)[: len(content)]
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)
    if sent < len(content):
        yield content[sent:]


def chat_chunks(plan: ChatPlan, choices: Sequence[Choice], fingerprint: str, completion_id: str,
                tokenizer) -> Iterator[dict]:  # fmt: skip
    """The `chat.completion.chunk` objects of a streamed response, in OpenAI's order: role, content (or tool call)
    deltas per choice, each choice's finish reason, then usage when asked for."""
    created = int(time.time())

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": plan.model,
                "system_fingerprint": fingerprint,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}  # fmt: skip

    for index, choice in enumerate(choices):
        yield chunk(index, {"role": "assistant", "content": ""})
        calls = choice.message.get("tool_calls")
        content = choice.message.get("content") or ""
        if calls:
            if content:
                yield chunk(index, {"content": content})
            for call_index, call in enumerate(calls):
                yield chunk(index, {"tool_calls": [{"index": call_index, **call}]})
        else:
            for piece in _content_pieces(content, choice.token_ids, plan.prefill, tokenizer):
                yield chunk(index, {"content": piece})
        yield chunk(index, {}, choice.finish_reason)
    if plan.include_usage:
        yield {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": plan.model,
               "system_fingerprint": fingerprint, "choices": [], "usage": _usage(plan, choices)}  # fmt: skip


def sse(events: Iterator[dict]) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: one `data:` line per JSON object, then `data: [DONE]`."""
    for event in events:
        yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
