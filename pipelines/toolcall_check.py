"""Tool-call checking by BFCL's AST rules, with the sandbox's typed error codes.

Why BFCL's rules: they are what the field's leaderboard publishes (Berkeley Function Calling Leaderboard,
`bfcl_eval/eval_checker/ast_eval/ast_checker.py`), so an accuracy from here sits beside a published one. Why the
sandbox's codes (`actors/tools.py`) and TTPA's (`pipelines/ttpa.py`) instead of BFCL's own labels: the evaluator,
the TTPA error-oriented scorer and the sandbox then count the same mistakes under the same names. BFCL's label is
kept beside ours in each verdict (`bfcl_error_type`), so a table can be read either way.

The rules, as BFCL applies them (one verdict per question; the first error found is the one reported):

- category -> checker: `irrelevance` (any call is wrong), `parallel*` (calls matched to the gold regardless of
  order), `multiple*` (one call; choosing the right function among several is the test), otherwise simple (one call).
- the number of calls must equal the number of gold calls (fewer: `missing_call`, more: `extra_call`).
- one call against one gold call: the name (`unknown_tool` if nothing offered has it, `wrong_tool` if another
  offered function does); each required parameter present (`missing_argument`); then for each argument in the
  call's order: known to the spec *and* used by the gold (`unexpected_argument`), of the declared type
  (`wrong_type`), and among the gold's allowed values (`wrong_value`; `invalid_value` when the value also breaks the
  spec's own enum/range/pattern, the way `validate_call` would reject it); last, every gold parameter whose allowed
  list lacks "" must be given (`missing_argument`: "" in the allowed list is how BFCL marks an optional parameter).
- types: BFCL's Python mapping (string -> str, integer -> int, float/number -> float, boolean -> bool,
  array/tuple -> list, dict -> dict, any -> str), compared by exact type, so `true` is not an integer; an integer
  is accepted where a float is declared (Python's int-to-float allowance). Arrays with an item type are checked one
  level deep. When the gold's allowed values have another type than the declared one (a variable name given as a
  string for an integer parameter), a value of the gold's type is accepted and compared exactly.
- values: strings are compared after BFCL's normalisation (drop spaces and `,./-_*^`, lower-case, `'` -> `"`), also
  inside lists and dicts; a dict is compared key by key against each allowed dict (a missing key is fine only when
  its allowed list holds ""); a list of dicts item by item; anything else by Python equality (`2 == 2.0`).
- parallel: every gold call needs its own call that passes against it, in any order. BFCL finds them greedily (each
  gold call, in order, takes the first free call that passes), which rejects some orders of a correct answer when
  one gold call accepts several of the calls (BFCL's parallel_178 accepts Microsoft *or* Apple in its first gold
  call); here a maximum matching decides, so only that case can get another verdict than BFCL's. When no full
  match exists, the error reported is the one of a call left over against a gold call left over (in order), i.e.
  the call that was meant for it, not the first one tried.
- Java and JavaScript: BFCL reads those calls from call syntax, where every value is a string it converts to the
  declared type. Calls here are JSON, so values are taken as they are and checked with the same type mapping (an
  integer is accepted for a float or double there too, as BFCL's conversion of "5" would).

Two more departures, where BFCL's code cannot mean its result for JSON calls: untyped ("any") array items are not
type-checked, and a bare value inside a gold dict (a few Java golds write `{"format": "epoch_millis"}` where a list
of acceptable values belongs; BFCL would iterate the string's characters) is read as the one acceptable value.

Gold comes from `actors.tools.load_bfcl` (the loader the tool registry uses): `ToolExample.allowed` is BFCL's
possible answer, and `gold_calls` makes `ToolExample.calls` (its first acceptable value per argument) into calls
that pass BFCL's check: what `predictions=gold` scores. A few golds cannot be met by any call (`gold_defects` says
why: BFCL v4 has three, in live_multiple); they count as failed, as on the leaderboard, and the accuracy table
shows them in a column of their own.

Predictions file (`predictions=<file>`), JSON lines, one row per question id:

    {"id": "parallel_3", "calls": [{"name": "f", "arguments": {"x": 1}}, ...]}   # calls as JSON
    {"id": "parallel_3", "text": "<the model's raw output>"}                    # parsed by `parse_model_text`

`arguments` may be an object or a JSON string (OpenAI's form); a call may also be written BFCL's way, `{"f": {"x": 1}}`.
`"result"` (BFCL's own result files) is read as `calls` when it is a list and as `text` when it is a string.
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actors.tools import (
    MISSING_ARGUMENT,
    UNEXPECTED_ARGUMENT,
    UNKNOWN_TOOL,
    WRONG_TYPE,
    ToolDataError,
    ToolError,
    ToolExample,
    load_bfcl,
    parse_arguments,
    validate_call,
)
from pipelines.data.toolsets import need, read_rows
from pipelines.ttpa import END_TAG, EXTRA_CALL, MALFORMED, MISSING_CALL, WRONG_TOOL, WRONG_VALUE, parse_calls

CHECKER_KINDS = ("irrelevance", "parallel", "multiple", "simple")
_FILE_NAME = re.compile(r"^BFCL_v\d+_(?P<category>\w+)\.json$")


# ---------------------------------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """A question's verdict: valid, or the first error found (our code, plus BFCL's own label for it)."""

    valid: bool
    error: ToolError | None = None
    bfcl_error_type: str | None = None
    """BFCL's label, e.g. `value_error:string`, `simple_function_checker:missing_required`."""

    @property
    def code(self) -> str | None:
        return self.error.code if self.error else None

    def to_dict(self) -> dict:
        return {"valid": self.valid, "error": self.error.to_dict() if self.error else None,
                "bfcl_error_type": self.bfcl_error_type}  # fmt: skip


