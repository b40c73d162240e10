"""A seeded, fictional knowledge base: the embedded default data of every ToolSeek job.

Why a synthetic world: agents must learn to *search* and to *call tools*, and that can only be measured when the
answers are not already memorised by the model. Every name here is invented, so a question can be answered only by
retrieving passages or calling tools, and gold evidence (decompositions, supporting passages, gold calls) is known
exactly because we generated it.

Design decisions that later stages rely on:

* Names are glued together from one small syllable inventory (``SYLLABLES``). A tiny language model (and its tiny
  tokenizer) can then copy a name it has never seen, because every piece of it was seen in training.
* People, companies and cities exist per split and relations never cross splits, so a dev/test question can never be
  answered from facts memorised on train questions (no entity leakage). Countries are shared: they are only ever
  answer values, never question topics.
* Every relation is a function (one founder per company, one birthplace per person, ...), so chaining relations
  yields multi-hop questions with exactly one correct answer.
* Distractor passages describe *other* invented entities whose names look like real ones (shared syllables, same
  company stem). They add retrieval noise without ever contradicting a real fact.
* Everything is plain Python and deterministic for a seed: each concern (names, attributes, passages, questions,
  tool tasks) draws from its own string-seeded RNG, so e.g. changing the number of questions does not reshuffle the
  entities or the corpus.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["SPLITS", "SYLLABLES", "WorldConfig", "World", "build_world", "format_number"]

SPLITS = ("train", "dev", "test")

SYLLABLES = (
    "ka", "lo", "ven", "tor", "mi", "sa", "rel", "du", "ra", "ni", "bo", "kel",
    "ta", "mor", "li", "ve", "dra", "sen", "po", "ru", "fa", "gin", "zo", "thal",
)  # fmt: skip
COMPANY_SUFFIXES = ("Systems", "Works", "Labs", "Group", "Industries", "Foods", "Motors", "Textiles")
_VOWELS = set("aeiou")


@dataclass
class WorldConfig:
    """Sizes and seed of the world. Only int/float/list[int] fields so it works as a Hydra structured config."""

    seed: int = 0
    people_per_split: int = 120
    companies_per_split: int = 60
    cities_per_split: int = 30
    countries: int = 12
    """Shared by all splits: countries are only answer values, never question topics."""
    train_questions: int = 1200
    """Enough for the ExSearch demo: 300 demonstration questions, then fresh E-step questions every iteration (more
    questions reuse the same train entities and passages; the dev and test questions do not change)."""
    dev_questions: int = 150
    test_questions: int = 300
    hops: list[int] = field(default_factory=lambda: [2, 3, 4])
    """Hop counts of bridge questions; questions cycle through them so every listed count occurs."""
    comparison_fraction: float = 0.2
    distractors_per_entity: int = 1
    """Look-alike passages per person/company/city: retrieval noise that never contradicts a real fact."""
    train_tool_tasks: int = 300
    dev_tool_tasks: int = 100
    test_tool_tasks: int = 200

    def questions_for(self, split: str) -> int:
        return {"train": self.train_questions, "dev": self.dev_questions, "test": self.test_questions}[split]

    def tool_tasks_for(self, split: str) -> int:
        return {"train": self.train_tool_tasks, "dev": self.dev_tool_tasks, "test": self.test_tool_tasks}[split]


# --------------------------------------------------------------------------------------------------------------------
# Schema of the knowledge base
# --------------------------------------------------------------------------------------------------------------------

# relation -> (subject type, object type or None for a plain value). These are the edges that bridge questions chain.
_RELATIONS: dict[str, tuple[str, str | None]] = {
    "founder": ("company", "person"),
    "headquarters": ("company", "city"),
    "employer": ("person", "company"),
    "birthplace": ("person", "city"),
    "country": ("city", "country"),
    "birth_year": ("person", None),
    "founded_year": ("company", None),
    "population": ("city", None),
}
# Every attribute the lookup tool can return, per entity type (a superset of the question relations).
_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "person": ("birthplace", "birth_year", "employer"),
    "company": ("founder", "headquarters", "founded_year"),
    "city": ("country", "population", "elevation_m"),
    "country": ("area_km2",),
}
_ENTITY_VALUED = {"founder", "headquarters", "employer", "birthplace", "country"}
LOOKUP_ATTRIBUTES = tuple(a for attrs in _ATTRIBUTES.values() for a in attrs)

# Units are factors to a base unit per dimension (metre, kilogram).
_UNITS: dict[str, tuple[str, float, str]] = {
    "km": ("length", 1000.0, "kilometres"),
    "m": ("length", 1.0, "metres"),
    "cm": ("length", 0.01, "centimetres"),
    "mi": ("length", 1609.344, "miles"),
    "ft": ("length", 0.3048, "feet"),
    "in": ("length", 0.0254, "inches"),
    "kg": ("mass", 1.0, "kilograms"),
    "g": ("mass", 0.001, "grams"),
    "lb": ("mass", 0.45359237, "pounds"),
    "oz": ("mass", 0.028349523125, "ounces"),
}

# --------------------------------------------------------------------------------------------------------------------
# Text templates. Several per fact so that a model learns the relation, not one fixed sentence.
# --------------------------------------------------------------------------------------------------------------------

_PERSON_BIRTH = (
    "{name} was born in {city} in {year}.",
    "{name} was born in {year} in the city of {city}.",
    "{name}, a native of {city}, was born in {year}.",
)
_PERSON_EMPLOYER = (
    "{name} works for {company}.",
    "{name} is employed by {company}.",
    "{name} is currently an employee of {company}.",
)
_COMPANY_FOUNDING = (
    "{name} was founded by {founder} in {year}.",
    "{founder} founded {name} in {year}.",
    "In {year}, {founder} established {name}.",
)
_COMPANY_HQ = (
    "{name} is headquartered in {city}.",
    "The headquarters of {name} are in {city}.",
    "{name} has its main office in {city}.",
)
_CITY_COUNTRY = (
    "{name} is a city in {country}.",
    "{name} is located in {country}.",
    "The city of {name} lies in {country}.",
)
_CITY_POPULATION = (
    "{name} has a population of {population}.",
    "{name} is home to {population} people.",
    "The population of {name} is {population}.",
)
_CITY_ELEVATION = (
    "{name} lies at an elevation of {elevation} metres.",
    "{name} sits {elevation} metres above sea level.",
)
_COUNTRY_AREA = (
    "{name} is a country with an area of {area} square kilometres.",
    "{name} is a country covering {area} square kilometres.",
)
_DISTRACTOR_LEAD = (
    "{name} is not to be confused with {real}.",
    "{name} is a different {kind} from {real}.",
)

# Single-hop questions; also the outermost clause of multi-hop questions, with {x} a nested noun phrase.
_ASK = {
    "founder": ("Who founded {x}?", "Who is the founder of {x}?"),
    "headquarters": ("Where is {x} headquartered?", "In which city is {x} headquartered?"),
    "employer": ("Which company does {x} work for?", "Which company employs {x}?"),
    "birthplace": ("Where was {x} born?", "In which city was {x} born?"),
    "country": ("In which country is {x}?", "Which country is {x} located in?"),
    "birth_year": ("When was {x} born?", "In what year was {x} born?"),
    "founded_year": ("When was {x} founded?", "In what year was {x} founded?"),
    "population": ("What is the population of {x}?", "How many people live in {x}?"),
    "elevation_m": ("What is the elevation of {x} in metres?", "How many metres above sea level is {x}?"),
}
# Nested noun phrases for inner hops; the first form is preferred so long chains stay readable.
_NOUN_PHRASE = {
    "founder": ("the founder of {x}", "the person who founded {x}"),
    "headquarters": ("the headquarters city of {x}", "the city where {x} is headquartered"),
    "employer": ("the employer of {x}", "the company that employs {x}"),
    "birthplace": ("the birthplace of {x}", "the city where {x} was born"),
}
# "country of the birthplace of X" reads better as "In which country was X born?" (same two hops).
_ASK_COUNTRY_VIA = {
    "birthplace": ("In which country was {x} born?", "What country was {x} born in?"),
    "headquarters": ("In which country is {x} headquartered?", "In what country does {x} have its headquarters?"),
}
# Comparison questions: (entity type, attribute, [(template, pick)]), pick = min or max of the attribute.
_COMPARISONS = (
    ("person", "birth_year", (("Who was born earlier, {a} or {b}?", min), ("Who is older, {a} or {b}?", min),
                              ("Who was born later, {a} or {b}?", max))),
    ("company", "founded_year", (("Which company was founded first, {a} or {b}?", min),
                                 ("Which company is older, {a} or {b}?", min),
                                 ("Which company was founded more recently, {a} or {b}?", max))),
    ("city", "population", (("Which city has the larger population, {a} or {b}?", max),
                            ("Which city has fewer inhabitants, {a} or {b}?", min))),
)  # fmt: skip


def _rng(seed: int, *tags: object) -> random.Random:
    """One independent, reproducible stream per concern (string seeds hash deterministically across runs)."""
    return random.Random(":".join([str(seed), *map(str, tags)]))


def format_number(value: float) -> str:
    """The one way numbers are written in tool results and gold answers, so exact-match scoring is meaningful.

    Integral values print without a decimal point; others are rounded to 2 decimals without trailing zeros.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"result is not a finite number: {value!r}")
    rounded = round(value, 2)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.2f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------------


