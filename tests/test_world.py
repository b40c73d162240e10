"""Tests of the synthetic world: the guarantees later stages rely on without re-checking them.

Training and evaluation trust that every question is answerable from its gold passages, that splits share no
entities, and that gold tool calls really produce the gold answer. A silent break in any of these would show up much
later as mysteriously bad training curves, so each is checked here against the knowledge base itself.
"""

from __future__ import annotations

import re

import pytest

from pipelines.data.world import (
    COMPANY_SUFFIXES,
    SPLITS,
    SYLLABLES,
    WorldConfig,
    build_world,
    format_number,
)

SMALL = dict(
    people_per_split=12, companies_per_split=6, cities_per_split=5, countries=3,
    train_questions=40, dev_questions=10, test_questions=20,
    train_tool_tasks=30, dev_tool_tasks=12, test_tool_tasks=20,
)  # fmt: skip

QUESTION_KEYS = {"id", "split", "question", "answers", "kind", "hops", "decomposition", "supporting_passage_ids",
                 "entity_ids"}  # fmt: skip
DOCUMENT_KEYS = {"id", "title", "text", "entity_id", "is_distractor"}
TOOL_TASK_KEYS = {"id", "split", "query", "tools", "gold_calls", "answer"}
STEP_KEYS = {"question", "answer", "passage_id"}


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig())


@pytest.fixture(scope="module")
def kb(world):
    """Indexes the tests need: entities by id and by name, documents by id."""
    return {
        "by_id": {e["id"]: e for e in world.entities},
        "by_name": {e["name"]: e for e in world.entities},
        "docs": {d["id"]: d for d in world.documents()},
    }


def mentions(text: str, name: str) -> bool:
    """Whole-word occurrence, so "Kalo" is not found inside "Kalonia"."""
    return re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text) is not None


def rendered(kb, entity: dict) -> set[str]:
    """The strings an entity's attribute values appear as in text (related entities by name)."""
    out = set()
    for value in entity["attributes"].values():
        out.add(kb["by_id"][value]["name"] if isinstance(value, str) and value in kb["by_id"] else str(value))
    return out


# -- determinism and config ------------------------------------------------------------------------------------------


def snapshot(w):
    return (w.entities, w.documents(), [w.questions(s) for s in SPLITS], [w.tool_tasks(s) for s in SPLITS])


def test_same_seed_same_world_and_different_seed_differs():
    a, b = build_world(WorldConfig(seed=3, **SMALL)), build_world(WorldConfig(seed=3, **SMALL))
    assert snapshot(a) == snapshot(b)
    assert list(a.texts()) == list(b.texts())
    c = build_world(WorldConfig(seed=4, **SMALL))
    sa, sc = snapshot(a), snapshot(c)
    for part_a, part_c in zip(sa, sc, strict=True):
        assert part_a != part_c  # entities, documents, questions and tool tasks all depend on the seed


def test_entities_do_not_depend_on_question_counts():
    """Separate random streams: asking for more questions must not reshuffle the corpus that indexes were built on."""
    a = build_world(WorldConfig(seed=1, **SMALL))
    b = build_world(WorldConfig(seed=1, **{**SMALL, "train_questions": 7, "test_tool_tasks": 3}))
    assert a.entities == b.entities and a.documents() == b.documents()


def test_sizes_follow_config():
    cfg = WorldConfig(seed=5, distractors_per_entity=2, comparison_fraction=0.25, **SMALL)
    w = build_world(cfg)
    per_split = {"person": cfg.people_per_split, "company": cfg.companies_per_split, "city": cfg.cities_per_split}
    for split in SPLITS:
        for kind, n in per_split.items():
            assert sum(e["type"] == kind and e["split"] == split for e in w.entities) == n
        questions = w.questions(split)
        assert len(questions) == cfg.questions_for(split)
        assert sum(q["kind"] == "comparison" for q in questions) == round(cfg.questions_for(split) * 0.25)
        assert len(w.tool_tasks(split)) == cfg.tool_tasks_for(split)
    assert sum(e["type"] == "country" for e in w.entities) == cfg.countries
    docs = w.documents()
    split_entities = len(SPLITS) * sum(per_split.values())
    assert sum(not d["is_distractor"] for d in docs) == len(w.entities)  # one real passage per entity
    assert sum(d["is_distractor"] for d in docs) == 2 * split_entities


