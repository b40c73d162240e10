"""Answer metrics with SQuAD's normalisation: exact match, token F1, and accuracy (a gold answer contained).

The same three numbers ExSearch, GenGround and FlashRAG report, so figures compare. Each takes one prediction and all
gold answers and returns the best over the golds, as SQuAD's evaluation script does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str | None) -> str:
    """Lower-case, drop punctuation and articles, collapse white space (SQuAD v1.1)."""
    text = (text or "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, golds: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(gold) for gold in golds))


def _f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(predicted) & Counter(expected)
    overlap = sum(common.values())
    if not predicted or not expected:
        return float(predicted == expected)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: Sequence[str]) -> float:
    return max((_f1(prediction or "", gold) for gold in golds), default=0.0)


def accuracy(prediction: str | None, golds: Sequence[str]) -> float:
    """1 when a normalised gold answer occurs inside the normalised prediction (lenient, as in FlashRAG's `acc`)."""
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(gold) and normalize_answer(gold) in predicted for gold in golds))