def _word(sylls: list[str]) -> str:
    return "".join(sylls).capitalize()


class _Namer:
    """Hands out globally unique names built only from SYLLABLES.

    Words of places, companies and countries are exclusive (used once, never inside a person's name) so that a
    name string in a passage or question refers to exactly one thing. Person name parts may repeat across people,
    but full names never do.
    """

    _MAX_TRIES = 20000

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.exclusive: set[str] = set()  # place/company/country words
        self.person_words: set[str] = set()
        self.names: set[str] = set()  # every full name, lower-cased

    def _sylls(self, lo: int, hi: int) -> list[str]:
        return [self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(lo, hi))]

    def _free_word(self, word: str) -> bool:
        return word not in self.exclusive and word not in self.person_words

    def _claim(self, name: str) -> None:
        self.names.add(name.lower())

    def _exhausted(self, what: str) -> RuntimeError:
        return RuntimeError(f"ran out of unique {what} names; reduce the world sizes")

    def exclusive_word(self, lo: int = 2, hi: int = 3) -> list[str]:
        for _ in range(self._MAX_TRIES):
            sylls = self._sylls(lo, hi)
            word = _word(sylls)
            if self._free_word(word) and word.lower() not in self.names:
                self.exclusive.add(word)
                return sylls
        raise self._exhausted("place")

    def country(self) -> str:
        for _ in range(self._MAX_TRIES):
            sylls = self._sylls(2, 2)
            base = _word(sylls)
            if self.rng.random() < 0.6:
                name = base + ("nia" if base[-1] in _VOWELS else "ia")
            else:
                name = base + "land"
            if self._free_word(base) and self._free_word(name) and name.lower() not in self.names:
                self.exclusive.update((base, name))  # the stem too: "Kalo" must not also be a city
                self._claim(name)
                return name
        raise self._exhausted("country")

    def city(self) -> tuple[str, list[str]]:
        sylls = self.exclusive_word(2, 3)
        name = _word(sylls)
        self._claim(name)
        return name, sylls

    def company(self) -> tuple[str, list[str], str]:
        sylls = self.exclusive_word(2, 2)
        suffix = self.rng.choice(COMPANY_SUFFIXES)
        name = f"{_word(sylls)} {suffix}"
        self._claim(name)
        return name, sylls, suffix

    def person(self) -> tuple[str, list[str], list[str]]:
        for _ in range(self._MAX_TRIES):
            first, last = self._sylls(2, 2), self._sylls(2, 3)
            name = f"{_word(first)} {_word(last)}"
            if (
                _word(first) not in self.exclusive
                and _word(last) not in self.exclusive
                and name.lower() not in self.names
            ):
                self.person_words.update((_word(first), _word(last)))
                self._claim(name)
                return name, first, last
        raise self._exhausted("person")

    # -- look-alikes for distractors: same leading syllables, a different ending -------------------------------------

    def _variants(self, sylls: list[str]) -> Iterator[list[str]]:
        """Syllable lists that keep the start of `sylls`: swap the last syllable, then grow by one."""
        others = [s for s in SYLLABLES if s != sylls[-1]]
        self.rng.shuffle(others)
        for s in others:
            yield sylls[:-1] + [s]
        extra = list(SYLLABLES)
        self.rng.shuffle(extra)
        for s in extra:
            yield sylls + [s]

    def person_lookalike(self, first: list[str], last: list[str]) -> str:
        for variant in self._variants(last):
            word = _word(variant)
            name = f"{_word(first)} {word}"
            if word not in self.exclusive and name.lower() not in self.names:
                self.person_words.add(word)
                self._claim(name)
                return name
        raise self._exhausted("look-alike person")

    def city_lookalike(self, sylls: list[str]) -> str:
        for variant in self._variants(sylls):
            name = _word(variant)
            if self._free_word(name) and name.lower() not in self.names:
                self.exclusive.add(name)
                self._claim(name)
                return name
        raise self._exhausted("look-alike city")

    def company_lookalike(self, sylls: list[str], suffix: str) -> str:
        # Same stem with another suffix is the most confusable look-alike ("Dravel Labs" vs "Dravel Systems").
        suffixes = [s for s in COMPANY_SUFFIXES if s != suffix]
        self.rng.shuffle(suffixes)
        for other in suffixes:
            name = f"{_word(sylls)} {other}"
            if name.lower() not in self.names:
                self._claim(name)
                return name
        for variant in self._variants(sylls):
            word = _word(variant)
            name = f"{word} {suffix}"
            if self._free_word(word) and name.lower() not in self.names:
                self.exclusive.add(word)
                self._claim(name)
                return name
        raise self._exhausted("look-alike company")


