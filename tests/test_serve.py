"""Ray Serve application: the real app on 127.0.0.1, driven by the official `openai` client and plain HTTP.

One application is deployed for the module (about half a minute) on the session's Ray cluster. Its policy is the
tiny model after a few seconds of SFT on two sequences the tests then ask for: an ExSearch run of one test question
(made by the scripted demonstration policy over the real BM25 index) and a tool call in our function-calling format,
rendered by the same `render_chat` the server uses. So a served tool call or a correct agent answer can only come
from the real path: HTTP -> ingress -> @serve.batch -> LLMEngineCore -> parser. The hot swap loads the untrained
policy and back; the fault test kills the LLM replica while requests are in flight.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.ports import free_port

pytest.importorskip("openai")

API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
WORLD = dict(people_per_split=20, companies_per_split=10, cities_per_split=8, train_questions=30, dev_questions=10,
             test_questions=10)  # the world the `tiny_policy` tokenizer was trained on (tests/conftest.py)
CALCULATE = {"type": "function", "function": {
    "name": "calculate", "description": "Arithmetic on two numbers.",
    "parameters": {"type": "object", "properties": {"operation": {"type": "string"}, "a": {"type": "number"},
                                                    "b": {"type": "number"}},
                   "required": ["operation", "a", "b"]}}}  # fmt: skip
TOOL_CHAT = [{"role": "user", "content": "Add 2 and 3."}]
TOOL_CALL = {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a trained checkpoint, an index, the deployed application
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    from pipelines.data.world import WorldConfig, build_world

    return build_world(WorldConfig(**WORLD))


@pytest.fixture(scope="module")
def served_config(tiny_policy, world, tmp_path_factory):
    """Overrides shared by the app and the fixtures that must agree with it (agent protocol, index, world)."""
    from actors.config import RetrieverConfig
    from actors.retriever import build_index_in_process

    folder = tmp_path_factory.mktemp("serve")
    index = build_index_in_process(world.documents(), RetrieverConfig(kind="bm25"), folder / "index")
    (folder / "keys").write_text(f"# test keys\n{API_KEY}\n{OTHER_KEY}\n")
    (folder / "admin").write_text(f"{ADMIN_KEY}\n")
    return {"folder": folder, "index": index, "overrides": [
        "retriever=bm25", f"retriever.index_dir={index}", *(f"data.world.{k}={v}" for k, v in WORLD.items()),
        "engine.max_model_len=512", "engine.batch_wait_ms=0", f"serve.api_keys_file={folder / 'keys'}",
        f"serve.admin_keys_file={folder / 'admin'}", "serve.request_timeout_s=90", "sandbox.num_cpus=0.1",
        f"output_dir={folder / 'out'}"]}  # fmt: skip


@pytest.fixture(scope="module")
def question(world):
    return world.questions("test")[0]


@pytest.fixture(scope="module")
def trained_policy(tiny_policy, served_config, question, tmp_path_factory):
    """The tiny policy after SFT on an ExSearch demonstration of `question` and on the calculate call of TOOL_CHAT."""
    import torch

    from actors.config import RetrieverConfig
    from actors.models import load_causal_lm
    from actors.retriever import LocalRetriever, load_index
    from agents.exsearch import DemonstrationPolicy, ExSearchAgent, ExSearchConfig
    from agents.toolcall import render_calls, render_chat
    from pipelines.serve import compose_config

    model, tokenizer = load_causal_lm(tiny_policy)
    agent_cfg = ExSearchConfig(**compose_config().recipe.agent)  # the protocol the server runs
    searcher = LocalRetriever(load_index(served_config["index"], RetrieverConfig(kind="bm25")))
    demo = ExSearchAgent(DemonstrationPolicy(tokenizer, [question], agent_cfg), searcher, tokenizer,
                         agent_cfg).run([question], greedy=True)[0]  # fmt: skip
    assert demo.finish_reason == "answer"
    prompt = tokenizer(render_chat(TOOL_CHAT, [CALCULATE["function"]], tokenizer), add_special_tokens=False)["input_ids"]
    target = tokenizer(render_calls([TOOL_CALL]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    sequences = [(demo.prompt_ids + demo.token_ids, [0] * len(demo.prompt_ids) + demo.loss_mask),
                 (prompt + target, [0] * len(prompt) + [1] * len(target))]  # fmt: skip
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        total = 0.0
        for ids, mask in sequences:
            inputs = torch.tensor([ids])
            labels = inputs.clone()
            labels[0, torch.tensor(mask) == 0] = -100
            loss = model(input_ids=inputs, labels=labels).loss
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        if total < 0.01:
            break
    folder = tmp_path_factory.mktemp("trained_policy")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(ray_cluster, trained_policy, served_config):
    """The application on a free port of 127.0.0.1; shut down after the module."""
    from ray import serve

    from pipelines.serve import compose_config, start

    port = free_port()
    cfg = compose_config([f"model.path={trained_policy}", f"serve.port={port}", *served_config["overrides"]])
    url = start(cfg)
    yield {"url": url, "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=API_KEY, timeout=90, max_retries=0)


@pytest.fixture(scope="module")
def http(served):
    import httpx

    with httpx.Client(base_url=served["url"], timeout=90, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


# ---------------------------------------------------------------------------------------------------------------------
# Without Ray: the translation and the guards
# ---------------------------------------------------------------------------------------------------------------------


def test_key_ring_matches_only_its_keys_and_limits_each_key(tmp_path, monkeypatch):
    from pipelines.serve_auth import KeyRing, RateLimiter, authenticate, digest, read_keys
    from pipelines.serve_schemas import ApiError

    (tmp_path / "keys").write_text("# comment\n\nfile-key-0123456789abcdef\n")
    monkeypatch.setenv("TOOLSEEK_API_KEYS", "env-key-0123456789abcdef, ")
    keys = read_keys(tmp_path / "keys", "TOOLSEEK_API_KEYS", "api_keys")
    assert keys == ["file-key-0123456789abcdef", "env-key-0123456789abcdef"]
    ring = KeyRing([digest(k) for k in keys])
    assert authenticate(ring, "Bearer env-key-0123456789abcdef", True) == digest(keys[1])[:12]
    for header in (None, "Bearer", "Basic env-key-0123456789abcdef", "Bearer env-key-0123456789abcdeF"):
        with pytest.raises(ApiError) as refused:
            authenticate(ring, header, True)
        assert refused.value.status == 401
    (tmp_path / "short").write_text("short\n")
    with pytest.raises(ValueError, match="short:1"):
        read_keys(tmp_path / "short", "UNSET_ENV_VAR", "api_keys")

    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(ApiError) as limited:
        limiter.check("a")
    assert limited.value.status == 429 and limited.value.headers["Retry-After"] == "1"
    limiter.check("b")  # buckets are per key
    now[0] += 1.0  # one token a second
    limiter.check("a")


def test_chat_requests_become_prompts_in_our_tool_format(tokenizer):
    from agents.toolcall import CALLS_CLOSE, CALLS_OPEN
    from pipelines.serve_chat import ChatLimits, prepare_chat, read_completion
    from pipelines.serve_schemas import ChatRequest

    limits = ChatLimits("m", max_model_len=512)
    messages = [*TOOL_CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "calculate", "arguments": json.dumps(TOOL_CALL["arguments"])}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "5"}]  # fmt: skip
    plan = prepare_chat(ChatRequest(model="m", messages=messages, tools=[CALCULATE], tool_choice="required",
                                    max_tokens=16), tokenizer,
                        limits)  # fmt: skip
    prompt = tokenizer.decode(plan.prompt_ids)
    assert '"name":"calculate"' in prompt and '{"id":"call_0","name":"calculate","output":"5"}' in prompt
    assert prompt.endswith(CALLS_OPEN + "\n") and plan.prefill == CALLS_OPEN + "\n"
    assert plan.sampling["stop"] == (CALLS_CLOSE,) and plan.first_call_id == 1  # ids continue the conversation

    class Written:  # what the engine returns after the prefill
        text = '{"name":"calculate","arguments":{"operation":"mul","a":4,"b":5}}\n' + CALLS_CLOSE
        token_ids, finish_reason = [1, 2, 3], "stop"

    choice = read_completion(plan, Written())
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message["tool_calls"]
    assert call["id"] == "call_1" and json.loads(call["function"]["arguments"]) == {"operation": "mul", "a": 4, "b": 5}


def test_an_unexpected_failure_is_a_json_500_without_internals():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipelines.serve_http import MeasuredRequests

    recorded = []

    class Recorder:
        def record(self, route, status, seconds):
            recorded.append((route, status))

    app = FastAPI()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    app.add_middleware(MeasuredRequests, metrics=Recorder())
    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert "secret" not in response.text and "Traceback" not in response.text
    assert recorded == [("/boom", 500)]


# ---------------------------------------------------------------------------------------------------------------------
# The deployed application
# ---------------------------------------------------------------------------------------------------------------------


def test_openai_client_chat_and_streaming(client):
    assert [m.id for m in client.models.list()] == ["toolseek-policy"]
    request = dict(model="toolseek-policy", messages=[{"role": "user", "content": "Where is Drami?"}], max_tokens=12,
                   temperature=0)  # fmt: skip
    reply = client.chat.completions.create(**request)
    (choice,) = reply.choices
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert reply.usage.completion_tokens <= 12 and reply.system_fingerprint == "toolseek-policy-v0"
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # greedy: the stream carries the same completion, token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    two = client.chat.completions.create(**{**request, "temperature": 1.0}, n=2, seed=7)
    assert len(two.choices) == 2


def test_openai_client_tool_calls(client):
    reply = client.chat.completions.create(model="toolseek-policy", messages=TOOL_CHAT, tools=[CALCULATE],
                                           temperature=0, max_tokens=96)  # fmt: skip
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculate" and json.loads(call.function.arguments) == TOOL_CALL["arguments"]
    streamed = list(client.chat.completions.create(model="toolseek-policy", messages=TOOL_CHAT, tools=[CALCULATE],
                                                   temperature=0, max_tokens=96, stream=True))  # fmt: skip
    deltas = [d for c in streamed for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.id, d.function.name) for d in deltas] == [(call.id, "calculate")]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # the client sends the result back in OpenAI's shape; the server renders it as a results block
    follow_up = [*TOOL_CHAT, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "5"}]  # fmt: skip
    second = client.chat.completions.create(model="toolseek-policy", messages=follow_up, tools=[CALCULATE],
                                            temperature=0, max_tokens=8)  # fmt: skip
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice="none" offers no tools: the model never sees the schema, so it writes no call
    plain = client.chat.completions.create(model="toolseek-policy", messages=TOOL_CHAT, tools=[CALCULATE],
                                           tool_choice="none", temperature=0, max_tokens=16)  # fmt: skip
    assert plain.choices[0].message.tool_calls is None


def test_api_keys_are_required_and_checked(served, http):
    import httpx
    import openai

    url = served["url"]
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-0123456789abcdef", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": f"Basic {API_KEY}"}):
        response = httpx.post(url + "/v1/retrieve", json={"queries": ["Drami"]}, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    assert http.get("/v1/models").status_code == 200
    assert httpx.get(url + "/healthz", timeout=30).json()["status"] == "ok"  # public
    assert http.post("/v1/admin/reload", json={"checkpoint": "/x"}).status_code == 401  # an API key is no admin key


def test_each_key_is_rate_limited_on_its_own(served, http):
    import httpx

    with httpx.Client(base_url=served["url"], timeout=30, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
        responses = [other.get("/v1/agents") for _ in range(120)]  # burst 60, then 10 a second
    codes = [r.status_code for r in responses]
    assert codes.count(200) >= 60 and 429 in codes  # how many pass after the burst depends on the machine's speed
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert http.get("/v1/agents").status_code == 200  # the other key is untouched


LONG = "Where is Drami? " * 200
BAD_INPUTS = [
    # (name, method, path, JSON body or raw bytes, status, param, code)
    ("invalid json", "POST", "/v1/chat/completions", b'{"model": "toolseek-policy", "messages": [', 400, None,
     "invalid_json"),
    ("body not an object", "POST", "/v1/chat/completions", [1, 2], 400, None, "invalid_body"),
    ("unknown model", "POST", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
     404, "model", "model_not_found"),
    ("wrong type", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("numeric string", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "max_tokens": "10"}, 400, "max_tokens", "invalid_value"),
    ("unknown field", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "max_token": 5}, 400, "max_token", "unknown_parameter"),
    ("no messages", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": []}, 400, "messages",
     "invalid_value"),
    ("bad role", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "wizard",
     "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ("orphan tool result", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "5"}]}, 400, "messages[1].tool_call_id",
     "invalid_value"),
    ("max_tokens over limit", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens", "invalid_value"),
    ("n over limit", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "n": 50}, 400, "n", "invalid_value"),
    ("prompt too long", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    ("invalid tool schema", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
     "properties": {"a": {"type": "not-a-type"}}}}}]}, 400, "tools[0].function.parameters.properties.a.type",
     "invalid_tool"),
    ("tool name", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, 400,
     "tools[0].function.name", "invalid_tool"),
    ("tool_choice unknown", "POST", "/v1/chat/completions", {"model": "toolseek-policy", "messages": [{"role": "user",
     "content": "hi"}], "tools": [CALCULATE], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "tool_choice.function.name", "invalid_value"),
    ("unknown agent", "POST", "/v1/agents/oracle/runs", {"question": "Where is Drami?"}, 404, "name",
     "agent_not_found"),
    ("empty question", "POST", "/v1/agents/exsearch/runs", {"question": ""}, 400, "question", "invalid_value"),
    ("unknown tool", "POST", "/v1/agents/conagents/runs", {"question": "2 + 3?", "tools": ["teleport"]}, 400,
     "tools[0]", "invalid_value"),
    ("query type", "POST", "/v1/retrieve", {"queries": [3]}, 400, "queries[0]", "invalid_value"),
    ("k over limit", "POST", "/v1/retrieve", {"queries": ["Drami"], "k": 1000}, 400, "k", "invalid_value"),
    ("instructions count", "POST", "/v1/retrieve", {"queries": ["a", "b"], "instruction": ["x"]}, 400, "instruction",
     "invalid_value"),
    ("unknown route", "GET", "/v1/nothing", None, 404, None, "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, None, "method_not_allowed"),
    ("body too large", "POST", "/v1/retrieve", {"queries": ["x" * 1_100_000]}, 413, None, "request_too_large"),
]  # fmt: skip


@pytest.mark.parametrize("name,method,path,body,status,param,code", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_4xx_naming_the_field(http, name, method, path, body, status, param, code):
    kwargs = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    response = http.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["message"] and "Traceback" not in response.text


def test_the_service_survives_bad_input(http):
    assert http.get("/healthz").json()["status"] == "ok"
    reply = http.post("/v1/chat/completions", json={"model": "toolseek-policy", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert reply.status_code == 200


def test_agent_runs_answer_with_their_step_trace(http, question):
    run = http.post("/v1/agents/exsearch/runs", json={"question": question["question"]}).json()
    assert (run["answer"], run["finish_reason"]) == (question["answers"][0], "answer")
    roles = [step["role"] for step in run["steps"]]
    assert roles[0] == "search" and "documents" in roles and roles[-1] == "answer"
    with http.stream("POST", "/v1/agents/exsearch/runs", json={"question": question["question"], "stream": True}) as s:
        lines = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.index("model") < kinds.index("search")
    assert events[-1]["answer"] == run["answer"] and events[-1]["steps"] == run["steps"]
    for name in ("genground", "conagents"):  # the untrained protocols end early, but the run is served and traced
        other = http.post(f"/v1/agents/{name}/runs", json={"question": "What is 2 plus 3?"})
        assert other.status_code == 200 and other.json()["finish_reason"] != "running"


def test_retrieve_returns_ranked_documents(http, world):
    doc = world.documents()[5]
    response = http.post("/v1/retrieve", json={"queries": [doc["title"], "Drami"], "k": 3}).json()
    first = response["data"][0]
    assert first["query"] == doc["title"] and 1 <= len(first["hits"]) <= 3  # BM25 returns only matching documents
    assert first["hits"][0]["id"] == doc["id"] and set(first["hits"][0]) == {"id", "title", "text", "score"}
    scores = [hit["score"] for hit in first["hits"]]
    assert scores == sorted(scores, reverse=True)


# ---------------------------------------------------------------------------------------------------------------------
# Hot swap, replica failure, metrics
# ---------------------------------------------------------------------------------------------------------------------


class Load:
    """Chat requests sent by `workers` threads until stopped; every answer (or exception) is kept. It uses the admin
    key, which the rate limit does not apply to."""

    def __init__(self, url: str, workers: int = 4):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                   limits=httpx.Limits(max_connections=workers))  # fmt: skip
        self.results: list[tuple[float, int | str, str | None]] = []  # (answered at, status, system_fingerprint)
        self.spans: list[tuple[float, float]] = []  # (sent at, answered at)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(workers)
        self.futures = [self.pool.submit(self._loop) for _ in range(workers)]

    def _loop(self) -> None:
        body = {"model": "toolseek-policy", "messages": TOOL_CHAT, "tools": [CALCULATE], "temperature": 0,
                "max_tokens": 32}  # fmt: skip
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                response = self.client.post("/v1/chat/completions", json=body)
                fingerprint = response.json().get("system_fingerprint") if response.status_code == 200 else None
                self.results.append((time.monotonic(), response.status_code, fingerprint))
            except Exception as error:  # noqa: BLE001  (a hang or a dropped connection is recorded, not raised)
                self.results.append((time.monotonic(), type(error).__name__, None))
            self.spans.append((sent, time.monotonic()))

    def finish(self) -> list[tuple[float, int | str, str | None]]:
        self.stop.set()
        for future in self.futures:
            future.result(timeout=120)
        self.pool.shutdown()
        self.client.close()
        return self.results


@pytest.mark.slow
def test_hot_swap_under_load_drops_no_request(served, http, client, tiny_policy, trained_policy, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    missing = http.post("/v1/admin/reload", json={"checkpoint": str(tmp_path / "nothing")}, headers=admin)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "checkpoint"
    load = Load(served["url"])
    time.sleep(2)
    swapped = http.post("/v1/admin/reload", json={"checkpoint": str(tiny_policy)}, headers=admin)
    swapped_at = time.monotonic()
    time.sleep(2)
    results = load.finish()
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["checkpoint_version"] == 1 and swapped.json()["replicas"] == 1
    assert {status for _, status, _ in results} == {200}  # none failed while the weights changed under them
    assert any(f == "toolseek-policy-v0" for _, _, f in results)
    after = [f for t, _, f in results if t > swapped_at + 0.5]
    assert after and set(after) == {"toolseek-policy-v1"}
    untrained = client.chat.completions.create(model="toolseek-policy", messages=TOOL_CHAT, tools=[CALCULATE],
                                               temperature=0, max_tokens=96)  # fmt: skip
    assert untrained.choices[0].finish_reason != "tool_calls"  # the untrained weights answer now
    assert http.get("/v1/models").json()["data"][0]["checkpoint_version"] == 1
    back = http.post("/v1/admin/reload", json={"checkpoint": str(trained_policy)}, headers=admin)
    assert back.status_code == 200 and back.json()["checkpoint_version"] == 2


@pytest.mark.slow
def test_killing_the_llm_replica_under_load_loses_no_request(served, http):
    import ray
    from ray.util.state import list_actors

    before = http.get("/healthz").json()
    load = Load(served["url"])
    time.sleep(2)
    (replica,) = list_actors(filters=[("class_name", "=", "ServeReplica:toolseek:LLMServer"), ("state", "=", "ALIVE")])
    ray.kill(ray.get_actor(replica.name, namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    deadline = killed_at + 90
    while time.monotonic() < deadline and sum(1 for t, s, _ in load.results if t > killed_at and s == 200) < 8:
        time.sleep(0.5)
    results = load.finish()
    after = [status for t, status, _ in results if t > killed_at]
    assert sum(1 for s in after if s == 200) >= 8, after  # service came back
    assert {status for _, status, _ in results} == {200}, results  # in-flight requests were retried, none hung
    assert any(sent < killed_at < answered for sent, answered in load.spans)  # some were in flight at the kill
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["checkpoint_version"] == before["checkpoint_version"]


@pytest.mark.slow
def test_prometheus_metrics_are_exported(served, http):
    import httpx

    from pipelines.serve import metrics_ports

    (port,) = metrics_ports()
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        http.get("/v1/models")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "ray_toolseek_http_requests" in text and "ray_serve_num_http_requests" in text:
            break
        time.sleep(2)
    assert 'route="/v1/chat/completions"' in text and "ray_serve_num_http_requests" in text


def test_the_rayservice_manifest_builds_this_app():
    """cluster/kuberay/rayservice.yaml names `pipelines.serve:app`; its args are overrides that compose here."""
    import yaml

    from pipelines.serve import compose_config

    manifest = Path(__file__).resolve().parents[1] / "cluster" / "kuberay" / "rayservice.yaml"
    (service,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "pipelines.serve:app"
    cfg = compose_config([f"{k}={v}" for k, v in (application.get("args") or {}).items()])
    assert cfg.serve.app_name == application["name"]
