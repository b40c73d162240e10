"""Test doubles of the *model only* (never of our own components): scripted policies that emit fixed turns.

They prove an agent's loop logic (parsing, searching, inserting observations, stopping) independently of what a
tiny random model happens to write. Everything around them — tokenizer, retriever, trajectories — is real.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from actors.llm import Completion, Generation


class ScriptedPolicy:
    """Answers each prompt with `next_turn(decoded_context)`, tokenized by the real tokenizer."""

    def __init__(self, tokenizer, next_turn: Callable[[str], str]):
        self.tokenizer, self.next_turn = tokenizer, next_turn
        self.calls = 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling) -> list[Generation]:
        self.calls += 1
        out = []
        for ids in prompts:
            text = self.next_turn(self.tokenizer.decode(list(ids), skip_special_tokens=True))
            tokens = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            stop = next((s for s in sampling.stop if text.endswith(s)), None)
            reason = "stop" if stop else "length"
            completion = Completion(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True),
                                    [0.0] * len(tokens), reason, stop)
            out.append(Generation(list(ids), [completion]))
        return out


def exsearch_oracle(questions: dict[str, dict], cfg) -> Callable[[str], str]:
    """The next ExSearch turn of a gold run, found from the question in the context and the searches made so far."""
    from agents.exsearch import demonstration_turns

    def next_turn(context: str) -> str:
        question = re.search(r"Question: (.*)\n", context).group(1)
        record = questions[question]
        done = context.count(cfg.tag(cfg.search_tag)[1])
        return demonstration_turns(record["decomposition"], record["answers"][0], cfg)[done]

    return next_turn


def shown_passages(context: str, documents: dict[str, dict], documents_tag: str = "documents") -> dict[int, str]:
    """Label -> document id of each passage in the last documents block of `context`, matched on its rendered start."""
    block = context.rsplit(f"<{documents_tag}>", 1)[-1].split(f"</{documents_tag}>", 1)[0]
    by_start = {f"{doc['title']}: {doc['text']}"[:80]: doc_id for doc_id, doc in documents.items()}
    shown = {}
    for line in block.splitlines():
        match = re.match(r"\[(\d+)\] (.*)", line)
        if match and match.group(2)[:80] in by_start:
            shown[int(match.group(1))] = by_start[match.group(2)[:80]]
    return shown


def selector_oracle(questions: dict[str, dict], documents: dict[str, dict], k: int) -> Callable[[str], str]:
    """A DRO selector that ranks the question's supporting passages first (in hop order), then the others by label."""

    def next_turn(context: str) -> str:
        record = questions[re.search(r"Question: (.*)\n", context).group(1)]
        label_of = {doc_id: label for label, doc_id in shown_passages(context, documents).items()}
        gold = [label_of[p] for p in record["supporting_passage_ids"] if p in label_of]
        others = sorted(label for label in label_of.values() if label not in gold)
        return " " + " > ".join(f"[{label}]" for label in (gold + others)[:k]) + "\n"

    return next_turn


def reader_oracle(questions: dict[str, dict], documents: dict[str, dict]) -> Callable[[str], str]:
    """A generator that answers correctly exactly when every supporting passage is among the documents it was shown."""

    def next_turn(context: str) -> str:
        record = questions[re.search(r"Question: (.*)\n", context).group(1)]
        shown = set(shown_passages(context, documents).values())
        answer = record["answers"][0] if set(record["supporting_passage_ids"]) <= shown else "unknown"
        return f"<answer>{answer}</answer>"

    return next_turn


