"""The MoAI CPU miniature (multimodal_compression_systems.md §8(d)): does a frozen vision-language model answer
counting and existence questions better when MoAI's compressor and mixers feed it the verbalised output of
an external "CV model"?

Data: ShapeWorld scenes (1-4 coloured shapes on a 4x4 grid) with pixel noise (std 0.1), and their existence
(yes / no) and counting (0-4) questions: the spec's test is on these two types.

The "CV model" is the scene's ground-truth object list, verbalised (``moai.verbalize``) as
``detections : red circle at row 0 col 1 ; ... .``, exactly or through the spec's noisy detector (each object
dropped or given a wrong colour or shape with probability 10%).

The frozen LVLM (a stand-in for InternLM-XComposer2): a tiny ViT (one token per grid cell) and a 2-layer
LM of width 64 (the spec's TinyLM is 128 wide; 64 keeps a seed at ~6 minutes on 2 cores). Three stand-in
pre-training stages make it: the ViT learns each cell's object; the LM learns to answer from the object list
written in front of the question (as a pre-trained LLM reads text); then the whole model learns to answer
from the image alone. It is then frozen.

MoAI (§8(b)): the verbalised detections are embedded by the frozen LM's embedding table and compressed by
the MoAI-Compressor into 16 tokens. A MoAI-Mixer sits in front of layer 1 (every 2 layers, as the spec's
miniature). Only the compressor and the mixer train: step 1 with one random expert per side per forward,
then step 2 with the soft mixture.

Rows, every one on the same frozen LVLM, test scenes and question set:
- ``base``: the frozen LVLM alone;
- ``no_aux``: compressor and mixers trained the same way, with an aux text that carries no information
  (``detections : none .`` for every scene). Same parameters and steps: it isolates the information;
- ``noisy``: the noisy detector's text (a fresh draw per training batch; a fixed seeded draw at test);
- ``exact``: the exact object list.

Reported per seed, on held-out scenes: exact-match accuracy per question type, and, for the mixer rows, the
mean gate of each expert on image and on language tokens (how much of the mixture reads the aux tokens).
Mean ± std over seeds; the spec's test ("with aux information beats no-aux on counting / existence") is a
soft one and is reported per seed, not asserted.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data.shapeworld import OBJECTS, ShapeWorld
from ..errors import ConfigError
from ..models.tokenizer import SPECIALS
from ..models.vlm import VisionLanguageModel, VLMConfig, _vision
from . import moai as M
from ._experiment import ExactMatch, mean_std, run_seeds, write_report
from .unimoe_experiment import Split, _encode, _train, caption_of, train_vision

QTYPES = ("exist", "count")  # the spec's test is on counting and existence
ROWS = ("base", "no_aux", "noisy", "exact")


@dataclass
class MoAISettings:
    seeds: int = 3
    train_scenes: int = 15000  # ~45k questions: the mixers memorise a few thousand (measured: 1,500 scenes
    test_scenes: int = 300     # gave a train loss of 0.14 at 50% test accuracy, aux or not)
    image_noise: float = 0.1  # std of the pixel noise on the scenes (0..1 images)
    dim: int = 64  # the spec's TinyLM has width 128; 64 keeps a seed at ~6 min on 2 cores
    depth: int = 2
    heads: int = 2
    ffn_hidden: int = 128
    batch_size: int = 64
    vision_steps: int = 300
    lm_steps: int = 2000  # pre-stage: the LM answers from the object list given as text in the prompt
    base_steps: int = 800
    step1_steps: int = 300  # MoAI step 1: one random expert per side
    step2_steps: int = 700  # MoAI step 2: the soft mixture
    lr: float = 2e-3
    moai_lr: float = 3e-3
    detector_noise: float = 0.1
    every: int = 2  # one mixer, in front of layer 1
    num_latents: int = 16
    compressor_depth: int = 2
    compressor_heads: int = 2
    compressor_head_dim: int = 32
    rank: int = 16
    mixer_heads: int = 4
    threads: int = 0

    def validate(self) -> None:
        for k in ("seeds", "train_scenes", "test_scenes", "dim", "depth", "heads", "ffn_hidden", "batch_size",
                  "every", "num_latents", "compressor_depth", "compressor_heads", "compressor_head_dim", "rank",
                  "mixer_heads"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k} must be a positive integer, got {v!r}")
        for k in ("vision_steps", "lm_steps", "base_steps", "step1_steps", "step2_steps", "threads"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{k} must be an integer >= 0, got {v!r}")
        if self.dim % (2 * self.heads):
            raise ConfigError(f"dim={self.dim} must be divisible by 2*heads={2 * self.heads}")
        if not 0.0 <= self.image_noise <= 1.0:
            raise ConfigError(f"image_noise must be in [0, 1], got {self.image_noise!r}")
        if not 0.0 <= self.detector_noise <= 1.0:
            raise ConfigError(f"detector_noise must be in [0, 1], got {self.detector_noise!r}")
        if not M.mixer_layers(self.depth, self.every):
            raise ConfigError(f"every={self.every} places no mixer in a {self.depth}-layer LM")


# ---- data ---------------------------------------------------------------------------------------------
def make_split(seed: int, n: int, split: str, image_noise: float, qtypes: tuple[str, ...] = QTYPES) -> Split:
    from ..train.vlm_data import cell_labels

    sw = ShapeWorld(seed * 7919 + (0 if split == "train" else 1), image_size=32, noise_std=image_noise)
    scenes = sw.scenes(n, split)
    recs = sw.vqa_records(scenes, qtypes)
    index = {sc["id"]: i for i, sc in enumerate(scenes)}
    return Split(torch.stack([sc["image"] for sc in scenes]) * 2 - 1, [caption_of(sc) for sc in scenes],
                 cell_labels(scenes), [r["question"] for r in recs], [r["answer"] for r in recs],
                 [r["qtype"] for r in recs], [index[r["id"]] for r in recs])


def scene_objects(cells: torch.Tensor) -> list[dict]:
    """The object list of one scene back from its (16,) cell classes (0 = empty, else 1 + OBJECTS index)."""
    out = []
    for i, c in enumerate(cells.tolist()):
        if c:
            colour, shape = OBJECTS[c - 1].split()
            out.append({"colour": colour, "shape": shape, "row": i // 4, "col": i % 4})
    return out


def aux_texts(split: Split, scenes: list[int], row: str, noise: float, rng: np.random.Generator | None) -> list[str]:
    """The verbalised "CV model" output of each scene for a row (``no_aux``: no information)."""
    if row == "no_aux":
        return [M.verbalize([])] * len(scenes)
    objs = [scene_objects(split.cells[s]) for s in scenes]
    if row == "exact":
        return [M.verbalize(o) for o in objs]
    return [M.verbalize(o, noise=noise, rng=rng) for o in objs]


def build_vocab(*splits: Split) -> list[str]:
    from ..data.shapeworld import COLOURS, SHAPES

    words = set("detections : none at row col ; .".split()) | set(COLOURS) | set(SHAPES) | {str(i) for i in range(4)}
    for s in splits:
        for t in s.questions + s.answers:
            words.update(t.split())
    return list(SPECIALS) + sorted(words - set(SPECIALS))


def new_model(S: MoAISettings, vocab: list[str]) -> VisionLanguageModel:
    vision = _vision(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    cfg = VLMConfig.from_dict(dict(vocab=vocab, vision=vision, dim=S.dim, depth=S.depth, num_heads=S.heads,
                                   ffn_hidden=S.ffn_hidden, max_len=96, moe_impl="auto"))
    return VisionLanguageModel(cfg)


def moai_config(S: MoAISettings, mode: str) -> M.MoAIConfig:
    return M.MoAIConfig(dim=S.dim, num_latents=S.num_latents, compressor_depth=S.compressor_depth,
                        compressor_heads=S.compressor_heads, compressor_head_dim=S.compressor_head_dim,
                        rank=S.rank, mixer_heads=S.mixer_heads, every=S.every, mode=mode)


class _Wrapped(torch.nn.Module):
    """The VLM with a MoAI handle registered as a child, so that ``_train`` sees the handle's parameters."""

    def __init__(self, vlm: VisionLanguageModel, handle: M.MoAIHandle | None):
        super().__init__()
        self.vlm, self.handle = vlm, handle


