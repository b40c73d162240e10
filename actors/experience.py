"""ExperiencePool: 360°REA's dual-level experience, as a Ray actor that agents share and that survives restarts.

Two levels (Gao et al., 2024, "360°REA"): **local** experience belongs to one task — the assessments' feedback to the
crew while that task runs, so a revision can read what was wrong; **global** experience is reusable — the leader's
lesson after a task, offered to later, similar tasks. Both are found by similarity: texts are embedded with the
sentence embedder (MiniLM, `actors/models.load_embedder`) and a query returns the most similar ones (cosine), so a
lesson learned on "Convert 3 miles to metres" reaches "How many feet are in 12 km?".

Scores come from 360° assessments: an experience starts with the score of the work it came from, and every later
task that used it reports its own assessed score, kept as a running mean, so lessons that keep helping rise.

Durability: every change is appended to `experiences.jsonl` (flushed and fsynced) before the call returns, and a new
or restarted actor replays that log, so a crash loses nothing that was acknowledged. A torn last line (a crash
mid-write) is dropped with a warning; damage anywhere else fails loudly, naming the line. Ids are content hashes, so
an add retried by Ray after a restart (`max_task_retries`) is not stored twice. One actor serves every agent; its
calls run one at a time, so concurrent agents never interleave a write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

LEVELS = ("local", "global")
LOG_NAME = "experiences.jsonl"


@dataclass
class ExperienceConfig:
    """Where the pool lives and how it is queried (Hydra group `experience`)."""

    path: str = "experience"
    """Folder of the append-only log; a restarted actor replays it."""
    embedder_path: str | None = None
    """Sentence embedder folder; None = the packaged all-MiniLM-L6-v2."""
    max_seq_length: int = 128
    min_similarity: float = 0.3
    """Queries return only experiences at least this similar (cosine) to the query."""
    num_cpus: float = 0.25
    max_restarts: int = 3
    max_task_retries: int = 2
    """Calls Ray retries on a restarted actor: adds are idempotent (content-hash ids), updates are not replayed
    twice in effect because each carries the assessment it applies."""
    request_timeout_s: float = 120.0


@dataclass
class Experience:
    id: str
    level: str
    """`local` (one task's) or `global` (reusable)."""
    key: str
    """What the experience is about (a task or subtask); what queries are matched against."""
    text: str
    """The lesson or feedback itself, as shown in prompts."""
    score: float
    task_id: str | None = None
    author: str = ""
    updates: int = 1
    """Assessed scores averaged into `score` (its first one included)."""
    applied: list[str] = field(default_factory=list)
    """Ids of the assessments already averaged in (so a retried update is not counted twice)."""

    def public(self, similarity: float | None = None) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "applied"}
        if similarity is not None:
            out["similarity"] = round(float(similarity), 4)
        return out


def experience_id(level: str, key: str, text: str, task_id: str | None, author: str) -> str:
    return hashlib.sha1(json.dumps([level, key, text, task_id, author]).encode()).hexdigest()[:16]