def genground_oracle(questions: dict[str, dict], documents: dict[str, dict], cfg,
                     guess: Callable[[dict], str] = lambda step: "Unknown") -> Callable[[str], str]:
    """The next GenGround turn of a model whose own knowledge is wrong (`guess`) but which grounds faithfully.

    Deduce: the next gold sub-question, with the previous hop's answer replaced by the answer the run *kept* (so an
    unrevised wrong guess propagates), and a direct answer from `guess`. Ground: cite the hop's gold passage if the
    current batch shows it, else say insufficient. Finish with the last kept answer.
    """
    from agents.genground import answer_text, deduction_text, grounding_text

    question_close = cfg.tag(cfg.question_tag)[1]
    ground_open, ground_close = cfg.tag(cfg.grounding_tag)
    guess_open, guess_close = cfg.tag(cfg.guess_tag)

    def kept_answer(context: str) -> str | None:
        """The revised answer of the last hop if it was grounded, else its direct answer."""
        last_hop = context.rsplit(question_close, 1)[-1]
        cited = re.findall(re.escape(ground_open) + r"\[\d+\] (.*?)" + re.escape(ground_close), last_hop)
        if cited:
            return cited[-1]
        guessed = re.findall(re.escape(guess_open) + r"(.*?)" + re.escape(guess_close), last_hop)
        return guessed[-1] if guessed else None

    def next_turn(context: str) -> str:
        record = questions[re.search(r"Question: (.*)\n", context).group(1)]
        steps = record["decomposition"]
        hop = context.count(question_close)
        if context.rstrip().endswith(f"</{cfg.documents_tag}>"):
            shown = shown_passages(context, documents, cfg.documents_tag)
            label_of = {doc_id: label for label, doc_id in shown.items()}
            step = steps[hop - 1]
            label = label_of.get(step["passage_id"])
            return grounding_text(label, step["answer"], cfg)
        if hop == len(steps):
            return answer_text(kept_answer(context), cfg)
        question = steps[hop]["question"]
        if hop > 0:
            question = question.replace(steps[hop - 1]["answer"], kept_answer(context))
        return deduction_text(question, guess(steps[hop]), cfg)

    return next_turn


class TeacherForcedPolicy:
    """A scripted model whose probabilities are a real engine's: where `next_turn` returns text, that turn is written
    and its logprobs come from the engine's `score`; where it returns None, the engine samples the turn itself.

    It lets real-engine tests reach states a random tiny model would not (a turn after retrieved documents) while
    every logprob in the trajectory is still the real model's.
    """

    def __init__(self, engine, tokenizer, next_turn: Callable[[str], str | None]):
        self.engine, self.tokenizer, self.next_turn = engine, tokenizer, next_turn
        self.calls = 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling) -> list[Generation]:
        self.calls += 1
        texts = [self.next_turn(self.tokenizer.decode(list(ids), skip_special_tokens=True)) for ids in prompts]
        free = [i for i, text in enumerate(texts) if text is None]
        sampled = iter(self.engine.generate([prompts[i] for i in free], sampling) if free else [])
        forced = [(i, list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
                  for i, text in enumerate(texts) if text is not None]
        scores = iter(self.engine.score([(list(prompts[i]), tokens) for i, tokens in forced]) if forced else [])
        forced_ids = dict(forced)
        out = []
        for i, (ids, text) in enumerate(zip(prompts, texts, strict=True)):
            if text is None:
                out.append(next(sampled))
                continue
            tokens = forced_ids[i]
            stop = next((s for s in sampling.stop if text.endswith(s)), None)
            completion = Completion(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), next(scores),
                                    "stop" if stop else "length", stop)
            out.append(Generation(list(ids), [completion]))
        return out


# ---------------------------------------------------------------------------------------------------- tool agents

ROLE_BANNER = re.compile(r"\[([\w-]+)\] Task: (.*)\n")


def role_and_task(context: str, tasks: dict[str, dict]) -> tuple[str, dict]:
    """Which tool-agent role a context belongs to (its `[role] Task: ...` banner) and the task it works on."""
    match = ROLE_BANNER.search(context)
    return match.group(1), tasks[match.group(2)]


def last_instruction(context: str) -> str:
    return re.findall(r"\nInstruction: (.*)\n", context)[-1]