VALID = Verdict(True)


def _fail(code: str, message: str, bfcl_type: str, tool: str | None = None, argument: str | None = None) -> Verdict:
    return Verdict(False, ToolError(code, message, tool, argument), bfcl_type)


# ---------------------------------------------------------------------------------------------------- categories


def checker_kind(category: str) -> str:
    """Which of BFCL's checkers a category uses (BFCL dispatches on the category name the same way)."""
    if "irrelevance" in category:
        return "irrelevance"
    if "parallel" in category:
        return "parallel"
    if "multiple" in category:
        return "multiple"
    return "simple"


def language_of(category: str) -> str:
    if category.endswith("javascript"):
        return "javascript"
    return "java" if category.endswith("java") else "python"


def category_of(question_file: str | Path) -> str:
    match = _FILE_NAME.match(Path(question_file).name)
    if not match:
        raise ToolDataError(f"{question_file}: not a BFCL question file (expected BFCL_v<N>_<category>.json)")
    return match.group("category")


# ---------------------------------------------------------------------------------------------------- types and values

_PYTHON_TYPES: dict[str, type] = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list,
                                  "object": dict}  # fmt: skip
"""Normalised JSON-schema type -> BFCL's Python type; an untyped parameter (BFCL's "any") is a string."""


def _python_type(schema: object) -> type:
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    return _PYTHON_TYPES.get(kind, str) if isinstance(kind, str) else str


def _item_type(schema: Mapping) -> type | None:
    """The item type BFCL checks one level deep (arrays whose items declare a type), else None.

    Untyped items ("any", only in the Java set) are not checked: BFCL gets Java values as strings, so it never sees
    the mixed lists (`["userID", 42, true]`) that a JSON call of such a parameter holds.
    """
    items = schema.get("items")
    typed = isinstance(items, Mapping) and isinstance(items.get("type"), str)
    return _python_type(items) if _python_type(schema) is list and typed else None


def _allowed_type(allowed: Sequence) -> type | None:
    """Type of the first acceptable value that is not the optional marker ""; None if there is none."""
    return next((type(option) for option in allowed if option != ""), None)


def _element_type_ok(value: object, allowed: object, expected: type) -> bool:
    """One array item against the item type, or against the type of the gold's items (a variable)."""
    if type(value) is expected:
        return True
    allowed_type = _allowed_type(allowed) if isinstance(allowed, list) else None
    return allowed_type is not None and type(value) is allowed_type


def _type_check(value: object, allowed: Sequence, schema: Mapping) -> tuple[str | None, bool]:
    """(BFCL error type or None, is_variable). `is_variable`: the gold's values have another type than declared."""
    expected, item = _python_type(schema), _item_type(schema)
    allowed_type = _allowed_type(allowed)
    is_variable = allowed_type is not None and allowed_type is not expected
    if type(value) is expected:
        if item is None:
            return None, is_variable
        for option in allowed:
            if not isinstance(option, list) or all(_element_type_ok(v, option, item) for v in value):
                return None, is_variable
        return "type_error:nested", is_variable
    if allowed_type is not None and type(value) is allowed_type:
        return None, True
    return "type_error:simple", is_variable


