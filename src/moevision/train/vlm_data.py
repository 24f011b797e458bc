"""The data of a VLM run: easy-VQA and ShapeWorld, tokenised once into the sets each stage trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.easy_vqa import VQASet, captions, image_attributes, load_easy_vqa
from ..data.shapeworld import OBJECTS, ShapeWorld, to_vqa_set
from ..eval.pope import TEMPLATE
from ..models.tokenizer import WordTokenizer
from .vlm import Samples, qa_samples

CAPTION_PROMPT = "describe the image ."


@dataclass
class VLMData:
    tokenizer: WordTokenizer
    ev_train: VQASet | None
    ev_test: VQASet | None
    ev_attrs: tuple[torch.Tensor, torch.Tensor] | None
    sw_train_images: torch.Tensor | None  # (I, 3, H, W) uint8
    sw_cells: torch.Tensor | None  # (I, 16) object class per grid cell, 0 = empty
    sw_eval: VQASet | None
    sw_eval_scenes: list
    sw_world: ShapeWorld
    text_sets: list[Samples]
    caption_sets: list[Samples]
    vqa_sets: list[Samples]


def cell_labels(scenes: list[dict]) -> torch.Tensor:
    out = torch.zeros(len(scenes), 16, dtype=torch.long)
    for i, sc in enumerate(scenes):
        for o in sc["objects"]:
            out[i, 4 * o["row"] + o["col"]] = 1 + OBJECTS.index(f"{o['colour']} {o['shape']}")
    return out


def build_data(cfg) -> VLMData:
    d, size = cfg.data, 64
    ev_train = ev_test = ev_attrs = None
    if d.easy_vqa:
        ev_train, ev_test = load_easy_vqa("train"), load_easy_vqa("test")
        ev_attrs = image_attributes(ev_train)
        if d.easy_vqa_train_subset and d.easy_vqa_train_subset < len(ev_train):
            ev_train = ev_train.subset(d.easy_vqa_train_subset, seed=d.shapeworld_seed)
        if d.easy_vqa_test_subset and d.easy_vqa_test_subset < len(ev_test):
            ev_test = ev_test.subset(d.easy_vqa_test_subset, seed=d.shapeworld_seed)
    world = ShapeWorld(d.shapeworld_seed, image_size=size)
    sw_scenes = world.scenes(d.shapeworld_train_images, "train")
    sw_recs = world.vqa_records(sw_scenes)
    sw_caps = [world.caption(sc) for sc in sw_scenes]
    sw_eval_scenes = world.scenes(d.shapeworld_eval_images, "eval")
    sw_eval = to_vqa_set(sw_eval_scenes, world.vqa_records(sw_eval_scenes), "shapeworld_eval")
    sw_train = to_vqa_set(sw_scenes, sw_recs, "shapeworld") if sw_scenes else None
    ev_caps = captions(ev_train) if ev_train is not None else []

    texts = [CAPTION_PROMPT, TEMPLATE.format(OBJECTS[0])] + [r["question"] + " " + r["answer"] for r in sw_recs + sw_caps]
    texts += [o for o in OBJECTS] + [str(i) for i in range(5)]
    if ev_train is not None:
        texts += [q + " " + a for q, a in zip(ev_train.questions, ev_train.answers)] + [c for _, c in ev_caps]
    tok = WordTokenizer.build(texts)

    def text_only(strings, name):
        ids = [tok.encode(t) + [tok.eos_id] for t in strings]
        return Samples(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), [0] * len(ids), ids, [0] * len(ids), name)

    text_sets, caption_sets, vqa_sets = [], [], []
    if ev_train is not None:
        text_sets.append(text_only([c for _, c in ev_caps] + sorted(set(ev_train.questions)), "easy_vqa_text"))
        caption_sets.append(qa_samples(tok, ev_train.images, [CAPTION_PROMPT] * len(ev_caps), [c for _, c in ev_caps],
                                       [i for i, _ in ev_caps], "easy_vqa_captions"))
        vqa_sets.append(qa_samples(tok, ev_train.images, ev_train.questions, ev_train.answers, ev_train.image_index,
                                   "easy_vqa"))
    if sw_train is not None:
        text_sets.append(text_only([c["answer"] for c in sw_caps] + sorted({r["question"] for r in sw_recs}),
                                   "shapeworld_text"))
        caption_sets.append(qa_samples(tok, sw_train.images, [CAPTION_PROMPT] * len(sw_caps),
                                       [c["answer"] for c in sw_caps], list(range(len(sw_scenes))), "shapeworld_captions"))
        vqa_sets.append(qa_samples(tok, sw_train.images, sw_train.questions, sw_train.answers, sw_train.image_index,
                                   "shapeworld"))
    return VLMData(tok, ev_train, ev_test, ev_attrs, sw_train.images if sw_train else None,
                   cell_labels(sw_scenes) if sw_scenes else None, sw_eval, sw_eval_scenes, world,
                   text_sets, caption_sets, vqa_sets)