def conagents_oracle(tasks: dict[str, dict], program: Callable[[dict, int, str], str] | None = None,
                     execution: Callable[[dict, str], str | None] | None = None) -> Callable[[str], str]:
    """A ConAgents policy (all three roles) that plans the task's gold calls, writes each as told, relays each result.

    Grounding plans the next gold call as "tool: <its arguments as JSON>" and answers with the last result it was
    given; execution writes the call from the last instruction (so the arguments reach the sandbox only through the
    grounding agent's words); observing copies a short response, and for a large one writes `program(task, step,
    context)`. `execution(task, context)` may override an execution turn (None: the faithful call). Queries identify
    the tasks.
    """
    from agents.toolcall import render_calls

    def next_turn(context: str) -> str:
        role, task = role_and_task(context, tasks)
        gold = task["gold_calls"]
        if role == "grounding":
            step = context.count("</ground>")
            if step < len(gold):
                return f"<ground>{gold[step]['name']}: {json.dumps(gold[step]['arguments'])}</ground>"
            return f"<answer>{re.findall(r'Result: (.*)', context)[-1]}</answer>"
        if role == "execution":
            override = execution(task, context) if execution else None
            if override is not None:
                return override
            tool = re.findall(r"\nTool: (\w+)", context)[-1]
            return render_calls([{"name": tool, "arguments": json.loads(last_instruction(context))}])
        step = context.count("\nInstruction: ") - 1
        shown = context.rsplit("\nInstruction: ", 1)[-1]
        short = re.search(r"\nResponse: (.*)\n", shown)
        if short and "characters of {" not in short.group(1):
            return f"<extract>{short.group(1)}</extract>"
        return f"<program>{program(task, step, context)}</program>"

    return next_turn


class FlakyTool:
    """A real tool with injected faults: each distinct argument set fails its first `failures` calls."""

    def __init__(self, function: Callable[..., str], failures: int = 1, message: str = "service unavailable"):
        self.function, self.failures, self.message = function, failures, message
        self.seen: dict[str, int] = {}

    def __call__(self, **arguments) -> str:
        key = json.dumps(arguments, sort_keys=True)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= self.failures:
            raise RuntimeError(f"{self.message} (attempt {self.seen[key]})")
        return self.function(**arguments)


class SyncEngine:
    """A real `LLMEngineCore` behind the synchronous `generate` / `score` an agent calls (no Ray, no double)."""

    def __init__(self, model_path, max_model_len: int = 512):
        import asyncio

        from actors.config import EngineConfig
        from actors.llm import LLMEngineCore

        self.core = LLMEngineCore(model_path, EngineConfig(max_model_len=max_model_len))
        self.tokenizer = self.core.backend.tokenizer
        self._run = asyncio.run

    def generate(self, prompts, sampling):
        return self._run(self.core.generate(prompts, sampling))

    def score(self, pairs):
        return self._run(self.core.score(pairs))


def chain_program(calls: Sequence[dict], output_of: Callable[[dict], str]) -> str:
    """A program chaining `calls` as a model would: an argument that equals an earlier call's output is passed as that
    call's variable (converted to the argument's type), so results flow through the program, not through literals."""
    lines, outputs = [], []
    for index, call in enumerate(calls):
        arguments = []
        for key, value in call["arguments"].items():
            source = next((j for j, out in enumerate(outputs) if not isinstance(value, bool) and out == str(value)), None)
            if source is None:
                arguments.append(f"{key}={value!r}")
            else:
                convert = "int" if isinstance(value, int) else "float" if isinstance(value, float) else ""
                arguments.append(f"{key}={convert}(r{source})" if convert else f"{key}=r{source}")
        lines.append(f"r{index} = {call['name']}({', '.join(arguments)})")
        outputs.append(output_of(call))
    return "\n".join(lines + [f"print(r{len(calls) - 1})"])