def standardize_string(text: str) -> str:
    """BFCL's string normalisation: "April 1, 2024" and "april 1 2024" compare equal."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _standard(value: object) -> object:
    return standardize_string(value) if isinstance(value, str) else value


def _as_options(options: object) -> list:
    """A gold dict's allowed values for one key; a bare value (a few Java golds) is the only acceptable one."""
    return options if isinstance(options, list) else [options]


def _dict_matches(value: object, options: Sequence) -> str | None:
    """None if the dict matches one allowed dict (key by key, strings normalised), else BFCL's error type."""
    if not isinstance(value, Mapping):
        return "value_error:dict_value"
    problem = "value_error:dict_value"
    for option in options:
        if not isinstance(option, Mapping):
            continue  # "" (optional) or a variable name: not a dict to compare with
        problem = None
        for key, item in value.items():
            if key not in option:
                problem = "value_error:dict_key"
                break
            if _standard(item) not in [_standard(o) for o in _as_options(option[key])]:
                problem = "value_error:dict_value"
                break
        if problem is None:
            missing = [k for k, allowed in option.items() if k not in value and "" not in _as_options(allowed)]
            problem = "value_error:dict_key" if missing else None
        if problem is None:
            return None
    return problem


def _list_of_dicts_matches(value: Sequence, options: Sequence) -> str | None:
    """Item by item against each allowed list of dicts ("" counts as the empty list, as in BFCL)."""
    problem = "value_error:list_dict_count"
    for option in options:
        option = option if isinstance(option, list) else []
        if len(option) != len(value):
            problem = "value_error:list_dict_count"
            continue
        problem = next((p for v, o in zip(value, option, strict=True) if (p := _dict_matches(v, [o]))), None)
        if problem is None:
            return None
    return problem


def _value_check(value: object, allowed: Sequence, schema: Mapping, is_variable: bool) -> str | None:
    """None if the value is one of the allowed ones (BFCL's comparison for its type), else BFCL's error type."""
    expected = _python_type(schema)
    if not is_variable:
        if expected is dict:
            return _dict_matches(value, allowed)
        if expected is list and _item_type(schema) is dict:
            return _list_of_dicts_matches(value, allowed)
        if expected is str:
            return None if _standard(value) in [_standard(o) for o in allowed if isinstance(o, str)] else \
                "value_error:string"  # fmt: skip
        if expected is list:
            options = [[_standard(i) for i in o] if isinstance(o, list) else [] for o in allowed if o == "" or
                       isinstance(o, list)]  # fmt: skip
            return None if [_standard(i) for i in value] in options else "value_error:list/tuple"
    return None if value in allowed else "value_error:others"


def _value_error_code(spec: Mapping, name: str, value: object) -> ToolError | None:
    """The spec's own verdict on one argument: what `validate_call` (hence TTPA) would call this value."""
    parameters = spec["parameters"]
    alone = {**spec, "parameters": {**parameters, "properties": {name: parameters["properties"][name]},
                                    "required": []}}  # fmt: skip
    return validate_call(alone, {"name": spec["name"], "arguments": {name: value}})


# ---------------------------------------------------------------------------------------------------- one call


