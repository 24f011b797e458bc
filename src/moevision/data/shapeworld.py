"""ShapeWorld: the procedural image + question generator of spec multimodal_compression_systems.md §0.4.

A 32x32 black image (``image_size=64`` draws every pixel as a 2x2 block) holds 1-4 objects in distinct
cells of a 4x4 grid of 8x8 cells; object = shape (square, circle, triangle, cross) x colour (7). The
rasterisation and record schema follow §0.4.1 exactly. Questions (lower-case templates, whitespace
tokens): existence yes/no (the POPE template), colour multiple choice with 4 lettered options, counting
(0-4), spatial yes/no (left of / right of / above / below, by cell column or row) and captions; plus
the MMStar "leaky" items whose question states the answer. Geometry comes from integer draws of a
seeded numpy Generator; the optional pixel noise from a seeded torch Generator, so a seed gives the same
data on every run. Not implemented here: glyph objects and BEAF pairs; the video variant (a sprite moving over a
static distractor) is `techniques.imp_experiment.moving_videos`, used by IMP and MERV.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import torch

from .easy_vqa import VQASet

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "magenta": (1, 0, 1),
           "cyan": (0, 1, 1), "white": (1, 1, 1)}
OBJECTS = tuple(f"{c} {s}" for s, c in product(SHAPES, COLOURS))  # the 28 object types
LETTERS = "ABCD"
RELATIONS = ("left of", "right of", "above", "below")
MCQ_SUFFIX = "answer with the option's letter from the given choices directly ."


def _masks() -> dict[str, np.ndarray]:
    v, u = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")  # v = row (down), u = column
    return {
        "square": (u >= 1) & (u <= 6) & (v >= 1) & (v <= 6),
        "circle": (u - 3.5) ** 2 + (v - 3.5) ** 2 <= 3.2 ** 2,
        "triangle": (v >= 1) & (v <= 6) & (np.abs(u - 3.5) <= (v - 0.5) / 2),  # apex up
        "cross": ((u >= 3) & (u <= 4) & (v >= 1) & (v <= 6)) | ((u >= 1) & (u <= 6) & (v >= 3) & (v <= 4)),
    }


MASKS = _masks()


def render(objects: list[dict], image_size: int = 32) -> np.ndarray:
    """float32 (3, H, W) in [0, 1]: each object's mask in its cell, in its colour, on black."""
    img = np.zeros((3, 32, 32), dtype=np.float32)
    for o in objects:
        r, c = 8 * o["row"], 8 * o["col"]
        m = MASKS[o["shape"]]
        for ch, val in enumerate(COLOURS[o["colour"]]):
            img[ch, r:r + 8, c:c + 8][m] = val
    if image_size == 64:
        img = img.repeat(2, axis=1).repeat(2, axis=2)
    return img


