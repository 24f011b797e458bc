"""easy-VQA (Victor Zhou, 2020; PyPI ``easy-vqa``, MIT): 4,000 train / 1,000 test 64x64 RGB images of
one coloured shape, 38,575 / 9,673 templated questions with 13 single-word answers.

Everything is read from the installed package (``pip install easy-vqa``, in the ``vlm`` extra); nothing
is downloaded. Besides the questions, each image gets the attribute labels that its own training
questions imply (shape, colour; -1 where they imply nothing) and a caption ``"a {colour} {shape}"``:
the stand-in pre-training signals of the VLM recipe (``moevision.train.vlm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
ANSWERS = SHAPES + COLORS + ("yes", "no")


@dataclass
class VQASet:
    """Images stored once (uint8); each question points at its image by row."""

    images: torch.Tensor  # (I, 3, H, W) uint8
    questions: list[str]
    answers: list[str]
    image_index: torch.Tensor  # (Q,) int64 row of each question's image
    name: str = "easy_vqa"
    qtypes: list[str] | None = None  # question type of each question (ShapeWorld), None = one type

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, n: int, *, seed: int = 0) -> "VQASet":
        """n questions drawn without replacement (all images are kept)."""
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
        return VQASet(self.images, [self.questions[i] for i in idx], [self.answers[i] for i in idx],
                      self.image_index[idx], self.name, None if self.qtypes is None else [self.qtypes[i] for i in idx])


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise DataError("easy-VQA needs the PyPI package easy-vqa: pip install 'moevision[vlm]' "
                        "(or pip install easy-vqa)") from None
    return easy_vqa


def load_easy_vqa(split: str) -> VQASet:
    """The ``train`` or ``test`` split, questions in the package's order."""
    if split not in ("train", "test"):
        raise DataError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    from PIL import Image

    ev = _package()
    q, a, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    keys = sorted(paths)
    row = {k: i for i, k in enumerate(keys)}
    imgs = np.empty((len(keys), 64, 64, 3), dtype=np.uint8)
    for i, k in enumerate(keys):
        try:
            with Image.open(paths[k]) as im:
                imgs[i] = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"easy-VQA image {paths[k]} is unreadable ({e}); reinstall easy-vqa") from None
    missing = sorted(set(ids) - set(row))
    if missing:
        raise DataError(f"easy-VQA {split}: questions refer to missing images {missing[:3]}")
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    return VQASet(images, list(q), list(a), torch.tensor([row[i] for i in ids], dtype=torch.long))


def image_attributes(ds: VQASet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (shape id, colour id) implied by its questions, -1 where they do not pin it down.

    "what ..." questions give the attribute directly; yes/no questions ("is there a circle?", "does the
    image not contain a red shape?") include or exclude one value; one value left over is the answer."""
    n = ds.images.shape[0]
    known = [[None, None] for _ in range(n)]
    excluded = [[set(), set()] for _ in range(n)]
    for q, a, i in zip(ds.questions, ds.answers, ds.image_index.tolist()):
        if a in SHAPES:
            known[i][0] = a
        elif a in COLORS:
            known[i][1] = a
        else:
            words = q.replace("?", " ").split()
            for kind, vals in ((0, SHAPES), (1, COLORS)):
                hit = [w for w in words if w in vals]
                if hit:
                    present = (a == "yes") != ("not" in words or "no" in words)
                    (known[i].__setitem__(kind, hit[0]) if present else excluded[i][kind].add(hit[0]))
    out = torch.full((n, 2), -1, dtype=torch.long)
    for i in range(n):
        for kind, vals in ((0, SHAPES), (1, COLORS)):
            v = known[i][kind]
            left = [x for x in vals if x not in excluded[i][kind]]
            v = v if v is not None else (left[0] if len(left) == 1 else None)
            if v is not None:
                out[i, kind] = vals.index(v)
    return out[:, 0], out[:, 1]


def captions(ds: VQASet) -> list[tuple[int, str]]:
    """(image row, "a {colour} {shape}") for every image whose attributes are known."""
    shape, color = image_attributes(ds)
    return [(i, f"a {COLORS[c]} {SHAPES[s]}") for i, (s, c) in enumerate(zip(shape.tolist(), color.tolist()))
            if s >= 0 and c >= 0]