def test_default_sizes(world):
    counts = {s: (len(world.questions(s)), len(world.tool_tasks(s))) for s in SPLITS}
    assert counts == {"train": (1200, 300), "dev": (150, 100), "test": (300, 200)}
    assert len(world.entities) == 3 * (120 + 60 + 30) + 12


def test_ids_are_unique_and_well_formed(world):
    docs = world.documents()
    assert [d["id"] for d in docs] == [f"doc-{i:06d}" for i in range(len(docs))]
    # Ids must not give away which passages are distractors (or which entity comes first): they are interleaved.
    flags = [d["is_distractor"] for d in docs]
    assert flags != sorted(flags) and flags != sorted(flags, reverse=True)
    assert len({e["id"] for e in world.entities}) == len(world.entities)
    for e in world.entities:
        expected = rf"{e['type']}-\d{{4}}" if e["split"] == "shared" else rf"{e['type']}-{e['split']}-\d{{4}}"
        assert re.fullmatch(expected, e["id"]), e["id"]
    for split in SPLITS:
        assert [q["id"] for q in world.questions(split)] == [
            f"q-{split}-{i:05d}" for i in range(len(world.questions(split)))
        ]
        tasks = world.tool_tasks(split)
        assert [t["id"] for t in tasks] == [f"tool-{split}-{i:04d}" for i in range(len(tasks))]


def test_record_keys_are_exact(world):
    assert all(set(d) == DOCUMENT_KEYS for d in world.documents())
    for split in SPLITS:
        for q in world.questions(split):
            assert set(q) == QUESTION_KEYS and q["split"] == split
            assert all(set(step) == STEP_KEYS for step in q["decomposition"])
        for t in world.tool_tasks(split):
            assert set(t) == TOOL_TASK_KEYS and t["split"] == split
            assert all(set(c) == {"name", "arguments"} for c in t["gold_calls"])
    assert all(set(e) == {"id", "type", "name", "split", "attributes"} for e in world.entities)


def test_accessors_return_copies(world):
    world.questions("train")[0]["answers"].append("tampered")
    world.documents()[0]["text"] = "tampered"
    assert "tampered" not in world.questions("train")[0]["answers"]
    assert world.documents()[0]["text"] != "tampered"


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="hops"):
        build_world(WorldConfig(hops=[0], **SMALL))
    with pytest.raises(ValueError, match="people_per_split"):
        build_world(WorldConfig(**{**SMALL, "people_per_split": 1}))
    with pytest.raises(ValueError, match="split"):
        build_world(WorldConfig(**SMALL)).questions("validation")


def test_config_is_a_valid_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(WorldConfig)
    cfg.hops = [1, 2]
    assert omegaconf.OmegaConf.to_object(cfg).hops == [1, 2]
    with pytest.raises(omegaconf.errors.ValidationError):
        cfg.people_per_split = "many"


# -- names -----------------------------------------------------------------------------------------------------------

SYLLABIC = re.compile("(?:" + "|".join(sorted(SYLLABLES, key=len, reverse=True)) + "){2,4}")


def test_names_are_unique_and_built_from_syllables(world):
    names = [e["name"].lower() for e in world.entities]
    assert len(set(names)) == len(names)
    titles = [d["title"].lower() for d in world.documents()]
    assert len(set(titles)) == len(titles)  # look-alikes never reuse a real (or another look-alike's) name
    for e in world.entities:
        words = e["name"].split()
        if e["type"] == "company":
            assert words[-1] in COMPANY_SUFFIXES
            words = words[:-1]
        elif e["type"] == "country":
            words = [re.sub(r"(nia|ia|land)$", "", words[0])]
        assert len(words) == (2 if e["type"] == "person" else 1), e["name"]
        for word in words:
            assert word[0].isupper() and SYLLABIC.fullmatch(word.lower()), e["name"]