def atc_oracle(tasks: dict[str, dict], output_of: Callable[[dict], str],
               revise: Callable[[dict, str], str] | None = None) -> Callable[[str], str]:
    """An ATC programmer: the task's gold calls as one chaining program; after a failure, `revise(task, context)`."""

    def next_turn(context: str) -> str:
        _, task = role_and_task(context, tasks)
        if revise is not None and "\nError: " in context:
            return f"<program>\n{revise(task, context)}\n</program>"
        return f"<program>\n{chain_program(task['gold_calls'], output_of)}\n</program>"

    return next_turn


_PLACEHOLDERS = {"number": 1, "integer": 1, "boolean": True, "array": [], "object": {}}


def prober_oracle(date: str = "2001-02-03") -> Callable[[str], str]:
    """A black-box prober that reads only the answers it is shown: an unexpected argument first (its error lists the
    parameters), then no arguments (each `missing_argument` names a required one), then every listed parameter with a
    placeholder, fixing one typed error at a time (a type, an allowed value, a date format). After a working call it
    varies a number once; it stops (writes no call) when nothing more can be fixed. Asked to chain, it feeds the first
    item of a helper's list-valued example into its placeholder arguments."""
    from ast import literal_eval

    from agents.toolcall import render_calls

    names: dict[str, list[str]] = {}
    state: dict[str, dict] = {}

    def next_turn(context: str) -> str:
        tool = re.search(r"\[prober\] Tool: (\w+)", context).group(1)
        arguments = state.setdefault(tool, {})
        if "\nHelpers:\n" in context:
            example = re.search(r"Examples: (\w+\(.*?\)) -> '\[", context.split("\nHelpers:\n", 1)[1]).group(1)
            fill = "".join(f"arguments[{k!r}] = values[0]\n" for k, v in arguments.items() if v == "?")
            return (f"<program>\nimport json\nvalues = json.loads({example})\narguments = {arguments!r}\n{fill}"
                    f"print({tool}(**arguments))\n</program>")  # fmt: skip
        answers = [json.loads(line) for block in re.findall(r"<results>\n(.*?)\n</results>", context, re.S)
                   for line in block.splitlines()]  # fmt: skip
        if not answers:
            return render_calls([{"name": tool, "arguments": {"probe": 0}}])
        last = answers[-1]
        if "output" in last:
            number = next((k for k, v in arguments.items() if isinstance(v, int) and not isinstance(v, bool)), None)
            if number is None or sum("output" in a for a in answers) > 1:
                return "Nothing more to try."
            arguments[number] += 1
            return render_calls([{"name": tool, "arguments": arguments}])
        error = last["error"]
        code, message, key = error["code"], error["message"], error.get("argument")
        if code == "unexpected_argument":
            names[tool] = literal_eval(re.search(r"expected (\[.*\])", message).group(1))
            arguments.clear()
        elif code == "missing_argument":
            arguments[key] = "?"
        else:
            arguments.update({name: "?" for name in names.get(tool, []) if name not in arguments})
            if code == "wrong_type":
                arguments[key] = _PLACEHOLDERS.get(re.search(r"must be of type (\w+)", message).group(1), "?")
            elif code == "invalid_value" and "one of" in message:
                arguments[key] = literal_eval(re.search(r"one of (\[.*\]), got", message).group(1))[0]
            elif "YYYY-MM-DD" in message:
                arguments[re.search(r"argument '(\w+)'", message).group(1)] = date
            else:
                return "I cannot find values that work."
        return render_calls([{"name": tool, "arguments": arguments}])

    return next_turn