def check_call(spec: Mapping, call: Mapping, allowed: Mapping[str, Sequence], offered: Sequence[str] = ()) -> Verdict:
    """One call against one gold call: `spec` (normalised, `actors.tools.normalize_spec`) is the gold function's,
    `allowed` its possible answer {parameter: [acceptable values]}, `offered` the names of every offered function."""
    name = call.get("name") if isinstance(call, Mapping) else None
    if name != spec["name"]:
        code = WRONG_TOOL if name in offered else UNKNOWN_TOOL
        return _fail(code, f"called {name!r}, expected {spec['name']!r}", "simple_function_checker:wrong_func_name",
                     name if isinstance(name, str) else None)  # fmt: skip
    arguments, error = parse_arguments(name, call.get("arguments"))
    if error:
        return Verdict(False, error, "simple_function_checker:unclear")
    allowed = {key: _as_options(options) for key, options in allowed.items()}
    properties = spec["parameters"].get("properties") or {}
    for required in spec["parameters"].get("required") or []:
        if required not in arguments:
            return _fail(MISSING_ARGUMENT, f"missing required parameter {required!r}",
                         "simple_function_checker:missing_required", name, required)  # fmt: skip
    for key, value in arguments.items():
        if key not in properties or key not in allowed:
            return _fail(UNEXPECTED_ARGUMENT, f"unexpected parameter {key!r}",
                         "simple_function_checker:unexpected_param", name, key)  # fmt: skip
        schema = properties[key]
        if isinstance(value, tuple):
            value = list(value)
        if _python_type(schema) is float and type(value) is int:
            value = float(value)  # Python's int-to-float allowance
        type_problem, is_variable = _type_check(value, allowed[key], schema)
        if type_problem:
            return _fail(WRONG_TYPE, f"parameter {key!r} must be of type {schema.get('type', 'any')}, got "
                         f"{type(value).__name__} {value!r}", type_problem, name, key)  # fmt: skip
        value_problem = _value_check(value, allowed[key], schema, is_variable)
        if value_problem:
            # A variable (the gold's own value breaks the declared type) is judged by the gold alone.
            schema_error = None if is_variable else _value_error_code(spec, key, arguments[key])
            code = schema_error.code if schema_error else WRONG_VALUE
            argument = schema_error.argument if schema_error else key
            return _fail(code, f"parameter {key!r}: {value!r} is not among the allowed values {allowed[key]}",
                         value_problem, name, argument)  # fmt: skip
    for key, options in allowed.items():
        if key not in arguments and "" not in options:
            return _fail(MISSING_ARGUMENT, f"parameter {key!r} is needed here (the gold does not mark it optional)",
                         "simple_function_checker:missing_optional", name, key)  # fmt: skip
    return VALID


# ---------------------------------------------------------------------------------------------------- one question


def _gold_spec(specs: Sequence[Mapping], name: str) -> Mapping:
    for spec in specs:
        if spec["name"] == name:
            return spec
    offered = [spec["name"] for spec in specs]
    raise ToolDataError(f"the gold calls {name!r}, which is not among the offered functions {offered}")


def _gold_entry(entry: Mapping) -> tuple[str, Mapping]:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise ToolDataError(f"a BFCL gold entry is {{function name: {{parameter: [values]}}}}, got {entry!r}")
    return next(iter(entry.items()))


def maximum_matching(passes: Sequence[Sequence[bool]]) -> dict[int, int]:
    """Row -> column for as many rows as possible, each pair with passes[row][column] (augmenting paths: Kuhn's
    algorithm; BFCL questions have at most a handful of calls)."""
    owner: dict[int, int] = {}  # column -> row

    def assign(row: int, seen: set[int]) -> bool:
        for column, ok in enumerate(passes[row]):
            if ok and column not in seen:
                seen.add(column)
                if column not in owner or assign(owner[column], seen):
                    owner[column] = row
                    return True
        return False

    for row in range(len(passes)):
        assign(row, set())
    return {row: column for column, row in owner.items()}


def check_calls(specs: Sequence[Mapping], calls: Sequence[Mapping], ground_truth: Sequence[Mapping],
                category: str) -> Verdict:  # fmt: skip
    """A question's verdict: `calls` ({"name", "arguments"}) against BFCL's `ground_truth` ([{name: allowed}]) with
    the checker of `category`. `specs` are the offered functions (normalised, as `load_bfcl` gives them)."""
    kind = checker_kind(category)
    if kind == "irrelevance":
        if not calls:
            return VALID
        names = [c.get("name") if isinstance(c, Mapping) else None for c in calls]
        return _fail(EXTRA_CALL, f"no call was expected, got {len(calls)}: {names}", "irrelevance:function_called")
    if len(calls) != len(ground_truth):
        code = MISSING_CALL if len(calls) < len(ground_truth) else EXTRA_CALL
        message = f"expected {len(ground_truth)} call(s), got {len(calls)}"
        return _fail(code, message, f"{kind}_function_checker:wrong_count")
    offered = [spec["name"] for spec in specs]
    gold = [(_gold_spec(specs, name), allowed) for name, allowed in map(_gold_entry, ground_truth)]
    if kind != "parallel":
        return check_call(gold[0][0], calls[0], gold[0][1], offered)
    passes = [[check_call(spec, call, allowed, offered).valid for call in calls] for spec, allowed in gold]
    matched = maximum_matching(passes)  # gold index -> call index
    if len(matched) == len(gold):
        return VALID
    left_calls = [i for i in range(len(calls)) if i not in matched.values()]
    left_gold = [i for i in range(len(gold)) if i not in matched]
    spec, allowed = gold[left_gold[0]]
    verdict = check_call(spec, calls[left_calls[0]], allowed, offered)
    label = f"parallel_function_checker_no_order:cannot_find_match ({verdict.bfcl_error_type})"
    return Verdict(False, verdict.error, label)