# --------------------------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------------------------


def _tool_specs() -> list[dict]:
    """OpenAI/BFCL function specs. Descriptions state result formats because the agent only sees these texts."""
    units = list(_UNITS)
    return [
        {
            "name": "lookup",
            "description": (
                "Look up one attribute of a person, company, city or country in the knowledge base. Attributes that "
                "refer to another entity (birthplace, employer, founder, headquarters, country) return that "
                "entity's name; numeric attributes return the number. People have birthplace, birth_year, employer; "
                "companies have founder, headquarters, founded_year; cities have country, population, elevation_m; "
                "countries have area_km2."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "entity": {
                        "type": "string",
                        "description": "The exact name of the entity, e.g. a person's full name.",
                    },
                    "attribute": {
                        "type": "string",
                        "enum": list(LOOKUP_ATTRIBUTES),
                        "description": "The attribute to read.",
                    },
                },
                "required": ["entity", "attribute"],
                "additionalProperties": False,
            },
        },
        {
            "name": "calculate",
            "description": "Apply one arithmetic operation to two numbers: a + b, a - b, a * b or a / b. Results are "
            "rounded to 2 decimals.",
            "parameters": {
                "type": "object",
                "properties": {
                    "operation": {"type": "string", "enum": ["add", "subtract", "multiply", "divide"]},
                    "a": {"type": "number", "description": "The first operand."},
                    "b": {"type": "number", "description": "The second operand."},
                },
                "required": ["operation", "a", "b"],
                "additionalProperties": False,
            },
        },
        {
            "name": "convert_units",
            "description": "Convert a length (km, m, cm, mi, ft, in) or a mass (kg, g, lb, oz) to another unit of the "
            "same kind. Results are rounded to 2 decimals.",
            "parameters": {
                "type": "object",
                "properties": {
                    "value": {"type": "number", "description": "The amount to convert."},
                    "from_unit": {"type": "string", "enum": units},
                    "to_unit": {"type": "string", "enum": units},
                },
                "required": ["value", "from_unit", "to_unit"],
                "additionalProperties": False,
            },
        },
        {
            "name": "date_diff",
            "description": "The time from start to end (negative if end is earlier). Weeks count whole weeks only.",
            "parameters": {
                "type": "object",
                "properties": {
                    "start": {"type": "string", "description": "Start date as YYYY-MM-DD."},
                    "end": {"type": "string", "description": "End date as YYYY-MM-DD."},
                    "unit": {"type": "string", "enum": ["days", "weeks"], "default": "days"},
                },
                "required": ["start", "end"],
                "additionalProperties": False,
            },
        },
        {
            "name": "add_days",
            "description": "The date a number of days after (or, if negative, before) a date, as YYYY-MM-DD.",
            "parameters": {
                "type": "object",
                "properties": {
                    "date": {"type": "string", "description": "A date as YYYY-MM-DD."},
                    "days": {"type": "integer", "description": "Days to add; negative to go back."},
                },
                "required": ["date", "days"],
                "additionalProperties": False,
            },
        },
    ]


