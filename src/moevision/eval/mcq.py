"""Multiple-choice protocols: MMBench CircularEval with VLMEvalKit's rule-based answer extraction
(spec multimodal_compression_systems.md §12.1) and MMStar's matcher, multi-modal gain and leakage (§12.2).

The LLM judge of step 5 is a pluggable callable (prompt -> text); without one, an unparsed answer
falls back to a seeded random letter among the options and 'Z', as VLMEvalKit does after 3 failed tries.
"""

from __future__ import annotations

import random
import re
import string
from typing import Callable, Sequence

FAIL_MSG = "Failed to obtain answer via API."
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
LETTERS = string.ascii_uppercase
JUDGE_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice "
    "question. You are provided with a question, several options, and an answer, and you need to find which "
    "option is most similar to the answer. If the meaning of all options are significantly different from "
    "the answer, output Z. Your should output a single uppercase character in A, B, C, D (if they are valid "
    "options), and Z.\n"
    "Example 1:\nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2:\nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3:\nQuestion: {question}\nOptions: {options}\nAnswer: {prediction}\nYour output: ")


def circular_copies(item: dict) -> list[dict]:
    """Copies k = 0..n-1 of an item ``{index, question, options: [texts], answer: letter, ...}``: copy k
    shows at position j the original option (j + k) mod n, its answer is L[(a - k) mod n], its index
    ``index + k * 10**6`` and ``g_index`` the original index."""
    opts, n = list(item["options"]), len(item["options"])
    a = LETTERS.index(item["answer"])
    out = []
    for k in range(n):
        c = dict(item)
        c.update(options=[opts[(j + k) % n] for j in range(n)], answer=LETTERS[(a - k) % n],
                 index=item["index"] + k * 10 ** 6, g_index=item["index"] % 10 ** 6, copy=k)
        out.append(c)
    return out


def can_infer(pred: str, choices: dict[str, str]) -> str | None:
    """A letter of ``choices`` (or 'Z') extracted from a free-form answer by VLMEvalKit's rules, or None."""
    pred = str(pred)
    if FAIL_MSG in pred:
        return None
    if any(r in pred for r in REFUSALS):
        return "Z"
    # option letter as a whole token, only if it occurs among the last 4 tokens
    cleaned = pred
    for ch in ".()[],:;!*#{}":
        cleaned = cleaned.replace(ch, " ")
    tokens = cleaned.split()
    found = [c for c in choices if c in tokens]
    if len(found) == 1:
        if tokens.index(found[0]) > len(tokens) - 5:
            return found[0]
    elif not found and tokens.count("Z") == 1:
        return "Z"
    # "the answer is X" / "correct answer is **X**"
    m = re.search(r"(correct )?answer is \**([A-D])\**", pred, flags=re.IGNORECASE)
    if m and m.group(2).upper() in choices:
        return m.group(2).upper()
    # option text match
    if len(pred) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    low = pred.lower()
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def _extract(pred: str, item: dict, judge: Callable[[str], str] | None, rng: random.Random, tries: int = 3) -> str:
    choices = {LETTERS[i]: t for i, t in enumerate(item["options"])}
    letter = can_infer(pred, choices)
    if letter is not None:
        return letter
    if judge is not None:
        opts = " ".join(f"{k}. {v}" for k, v in choices.items())
        for _ in range(tries):
            letter = can_infer(judge(JUDGE_PROMPT.format(question=item.get("question", ""), options=opts,
                                                          prediction=pred)), choices)
            if letter is not None:
                return letter
    return rng.choice(list(choices) + ["Z"])


def circular_eval(items: Sequence[dict], predict: Callable[[list[dict]], list[str]], *,
                  judge: Callable[[str], str] | None = None, seed: int = 0, circular: bool = True) -> dict:
    """MMBench scoring. ``predict`` maps a list of items (each with its rotated ``options``) to free-form
    answers. A group scores 1 iff every copy's extracted letter is its GT letter; extraction is lazy
    (a group with a rule-extracted wrong answer scores 0 without calling the judge). Returns
    percentages: ``circular``, ``vanilla`` (copy 0 only), per ``category`` when items have one, and
    ``judge_calls``."""
    rng = random.Random(seed)
    copies = [c for it in items for c in (circular_copies(it) if circular else circular_copies(it)[:1])]
    preds = predict(copies)
    by_group: dict[int, list[tuple[dict, str]]] = {}
    for c, p in zip(copies, preds):
        by_group.setdefault(c["g_index"], []).append((c, p))
    calls = [0]

    def counted(prompt: str) -> str:
        calls[0] += 1
        return judge(prompt)

    hits, vanilla, cats = {}, {}, {}
    for g, members in by_group.items():
        members.sort(key=lambda cp: cp[0]["copy"])
        rule = [can_infer(p, {LETTERS[i]: t for i, t in enumerate(c["options"])}) for c, p in members]
        c0 = members[0][0]
        v0 = rule[0] if rule[0] is not None else _extract(members[0][1], c0, counted if judge else None, rng)
        vanilla[g] = v0 == c0["answer"]
        if any(r is not None and r != c["answer"] for r, (c, _) in zip(rule, members)):
            hits[g] = False
        else:
            ok = True
            for r, (c, p) in zip(rule, members):
                if r is None and _extract(p, c, counted if judge else None, rng) != c["answer"]:
                    ok = False
                    break
            hits[g] = ok
        cats.setdefault(c0.get("category", "all"), []).append(hits[g])
    n = max(len(hits), 1)
    out = {"circular": 100.0 * sum(hits.values()) / n, "vanilla": 100.0 * sum(vanilla.values()) / n,
           "groups": len(hits), "judge_calls": calls[0]}
    if len(cats) > 1 or "all" not in cats:
        out["per_category"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(cats.items())}
    return out


# ---- MMStar --------------------------------------------------------------------------------------
def mmstar_match(prediction: str, answer: str) -> bool:
    """MMStar's official matcher: the first character, or after '(', 'option ' or 'the answer is '."""
    a = answer.lower().strip()
    p = prediction.lower().strip().replace("\n", " ")
    try:
        return (p[0] == a or (p.startswith("(") and p[1] == a) or (p.startswith("option ") and p[7] == a)
                or (p.startswith("the answer is ") and p[14] == a))
    except IndexError:
        return False


def mmstar_score(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Percentage of hits."""
    return 100.0 * sum(mmstar_match(p, a) for p, a in zip(predictions, answers)) / max(len(answers), 1)


def multimodal_gain(s_v: float, s_wv: float) -> float:
    """MG = S_v - S_wv: what the model actually gains from seeing the image."""
    return s_v - s_wv


def multimodal_leakage(s_wv: float, s_t: float) -> float:
    """ML = max(0, S_wv - S_t): text-only skill that multimodal training leaked in (S_t: the LLM base)."""
    return max(0.0, s_wv - s_t)