def gold_calls(example: ToolExample) -> list[dict]:
    """Calls that pass BFCL's check of this example: `load_bfcl`'s concrete gold (`bfcl_concrete`: the first
    acceptable value of each argument), with two BFCL-specific repairs:

    - an optional argument ("" allowed) that the function does not declare is left out (BFCL rejects any undeclared
      argument, and a few golds list one);
    - an argument whose only acceptable value is null is given as null (`bfcl_concrete` drops null, which is right
      for schema validation, but BFCL wants the argument present).
    """
    calls = []
    for call, entry in zip(example.calls, example.allowed or [], strict=True):
        name, allowed = _gold_entry(entry)
        declared = _gold_spec(example.tools, name)["parameters"].get("properties") or {}
        arguments = dict(call["arguments"])
        for key, options in allowed.items():
            if key not in declared and "" in options:
                arguments.pop(key, None)
            elif key not in arguments and "" not in options:
                arguments[key] = None
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


def gold_defects(example: ToolExample) -> list[str]:
    """Why no call can pass this example under BFCL's rules (empty for a sound gold): the gold requires an argument
    the function does not declare, or allows a required argument only to be omitted. BFCL counts such questions
    as failed for every model; the gold self-check names them instead of hiding them."""
    defects = []
    for entry in example.allowed or []:
        name, allowed = _gold_entry(entry)
        parameters = _gold_spec(example.tools, name)["parameters"]
        declared = parameters.get("properties") or {}
        defects += [f"{name}: the gold requires {key!r}, which the function does not declare"
                    for key, options in allowed.items() if key not in declared and "" not in options]  # fmt: skip
        omitted_only = [key for key in parameters.get("required") or [] if all(o == "" for o in allowed.get(key, [""]))]
        defects += [f"{name}: the gold leaves out required parameter {key!r}" for key in omitted_only]
    return defects


# ---------------------------------------------------------------------------------------------------- model text


def as_call(item: object) -> dict:
    """{"name", "arguments"} from our form, OpenAI's ({"function": {...}}) or BFCL's ({name: arguments})."""
    if isinstance(item, Mapping) and isinstance(item.get("function"), Mapping) and "name" not in item:
        item = item["function"]
    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
        unknown = sorted(set(item) - {"name", "arguments", "id", "type"})
        if unknown:
            raise ValueError(f"a call has unknown key(s) {unknown}")
        return {"name": item["name"], "arguments": item.get("arguments", {})}
    if isinstance(item, Mapping) and len(item) == 1:
        name, arguments = next(iter(item.items()))
        return {"name": str(name), "arguments": arguments}
    raise ValueError(f"not a call: {str(item)[:120]!r}")


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise ValueError("a call's function must be a (dotted) name")


def _python_call(node: ast.expr) -> dict:
    if not isinstance(node, ast.Call):
        raise ValueError("not a call")
    if node.args:
        raise ValueError(f"{_dotted_name(node.func)}: positional arguments (BFCL calls name every argument)")
    return {"name": _dotted_name(node.func), "arguments": {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}}


def parse_model_text(text: str) -> tuple[list[dict], str | None]:
    """(calls, problem) from raw model output; problem is None when the text is well-formed.

    Read, in this order: empty text (no call); our policy's format (JSON call lines closed by `</calls>`, see
    `pipelines.ttpa.parse_calls`); JSON (a call or a list of calls, in any form `as_call` reads); Python call syntax as
    BFCL's prompted models write it, `[f(a=1), pkg.g(b="x")]` (keyword arguments, literal values). A ```` ``` ````
    fence around the text is dropped first.
    """
    text = text.strip()
    fenced = re.fullmatch(r"```[\w-]*\s*(.*?)\s*```", text, re.S)
    text = fenced.group(1) if fenced else text
    if not text:
        return [], None
    if END_TAG in text:
        return parse_calls(text)
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError:
        decoded = None
    else:
        try:
            return [as_call(item) for item in (decoded if isinstance(decoded, list) else [decoded])], None
        except ValueError as error:
            return [], f"JSON, but {error}"
    try:
        node = ast.parse(text, mode="eval").body
        nodes = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
        return [_python_call(n) for n in nodes], None
    except (SyntaxError, ValueError) as error:
        return [], f"neither JSON calls nor Python call syntax ({error})"