def _check_arguments(spec: dict, arguments: dict) -> dict:
    """Validate model-produced arguments against a spec, so a bad call becomes a readable tool error, not a crash."""
    name, params = spec["name"], spec["parameters"]
    if not isinstance(arguments, dict):
        raise ValueError(f"{name}: arguments must be an object, got {type(arguments).__name__}")
    props = params["properties"]
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        raise ValueError(f"{name}: unexpected argument(s) {unknown}; expected {sorted(props)}")
    missing = [k for k in params.get("required", []) if k not in arguments]
    if missing:
        raise ValueError(f"{name}: missing required argument(s) {missing}")
    clean = {}
    for key, prop in props.items():
        if key not in arguments:
            if "default" in prop:
                clean[key] = prop["default"]
            continue
        value = arguments[key]
        kind = prop["type"]
        if kind == "string" and not isinstance(value, str):
            raise ValueError(f"{name}: argument {key!r} must be a string, got {value!r}")
        if kind in ("number", "integer"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: argument {key!r} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: argument {key!r} must be finite, got {value!r}")
            if kind == "integer":
                if value != int(value):
                    raise ValueError(f"{name}: argument {key!r} must be a whole number, got {value!r}")
                value = int(value)
        if "enum" in prop and value not in prop["enum"]:
            raise ValueError(f"{name}: argument {key!r} must be one of {prop['enum']}, got {value!r}")
        clean[key] = value
    return clean


def _parse_date(name: str, key: str, value: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name}: argument {key!r} must be a date as YYYY-MM-DD, got {value!r}") from None


def _calculate(operation: str, a: float, b: float) -> str:
    if operation == "add":
        result = a + b
    elif operation == "subtract":
        result = a - b
    elif operation == "multiply":
        result = a * b
    else:
        if b == 0:
            raise ValueError("calculate: division by zero")
        result = a / b
        if isinstance(a, int) and isinstance(b, int) and a % b == 0:
            result = a // b
    return format_number(result)


def _convert(value: float, from_unit: str, to_unit: str) -> str:
    dim_from, factor_from, _ = _UNITS[from_unit]
    dim_to, factor_to, _ = _UNITS[to_unit]
    if dim_from != dim_to:
        raise ValueError(f"convert_units: cannot convert {dim_from} ({from_unit}) to {dim_to} ({to_unit})")
    return format_number(value * factor_from / factor_to)


def _date_diff(start: str, end: str, unit: str = "days") -> str:
    days = (_parse_date("date_diff", "end", end) - _parse_date("date_diff", "start", start)).days
    return str(days if unit == "days" else int(days / 7))


def _add_days(date: str, days: int) -> str:
    try:
        return (_parse_date("add_days", "date", date) + _dt.timedelta(days=days)).isoformat()
    except OverflowError:
        raise ValueError(f"add_days: {days} days from {date} is outside the calendar") from None


# --------------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------------


class World:
    """The generated knowledge base and everything derived from it. Build it with `build_world`.

    Accessors return copies so a caller that edits a record cannot change what the next caller sees.
    """

    def __init__(self, cfg: WorldConfig):
        _validate(cfg)
        self.cfg = cfg
        self.entities: list[dict] = []
        self._by_id: dict[str, dict] = {}
        self._by_name: dict[str, dict] = {}
        self._sylls: dict[str, tuple] = {}  # naming pieces per entity, for look-alike distractors
        self._documents: list[dict] = []
        self._passage_of: dict[str, str] = {}  # entity id -> id of its (only) real passage
        self._questions: dict[str, list[dict]] = {}
        self._tool_tasks: dict[str, list[dict]] = {}
        self._make_entities()
        self._make_documents()
        for split in SPLITS:
            self._questions[split] = self._make_questions(split)
            self._tool_tasks[split] = self._make_tool_tasks(split)

    # -- public API -------------------------------------------------------------------------------------------------

    def documents(self) -> list[dict]:
        return copy.deepcopy(self._documents)

    def questions(self, split: str) -> list[dict]:
        return copy.deepcopy(self._questions[_check_split(split)])

    def tools(self) -> list[dict]:
        return _tool_specs()

    def tool_functions(self) -> dict[str, Callable[..., str]]:
        """Callables taking the call's arguments as keywords and returning the tool result as a string.

        Bad arguments raise ValueError with a message meant to be shown to the agent as the tool's output.
        """
        impls = {
            "lookup": self._lookup,
            "calculate": _calculate,
            "convert_units": _convert,
            "date_diff": _date_diff,
            "add_days": _add_days,
        }
        specs = {s["name"]: s for s in _tool_specs()}

        def bind(name: str) -> Callable[..., str]:
            def call(**arguments) -> str:
                return impls[name](**_check_arguments(specs[name], arguments))

            call.__name__ = name
            call.__doc__ = specs[name]["description"]
            return call

        return {name: bind(name) for name in impls}

    def tool_tasks(self, split: str) -> list[dict]:
        return copy.deepcopy(self._tool_tasks[_check_split(split)])

    def texts(self) -> Iterator[str]:
        """Every passage, question, sub-question and tool query: the corpus a world-specific tokenizer trains on."""
        for doc in self._documents:
            yield doc["text"]
        for split in SPLITS:
            for q in self._questions[split]:
                yield q["question"]
                for step in q["decomposition"]:
                    yield step["question"]
            for task in self._tool_tasks[split]:
                yield task["query"]

    # -- entities ---------------------------------------------------------------------------------------------------

    def _add(self, kind: str, index: int, split: str, name: str, attributes: dict, sylls: tuple = ()) -> dict:
        eid = f"{kind}-{index:04d}" if split == "shared" else f"{kind}-{split}-{index:04d}"
        entity = {"id": eid, "type": kind, "name": name, "split": split, "attributes": attributes}
        self.entities.append(entity)
        self._by_id[eid] = entity
        self._by_name[name.lower()] = entity
        self._sylls[eid] = sylls
        return entity

    def _make_entities(self) -> None:
        cfg = self.cfg
        namer = _Namer(_rng(cfg.seed, "names"))
        rng = _rng(cfg.seed, "attributes")
        countries = [
            self._add("country", i, "shared", namer.country(), {"area_km2": rng.randint(20, 900) * 1000})
            for i in range(cfg.countries)
        ]
        for split in SPLITS:
            cities = []
            for i in range(cfg.cities_per_split):
                name, sylls = namer.city()
                attrs = {
                    "country": rng.choice(countries)["id"],
                    "population": int(10 ** rng.uniform(3.7, 6.3)),
                    "elevation_m": rng.randint(2, 2500),
                }
                cities.append(self._add("city", i, split, name, attrs, (sylls,)))
            people = []
            for i in range(cfg.people_per_split):
                name, first, last = namer.person()
                attrs = {
                    "birthplace": rng.choice(cities)["id"],
                    "birth_year": rng.randint(1900, 1990),
                    "employer": None,
                }
                people.append(self._add("person", i, split, name, attrs, (first, last)))
            companies = []
            for i in range(cfg.companies_per_split):
                name, sylls, suffix = namer.company()
                founder = rng.choice(people)
                # Founders are adults: the founding year is at least 20 years after the founder's birth.
                earliest = max(1950, founder["attributes"]["birth_year"] + 20)
                attrs = {"founder": founder["id"], "headquarters": rng.choice(cities)["id"],
                         "founded_year": rng.randint(earliest, 2020)}  # fmt: skip
                companies.append(self._add("company", i, split, name, attrs, (sylls, suffix)))
            for person in people:
                person["attributes"]["employer"] = rng.choice(companies)["id"]
        self._namer = namer  # distractor names must stay unique against all real names

    def _name(self, eid: str) -> str:
        return self._by_id[eid]["name"]

    def _of_type(self, split: str, kind: str) -> list[dict]:
        return [e for e in self.entities if e["split"] == split and e["type"] == kind]

    # -- documents --------------------------------------------------------------------------------------------------

    def _passage(self, rng: random.Random, kind: str, name: str, a: dict) -> str:
        """The text stating an entity's facts; `a` holds attribute values with related entities already named."""
        if kind == "person":
            parts = [rng.choice(_PERSON_BIRTH).format(name=name, city=a["birthplace"], year=a["birth_year"]),
                     rng.choice(_PERSON_EMPLOYER).format(name=name, company=a["employer"])]  # fmt: skip
        elif kind == "company":
            parts = [rng.choice(_COMPANY_FOUNDING).format(name=name, founder=a["founder"], year=a["founded_year"]),
                     rng.choice(_COMPANY_HQ).format(name=name, city=a["headquarters"])]  # fmt: skip
        elif kind == "city":
            parts = [rng.choice(_CITY_COUNTRY).format(name=name, country=a["country"]),
                     rng.choice(_CITY_POPULATION).format(name=name, population=a["population"]),
                     rng.choice(_CITY_ELEVATION).format(name=name, elevation=a["elevation_m"])]  # fmt: skip
        else:
            parts = [rng.choice(_COUNTRY_AREA).format(name=name, area=a["area_km2"])]
        return " ".join(parts)

    def _named(self, entity: dict) -> dict:
        return {k: (self._name(v) if k in _ENTITY_VALUED else v) for k, v in entity["attributes"].items()}

    def _lookalike(self, rng: random.Random, entity: dict) -> tuple[str, str]:
        """A distractor (title, text): a new look-alike entity whose facts differ from the real one's.

        The look-alike is a different entity, so its facts cannot contradict the KB; its values are chosen to differ
        from the real entity's so that copying from the wrong passage gives a wrong answer. Half of them also name
        the real entity, so matching the real name alone does not find the right passage.
        """
        kind, split, a = entity["type"], entity["split"], entity["attributes"]

        def other(kind_: str, avoid: str | None) -> str:
            pool = [e for e in self._pools[split][kind_] if e["id"] != avoid] or self._pools[split][kind_]
            return rng.choice(pool)["name"]

        if kind == "person":
            first, last = self._sylls[entity["id"]]
            name = self._namer.person_lookalike(first, last)
            year = rng.choice([y for y in range(1900, 1991) if y != a["birth_year"]])
            facts = {"birthplace": other("city", a["birthplace"]), "birth_year": year,
                     "employer": other("company", a["employer"])}  # fmt: skip
        elif kind == "company":
            sylls, suffix = self._sylls[entity["id"]]
            name = self._namer.company_lookalike(sylls, suffix)
            founder = rng.choice([p for p in self._pools[split]["person"] if p["id"] != a["founder"]]
                                 or self._pools[split]["person"])  # fmt: skip
            earliest = max(1950, founder["attributes"]["birth_year"] + 20)
            years = [y for y in range(earliest, 2021) if y != a["founded_year"]] or [earliest]
            facts = {"founder": founder["name"], "founded_year": rng.choice(years),
                     "headquarters": other("city", a["headquarters"])}  # fmt: skip
        else:  # city
            (sylls,) = self._sylls[entity["id"]]
            name = self._namer.city_lookalike(sylls)
            countries = [c for c in self.entities if c["type"] == "country"]
            country = rng.choice([c for c in countries if c["id"] != a["country"]] or countries)
            facts = {"country": country["name"], "population": int(10 ** rng.uniform(3.7, 6.3)),
                     "elevation_m": rng.randint(2, 2500)}  # fmt: skip
        text = self._passage(rng, kind, name, facts)
        if rng.random() < 0.5:
            text = rng.choice(_DISTRACTOR_LEAD).format(name=name, real=entity["name"], kind=kind) + " " + text
        return name, text

    def _make_documents(self) -> None:
        cfg = self.cfg
        rng = _rng(cfg.seed, "documents")
        self._pools = {s: {k: self._of_type(s, k) for k in ("person", "company", "city")} for s in SPLITS}
        drafts = []  # (title, text, entity id, is_distractor)
        for entity in self.entities:
            drafts.append((entity["name"], self._passage(rng, entity["type"], entity["name"], self._named(entity)),
                           entity["id"], False))  # fmt: skip
        for entity in self.entities:
            if entity["type"] == "country":
                continue  # countries are shared answer values; nothing to confuse them with in questions
            for _ in range(cfg.distractors_per_entity):
                title, text = self._lookalike(rng, entity)
                # entity_id of a distractor names the entity it imitates (useful for hard-negative mining).
                drafts.append((title, text, entity["id"], True))
        # Shuffle before numbering: ids must not reveal which passages are real or what they are about.
        rng.shuffle(drafts)
        for i, (title, text, eid, is_distractor) in enumerate(drafts):
            doc = {"id": f"doc-{i:06d}", "title": title, "text": text, "entity_id": eid, "is_distractor": is_distractor}
            self._documents.append(doc)
            if not is_distractor:
                self._passage_of[eid] = doc["id"]

    # -- questions --------------------------------------------------------------------------------------------------

    def _walk(self, start: dict, path: tuple[str, ...]) -> list[tuple[dict, str, str]] | None:
        """Follow `path` from `start`: (subject entity, relation, answer string) per hop, None if it revisits one.

        Revisiting chains ("the employer of the founder of X" being X) are legal but degenerate, so they are skipped.
        """
        steps, entity, seen = [], start, {start["id"]}
        for rel in path:
            value = entity["attributes"][rel]
            if rel in _ENTITY_VALUED:
                target = self._by_id[value]
                if target["id"] in seen:
                    return None
                seen.add(target["id"])
                steps.append((entity, rel, target["name"]))
                entity = target
            else:
                steps.append((entity, rel, str(value)))
        return steps

    def _bridge_text(self, rng: random.Random, path: tuple[str, ...], start_name: str) -> str:
        """Compose a multi-hop question from its relation path, innermost relation first."""

        def noun_phrase(rels: tuple[str, ...]) -> str:
            x = start_name
            for rel in rels:
                forms = _NOUN_PHRASE[rel]
                x = (forms[0] if rng.random() < 0.7 else forms[1]).format(x=x)
            return x

        if len(path) >= 2 and path[-1] == "country" and path[-2] in _ASK_COUNTRY_VIA and rng.random() < 0.7:
            return rng.choice(_ASK_COUNTRY_VIA[path[-2]]).format(x=noun_phrase(path[:-2]))
        return rng.choice(_ASK[path[-1]]).format(x=noun_phrase(path[:-1]))

    def _step(self, rng: random.Random, subject: dict, rel: str, answer: str) -> dict:
        return {"question": rng.choice(_ASK[rel]).format(x=subject["name"]), "answer": answer,
                "passage_id": self._passage_of[subject["id"]]}  # fmt: skip

    def _bridge(self, rng: random.Random, split: str, start: dict, path: tuple[str, ...]) -> dict:
        steps = self._walk(start, path)
        decomposition = [self._step(rng, subject, rel, answer) for subject, rel, answer in steps]
        answer = steps[-1][2]
        answers = [answer]
        if path[-1] == "population" and len(answer) > 3:
            answers.append(f"{int(answer):,}")  # "48,210" is the same answer
        chain = [start] + [self._by_name[a.lower()] for _, rel, a in steps if rel in _ENTITY_VALUED]
        return {
            "split": split,
            "question": self._bridge_text(rng, path, start["name"]),
            "answers": answers,
            "kind": "bridge",
            "hops": len(path),
            "decomposition": decomposition,
            "supporting_passage_ids": _unique(s["passage_id"] for s in decomposition),
            # Countries are shared across splits and are only answers, so they are not listed as question entities.
            "entity_ids": [e["id"] for e in chain if e["type"] != "country"],
        }

    def _comparison(self, rng: random.Random, split: str, kind: str, attr: str, templates, a: dict, b: dict) -> dict:
        template, pick = rng.choice(templates)
        winner = a if pick(a["attributes"][attr], b["attributes"][attr]) == a["attributes"][attr] else b
        decomposition = [self._step(rng, e, attr, str(e["attributes"][attr])) for e in (a, b)]
        return {
            "split": split,
            "question": template.format(a=a["name"], b=b["name"]),
            "answers": [winner["name"]],
            "kind": "comparison",
            "hops": len(decomposition),
            "decomposition": decomposition,
            "supporting_passage_ids": _unique(s["passage_id"] for s in decomposition),
            "entity_ids": [a["id"], b["id"]],
        }

    def _make_questions(self, split: str) -> list[dict]:
        cfg = self.cfg
        rng = _rng(cfg.seed, "questions", split)
        total = cfg.questions_for(split)
        n_comparison = round(total * cfg.comparison_fraction)
        out = []
        # Bridge: cycle through the hop counts (so each occurs), pick a relation path uniformly (so short-tailed
        # paths are not drowned by the many long ones), then an unused start entity for that path.
        pools: dict[int, dict[tuple, list[dict]]] = {}
        for i in range(total - n_comparison):
            hops = cfg.hops[i % len(cfg.hops)]
            if hops not in pools:
                pools[hops] = self._start_pools(rng, split, hops)
            pool = pools[hops]
            open_paths = [p for p, starts in pool.items() if starts]
            if not open_paths:  # every (start, path) used once: allow repeats, phrased anew
                pools[hops] = pool = self._start_pools(rng, split, hops)
                open_paths = list(pool)
            path = rng.choice(open_paths)
            out.append(self._bridge(rng, split, pool[path].pop(), path))
        # Comparison: two entities of one type whose values differ (no ties), each pair used once if possible.
        kinds = [(k, attr, t, self._pools[split][k]) for k, attr, t in _COMPARISONS]
        kinds = [c for c in kinds if len({e["attributes"][c[1]] for e in c[3]}) >= 2]
        if n_comparison and not kinds:
            raise ValueError(f"split {split!r}: too few entities for comparison questions")
        seen: set[frozenset] = set()
        for _ in range(n_comparison):
            for attempt in range(200):
                kind, attr, templates, members = rng.choice(kinds)
                a, b = rng.sample(members, 2)
                key = frozenset((a["id"], b["id"], attr))
                if a["attributes"][attr] != b["attributes"][attr] and (key not in seen or attempt >= 100):
                    break
            else:
                raise ValueError(f"split {split!r}: could not find a comparison pair without a tie")
            seen.add(key)
            out.append(self._comparison(rng, split, kind, attr, templates, a, b))
        rng.shuffle(out)
        return [{"id": f"q-{split}-{i:05d}", **q} for i, q in enumerate(out)]

    def _start_pools(self, rng: random.Random, split: str, hops: int) -> dict[tuple, list[dict]]:
        pools = {}
        for path in _paths(hops):
            kind = _RELATIONS[path[0]][0]
            starts = [e for e in self._pools[split][kind] if self._walk(e, path) is not None]
            if starts:
                rng.shuffle(starts)
                pools[path] = starts
        if not pools:
            raise ValueError(f"split {split!r}: no {hops}-hop chain without repeated entities; enlarge the world")
        return pools

    # -- tool tasks -------------------------------------------------------------------------------------------------

    def _lookup(self, entity: str, attribute: str) -> str:
        found = self._by_name.get(entity.strip().lower()) or self._by_id.get(entity.strip())
        if found is None:
            raise ValueError(f"lookup: unknown entity {entity!r}")
        if attribute not in found["attributes"]:
            raise ValueError(
                f"lookup: {found['name']} is a {found['type']} and has no attribute {attribute!r}; "
                f"available: {', '.join(_ATTRIBUTES[found['type']])}"
            )
        value = found["attributes"][attribute]
        return self._name(value) if attribute in _ENTITY_VALUED else str(value)

    def _make_tool_tasks(self, split: str) -> list[dict]:
        rng = _rng(self.cfg.seed, "tools", split)
        makers = [
            self._task_lookup, self._task_founder_age, self._task_person_company_gap, self._task_age_difference,
            self._task_population, self._task_elevation_feet, self._task_founding_date,
            _task_convert, _task_calculate, _task_date_diff, _task_add_days,
        ]  # fmt: skip
        offline = makers[-4:]  # need no entities, so they always succeed
        names = [t["name"] for t in _tool_specs()]
        out = []
        for i in range(self.cfg.tool_tasks_for(split)):
            task = makers[i % len(makers)](rng, split) or rng.choice(offline)(rng, split)
            query, calls, answer = task
            needed = _unique(c["name"] for c in calls)
            # Offer one or two unneeded tools as well, so choosing the right tool is part of the task.
            spare = [n for n in names if n not in needed]
            offered = set(needed) | set(rng.sample(spare, min(len(spare), rng.randint(1, 2))))
            out.append({"split": split, "query": query, "tools": [n for n in names if n in offered],
                        "gold_calls": calls, "answer": answer})  # fmt: skip
        rng.shuffle(out)
        return [{"id": f"tool-{split}-{i:04d}", **t} for i, t in enumerate(out)]

    def _task_lookup(self, rng, split):
        kind = rng.choice(["person", "company", "city"])
        entity = rng.choice(self._pools[split][kind])
        attr = rng.choice(_ATTRIBUTES[kind])
        value = entity["attributes"][attr]
        answer = self._name(value) if attr in _ENTITY_VALUED else str(value)
        query = rng.choice(_ASK[attr]).format(x=entity["name"])
        return query, [_call("lookup", entity=entity["name"], attribute=attr)], answer

    def _task_founder_age(self, rng, split):
        company = rng.choice(self._pools[split]["company"])
        founder = self._by_id[company["attributes"]["founder"]]
        born, founded = founder["attributes"]["birth_year"], company["attributes"]["founded_year"]
        c = company["name"]
        query = rng.choice([
            f"How many years after the birth of its founder was {c} founded?",
            f"How many years passed between the birth of the founder of {c} and the founding of {c}?",
        ])  # fmt: skip
        calls = [_call("lookup", entity=c, attribute="founder"),
                 _call("lookup", entity=founder["name"], attribute="birth_year"),
                 _call("lookup", entity=c, attribute="founded_year"),
                 _call("calculate", operation="subtract", a=founded, b=born)]  # fmt: skip
        return query, calls, str(founded - born)

    def _task_person_company_gap(self, rng, split):
        person = rng.choice(self._pools[split]["person"])
        company = rng.choice(self._pools[split]["company"])
        born, founded = person["attributes"]["birth_year"], company["attributes"]["founded_year"]
        if born == founded:
            return None
        p, c = person["name"], company["name"]
        if founded > born:
            query, a, b = f"How many years after {p} was born was {c} founded?", founded, born
        else:
            query, a, b = f"How many years before the birth of {p} was {c} founded?", born, founded
        calls = [_call("lookup", entity=p, attribute="birth_year"),
                 _call("lookup", entity=c, attribute="founded_year"),
                 _call("calculate", operation="subtract", a=a, b=b)]  # fmt: skip
        return query, calls, str(a - b)

    def _task_age_difference(self, rng, split):
        x, y = rng.sample(self._pools[split]["person"], 2)
        if x["attributes"]["birth_year"] == y["attributes"]["birth_year"]:
            return None
        older, younger = sorted((x, y), key=lambda e: e["attributes"]["birth_year"])
        o, yo = older["attributes"]["birth_year"], younger["attributes"]["birth_year"]
        query = rng.choice([f"How many years older is {older['name']} than {younger['name']}?",
                            f"How many years apart were {x['name']} and {y['name']} born?"])  # fmt: skip
        calls = [_call("lookup", entity=x["name"], attribute="birth_year"),
                 _call("lookup", entity=y["name"], attribute="birth_year"),
                 _call("calculate", operation="subtract", a=yo, b=o)]  # fmt: skip
        return query, calls, str(yo - o)

    def _task_population(self, rng, split):
        x, y = rng.sample(self._pools[split]["city"], 2)
        px, py = x["attributes"]["population"], y["attributes"]["population"]
        lookups = [_call("lookup", entity=x["name"], attribute="population"),
                   _call("lookup", entity=y["name"], attribute="population")]  # fmt: skip
        if rng.random() < 0.5 or px == py:
            query = f"What is the combined population of {x['name']} and {y['name']}?"
            return query, lookups + [_call("calculate", operation="add", a=px, b=py)], str(px + py)
        big, small = (x, y) if px > py else (y, x)
        pb, ps = max(px, py), min(px, py)
        query = f"How many more people live in {big['name']} than in {small['name']}?"
        return query, lookups + [_call("calculate", operation="subtract", a=pb, b=ps)], str(pb - ps)

    def _task_elevation_feet(self, rng, split):
        city = rng.choice(self._pools[split]["city"])
        metres = city["attributes"]["elevation_m"]
        to = rng.choice(["ft", "km", "mi"])
        query = f"What is the elevation of {city['name']} in {_UNITS[to][2]}?"
        calls = [_call("lookup", entity=city["name"], attribute="elevation_m"),
                 _call("convert_units", value=metres, from_unit="m", to_unit=to)]  # fmt: skip
        return query, calls, format_number(metres / _UNITS[to][1])

    def _task_founding_date(self, rng, split):
        company = rng.choice(self._pools[split]["company"])
        year = company["attributes"]["founded_year"]
        days = rng.randint(10, 360)
        query = f"What date was {days} days after January 1 of the year {company['name']} was founded?"
        calls = [_call("lookup", entity=company["name"], attribute="founded_year"),
                 _call("add_days", date=f"{year}-01-01", days=days)]  # fmt: skip
        return query, calls, (_dt.date(year, 1, 1) + _dt.timedelta(days=days)).isoformat()


def _call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def _random_date(rng: random.Random) -> _dt.date:
    return _dt.date(1995, 1, 1) + _dt.timedelta(days=rng.randint(0, 35 * 365))


def _task_convert(rng, split):
    dimension = rng.choice(["length", "mass"])
    src, dst = rng.sample([u for u, spec in _UNITS.items() if spec[0] == dimension], 2)
    value = rng.randint(1, 500) if rng.random() < 0.6 else rng.randint(10, 5000) / 10
    v, src_name, dst_name = format_number(value), _UNITS[src][2], _UNITS[dst][2]
    query = rng.choice([f"Convert {v} {src_name} to {dst_name}.", f"How many {dst_name} are in {v} {src_name}?"])
    answer = format_number(value * _UNITS[src][1] / _UNITS[dst][1])
    return query, [_call("convert_units", value=value, from_unit=src, to_unit=dst)], answer


def _task_calculate(rng, split):
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op, word = rng.choice([("add", "plus"), ("subtract", "minus"), ("multiply", "times"), ("divide", "divided by")])
    results = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b}
    query = rng.choice([f"What is {a} {word} {b}?", f"Calculate {a} {word} {b}."])
    return query, [_call("calculate", operation=op, a=a, b=b)], format_number(results[op])