# -- split hygiene ---------------------------------------------------------------------------------------------------


def test_questions_use_only_entities_of_their_split(world, kb):
    seen = {}
    any_name_of = {  # one whole-word pattern per split, matching any of its entity names
        s: re.compile(
            r"(?<!\w)(?:" + "|".join(re.escape(e["name"]) for e in world.entities if e["split"] == s) + r")(?!\w)"
        )
        for s in SPLITS
    }
    for split in SPLITS:
        ids = set()
        for q in world.questions(split):
            for eid in q["entity_ids"]:
                assert kb["by_id"][eid]["split"] == split
            ids.update(q["entity_ids"])
            for step in q["decomposition"]:  # every hop passes through an entity of this split
                assert kb["by_id"][kb["docs"][step["passage_id"]]["entity_id"]]["split"] == split
            texts = [q["question"]] + [s["question"] for s in q["decomposition"]]
            for other in SPLITS:
                if other != split:
                    assert not any(any_name_of[other].search(t) for t in texts), q["question"]
        seen[split] = ids
    assert not seen["train"] & seen["dev"] and not seen["train"] & seen["test"] and not seen["dev"] & seen["test"]


def test_tool_tasks_use_only_entities_of_their_split(world, kb):
    seen = {}
    for split in SPLITS:
        named = set()
        for task in world.tool_tasks(split):
            for call in task["gold_calls"]:
                if call["name"] == "lookup":
                    entity = kb["by_name"][call["arguments"]["entity"]]
                    assert entity["split"] == split
                    named.add(entity["id"])
        seen[split] = named
    assert all(seen.values())  # some tasks do use the knowledge base
    assert not seen["train"] & seen["dev"] and not seen["train"] & seen["test"] and not seen["dev"] & seen["test"]


# -- questions -------------------------------------------------------------------------------------------------------


def test_every_question_is_answerable_from_its_passages(world, kb):
    for split in SPLITS:
        for q in world.questions(split):
            assert q["kind"] in ("bridge", "comparison") and q["answers"] and q["question"].endswith("?")
            steps = q["decomposition"]
            for step in steps:
                doc = kb["docs"][step["passage_id"]]
                assert not doc["is_distractor"]
                subject = kb["by_id"][doc["entity_id"]]
                assert mentions(doc["text"], step["answer"]), (step, doc)
                assert mentions(doc["text"], subject["name"]) and mentions(step["question"], subject["name"])
                assert step["answer"] in rendered(kb, subject), (step, subject)  # a real KB fact, not a coincidence
            assert q["supporting_passage_ids"] == list(dict.fromkeys(s["passage_id"] for s in steps))
            if q["kind"] == "bridge":
                assert steps[-1]["answer"] == q["answers"][0]
                assert mentions(q["question"], kb["by_id"][q["entity_ids"][0]]["name"])  # the topic is named
                for prev, step in zip(steps, steps[1:], strict=False):
                    assert mentions(step["question"], prev["answer"])  # the previous answer is substituted


COMPARISON_PICKS = {"earlier": min, "older": min, "first": min, "fewer": min, "later": max, "recently": max,
                    "larger": max}  # fmt: skip


def test_comparison_answers_are_correct(world, kb):
    count = 0
    for split in SPLITS:
        for q in world.questions(split):
            if q["kind"] != "comparison":
                continue
            count += 1
            a, b = (kb["by_id"][i] for i in q["entity_ids"])
            assert a["type"] == b["type"] and q["answers"][0] in (a["name"], b["name"])
            assert mentions(q["question"], a["name"]) and mentions(q["question"], b["name"])
            attr = {"person": "birth_year", "company": "founded_year", "city": "population"}[a["type"]]
            va, vb = a["attributes"][attr], b["attributes"][attr]
            assert va != vb  # no ties
            assert [s["answer"] for s in q["decomposition"]] == [str(va), str(vb)]
            picks = {pick for word, pick in COMPARISON_PICKS.items() if word in q["question"]}
            assert len(picks) == 1, q["question"]
            pick = picks.pop()
            assert q["answers"][0] == (a if pick(va, vb) == va else b)["name"], q
    assert count > 0