def _coerce(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def rea_oracle(tasks: dict[str, dict], output_of: Callable[[dict], str],
               lesson: Callable[[dict], str] | None = None) -> Callable[[str], str]:
    """A 360°REA policy for the leader and the crew. The leader plans one subtask per gold call, naming an earlier
    result as #n where the call uses it; a crew agent writes the call with #n replaced from its known results, and
    reports the output (or the error); every assessor scores 5 for a result and 1 for an error, with feedback; the
    leader answers with the last result and writes `lesson(task)` (default: the tools in order)."""
    from agents.toolcall import render_calls

    def plan(task: dict) -> str:
        lines, outputs = [], []
        for call in task["gold_calls"]:
            arguments = {k: next((f"#{j + 1}" for j, out in enumerate(outputs) if not isinstance(v, bool)
                                  and out == str(v)), v) for k, v in call["arguments"].items()}  # fmt: skip
            lines.append(f"{len(lines) + 1}. {call['name']} {json.dumps(arguments)}")
            outputs.append(output_of(call))
        return "<plan>\n" + "\n".join(lines) + "\n</plan>"

    def next_turn(context: str) -> str:
        role, task = role_and_task(context, tasks)
        if context.rstrip().endswith("</assess>."):
            shown = context.rsplit("\nAssess ", 1)[-1]
            error = re.search(r'"error":\{"code":"(\w+)"', shown)
            if error:
                return f'<assess>{{"score": 1, "feedback": "the call failed ({error.group(1)}): make it again"}}</assess>'
            return '<assess>{"score": 5, "feedback": "the result answers the subtask"}</assess>'
        if role == "leader":
            if "\nResults: " in context:
                last = re.findall(r"#\d+ = ([^;\n]*)", context.rsplit("\nResults: ", 1)[-1])[-1]
                written = lesson(task) if lesson else "Use " + " then ".join(c["name"] for c in task["gold_calls"])
                return f"<answer>{last}</answer><experience>{written}</experience>"
            return plan(task)
        if context.rstrip().endswith("</report>."):
            block = context.rsplit("<results>\n", 1)[-1].split("\n</results>", 1)[0]
            line = json.loads(block.splitlines()[0])
            return f"<report>{line.get('output', 'error')}</report>"
        subtask = re.findall(r"\nSubtask (\d+): (\w+) (.*)\n|\nRevise subtask (\d+): (\w+) (.*)\n", context)[-1]
        name, arguments = (subtask[1], subtask[2]) if subtask[1] else (subtask[4], subtask[5])
        known = dict(re.findall(r"#(\d+) = ([^;\n]*)", context.rsplit("\nKnown results: ", 1)[-1].split("\n")[0]))
        values = {k: _coerce(known[v[1:]]) if isinstance(v, str) and re.fullmatch(r"#\d+", v) else v
                  for k, v in json.loads(arguments).items()}  # fmt: skip
        return render_calls([{"name": name, "arguments": values}])

    return next_turn


def by_query(tasks: Sequence[dict]) -> dict[str, dict]:
    """Tool tasks by their query: how the doubles above recognise the task in a context."""
    return {t["query"]: t for t in tasks}


def world_sandbox(world, extra_specs: Sequence[dict] = (), **functions):
    """The real in-process sandbox over the world's tools, with tools replaced (fault injection: `lookup=FlakyTool
    (...)`) or added (`extra_specs` with their functions by name), under tight limits for tests."""
    from actors.config import SandboxConfig
    from actors.sandbox import ToolSandboxCore
    from actors.tools import ToolRegistry

    specs = [*world.tools(), *extra_specs]
    implementations = {**world.tool_functions(), **functions}
    limits = SandboxConfig(wall_time_s=5.0, cpu_time_s=2.0, memory_mb=256, tool_timeout_s=5.0)
    return ToolSandboxCore(ToolRegistry.from_functions(specs, implementations), limits)


def tool_outputs(world) -> Callable[[dict], str]:
    """What a gold call returns: the double's knowledge of results (a clean registry, never a fault-injected one)."""
    from actors.tools import ToolRegistry

    registry = ToolRegistry.from_functions(world.tools(), world.tool_functions())
    return lambda call: registry.call(call).output
