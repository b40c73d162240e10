"""The function-calling format: tools into prompts, model text into calls (typed failures), OpenAI shapes, chat."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from openai.types.chat import ChatCompletionMessage
from openai.types.shared import FunctionDefinition

from actors.tools import SYNTAX_ERROR, UNKNOWN_TOOL, WRONG_TYPE, ToolRegistry, normalize_spec
from agents.toolcall import (
    CALLS_CLOSE,
    ToolCall,
    flatten_messages,
    openai_tool,
    parse_calls,
    render_calls,
    render_chat,
    render_results,
    render_tool,
    render_tools,
    response_schema,
    tool_message,
)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def registry(small_world):
    return ToolRegistry.from_functions(small_world.tools(), small_world.tool_functions())


def test_every_world_task_round_trips_its_gold_calls(small_world):
    tasks = small_world.tool_tasks("dev")
    shapes = set()
    for task in tasks:
        parsed = parse_calls(render_calls(task["gold_calls"]), tools=task["tools"], first_id=3)
        assert parsed.ok and parsed.block, (task["id"], parsed.errors)
        assert [c.as_call() for c in parsed.calls] == task["gold_calls"]
        assert [c.id for c in parsed.calls] == [f"call_{3 + i}" for i in range(len(task["gold_calls"]))]
        shapes.add("single" if len(task["gold_calls"]) == 1 else "several")
    assert shapes == {"single", "several"}
    # parallel: independent calls of one function in one block (the two lookups of a population task)
    task = next(t for t in tasks if [c["name"] for c in t["gold_calls"][:2]] == ["lookup", "lookup"])
    parallel = parse_calls(render_calls(task["gold_calls"][:2]), tools=["lookup"])
    assert parallel.ok and [c.as_call() for c in parallel.calls] == task["gold_calls"][:2]
    # multiple: one call chosen among several offered tools
    assert any(len(t["gold_calls"]) == 1 and len(t["tools"]) > 1 for t in tasks)


def test_openai_shapes_validate_with_the_openai_client_types(small_world):
    text = "Looking both up.\n" + render_calls([
        {"name": "lookup", "arguments": {"entity": "Nili Motors", "attribute": "founder"}},
        {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3.5}},
    ])  # fmt: skip
    parsed = parse_calls(text, tools=small_world.tools())
    message = ChatCompletionMessage.model_validate(parsed.assistant_message())
    assert message.content == "Looking both up."
    assert [(c.id, c.type, c.function.name) for c in message.tool_calls] == [
        ("call_0", "function", "lookup"), ("call_1", "function", "calculate")]  # fmt: skip
    assert json.loads(message.tool_calls[1].function.arguments) == {"operation": "add", "a": 2, "b": 3.5}
    back = [ToolCall.from_openai(c.model_dump()) for c in message.tool_calls]
    assert back == parsed.calls
    for spec in small_world.tools():
        entry = openai_tool(spec)
        assert entry["type"] == "function"
        FunctionDefinition.model_validate(entry["function"])
        assert json.loads(render_tool(entry)) == normalize_spec(spec)  # any accepted form renders the same line
    plain = parse_calls("The answer is 42.")
    assert (plain.content, plain.calls, plain.errors, plain.block) == ("The answer is 42.", [], [], False)
    assert "tool_calls" not in plain.assistant_message()


@pytest.mark.parametrize("text,code,fragment", [
    ('<calls>\n{"name": "lookup", "arguments": {"entity": "X"\n</calls>', SYNTAX_ERROR, "line 1 is not JSON"),
    ('<calls>\n["lookup", {}]\n</calls>', SYNTAX_ERROR, "not an object"),
    ('<calls>\n{"arguments": {}}\n</calls>', SYNTAX_ERROR, "no string 'name'"),
    ('<calls>\n{"name": "lookup", "args": {}}\n</calls>', SYNTAX_ERROR, "unknown key(s) ['args']"),
    ('<calls>\n{"name": "lookup", "arguments": [1, 2]}\n</calls>', WRONG_TYPE, "arguments must be an object"),
    ('<calls>\n{"name": "lookup", "arguments": "{\\"a\\": "}\n</calls>', WRONG_TYPE, "not valid JSON"),
    ('<calls>\n{"name": "rm_rf", "arguments": {}}\n</calls>', UNKNOWN_TOOL, "unknown tool 'rm_rf'"),
    ('<calls>\n{"name": "lookup", "arguments": {}}\n', SYNTAX_ERROR, "cut off"),
    ("<calls>\n\n</calls>", SYNTAX_ERROR, "empty call block"),
    ('{"name": "lookup", "arguments": {}}\n</calls>', SYNTAX_ERROR, "</calls> without <calls>"),
    ('<calls>\n{"name": "lookup", "arguments": {}}\n</calls> and more', SYNTAX_ERROR, "text after </calls>"),
])  # fmt: skip
def test_parse_failures_are_typed_values(small_world, text, code, fragment):
    parsed = parse_calls(text, tools=[t["name"] for t in small_world.tools()])
    assert not parsed.ok and [e.code for e in parsed.errors] == [code]
    assert fragment in parsed.errors[0].message


def test_a_bad_line_does_not_hide_the_good_ones():
    text = ('<calls>\n{"name":"calculate","arguments":{"operation":"add","a":1,"b":2}}\nnot a call\n'
            '{"name":"add_days","arguments":"{\\"date\\":\\"2001-01-01\\",\\"days\\":3}"}\n</calls>')  # fmt: skip
    parsed = parse_calls(text)
    assert [c.name for c in parsed.calls] == ["calculate", "add_days"] and [c.id for c in parsed.calls] == ["call_0",
                                                                                                       "call_1"]
    assert parsed.calls[1].arguments == {"date": "2001-01-01", "days": 3}  # OpenAI-style string arguments
    assert len(parsed.errors) == 1 and "call line 2" in parsed.errors[0].message


def test_results_carry_outputs_and_the_registrys_typed_errors(registry):
    parsed = parse_calls(render_calls([
        {"name": "calculate", "arguments": {"operation": "subtract", "a": 10, "b": 4}},
        {"name": "calculate", "arguments": {"operation": "pow", "a": 2, "b": 3}},
        {"name": "add_days", "arguments": {"date": "someday", "days": 3}},
    ]))  # fmt: skip
    results = [registry.call(c.as_call()) for c in parsed.calls]
    block = render_results(zip(parsed.calls, results, strict=True))
    lines = [json.loads(line) for line in block.splitlines()[1:-1]]
    assert lines[0] == {"id": "call_0", "name": "calculate", "output": "6"}
    assert lines[1]["error"]["code"] == "invalid_value" and lines[1]["error"]["argument"] == "operation"
    assert lines[2]["error"]["code"] == "execution_error" and "YYYY-MM-DD" in lines[2]["error"]["message"]
    message = tool_message(parsed.calls[1], results[1])
    assert message["tool_call_id"] == "call_1" and message["content"].startswith("error (invalid_value)")


CONVERSATION = [
    {"role": "system", "content": "You answer with tools."},
    {"role": "user", "content": "What is 10 minus 4, and 2 plus 2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "calculate",
                                                          "arguments": '{"operation":"subtract","a":10,"b":4}'}},
        {"id": "call_1", "type": "function", "function": {"name": "calculate",
                                                          "arguments": {"operation": "add", "a": 2, "b": 2}}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "6"},
    {"role": "tool", "tool_call_id": "call_1", "content": "4"},
]  # fmt: skip


def test_chat_rendering_puts_tools_calls_and_results_in_the_format(small_world, tokenizer):
    tools = [openai_tool(t) for t in small_world.tools() if t["name"] == "calculate"]
    flat = flatten_messages(CONVERSATION, tools)
    assert [m["role"] for m in flat] == ["system", "user", "assistant", "tool"]  # both results in one block
    assert flat[0]["content"] == "You answer with tools.\n" + render_tools(tools)
    parsed = parse_calls(flat[2]["content"], tools=tools)
    assert parsed.ok and [c.arguments for c in parsed.calls] == [{"operation": "subtract", "a": 10, "b": 4},
                                                                 {"operation": "add", "a": 2, "b": 2}]
    assert [json.loads(line)["output"] for line in flat[3]["content"].splitlines()[1:-1]] == ["6", "4"]
    ours = render_chat(CONVERSATION, tools)
    templated = render_chat(CONVERSATION, tools, tokenizer=tokenizer)  # the tiny policy's own chat template
    assert templated.replace(tokenizer.eos_token, "") == ours and ours.endswith("<|assistant|>\n")
    ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == templated  # the text survives tokenization
    without = render_chat(CONVERSATION[1:2], tools, descriptions=False)
    assert without.startswith("<|system|>\n") and "description" not in without


@pytest.mark.parametrize("messages,fragment", [
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content: a user message needs content"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content: expected a string"),
    ([{"role": "tool", "tool_call_id": "call_9", "content": "6"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments: not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
     "messages[0].tool_calls[0].id"),
])  # fmt: skip
def test_bad_messages_raise_naming_the_field(messages, fragment):
    with pytest.raises(ValueError, match=__import__("re").escape(fragment)):
        flatten_messages(messages)


def test_response_schemas_of_tool_outputs(registry):
    def output(name, **arguments):
        return registry.call({"name": name, "arguments": arguments}).output

    assert response_schema(output("add_days", date="2001-01-01", days=3)) == {"type": "string", "format": "date"}
    assert response_schema(output("calculate", operation="divide", a=7, b=2)) == {"type": "number"}
    assert response_schema(output("date_diff", start="2001-01-01", end="2001-02-01")) == {"type": "integer"}
    assert response_schema("Mira Tovenka") == {"type": "string"}
    nested = json.dumps({"people": [{"name": "A", "born": 1931}, {"name": "B", "born": 1950.5, "city": "K"}]})
    assert response_schema(nested) == {"type": "object", "properties": {"people": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "number"},
                                         "city": {"type": "string"}}}}}}  # fmt: skip


def test_the_format_imports_without_ray_or_torch():
    probe = ("import sys, agents.toolcall; heavy = {'ray', 'torch', 'transformers'} & set(sys.modules); "
             "print(sorted(heavy))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert CALLS_CLOSE == "</calls>"  # the block TTPA trains (pipelines/ttpa.py END_TAG)