class ExperiencePoolCore:
    """The pool without Ray (`ExperiencePool` is this class as an actor): in-memory items and their embeddings,
    backed by the log."""

    def __init__(self, cfg: ExperienceConfig | Mapping):
        self.cfg = cfg if isinstance(cfg, ExperienceConfig) else ExperienceConfig(**cfg)
        self.folder = Path(self.cfg.path)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / LOG_NAME
        from actors.models import load_embedder

        self.embedder = load_embedder(self.cfg.embedder_path, max_seq_length=self.cfg.max_seq_length)
        self.items: dict[str, Experience] = {}
        self.vectors: dict[str, Any] = {}
        self.replayed = self._replay()

    # ---- durability ---------------------------------------------------------------------------------------------

    def _replay(self) -> int:
        if not self.log_path.exists():
            return 0
        raw = self.log_path.read_bytes()
        lines = raw.split(b"\n")
        events, good_bytes = [], 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                good_bytes += len(line) + 1
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                    log.warning("%s: dropping a torn last line (%d bytes) left by a crash", self.log_path, len(line))
                    with open(self.log_path, "r+b") as handle:
                        handle.truncate(good_bytes)
                    break
                raise RuntimeError(f"{self.log_path}:{number}: not JSON; the experience log is damaged") from None
            good_bytes += len(line) + 1
        if raw and not raw.endswith(b"\n") and self.log_path.stat().st_size == len(raw):
            with open(self.log_path, "ab") as handle:  # a complete last line without its newline: finish it
                handle.write(b"\n")
        for number, event in enumerate(events, 1):
            self._apply(event, f"{self.log_path} event {number}")
        self._embed(list(self.items))
        return len(events)

    def _append(self, event: dict) -> None:
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _apply(self, event: Mapping, where: str) -> None:
        op = event.get("op")
        if op == "add":
            item = Experience(**event["item"])
            self.items.setdefault(item.id, item)
        elif op == "score":
            item = self.items.get(event["id"])
            if item is None:
                raise RuntimeError(f"{where}: score update for unknown experience {event['id']!r}")
            if event["assessment"] not in item.applied:
                item.score = (item.score * item.updates + float(event["score"])) / (item.updates + 1)
                item.updates += 1
                item.applied.append(event["assessment"])
        else:
            raise RuntimeError(f"{where}: unknown operation {op!r}")

    def _embed(self, ids: Sequence[str]) -> None:
        if ids:
            vectors = self.embedder.encode([self.items[i].key for i in ids], normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False)  # fmt: skip
            self.vectors.update(zip(ids, vectors, strict=True))

    # ---- API ------------------------------------------------------------------------------------------------------

    def add(self, items: Iterable[Mapping]) -> list[str]:
        """Store experiences ({level, key, text, score, task_id?, author?}); returns their ids (existing ones kept)."""
        new, ids = [], []
        for index, raw in enumerate(items):
            item = _checked(raw, index)
            ids.append(item.id)
            if item.id not in self.items:
                self._append({"op": "add", "item": asdict(item)})
                self.items[item.id] = item
                new.append(item.id)
        self._embed(new)
        return ids

    def update(self, scores: Mapping[str, float], assessment: str) -> list[dict]:
        """Average one assessment's score into each experience it judged (experience id -> score)."""
        unknown = [i for i in scores if i not in self.items]
        if unknown:
            raise KeyError(f"unknown experience id(s) {unknown}")
        out = []
        for experience, score in scores.items():
            event = {"op": "score", "id": experience, "score": float(score), "assessment": str(assessment)}
            if str(assessment) not in self.items[experience].applied:
                self._append(event)
                self._apply(event, "update")
            out.append(self.items[experience].public())
        return out

    def query(self, texts: Sequence[str], k: int = 3, level: str = "global", task_id: str | None = None,
              exclude_task: str | None = None) -> list[list[dict]]:  # fmt: skip
        """For each text, up to k experiences of `level` (local ones of `task_id` only) by similarity, best first;
        equally similar ones newest first."""
        if level not in LEVELS:
            raise ValueError(f"level={level!r} is not one of {LEVELS}")
        candidates = [i for i, item in reversed(self.items.items()) if item.level == level
                      and (level == "global" or item.task_id == task_id)
                      and (exclude_task is None or item.task_id != exclude_task)]  # fmt: skip
        if not texts:
            return []
        if not candidates:
            return [[] for _ in texts]
        import numpy as np

        queries = self.embedder.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                       show_progress_bar=False)  # fmt: skip
        matrix = np.stack([self.vectors[i] for i in candidates])
        out = []
        for similarities in queries @ matrix.T:
            order = np.argsort(-similarities, kind="stable")[:k]
            out.append([self.items[candidates[j]].public(similarities[j]) for j in order
                        if similarities[j] >= self.cfg.min_similarity])  # fmt: skip
        return out

    def items_of(self, level: str | None = None, task_id: str | None = None) -> list[dict]:
        """Every experience (of a level, of a task), in the order they were added."""
        return [item.public() for item in self.items.values()
                if (level is None or item.level == level) and (task_id is None or item.task_id == task_id)]  # fmt: skip

    def info(self) -> dict:
        counts = {level: sum(item.level == level for item in self.items.values()) for level in LEVELS}
        return {"path": str(self.log_path), "pid": os.getpid(), "counts": counts, "replayed": self.replayed}


def _checked(raw: Mapping, index: int) -> Experience:
    where = f"experience {index}"
    for key in ("level", "key", "text", "score"):
        if key not in raw:
            raise ValueError(f"{where}: missing field {key!r}")
    if raw["level"] not in LEVELS:
        raise ValueError(f"{where}: field 'level' is {raw['level']!r}, not one of {LEVELS}")
    if raw["level"] == "local" and not raw.get("task_id"):
        raise ValueError(f"{where}: a local experience needs a 'task_id'")
    for key in ("key", "text"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    score = raw["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ValueError(f"{where}: field 'score' must be a number, got {score!r}")
    task_id, author = raw.get("task_id"), str(raw.get("author") or "")
    return Experience(experience_id(raw["level"], raw["key"], raw["text"], task_id, author), raw["level"], raw["key"],
                      raw["text"], float(score), task_id, author)  # fmt: skip


ExperiencePool = ray.remote(ExperiencePoolCore)


def start_experience_pool(cfg: ExperienceConfig, name: str | None = None):
    """The pool actor (restarted by Ray on a crash; it replays its log). A `name` lets other jobs find it."""
    options: dict[str, Any] = dict(num_cpus=cfg.num_cpus, max_restarts=cfg.max_restarts,
                                   max_task_retries=cfg.max_task_retries)  # fmt: skip
    if name:
        options.update(name=name, get_if_exists=True)
    return ExperiencePool.options(**options).remote(asdict(cfg))


class ExperienceClient:
    """The actor behind plain method calls with a deadline: what agents hold (the same methods as the core)."""

    def __init__(self, actor, timeout_s: float = 120.0):
        self.actor, self.timeout_s = actor, timeout_s

    def _call(self, method: str, *args, **kwargs):
        try:
            return ray.get(getattr(self.actor, method).remote(*args, **kwargs), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"experience pool: {method} took longer than {self.timeout_s}s") from None

    def add(self, items: Iterable[Mapping]) -> list[str]:
        return self._call("add", list(items))

    def update(self, scores: Mapping[str, float], assessment: str) -> list[dict]:
        return self._call("update", dict(scores), assessment)

    def query(self, texts: Sequence[str], k: int = 3, level: str = "global", task_id: str | None = None,
              exclude_task: str | None = None) -> list[list[dict]]:  # fmt: skip
        return self._call("query", list(texts), k, level, task_id, exclude_task)

    def items_of(self, level: str | None = None, task_id: str | None = None) -> list[dict]:
        return self._call("items_of", level, task_id)

    def info(self) -> dict:
        return self._call("info")