def _name(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def mcq_prompt(question: str, options: list[str]) -> str:
    return question + " " + " ".join(f"{LETTERS[i]} . {t}" for i, t in enumerate(options)) + " " + MCQ_SUFFIX


class ShapeWorld:
    """``ShapeWorld(seed).scenes(n)`` -> scene dicts; ``questions(scenes, ...)`` -> records (§0.4.1)."""

    def __init__(self, seed: int = 0, *, image_size: int = 32, noise_std: float = 0.0, min_objects: int = 1,
                 max_objects: int = 4):
        if image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {image_size}")
        if not 1 <= min_objects <= max_objects <= 16:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 16, got {min_objects}, {max_objects}")
        self.seed, self.image_size, self.noise_std = seed, image_size, noise_std
        self.min_objects, self.max_objects = min_objects, max_objects
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def scenes(self, n: int, split: str = "train") -> list[dict]:
        out = []
        for i in range(n):
            k = int(self.rng.integers(self.min_objects, self.max_objects + 1))
            cells = self.rng.choice(16, size=k, replace=False)
            objs = [{"shape": SHAPES[int(self.rng.integers(4))], "colour": list(COLOURS)[int(self.rng.integers(7))],
                     "row": int(c) // 4, "col": int(c) % 4} for c in cells]
            img = torch.from_numpy(render(objs, self.image_size))
            if self.noise_std > 0:
                img = (img + self.noise_std * torch.randn(img.shape, generator=self.gen)).clamp(0, 1)
            out.append({"id": f"{split}-{self.seed}-{i}", "image": img, "objects": objs, "split": split})
        return out

    # -- questions
    def exist(self, scene: dict, positive: bool) -> dict | None:
        present = sorted({_name(o) for o in scene["objects"]})
        pool = present if positive else [o for o in OBJECTS if o not in present]
        obj = pool[int(self.rng.integers(len(pool)))]
        return self._rec(scene, f"is there a {obj} in the image ?", "yes" if positive else "no", "exist")

    def colour_mcq(self, scene: dict, *, leaky: bool = False) -> dict | None:
        shapes = [o["shape"] for o in scene["objects"]]
        unique = [o for o in scene["objects"] if shapes.count(o["shape"]) == 1]
        if not unique:
            return None
        o = unique[int(self.rng.integers(len(unique)))]
        others = [c for c in COLOURS if c != o["colour"]]
        opts = [others[i] for i in self.rng.choice(len(others), size=3, replace=False)] + [o["colour"]]
        opts = [opts[i] for i in self.rng.permutation(4)]
        q = f"what colour is the {o['shape']} ?"
        if leaky:
            q = f"the {o['shape']} is {o['colour']} . " + q
        rec = self._rec(scene, mcq_prompt(q, opts), LETTERS[opts.index(o["colour"])], "colour_mcq")
        rec.update(options=opts, stem=q)
        return rec

    def count(self, scene: dict) -> dict:
        s = SHAPES[int(self.rng.integers(4))]
        n = sum(o["shape"] == s for o in scene["objects"])
        plural = "crosses" if s == "cross" else s + "s"
        return self._rec(scene, f"how many {plural} are there ?", str(n), "count")

    def spatial(self, scene: dict) -> dict | None:
        objs = scene["objects"]
        names = [_name(o) for o in objs]
        cand = [(a, b) for a in range(len(objs)) for b in range(len(objs))
                if a != b and names.count(names[a]) == 1 and names.count(names[b]) == 1]
        if not cand:
            return None
        a, b = cand[int(self.rng.integers(len(cand)))]
        rel = RELATIONS[int(self.rng.integers(4))]
        oa, ob = objs[a], objs[b]
        truth = {"left of": oa["col"] < ob["col"], "right of": oa["col"] > ob["col"],
                 "above": oa["row"] < ob["row"], "below": oa["row"] > ob["row"]}[rel]
        return self._rec(scene, f"is the {names[a]} {rel} the {names[b]} ?", "yes" if truth else "no", "spatial")

    def caption(self, scene: dict) -> dict:
        objs = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
        return self._rec(scene, "describe the image .", " and ".join(f"a {_name(o)}" for o in objs), "caption")

    @staticmethod
    def _rec(scene: dict, question: str, answer: str, qtype: str) -> dict:
        return {"id": scene["id"], "image": scene["image"], "objects": scene["objects"], "question": question,
                "answer": answer, "qtype": qtype, "split": scene["split"]}

    def vqa_records(self, scenes: list[dict], qtypes=("exist", "colour_mcq", "count", "spatial")) -> list[dict]:
        """Per scene: one positive and one negative existence question and one of each other type
        (where the scene allows it)."""
        recs = []
        for sc in scenes:
            for qt in qtypes:
                if qt == "exist":
                    recs += [self.exist(sc, True), self.exist(sc, False)]
                else:
                    recs.append(getattr(self, qt)(sc))
        return [r for r in recs if r is not None]


def to_vqa_set(scenes: list[dict], records: list[dict], name: str = "shapeworld") -> VQASet:
    """Pack records into a ``VQASet`` (images as uint8, one row per scene)."""
    row = {sc["id"]: i for i, sc in enumerate(scenes)}
    images = torch.stack([(sc["image"] * 255).round().to(torch.uint8) for sc in scenes]) if scenes else \
        torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    return VQASet(images, [r["question"] for r in records], [r["answer"] for r in records],
                  torch.tensor([row[r["id"]] for r in records], dtype=torch.long), name,
                  [r["qtype"] for r in records])
