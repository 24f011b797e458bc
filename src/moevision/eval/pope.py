"""POPE, polling-based object probing for hallucination (spec multimodal_compression_systems.md §12.5).

Per image with >= ``min_objects`` ground-truth objects: ``n_pos`` questions about present objects and
``n_neg`` about absent ones, "is there a {object} in the image ?" (the template lower-cased and
tokenised for the word-level models). Negatives: ``random`` (uniform over absent objects), ``popular``
(most frequent objects of the image set, in frequency order), ``adversarial`` (highest co-occurrence
with the image's objects). Ties are broken by object name so the splits are deterministic.
Metrics per split, positive = yes: accuracy, precision, recall, F1, yes-ratio (percentages).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Sequence

STRATEGIES = ("random", "popular", "adversarial")
TEMPLATE = "is there a {} in the image ?"


def pope_questions(image_objects: Sequence[Sequence[str]], vocabulary: Sequence[str], strategy: str, *,
                   n_pos: int = 3, n_neg: int = 3, min_objects: int = 3, seed: int = 0) -> list[dict]:
    """Records ``{image, object, question, answer}``; ``image`` indexes ``image_objects``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"POPE strategy must be one of {STRATEGIES}, got {strategy!r}")
    rng = random.Random(seed)
    sets = [sorted(set(objs)) for objs in image_objects]
    chosen = [i for i, s in enumerate(sets) if len(s) >= min_objects]
    freq = Counter(o for i in chosen for o in sets[i])
    co: dict[str, Counter] = {}
    for i in chosen:
        for a in sets[i]:
            co.setdefault(a, Counter()).update(b for b in sets[i] if b != a)
    popular = sorted(vocabulary, key=lambda o: (-freq[o], o))
    out = []
    for i in chosen:
        present = sets[i]
        absent = [o for o in vocabulary if o not in present]
        if strategy == "random":
            neg = rng.sample(absent, min(n_neg, len(absent)))
        elif strategy == "popular":
            neg = [o for o in popular if o not in present][:n_neg]
        else:
            score = Counter()
            for a in present:
                score.update(co.get(a, Counter()))
            neg = sorted(absent, key=lambda o: (-score[o], o))[:n_neg]
        pos = rng.sample(present, min(n_pos, len(present)))
        out += [{"image": i, "object": o, "question": TEMPLATE.format(o), "answer": "yes"} for o in pos]
        out += [{"image": i, "object": o, "question": TEMPLATE.format(o), "answer": "no"} for o in neg]
    return out


def parse_yes_no(text: str) -> str:
    """POPE's reference parser: the text before the first '.', commas dropped; 'No', 'not' or 'no'
    among its words -> no, else yes."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def parse_yes_no_vlmevalkit(text: str) -> str:
    """VLMEvalKit's variant: lower-case, punctuation stripped; yes xor no, else 'unknown'."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    y, n = "yes" in words, "no" in words
    return "yes" if y and not n else "no" if n and not y else "unknown"


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio (percent) with yes as the positive class.
    A prediction that is neither yes nor no counts as wrong (and as not-yes)."""
    tp = sum(p == "yes" and a == "yes" for p, a in zip(predictions, answers))
    fp = sum(p == "yes" and a == "no" for p, a in zip(predictions, answers))
    fn = sum(p != "yes" and a == "yes" for p, a in zip(predictions, answers))
    tn = sum(p == "no" and a == "no" for p, a in zip(predictions, answers))
    n = max(len(answers), 1)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"accuracy": 100.0 * (tp + tn) / n, "precision": 100.0 * prec, "recall": 100.0 * rec,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * sum(p == "yes" for p in predictions) / n, "n": len(answers)}