# ---------------------------------------------------------------------------------------------------- data


def load_bfcl_file(question_file: str | Path) -> tuple[str, list[ToolExample]]:
    """(category, examples) of one BFCL question file, gold from `possible_answer/<same name>` beside it.

    Irrelevance categories ship no possible answers: their gold is "no call". The loading itself is
    `actors.tools.load_bfcl`'s; it reads `<root>/bfcl/BFCL_v4_<category>.json`, so the file (wherever it lives, and
    whatever its version number) is linked into that layout in a temporary folder.
    """
    path = Path(question_file).resolve()
    category = category_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"{question_file}: no such BFCL question file")
    answers = path.parent / "possible_answer" / path.name
    with tempfile.TemporaryDirectory(prefix="bfcl-") as tmp:
        folder = Path(tmp) / "bfcl"
        (folder / "possible_answer").mkdir(parents=True)
        name = f"BFCL_v4_{category}.json"
        (folder / name).symlink_to(path)
        if answers.is_file():
            (folder / "possible_answer" / name).symlink_to(answers)
        elif checker_kind(category) == "irrelevance":
            rows = [{"id": question_id, "ground_truth": []} for question_id in _question_ids(path)]
            (folder / "possible_answer" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            raise FileNotFoundError(f"{answers}: missing (BFCL keeps a category's gold in possible_answer/ beside it)")
        dataset = load_bfcl(Path(tmp), [category])
    return category, dataset.examples


def _question_ids(path: Path) -> list[str]:
    return [str(need(row, "id", where, (str, int))) for where, row in read_rows(path)]


def question_files(path: str | Path) -> list[Path]:
    """A BFCL question file, or every `BFCL_v<N>_*.json` in a folder (one category each)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("BFCL_v*_*.json") if _FILE_NAME.match(p.name))
        if not files:
            raise FileNotFoundError(f"{path}: no BFCL question files (BFCL_v<N>_<category>.json)")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such BFCL question file or folder")
    return [path]


@dataclass
class Prediction:
    calls: list[dict]
    problem: str | None = None
    """Why the model's text could not be read as calls (None when it could)."""


def read_predictions(path: str | Path) -> dict[str, Prediction]:
    """question id -> Prediction, from the JSON-lines format in the module docstring; a bad row fails with its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions={path}: no such file (or use predictions=gold)")
    predictions: dict[str, Prediction] = {}
    for where, row in read_rows(path):
        if need(row, "id", where) in predictions:
            raise ValueError(f"{where}: question {row['id']!r} appears twice")
        calls, text = row.get("calls"), row.get("text")
        if "result" in row:
            calls, text = (row["result"], None) if isinstance(row["result"], list) else (None, row["result"])
        if isinstance(calls, list):
            try:
                predictions[row["id"]] = Prediction([as_call(c) for c in calls])
            except ValueError as error:
                raise ValueError(f"{where}: 'calls': {error}") from None
        elif isinstance(text, str):
            predictions[row["id"]] = Prediction(*parse_model_text(text))
        else:
            raise ValueError(f"{where}: needs 'calls' (a list) or 'text' (a string)")
    return predictions


# ---------------------------------------------------------------------------------------------------- scoring


@dataclass
class ScoredQuestion:
    id: str
    category: str
    verdict: Verdict
    calls: list[dict] = field(default_factory=list)
    gold_defects: list[str] = field(default_factory=list)
    """Why no answer can pass (`gold_defects`): the question counts as failed, as on BFCL's leaderboard."""

    def to_dict(self) -> dict:
        return {"id": self.id, "category": self.category, **self.verdict.to_dict(), "calls": self.calls,
                "gold_defects": self.gold_defects}  # fmt: skip


def score_question(example: ToolExample, category: str, prediction: Prediction) -> ScoredQuestion:
    """A question's verdict; unreadable text is `malformed`, except on irrelevance, where BFCL counts text that
    holds no call as the right answer (declining is what the question asks for)."""
    if prediction.problem is not None and checker_kind(category) != "irrelevance":
        verdict = _fail(MALFORMED, prediction.problem, "ast_decoder:decoder_failed")
    else:
        verdict = check_calls(example.tools, prediction.calls, example.allowed or [], category)
    return ScoredQuestion(example.id, category, verdict, prediction.calls, gold_defects(example))


def accuracy_rows(scored: Sequence[ScoredQuestion]) -> list[dict]:
    """One row per category, then `all` (every question counted once). `defective gold` counts the questions no
    answer can pass: they stay in `accuracy`, as on BFCL's leaderboard, and are left out of `accuracy (sound gold)`
    (where the gold self-check must reach 1)."""
    groups = {category: [s for s in scored if s.category == category] for category in dict.fromkeys(
        s.category for s in scored)}  # fmt: skip
    if len(groups) > 1:
        groups["all"] = list(scored)
    rows = []
    for category, chosen in groups.items():
        correct = sum(s.verdict.valid for s in chosen)
        sound = [s for s in chosen if not s.gold_defects]
        sound_accuracy = sum(s.verdict.valid for s in sound) / len(sound) if sound else ""
        rows.append({"category": category, "checker": checker_kind(category) if category != "all" else "",
                     "questions": len(chosen), "correct": correct, "accuracy": correct / len(chosen),
                     "defective gold": len(chosen) - len(sound), "accuracy (sound gold)": sound_accuracy})  # fmt: skip
    return rows


def error_rows(scored: Sequence[ScoredQuestion]) -> list[dict]:
    """Error code -> count (and BFCL's labels for it), most frequent first; empty when everything passed."""
    failed = [s.verdict for s in scored if not s.verdict.valid]
    counts = Counter(v.code for v in failed)
    rows = []
    for code, count in counts.most_common():
        labels = Counter(v.bfcl_error_type for v in failed if v.code == code)
        rows.append({"error": code, "count": count, "share of failures": count / len(failed),
                     "BFCL error types": ", ".join(f"{label} ({n})" for label, n in labels.most_common())})  # fmt: skip
    return rows


def predictions_for(examples: Sequence[ToolExample], predictions: Mapping[str, Prediction] | None,
                    known_ids: set[str]) -> list[Prediction]:  # fmt: skip
    """Each example's prediction (the gold calls when `predictions` is None). Rows for ids that are not questions of
    the evaluated files, and questions without a row, are errors: a silent miss would move the accuracy."""
    if predictions is None:
        return [Prediction(gold_calls(e)) for e in examples]
    unknown = sorted(set(predictions) - known_ids)
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} id(s) that are not questions of data.path: {unknown[:5]}")
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s): {missing[:5]}")
    return [predictions[e.id] for e in examples]