def test_hop_counts_match_decompositions_and_config(world):
    for cfg_world, hops in ((world, {2, 3, 4}), (build_world(WorldConfig(hops=[1, 3], **SMALL)), {1, 3})):
        for split in SPLITS:
            bridge = [q for q in cfg_world.questions(split) if q["kind"] == "bridge"]
            assert all(q["hops"] == len(q["decomposition"]) for q in bridge)
            assert {q["hops"] for q in bridge} == hops


def test_bridge_questions_vary(world):
    questions = [q["question"] for q in world.questions("train")]
    assert len(set(questions)) == len(questions)
    # Different relation paths: the relation asked at the first hop is not always the same.
    first_hops = {q["decomposition"][0]["question"].split()[0] for q in world.questions("train")}
    assert len(first_hops) >= 4


# -- documents -------------------------------------------------------------------------------------------------------


def test_distractors_look_alike_but_never_state_facts_about_the_real_entity(world, kb):
    real_names = {e["name"] for e in world.entities}
    distractors = [d for d in world.documents() if d["is_distractor"]]
    assert distractors
    for d in distractors:
        real = kb["by_id"][d["entity_id"]]
        assert d["title"] not in real_names and d["title"] != real["name"]
        assert d["title"].split()[0][:2] == real["name"].split()[0][:2]  # shares its leading syllable
        assert mentions(d["text"], d["title"])
        # The imitated entity may only be named to say it is a different one, never as the subject of a fact.
        rest = re.sub(r"^[^.]*(not to be confused with|is a different \w+ from)[^.]*\.\s*", "", d["text"])
        assert not mentions(rest, real["name"]), d["text"]


def test_every_entity_has_a_passage_stating_all_its_facts(world, kb):
    real = [d for d in world.documents() if not d["is_distractor"]]
    assert sorted(d["entity_id"] for d in real) == sorted(e["id"] for e in world.entities)
    for d in real:
        entity = kb["by_id"][d["entity_id"]]
        assert d["title"] == entity["name"]
        assert all(mentions(d["text"], value) for value in rendered(kb, entity)), d


def test_texts_cover_every_text(world):
    texts = list(world.texts())
    expected = [d["text"] for d in world.documents()]
    for split in SPLITS:
        for q in world.questions(split):
            expected += [q["question"]] + [s["question"] for s in q["decomposition"]]
        expected += [t["query"] for t in world.tool_tasks(split)]
    assert texts == expected


# -- tools -----------------------------------------------------------------------------------------------------------

JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,)}


def check_schema(params: dict) -> None:
    assert params["type"] == "object"
    assert isinstance(params["properties"], dict) and params["properties"]
    assert set(params.get("required", [])) <= set(params["properties"])
    for prop in params["properties"].values():
        assert prop["type"] in JSON_TYPES
        if "enum" in prop:
            assert prop["enum"] and all(isinstance(v, JSON_TYPES[prop["type"]]) for v in prop["enum"])


def check_arguments(params: dict, arguments: dict) -> None:
    assert set(params.get("required", [])) <= set(arguments)
    assert set(arguments) <= set(params["properties"])
    for key, value in arguments.items():
        prop = params["properties"][key]
        assert isinstance(value, JSON_TYPES[prop["type"]]) and not isinstance(value, bool), (key, value)
        if "enum" in prop:
            assert value in prop["enum"]


def test_tool_schemas_are_valid(world):
    specs = world.tools()
    names = [s["name"] for s in specs]
    assert len(set(names)) == len(names)
    assert {"lookup", "calculate", "convert_units", "date_diff", "add_days"} <= set(names)
    assert set(world.tool_functions()) == set(names)
    for spec in specs:
        assert set(spec) == {"name", "description", "parameters"} and spec["description"]
        check_schema(spec["parameters"])


