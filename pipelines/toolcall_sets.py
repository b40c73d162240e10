"""Tool-call sets beyond BFCL, in the form BFCL's checker scores: Seal-Tools, API-Bank (level 1), APIBench.

These datasets give one concrete gold call per step, not BFCL's list of acceptable values per argument. Each gold
call becomes a BFCL possible answer in which every argument the gold passes allows exactly the gold's value and no
other argument is allowed (`concrete_ground_truth`): the strict reading, since nothing says which other values or
optional arguments a dataset would accept. The checker is then chosen per question the way BFCL names categories:

    <set>_parallel   more than one gold call (matched regardless of order: Seal-Tools' multi-tool requests)
    <set>_multiple   one gold call among several offered tools
    <set>_simple     one gold call, one tool offered

APIBench gives each gold as Python source (`torch.hub.load(repo_or_dir='...', model='...', pretrained=True)`):
it is parsed into a call (positional arguments named `arg0`, `arg1`, ... as their position is all that names them)
and the offered tool is that call's own signature, so the check is APIBench's AST match of the API call with BFCL's
value rules. Golds that are not a call with literal arguments (`hub.KerasLayer(...)` nested inside a list, an
expression) cannot be checked this way; they are left out and counted in `skipped`, with the reason.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from actors.tools import ToolExample, load_api_bank, load_seal_tools, normalize_spec
from pipelines.data.toolsets import read_rows

SETS = ("seal_tools", "api_bank", "apibench")
APIBENCH_FILES = {"huggingface": "huggingface_eval.json", "tensorflowhub": "tensorflow_eval.json",
                  "torchhub": "torchhub_eval.json"}  # fmt: skip
_INSTRUCTION = re.compile(r"#{3}\s*Instruction:\s*(.*?)\s*(?:#{3}\s*Output|\Z)", re.S)


def concrete_ground_truth(calls: Sequence[dict]) -> list[dict]:
    """BFCL's possible-answer form ([{name: {argument: [allowed values]}}]) of concrete gold calls."""
    return [{call["name"]: {key: [value] for key, value in (call.get("arguments") or {}).items()}} for call in calls]


def category(name: str, example: ToolExample) -> str:
    if len(example.calls) > 1:
        return f"{name}_parallel"
    return f"{name}_multiple" if len(example.tools) > 1 else f"{name}_simple"


def grouped(name: str, examples: Sequence[ToolExample]) -> list[tuple[str, list[ToolExample]]]:
    """(category, examples) groups with BFCL-form gold, categories in first-seen order.

    Ids must name one question each (a predictions file is keyed by them): `load_api_bank` gives every API call of
    a dialogue its dialogue's id, so each id shared by several examples gets `#<n>` (its occurrence, in file order).
    """
    counts = Counter(example.id for example in examples)
    seen: Counter = Counter()
    groups: dict[str, list[ToolExample]] = {}
    for example in examples:
        if counts[example.id] > 1:
            seen[example.id] += 1
            example.id = f"{example.id}#{seen[example.id]}"
        example.allowed = concrete_ground_truth(example.calls)
        groups.setdefault(category(name, example), []).append(example)
    return list(groups.items())


def _value_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object" if isinstance(value, dict) else "string"


def apibench_call(source: str) -> dict:
    """{"name", "arguments"} of an APIBench gold written as Python; ValueError when it is not one literal call."""
    node = ast.parse(source.strip(), mode="eval").body
    if not isinstance(node, ast.Call):
        raise ValueError("not a call")
    name = ast.unparse(node.func)
    arguments = {f"arg{index}": ast.literal_eval(arg) for index, arg in enumerate(node.args)}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError("**kwargs")
        arguments[keyword.arg] = ast.literal_eval(keyword.value)
    return {"name": name, "arguments": arguments}


def load_apibench(root: Path) -> tuple[list[ToolExample], dict[str, str]]:
    """APIBench's eval questions of every hub with a gold call that parses, and {row: why} for those that do not."""
    examples, skipped = [], {}
    for hub, file in APIBENCH_FILES.items():
        for number, (where, row) in enumerate(read_rows(Path(root) / "apibench" / file)):
            instruction = _INSTRUCTION.search(str(row.get("code", "")))
            try:
                if instruction is None:
                    raise ValueError("no ###Instruction in 'code'")
                call = apibench_call(str(row.get("api_call", "")))
            except (SyntaxError, ValueError) as error:
                skipped[where] = f"{type(error).__name__}: {error}"
                continue
            description = str((row.get("api_data") or {}).get("description") or "")
            spec = normalize_spec({"name": call["name"], "description": description, "parameters": {
                "type": "object", "required": list(call["arguments"]),
                "properties": {key: {"type": _value_type(value)} for key, value in call["arguments"].items()}}})
            examples.append(ToolExample(f"apibench_{hub}_{number}", instruction.group(1), [spec], [call]))
    return examples, skipped


def load_toolcall_set(name: str, tools_root: Path) -> tuple[list[tuple[str, list[ToolExample]]], dict[str, str]]:
    """(category groups, skipped rows) of a named set under the shared tools folder (../shared/data/tools)."""
    root = Path(tools_root)
    if name == "seal_tools":
        return grouped(name, load_seal_tools(root).examples), {}
    if name == "api_bank":
        return grouped(name, load_api_bank(root, levels=(1,)).examples), {}
    if name == "apibench":
        examples, skipped = load_apibench(root)
        return grouped(name, examples), skipped
    raise ValueError(f"data.path={name!r}: not a BFCL file or folder, nor one of {SETS}")