def _aux_tokens(vlm: VisionLanguageModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed the verbalised texts with the frozen LM's table: (B, M, D) right-padded and the (B, M) mask."""
    tok = vlm.tokenizer
    ids = [tok.encode(t) for t in texts]
    L = max(len(i) for i in ids)
    buf = torch.full((len(ids), L), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.bool)
    for j, i in enumerate(ids):
        buf[j, :len(i)] = torch.tensor(i)
        mask[j, :len(i)] = True
    with torch.no_grad():
        emb = vlm.embed(buf)
    return emb, mask


# ---- the rows -----------------------------------------------------------------------------------------
def train_base(S: MoAISettings, vlm: VisionLanguageModel, data: Split, seed: int) -> dict[str, float]:
    """The stand-in for the pre-trained LVLM: the ViT learns each cell's object; the LM learns to answer from
    the object list written in front of the question (as an LLM reads text); then everything learns to
    answer from the image alone."""

    class _Holder(torch.nn.Module):  # train_vision expects ``model.lm`` to be the VLM
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

    losses = {"vision": train_vision(_Holder(vlm), data, S.vision_steps, S.batch_size, S.lr, seed)}
    for p in vlm.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    tok = vlm.tokenizer

    def text_batch(_):  # the object list as text in front of the question, no image
        idx = torch.randint(len(data.questions), (S.batch_size,), generator=g).tolist()
        texts = aux_texts(data, [data.scene[i] for i in idx], "exact", 0.0, None)
        t, lens, lab = _encode(tok, [f"{a} {data.questions[i]}" for a, i in zip(texts, idx)],
                               [data.answers[i] for i in idx])
        return vlm(t, lens, lab).loss

    def batch(_):
        idx = torch.randint(len(data.questions), (S.batch_size,), generator=g).tolist()
        t, lens, lab = _encode(tok, [data.questions[i] for i in idx], [data.answers[i] for i in idx])
        return vlm(t, lens, lab, images=data.images[[data.scene[i] for i in idx]]).loss

    losses["lm"] = _train(vlm, S.lm_steps, text_batch, S.lr)
    losses["base"] = _train(vlm, S.base_steps, batch, S.lr)
    for p in vlm.parameters():
        p.requires_grad_(False)
    return losses


def train_moai(S: MoAISettings, base: VisionLanguageModel, data: Split, row: str, seed: int
               ) -> tuple[VisionLanguageModel, M.MoAIHandle, dict[str, float]]:
    """Attach MoAI to a copy of the frozen LVLM and run its two steps on ``row``'s aux text."""
    vlm = copy.deepcopy(base)
    torch.manual_seed(100 + seed)
    handle = M.attach_mixers(vlm, moai_config(S, "random"), freeze_model=True)
    model = _Wrapped(vlm, handle)
    g = torch.Generator().manual_seed(seed + 2)
    rng = np.random.default_rng(seed + 3)
    tok = vlm.tokenizer

    def batch(_):
        idx = torch.randint(len(data.questions), (S.batch_size,), generator=g).tolist()
        scenes = [data.scene[i] for i in idx]
        handle.set_aux(*_aux_tokens(vlm, aux_texts(data, scenes, row, S.detector_noise, rng)))
        t, lens, lab = _encode(tok, [data.questions[i] for i in idx], [data.answers[i] for i in idx])
        return vlm(t, lens, lab, images=data.images[scenes]).loss

    losses = {"step1": _train(model, S.step1_steps, batch, S.moai_lr)}
    handle.set_mode("soft")
    losses["step2"] = _train(model, S.step2_steps, batch, S.moai_lr)
    handle.set_aux(None)
    return vlm, handle, losses


@torch.no_grad()
def evaluate(vlm: VisionLanguageModel, handle: M.MoAIHandle | None, data: Split, row: str, seed: int,
             noise: float, bs: int = 128) -> dict[str, Any]:
    """Exact-match accuracy per question type (and all), and for a mixer row the mean gate of each expert on
    image and language tokens (teacher-forced question prompts, averaged over the mixers)."""
    vlm.eval()
    if handle is not None:
        handle.eval()
    rng = np.random.default_rng(20_000 + seed)  # the test-time noisy detector: one fixed draw
    score = ExactMatch(QTYPES)
    gsum = {"I": torch.zeros(3), "L": torch.zeros(3)}
    gcount = {"I": 0, "L": 0}
    n = len(data.questions)
    for i in range(0, n, bs):
        idx = list(range(i, min(n, i + bs)))
        scenes = [data.scene[j] for j in idx]
        images = data.images[scenes]
        if handle is not None:
            handle.set_aux(*_aux_tokens(vlm, aux_texts(data, scenes, row, noise, rng)))
        pred = vlm.answer([data.questions[j] for j in idx], images=images, max_new_tokens=3)
        score.add(pred, [data.answers[j] for j in idx], [data.qtypes[j] for j in idx])
        if handle is not None:
            t, lens, _ = _encode(vlm.tokenizer, [data.questions[j] for j in idx], [""] * len(idx))
            vlm(t, lens, images=images)
            for mixer in handle.mixers.values():
                info = mixer.last
                for side, g in (("I", info.gates_I), ("L", info.gates_L)):
                    rows = g[g.sum(-1) > 0]
                    gsum[side] += rows.sum(0)
                    gcount[side] += rows.shape[0]
            handle.set_aux(None)
    out: dict[str, Any] = score.result()
    if handle is not None:
        out["gates_image"] = dict(zip(M.EXPERTS_I, (gsum["I"] / max(1, gcount["I"])).tolist()))
        out["gates_language"] = dict(zip(M.EXPERTS_L, (gsum["L"] / max(1, gcount["L"])).tolist()))
    return out


def run_seed(S: MoAISettings, seed: int, log: Callable[[str], None] = print) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train = make_split(seed, S.train_scenes, "train", S.image_noise)
    test = make_split(seed, S.test_scenes, "test", S.image_noise)
    vlm = new_model(S, build_vocab(train, test))
    losses = train_base(S, vlm, train, seed)
    rows: dict[str, dict] = {"base": evaluate(vlm, None, test, "base", seed, S.detector_noise)}
    log(f"  seed {seed}: frozen LVLM trained, accuracy {rows['base']['all']:.3f} ({time.perf_counter() - t0:.0f} s)")
    trainable = 0
    for row in ROWS[1:]:
        m, handle, ls = train_moai(S, vlm, train, row, seed)
        losses.update({f"{row}_{k}": v for k, v in ls.items()})
        rows[row] = evaluate(m, handle, test, row, seed, S.detector_noise)
        trainable = sum(p.numel() for p in handle.parameters())
        log(f"  seed {seed}: {row:6s} accuracy {rows[row]['all']:.3f} (count {rows[row]['count']:.3f}, exist "
            f"{rows[row]['exist']:.3f})")
    secs = time.perf_counter() - t0
    return {"seed": seed, "rows": rows, "losses": losses, "seconds": round(secs, 1),
            "trainable_moai": trainable, "frozen_lvlm": sum(p.numel() for p in vlm.parameters())}


def run_moai(S: MoAISettings, out: Path | None = None, work: Path | None = None,
             log: Callable[[str], None] = print) -> dict:
    results = run_seeds(S, work, run_seed, log)
    return write_report(S, results, out, markdown, extra={"summary": summarise(results)})


def summarise(results: list[dict]) -> dict:
    s: dict[str, Any] = {}
    for row in ROWS:
        r = [x["rows"][row] for x in results]
        s[row] = {q: mean_std([x[q] for x in r], 100, 1) for q in QTYPES + ("all",)}
        if "gates_image" in r[0]:
            s[row]["gates_image"] = {e: mean_std([x["gates_image"][e] for x in r], 100, 1) for e in M.EXPERTS_I}
            s[row]["gates_language"] = {e: mean_std([x["gates_language"][e] for x in r], 100, 1)
                                        for e in M.EXPERTS_L}
    for row in ("exact", "noisy"):
        s[f"{row}_beats_no_aux"] = {
            q: [x["rows"][row][q] > x["rows"]["no_aux"][q] for x in results] for q in ("count", "exist")}
    return s


def markdown(report: dict) -> str:
    S, s = report["settings"], report["summary"]
    n = len(report["results"])
    names = {"base": "frozen LVLM alone", "no_aux": "MoAI, uninformative aux text",
             "noisy": "MoAI, noisy detector (10%)",
             "exact": "MoAI, exact object list"}
    lines = [f"# MoAI miniature ({n} seed{'s' if n != 1 else ''})", "",
             "Generated by `moevision moai` (see `moevision.techniques.moai_experiment`). Exact-match accuracy (%) on "
             "held-out ShapeWorld questions, mean ± std over seeds. Every row uses the same frozen LVLM; the MoAI "
             "rows "
             "train only the compressor and the mixers, with the same steps.", "",
             "| row | " + " | ".join(QTYPES) + " | all |", "|---|" + "---|" * (len(QTYPES) + 1)]
    for row in ROWS:
        lines.append(f"| {names[row]} | " + " | ".join(s[row][q] for q in QTYPES + ("all",)) + " |")
    lines += ["", "Mean gate of each expert (%), over the mixers, on image and on language tokens:", "",
              "| row | " + " | ".join(M.EXPERTS_I) + " | " + " | ".join(M.EXPERTS_L) + " |",
              "|---|" + "---|" * (len(M.EXPERTS_I) + len(M.EXPERTS_L))]
    for row in ROWS[1:]:
        lines.append(f"| {row} | " + " | ".join(s[row]["gates_image"][e] for e in M.EXPERTS_I) + " | "
                     + " | ".join(s[row]["gates_language"][e] for e in M.EXPERTS_L) + " |")
    lines += [""]
    for row in ("exact", "noisy"):
        b = s[f"{row}_beats_no_aux"]
        lines.append(f"`{row}` above `no_aux`, per seed: counting {b['count']}, existence {b['exist']} "
                     "(the spec's soft test).")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in S.items()), ""]
    return "\n".join(lines)


__all__ = ["MoAISettings", "run_moai", "run_seed", "summarise", "markdown", "scene_objects", "aux_texts"]