def load_and_score(path: str | Path, predictions: Mapping[str, Prediction] | None = None,
                   select: Callable[[list[str]], list[str]] | None = None) -> list[ScoredQuestion]:  # fmt: skip
    """Every question of the BFCL file or folder at `path`, scored against `predictions` (None = the gold calls).
    `select(ids) -> ids` picks which questions of each file to score (e.g. an evenly spaced sample)."""
    return score_groups([load_bfcl_file(file) for file in question_files(path)], predictions, select)


def score_groups(groups: Sequence[tuple[str, Sequence[ToolExample]]], predictions: Mapping[str, Prediction] | None,
                 select: Callable[[list[str]], list[str]] | None = None) -> list[ScoredQuestion]:  # fmt: skip
    """(category, examples) groups, each example with its BFCL-form gold in `allowed`, scored like `load_and_score`
    (the loaders of other datasets, pipelines/toolcall_sets.py, give their examples in this form)."""
    chosen: list[tuple[str, ToolExample]] = []
    known: set[str] = set()
    for category, examples in groups:
        known.update(e.id for e in examples)
        keep = set(select([e.id for e in examples])) if select is not None else None
        chosen += [(category, e) for e in examples if keep is None or e.id in keep]
    found = predictions_for([e for _, e in chosen], predictions, known)
    return [score_question(e, category, p) for (category, e), p in zip(chosen, found, strict=True)]
