"""VQA accuracy for closed-vocabulary single-answer sets (easy-VQA, ShapeWorld): exact match of the
normalised generated answer. (The VQAv2 soft score min(#humans agreeing / 3, 1) needs 10 human answers
per question; these sets have one, so it reduces to exact match.)"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str],
                 qtypes: Sequence[str] | None = None) -> dict[str, float]:
    """``{"accuracy": %, "n": count}`` plus ``"per_type"`` {qtype: %} when types are given."""
    hits = [normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    out: dict = {"accuracy": 100.0 * sum(hits) / max(len(hits), 1), "n": len(hits)}
    if qtypes is not None:
        by = defaultdict(list)
        for h, t in zip(hits, qtypes):
            by[t].append(h)
        out["per_type"] = {t: 100.0 * sum(v) / len(v) for t, v in sorted(by.items())}
    return out
