"""VLM evaluation protocols on hand-made cases (spec §12.6): CircularEval and can_infer, POPE sampling,
parsing and metrics, MMStar matching and MG/ML, VQA accuracy."""

import pytest

from moevision.eval import (can_infer, circular_copies, circular_eval, mmstar_match, mmstar_score, multimodal_gain,
                            multimodal_leakage, parse_yes_no, parse_yes_no_vlmevalkit, pope_metrics, pope_questions,
                            vqa_accuracy)

OPTS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_circular_copies_remap_answers(n):
    item = {"index": 7, "question": "q", "options": [f"o{i}" for i in range(n)], "answer": "ABCD"[n - 1]}
    copies = circular_copies(item)
    assert [c["index"] for c in copies] == [7 + k * 10 ** 6 for k in range(n)]
    assert all(c["g_index"] == 7 for c in copies) and copies[0]["options"] == item["options"]
    for c in copies:  # the GT letter still points at the GT text, which moved
        assert c["options"]["ABCD".index(c["answer"])] == f"o{n - 1}"
    assert sorted(c["answer"] for c in copies) == sorted("ABCD"[:n])  # every position used once


@pytest.mark.parametrize("pred,expected", [
    ("A", "A"), ("(B)", "B"), ("The answer is C.", "C"), ("**D**", "D"), ("B. blue", "B"),
    ("I think A is a dog and B is a cat", None),  # two letters, no unique option text
    ("A is what I would choose because the colour is obviously very clearly the one we see", None),  # letter early
    ("Cannot determine the answer", "Z"), ("it is green", "C"), ("green or blue", None), ("purple", None),
    ("Failed to obtain answer via API. A", None),
])
def test_can_infer_table(pred, expected):
    assert can_infer(pred, OPTS) == expected


def _items(n=8):
    colours = ["red", "blue", "green", "yellow", "cyan", "white"]
    return [{"index": i, "question": f"what colour is object {i} ?", "truth": colours[i % 6],
             "options": [colours[(i + j) % 6] for j in range(4)] if i % 2 else
             [colours[(i + j + 1) % 6] for j in range(3)] + [colours[i % 6]],
             "answer": "A" if i % 2 else "D"} for i in range(n)]


def test_circular_eval_fails_letter_position_and_passes_content():
    items = _items()
    truth = {it["index"]: it["truth"] for it in items}
    by_letter = circular_eval(items, lambda copies: ["A"] * len(copies))
    assert by_letter["circular"] == 0.0 and by_letter["vanilla"] == 50.0  # half the originals have answer A
    # a model that picks the option whose text is the truth, answering with its letter (or with the text)
    letter = circular_eval(items, lambda cs: ["ABCD"[c["options"].index(truth[c["g_index"]])] for c in cs])
    text = circular_eval(items, lambda cs: [f"it is {truth[c['g_index']]}" for c in cs])
    assert letter["circular"] == text["circular"] == 100.0 and letter["vanilla"] == 100.0
    assert letter["groups"] == len(items)


def test_circular_eval_is_lazy_about_the_judge():
    items = _items(4)
    calls = []

    def judge(prompt):
        calls.append(prompt)
        return "B"

    # copy 0 rule-extracted wrong ("A" where the answer is D) -> 0 without asking the judge for the others
    out = circular_eval(items[:1], lambda cs: ["A"] + ["???"] * (len(cs) - 1), judge=judge)
    assert out["circular"] == 0 and calls == []
    # all unparsed -> the judge is asked, and its letter is used
    out = circular_eval(items[1:2], lambda cs: ["???"] * len(cs), judge=judge)
    assert out["judge_calls"] >= 1 and out["circular"] == 0


def test_pope_sampler_and_splits():
    objs = [["red circle", "blue square", "green cross"], ["red circle", "blue square", "white cross"],
            ["red circle", "cyan square", "green cross"], ["red circle"]]
    vocab = ["red circle", "blue square", "green cross", "white cross", "cyan square", "magenta circle",
             "yellow triangle"]
    for strat in ("random", "popular", "adversarial"):
        qs = pope_questions(objs, vocab, strat, seed=1)
        assert {q["image"] for q in qs} == {0, 1, 2}  # fewer than 3 objects: not probed
        for q in qs:
            assert (q["object"] in objs[q["image"]]) == (q["answer"] == "yes")
            assert q["question"] == f"is there a {q['object']} in the image ?"
        assert pope_questions(objs, vocab, strat, seed=1) == qs
    pop = pope_questions(objs, vocab, "popular")
    # frequencies: red circle 3, blue square 2, green cross 2, white cross 1, cyan square 1, others 0
    assert [q["object"] for q in pop if q["image"] == 0 and q["answer"] == "no"] == \
        ["cyan square", "white cross", "magenta circle"]
    adv = pope_questions(objs, vocab, "adversarial")
    # image 1 (red circle, blue square, white cross): co-occurrence green cross 3, cyan square 1, others 0
    assert [q["object"] for q in adv if q["image"] == 1 and q["answer"] == "no"] == \
        ["green cross", "cyan square", "magenta circle"]


@pytest.mark.parametrize("text,ref,vlmeval", [
    ("No, there is not.", "no", "no"), ("Yes.", "yes", "yes"), ("There is no cat", "no", "no"),
    ("I do not see a cat", "no", "unknown"), ("yes", "yes", "yes"), ("Yes, but no.", "no", "unknown"),
])
def test_pope_parsers(text, ref, vlmeval):
    assert parse_yes_no(text) == ref and parse_yes_no_vlmevalkit(text) == vlmeval


def test_pope_metrics_arithmetic():
    preds = ["yes", "yes", "yes", "no", "no", "yes", "unknown", "no"]
    gts = ["yes", "yes", "no", "yes", "no", "no", "yes", "no"]
    # TP 2, FP 2, FN 2 (one 'no', one unparsed), TN 2 -> acc 50, P 50, R 50, F1 50, yes 4/8
    m = pope_metrics(preds, gts)
    assert m == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0, "n": 8}
    yes_man = pope_metrics(["yes"] * 6, ["yes"] * 3 + ["no"] * 3)
    assert yes_man["yes_ratio"] == 100.0 and yes_man["recall"] == 100.0 and yes_man["precision"] == 50.0
    assert yes_man["f1"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("pred,ans,hit", [
    ("B", "B", True), ("(b) a cat", "B", True), ("Option C", "C", True), ("The answer is D", "D", True),
    ("the answer is", "D", False), ("C", "B", False), ("", "A", False), ("option", "A", False),
])
def test_mmstar_matcher(pred, ans, hit):
    assert mmstar_match(pred, ans) is hit


def test_mmstar_gain_and_leakage():
    assert mmstar_score(["A", "b", "(C)", "D"], ["A", "B", "C", "A"]) == 75.0
    # the official LLaVA-NeXT-34B example: S_v 52.1, S_wv 22.7, LLM base S_t 20.3 -> MG 29.4, ML 2.4
    assert multimodal_gain(52.1, 22.7) == pytest.approx(29.4)
    assert multimodal_leakage(22.7, 20.3) == pytest.approx(2.4)
    assert multimodal_leakage(18.0, 20.3) == 0.0  # clamped


def test_vqa_accuracy_per_type():
    out = vqa_accuracy(["Circle", "red ", "yes", "no"], ["circle", "red", "no", "no"], ["shape", "colour", "yn", "yn"])
    assert out["accuracy"] == 75.0 and out["per_type"] == {"colour": 100.0, "shape": 100.0, "yn": 50.0}
