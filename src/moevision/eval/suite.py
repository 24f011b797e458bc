"""The evaluation suite of a VLM run: easy-VQA accuracy, ShapeWorld probes (per question type, POPE
random/popular/adversarial, CircularEval on the colour MCQs, MMStar-style MG/ML with and without the
image and with the LLM base) and the expert load of image vs text tokens in every MoE layer."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.easy_vqa import COLORS, SHAPES
from ..data.shapeworld import OBJECTS, ShapeWorld, mcq_prompt
from .mcq import circular_eval, mmstar_score, multimodal_gain, multimodal_leakage
from .pope import STRATEGIES, parse_yes_no, pope_metrics, pope_questions
from .vqa import vqa_accuracy


def _answer_kind(a: str) -> str:
    return "shape" if a in SHAPES else "colour" if a in COLORS else "yes/no"


def answer_all(model, questions: list[str], rows: list[int] | None, feats: torch.Tensor | None, *, bs: int,
               max_new_tokens: int, progress: bool = False, desc: str = "answer") -> list[str]:
    """Greedy answers; ``feats`` (I, Ni, Dv) cached image features indexed by ``rows``; None = text only."""
    out: list[str] = []
    dev = model.lm_head.weight.device
    for i in tqdm(range(0, len(questions), bs), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        f = None if feats is None else feats[torch.as_tensor(rows[i:i + bs])].to(dev)
        out += model.answer(questions[i:i + bs], image_feats=f, max_new_tokens=max_new_tokens)
    return out


@torch.no_grad()
def modality_load(model, sets, feats, *, bs: int, limit: int = 2000) -> list[dict[str, Any]]:
    """Teacher-forced pass over up to ``limit`` samples of each set; per MoE layer the share of the image
    tokens' (and the text tokens') kept assignments that each expert receives, their total-variation
    distance (0: same experts, 1: disjoint) and the dropped fraction."""
    from ..train.vlm import collate

    if not model.moe_layers:
        return []
    model.eval()
    dev = model.lm_head.weight.device
    acc = [torch.zeros(2, model.config.num_experts) for _ in model.moe_layers]
    dropped = [0.0] * len(model.moe_layers)
    n = 0
    for s, f in zip(sets, feats):
        idx = list(range(min(limit, len(s))))
        for i in range(0, len(idx), bs):
            tokens, lengths, _, rows = collate(s, idx[i:i + bs], model.tokenizer.pad_id)
            out = model(tokens.to(dev), lengths.to(dev), image_feats=f[rows].to(dev))
            for j, (ld, st) in enumerate(zip(out.modality_load, out.routing)):
                acc[j] += ld.cpu()
                dropped[j] += float(st.dropped_fraction)
            n += 1
    rows = []
    for j, layer in enumerate(model.moe_layers):
        img = acc[j][0] / acc[j][0].sum().clamp_min(1)
        txt = acc[j][1] / acc[j][1].sum().clamp_min(1)
        rows.append({"layer": layer, "image": [round(float(x), 4) for x in img],
                     "text": [round(float(x), 4) for x in txt], "tv_distance": round(0.5 * float((img - txt).abs().sum()), 4),
                     "dropped_fraction": round(dropped[j] / max(n, 1), 5)})
    return rows


def evaluate_vlm(model, data, cfg, *, base_lm=None, progress: bool = False) -> dict[str, Any]:
    from ..train.vlm import image_features, qa_samples

    model.eval()
    bs, mnt, ec = cfg.data.eval_batch_size, cfg.eval.max_new_tokens, cfg.eval
    res: dict[str, Any] = {}
    load_sets, load_feats = [], []
    if data.ev_test is not None:
        t = data.ev_test
        feats = image_features(model, t.images)
        preds = answer_all(model, t.questions, t.image_index.tolist(), feats, bs=bs, max_new_tokens=mnt,
                           progress=progress, desc="easy-VQA test")
        res["easy_vqa"] = vqa_accuracy(preds, t.answers, [_answer_kind(a) for a in t.answers])
        load_sets.append(qa_samples(model.tokenizer, t.images, t.questions, t.answers, t.image_index))
        load_feats.append(feats)
    sw = data.sw_eval
    if sw is not None and len(sw):
        feats = image_features(model, sw.images)
        preds = answer_all(model, sw.questions, sw.image_index.tolist(), feats, bs=bs, max_new_tokens=mnt,
                           progress=progress, desc="ShapeWorld eval")
        res["shapeworld"] = vqa_accuracy(preds, sw.answers, sw.qtypes)
        load_sets.append(qa_samples(model.tokenizer, sw.images, sw.questions, sw.answers, sw.image_index))
        load_feats.append(feats)
    if ec.pope_images:
        pw = ShapeWorld(cfg.data.shapeworld_seed + 1, image_size=64, min_objects=3, max_objects=4)
        scenes = pw.scenes(ec.pope_images, "pope")
        imgs = torch.stack([(sc["image"] * 255).round().to(torch.uint8) for sc in scenes])
        feats = image_features(model, imgs)
        objs = [[f"{o['colour']} {o['shape']}" for o in sc["objects"]] for sc in scenes]
        res["pope"] = {}
        for strat in STRATEGIES:
            qs = pope_questions(objs, OBJECTS, strat, seed=cfg.data.shapeworld_seed)
            preds = answer_all(model, [q["question"] for q in qs], [q["image"] for q in qs], feats, bs=bs,
                               max_new_tokens=mnt, progress=progress, desc=f"POPE {strat}")
            res["pope"][strat] = pope_metrics([parse_yes_no(p) for p in preds], [q["answer"] for q in qs])
        res["pope_f1_mean"] = sum(v["f1"] for v in res["pope"].values()) / len(STRATEGIES)
    if ec.mcq_items:
        mw = ShapeWorld(cfg.data.shapeworld_seed + 2, image_size=64)
        items, imgs = [], []
        while len(items) < ec.mcq_items:
            sc = mw.scenes(1, "mcq")[0]
            rec = mw.colour_mcq(sc)
            if rec is None:
                continue
            items.append({"index": len(items), "question": rec["stem"], "options": rec["options"],
                          "answer": rec["answer"], "image": len(imgs)})
            imgs.append((sc["image"] * 255).round().to(torch.uint8))
        feats = image_features(model, torch.stack(imgs))

        def predict(copies, m=model, f=feats):
            return answer_all(m, [mcq_prompt(c["question"], c["options"]) for c in copies],
                              [c["image"] for c in copies], f, bs=bs, max_new_tokens=mnt)

        res["mmbench"] = circular_eval(items, predict, seed=cfg.data.shapeworld_seed)
        gts = [it["answer"] for it in items]
        s_v = mmstar_score(predict(items), gts)
        s_wv = mmstar_score(predict(items, f=None), gts)
        s_t = mmstar_score(predict(items, m=base_lm, f=None), gts) if base_lm is not None else float("nan")
        res["mmstar"] = {"s_v": s_v, "s_wv": s_wv, "s_t": s_t, "mg": multimodal_gain(s_v, s_wv),
                         "ml": multimodal_leakage(s_wv, s_t)}
    res["modality_load"] = modality_load(model, load_sets, load_feats, bs=bs)
    return res