def test_gold_calls_are_valid_grounded_and_produce_the_answer(world):
    specs = {s["name"]: s for s in world.tools()}
    functions = world.tool_functions()
    used_tools, call_counts = set(), set()
    for split in SPLITS:
        for task in world.tool_tasks(split):
            assert set(task["tools"]) <= set(specs)
            results = []
            for call in task["gold_calls"]:
                assert call["name"] in task["tools"]
                params = specs[call["name"]]["parameters"]
                check_arguments(params, call["arguments"])
                for key, value in call["arguments"].items():
                    if "enum" in params["properties"][key]:
                        continue
                    # Solvable in principle: each free value comes from the query or from an earlier tool result.
                    text = value if isinstance(value, str) else format_number(abs(value))
                    assert mentions(task["query"], text) or any(r and r in text for r in results), (task, key)
                results.append(functions[call["name"]](**call["arguments"]))
            assert results[-1] == task["answer"], task
            used_tools.update(c["name"] for c in task["gold_calls"])
            call_counts.add(len(task["gold_calls"]))
    assert used_tools == set(specs)  # every tool is exercised
    assert 1 in call_counts and max(call_counts) >= 3  # single-call and multi-call tasks


def test_tool_functions_compute_correct_values(world, kb):
    f = world.tool_functions()
    assert f["calculate"](operation="divide", a=7, b=2) == "3.5"
    assert f["calculate"](operation="subtract", a=1987, b=1954) == "33"
    assert f["calculate"](operation="multiply", a=12, b=0.5) == "6"
    assert f["convert_units"](value=1, from_unit="mi", to_unit="km") == "1.61"
    assert f["convert_units"](value=10, from_unit="kg", to_unit="lb") == "22.05"
    assert f["date_diff"](start="2020-01-01", end="2020-03-01") == "60"  # leap year
    assert f["date_diff"](start="2020-01-01", end="2020-03-01", unit="weeks") == "8"
    assert f["add_days"](date="2020-02-28", days=1) == "2020-02-29"
    assert f["add_days"](date="2021-01-10", days=-10) == "2020-12-31"
    for entity in world.entities:  # lookup agrees with the knowledge base, by name or id, any case
        for attr, value in entity["attributes"].items():
            expected = kb["by_id"][value]["name"] if attr in ("birthplace", "employer", "founder", "headquarters",
                                                              "country") else str(value)  # fmt: skip
            assert f["lookup"](entity=entity["name"].upper(), attribute=attr) == expected


@pytest.mark.parametrize(
    "name, arguments, message",
    [
        ("lookup", {"entity": "Nobody Atall", "attribute": "birth_year"}, "unknown entity"),
        ("lookup", {"entity": None, "attribute": "founder"}, "must be a string"),
        ("lookup", {"entity": "X", "attribute": "height"}, "must be one of"),
        ("calculate", {"operation": "divide", "a": 1, "b": 0}, "division by zero"),
        ("calculate", {"operation": "add", "a": "1", "b": 2}, "must be a number"),
        ("calculate", {"operation": "add", "a": 1}, "missing"),
        ("calculate", {"operation": "add", "a": 1, "b": 2, "c": 3}, "unexpected"),
        ("convert_units", {"value": 3, "from_unit": "km", "to_unit": "kg"}, "cannot convert"),
        ("date_diff", {"start": "2020-13-01", "end": "2020-01-01"}, "YYYY-MM-DD"),
        ("add_days", {"date": "2020-01-01", "days": 1.5}, "whole number"),
    ],
)
def test_tool_functions_reject_bad_values(world, name, arguments, message):
    with pytest.raises(ValueError, match=message):
        world.tool_functions()[name](**arguments)


def test_lookup_rejects_attribute_of_another_entity_type(world):
    person = next(e for e in world.entities if e["type"] == "person")
    with pytest.raises(ValueError, match="has no attribute 'founder'"):
        world.tool_functions()["lookup"](entity=person["name"], attribute="founder")