def _task_date_diff(rng, split):
    start = _random_date(rng)
    end = start + _dt.timedelta(days=rng.randint(1, 1500))
    days = (end - start).days
    if rng.random() < 0.6:
        query = f"How many days are there between {start.isoformat()} and {end.isoformat()}?"
        unit, answer = "days", str(days)
    else:
        query = f"How many whole weeks are there between {start.isoformat()} and {end.isoformat()}?"
        unit, answer = "weeks", str(days // 7)
    return query, [_call("date_diff", start=start.isoformat(), end=end.isoformat(), unit=unit)], answer


def _task_add_days(rng, split):
    date, days = _random_date(rng), rng.randint(1, 1000)
    if rng.random() < 0.6:
        query, signed = f"What date is {days} days after {date.isoformat()}?", days
    else:
        query, signed = f"What was the date {days} days before {date.isoformat()}?", -days
    answer = (date + _dt.timedelta(days=signed)).isoformat()
    return query, [_call("add_days", date=date.isoformat(), days=signed)], answer


def _paths(hops: int, kind: str | None = None) -> list[tuple[str, ...]]:
    """All relation paths of `hops` hops that start at a person/company/city (or at `kind`)."""
    if hops == 0:
        return [()]
    out = []
    for rel, (src, dst) in _RELATIONS.items():
        if (kind is None and src == "country") or (kind is not None and src != kind):
            continue
        if hops == 1:
            out.append((rel,))
        elif dst is not None:
            out.extend((rel,) + rest for rest in _paths(hops - 1, dst))
    return out


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def _validate(cfg: WorldConfig) -> None:
    """Fail early, naming the field, on sizes the generator cannot honour."""
    for name in ("people_per_split", "companies_per_split", "cities_per_split", "countries"):
        if getattr(cfg, name) < 2:
            raise ValueError(
                f"world.{name} must be at least 2 (comparisons need two entities), got {getattr(cfg, name)}"
            )
    for name in ("train_questions", "dev_questions", "test_questions", "train_tool_tasks", "dev_tool_tasks",
                 "test_tool_tasks", "distractors_per_entity"):  # fmt: skip
        if getattr(cfg, name) < 0:
            raise ValueError(f"world.{name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.hops or any(h < 1 for h in cfg.hops):
        raise ValueError(f"world.hops must be a non-empty list of positive hop counts, got {list(cfg.hops)}")
    if not 0.0 <= cfg.comparison_fraction <= 1.0:
        raise ValueError(f"world.comparison_fraction must be within [0, 1], got {cfg.comparison_fraction}")


def build_world(cfg: WorldConfig | None = None) -> World:
    """Generate the world for `cfg` (defaults if None). Same config, same world, on any machine."""
    return World(cfg if cfg is not None else WorldConfig())
