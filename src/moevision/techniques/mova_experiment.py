"""The MoVA CPU miniature of multimodal_compression_systems.md §7.4 (``moevision mova``).

ShapeWorld question answering (§0.4) as classification over 14 answers (yes, no, 0-4, the 7 colours), with
four question types: existence, colour ("what colour is the square ?", asked open-ended: ShapeWorld's
multiple-choice stem with the colour word as the answer), counting and spatial relations. Vision side:

- a base tiny ViT (patch 4: an 8 x 8 grid, width ``dim``), always used, pre-trained briefly to count the
  objects (an image-level label: a generalist that is not taught colours or shapes);
- three frozen tiny conv "experts" of different grids and widths, each pre-trained briefly on its own
  sub-task: **A** colour (4 x 4 grid, width 32: the colour in each cell), **B** shape (8 x 8, width 24: the
  shape in each cell), **C** layout (16 x 16, width 16: which cells are occupied, and the object count).

Then, with the base and the experts frozen, the MoV-Adapter, the gate's text encoder and an "LLM" stand-in
(a question-conditioned FiLM token reader, ``AnswerModel``) are trained. The coarse
routing of MoVA (an LLM writing expert letters) is replaced by a router per row; every row writes its
routing as letters ("A, C", "none") and the adapter gets what ``parse_routing`` reads back from them:

- ``base_only``: "none" for every question (no expert reaches the adapter, which still refines the base);
- ``all_experts``: "A, B, C" for every question;
- ``rule_routing``: a hand-written question-type -> experts map from what each expert was trained on;
- ``learned_routing``: MoVA's [R] recipe in miniature. An all-experts model is trained for
  ``measure_steps``; on ``measure_records`` training questions, expert e "helps" when dropping it from the
  routing raises the answer NLL by more than ``help_margin``; a question -> multi-hot classifier is
  trained on these labels; a fresh adapter is then trained and tested with the classifier's routing;
- ``random_routing``: random experts, as many per question as the rule map picks (a control).
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..train.optim import set_lr, warmup_cosine
from ._experiment import check_grid_settings, mean_std, run_grid, write_report
from ._loop import adamw, optimizer_step
from .mova import (MoVAAdapter, MoVAConfig, TextEncoder, encode_texts, gate_text, parse_routing, resize_tokens,
                   routing_letters, routing_prompt)

ROWS = {
    "base_only": "base only: no expert routed ('none')",
    "all_experts": "MoVA, all 3 experts routed ('A, B, C')",
    "rule_routing": "MoVA, coarse routing by question type (hand-written map)",
    "learned_routing": "MoVA, coarse routing by a classifier on measured 'expert helps' labels",
    "random_routing": "MoVA, random experts (as many as the rule map; control)",
}
QTYPES = ("exist", "colour", "count", "spatial")
ANSWERS = ("yes", "no", "0", "1", "2", "3", "4", "red", "green", "blue", "yellow", "magenta", "cyan", "white")
POOL = (("colour", "this model knows the colour of the object in every cell of the image."),
        ("shape", "this model knows the shape of the object in every cell of the image."),
        ("layout", "this model knows which cells hold an object and how many objects there are."))
RULE = {"exist": "A, B", "colour": "A, B", "count": "B, C", "spatial": "A, B, C"}
EXPERTS = (("colour", 8, 32), ("shape", 4, 24), ("layout", 2, 16))  # (name, patch stride, width)
RESULT_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# data
@dataclass
class Split:
    images: torch.Tensor  # (n_scenes, 3, 32, 32)
    cell_colour: torch.Tensor  # (n_scenes, 16): 0 empty, 1 + colour index
    cell_shape: torch.Tensor  # (n_scenes, 16): 0 empty, 1 + shape index
    count: torch.Tensor  # (n_scenes,) objects - 1
    present: torch.Tensor  # (n_scenes, 11): which colours (7) and shapes (4) occur
    scene: torch.Tensor  # (n_records,) the record's scene
    q_ids: torch.Tensor  # (n_records, Lq)
    gate_ids: torch.Tensor  # (n_records, Lg)
    answer: torch.Tensor  # (n_records,)
    qtype: torch.Tensor  # (n_records,) index into QTYPES
    questions: list[str]


@dataclass
class QAData:
    train: Split
    test: Split
    vocab_size: int


def make_data(train_scenes: int, test_scenes: int) -> QAData:
    """Train scenes from ShapeWorld(1), test scenes from ShapeWorld(2); per scene two existence questions and
    one of each other type where the scene allows it (``ShapeWorld.vqa_records``)."""
    from ..data.shapeworld import COLOURS, LETTERS, SHAPES, ShapeWorld
    from ..models.tokenizer import WordTokenizer

    colours = list(COLOURS)
    raw = {}
    for name, seed, n in (("train", 1, train_scenes), ("test", 2, test_scenes)):
        sw = ShapeWorld(seed)
        scenes = sw.scenes(n, name)
        recs = sw.vqa_records(scenes, ("exist", "colour_mcq", "count", "spatial"))
        for r in recs:  # the colour question asked open-ended: the answer is the colour word
            if r["qtype"] == "colour_mcq":
                r.update(question=r["stem"], answer=r["options"][LETTERS.index(r["answer"])], qtype="colour")
        raw[name] = (scenes, recs)
    texts = [t for _, recs in raw.values() for r in recs for t in (r["question"], gate_text([r["question"]]))]
    tok = WordTokenizer.build(texts)  # a closed template vocabulary: the test words are the same

    def split(scenes, recs) -> Split:
        row = {sc["id"]: i for i, sc in enumerate(scenes)}
        cc, cs = torch.zeros(len(scenes), 16, dtype=torch.long), torch.zeros(len(scenes), 16, dtype=torch.long)
        present = torch.zeros(len(scenes), 11)
        for i, sc in enumerate(scenes):
            for o in sc["objects"]:
                cell = 4 * o["row"] + o["col"]
                cc[i, cell], cs[i, cell] = 1 + colours.index(o["colour"]), 1 + SHAPES.index(o["shape"])
                present[i, colours.index(o["colour"])] = present[i, 7 + SHAPES.index(o["shape"])] = 1
        qs = [r["question"] for r in recs]
        return Split(torch.stack([sc["image"] for sc in scenes]), cc, cs,
                     torch.tensor([len(sc["objects"]) - 1 for sc in scenes]), present,
                     torch.tensor([row[r["id"]] for r in recs]), encode_texts(tok, qs),
                     encode_texts(tok, [gate_text([q]) for q in qs]),
                     torch.tensor([ANSWERS.index(r["answer"]) for r in recs]),
                     torch.tensor([QTYPES.index(r["qtype"]) for r in recs]), qs)

    return QAData(split(*raw["train"]), split(*raw["test"]), len(tok))


# ---------------------------------------------------------------------------------------------------
# models
class ConvExpert(nn.Module):
    """A tiny frozen 'vision expert': patchify conv (stride = patch), GELU, 3x3 conv, GELU, 1x1 conv;
    tokens (B, (32/patch)^2, width)."""

    def __init__(self, patch: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, patch, stride=patch), nn.GELU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 1))

    def forward(self, images):
        return self.net(images).flatten(2).transpose(1, 2)


def build_base(dim: int):
    from ..models.vit import ViTConfig, VisionTransformer

    return VisionTransformer(ViTConfig(img_size=32, in_chans=3, num_classes=11, patch_size=4, embed_dim=dim, depth=2,
                                       num_heads=4, mlp_ratio=2.0, class_token=False, global_pool="avg"))


class BaseTokens(nn.Module):
    """The base ViT's patch tokens (B, 64, dim)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        return self.vit.forward_features(images)


def _cells(tokens_BNC: torch.Tensor) -> torch.Tensor:
    """Token map pooled to the 4 x 4 ShapeWorld cells: (B, 16, C)."""
    from .mova import tokens_to_grid

    return F.adaptive_avg_pool2d(tokens_to_grid(tokens_BNC), 4).flatten(2).transpose(1, 2)


def pretrain_encoders(split: Split, dim: int, steps: int, seed: int, batch_size: int = 64
                      ) -> tuple[nn.Module, list[nn.Module], dict[str, float]]:
    """Train the base (the number of objects, from its mean token) and each expert on its sub-task, then freeze
    all of them; also returns the last step's losses."""
    torch.manual_seed(seed)
    base = BaseTokens(build_base(dim))
    experts = [ConvExpert(p, w) for _, p, w in EXPERTS]
    heads = {"base": nn.Linear(dim, 4), "colour": nn.Linear(EXPERTS[0][2], 8), "shape": nn.Linear(EXPERTS[1][2], 5),
             "occupied": nn.Linear(EXPERTS[2][2], 2), "count": nn.Linear(EXPERTS[2][2], 4)}

    def losses(i):
        x = split.images[i]
        yield "base", F.cross_entropy(heads["base"](base(x).mean(1)), split.count[i])
        yield "colour", F.cross_entropy(heads["colour"](_cells(experts[0](x))).flatten(0, 1),
                                        split.cell_colour[i].flatten())
        yield "shape", F.cross_entropy(heads["shape"](_cells(experts[1](x))).flatten(0, 1),
                                       split.cell_shape[i].flatten())
        t = experts[2](x)
        yield "layout", (F.cross_entropy(heads["occupied"](_cells(t)).flatten(0, 1),
                                         (split.cell_shape[i] > 0).long().flatten())
                         + F.cross_entropy(heads["count"](t.mean(1)), split.count[i]))

    mods = [base, *experts, *heads.values()]
    params = [p for m in mods for p in m.parameters()]
    opt = adamw(params, 3e-3, 0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = torch.randint(0, len(split.images), (batch_size,), generator=g)
        parts = dict(losses(i))
        optimizer_step(opt, sum(parts.values()), params, 1.0, f"encoder pre-training step {step}")
    for m in (base, *experts):
        m.eval().requires_grad_(False)
    return base, experts, {k: float(v.detach()) for k, v in parts.items()}


class FlatTextEncoder(nn.Module):
    """Question encoder of the answer model: the word embeddings at fixed positions, flattened, through a GELU
    MLP (order-aware, and quick to train on templated questions)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, word_dim: int = 16):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(max_len * word_dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, ids_BL):
        ids_BL = F.pad(ids_BL[:, :self.max_len], (0, self.max_len - min(ids_BL.shape[1], self.max_len)))
        return self.mlp(self.embed(ids_BL).flatten(1))


class AnswerModel(nn.Module):
    """The LLM stand-in, a question-conditioned token reader: the question vector q (``FlatTextEncoder``)
    modulates every visual token (FiLM: ``LN(v) * (1 + g(q)) + b(q)``), a GELU MLP maps each token, the
    tokens are mean- and max-pooled, and an MLP over [pooled ; q] classifies over ``ANSWERS``."""

    def __init__(self, vocab_size: int, dim: int, max_len: int):
        super().__init__()
        self.question = FlatTextEncoder(vocab_size, dim, max_len)
        self.norm, self.film = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim)
        self.token_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, len(ANSWERS)))

    def forward(self, visual_BVD, q_ids_BL):
        q_BD = self.question(q_ids_BL)
        g, b = self.film(q_BD)[:, None].chunk(2, dim=-1)
        h = self.token_mlp(self.norm(visual_BVD) * (1 + g) + b)
        return self.head(torch.cat([h.mean(1), h.amax(1), q_BD], dim=-1))


class MoVAQA(nn.Module):
    """Frozen base + experts, and the trained parts: MoV-Adapter, gate text encoder, answer model."""

    def __init__(self, base: nn.Module, experts: list[nn.Module], adapter_cfg: MoVAConfig, vocab_size: int,
                 max_len: int):
        super().__init__()
        self.base, self.experts = base, nn.ModuleList(experts)
        self.adapter = MoVAAdapter(adapter_cfg)
        self.text = TextEncoder(vocab_size, adapter_cfg.text_dim, depth=1, num_heads=4)
        self.answer = AnswerModel(vocab_size, adapter_cfg.out_dim, max_len)

    def trainable(self) -> list[nn.Parameter]:
        return [p for m in (self.adapter, self.text, self.answer) for p in m.parameters()]

    def encode(self, images, routed_BE, skip_unselected: bool = True):
        """(base tokens, expert tokens or None) with the frozen encoders (experts no sample routes not run)."""
        from .mova import run_experts

        return self.base(images), run_experts(self.experts, images, routed_BE, skip_unselected)

    def forward_features(self, base, experts, q_ids, gate_ids, routed_BE):
        out = self.adapter(base, experts, self.text(gate_ids), routed_BE)
        return self.answer(out.tokens, q_ids), out.gate_weights

    def forward(self, images, q_ids, gate_ids, routed_BE):
        return self.forward_features(*self.encode(images, routed_BE), q_ids, gate_ids, routed_BE)


# ---------------------------------------------------------------------------------------------------
# routing
def letters_to_routes(letters: list[str]) -> torch.Tensor:
    """(n, 3) multi-hot read back from routing letters by the real parser."""
    return torch.tensor([parse_routing(t, num_experts=len(POOL)) for t in letters], dtype=torch.float32)


def rule_letters(split: Split) -> list[str]:
    return [RULE[QTYPES[int(t)]] for t in split.qtype]


def random_letters(split: Split, seed: int) -> list[str]:
    """As many random experts per question as the rule map picks."""
    rng = random.Random(seed)
    return [routing_letters([int(c in pick) for c in "ABC"])
            for pick in (rng.sample("ABC", sum(parse_routing(r, len(POOL)))) for r in rule_letters(split))]


class QuestionRouter(nn.Module):
    """Learned coarse router: question -> per-expert 'helps' logits (stands in for the routing LoRA)."""

    def __init__(self, vocab_size: int, dim: int = 32):
        super().__init__()
        self.text, self.head = TextEncoder(vocab_size, dim, depth=1, num_heads=4), nn.Linear(dim, len(POOL))

    def forward(self, ids):
        return self.head(self.text(ids))

    @torch.no_grad()
    def letters(self, ids, max_experts: int = 3) -> list[str]:
        """Routing text per question: the experts with p > 0.5, most probable first, at most ``max_experts``."""
        probs = torch.sigmoid(self(ids))
        out = []
        for p in probs:
            pick = [int(e) for e in p.argsort(descending=True) if p[e] > 0.5][:max_experts]
            out.append(routing_letters([int(e in pick) for e in range(len(POOL))]))
        return out


def train_router(q_ids, labels, vocab_size: int, steps: int, seed: int, batch_size: int = 64) -> QuestionRouter:
    torch.manual_seed(seed)
    router = QuestionRouter(vocab_size)
    params = list(router.parameters())
    opt = adamw(params, 3e-3, 0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = torch.randint(0, len(labels), (batch_size,), generator=g)
        optimizer_step(opt, F.binary_cross_entropy_with_logits(router(q_ids[i]), labels[i]), params, 1.0,
                       f"router step {step}")
    return router.eval()


@torch.no_grad()
def measure_helps(model: MoVAQA, feats, split: Split, idx: torch.Tensor, margin: float, batch_size: int = 256
                  ) -> torch.Tensor:
    """(len(idx), E) labels: 1 where removing expert e from an all-experts routing raises the answer NLL by
    more than ``margin`` nats."""
    model.eval()
    E = len(POOL)
    nll = torch.zeros(E + 1, len(idx))
    for k in range(E + 1):
        routed = torch.ones(len(idx), E)
        if k < E:
            routed[:, k] = 0
        nll[k] = -_log_probs(model, feats, split, idx, routed, batch_size)
    return (nll[:E] - nll[E] > margin).T.float()


# ---------------------------------------------------------------------------------------------------
# training and evaluation
@torch.no_grad()
def precompute(model: MoVAQA, images: torch.Tensor, batch_size: int = 500):
    """Frozen features of every image: base (n, 64, C) and each expert's tokens, already resized to the base
    grid (the adapter's own ``feature_align`` then leaves them as they are: the same result, done once)."""
    base, ex = [], [[] for _ in model.experts]
    grid = model.adapter.config.grid
    for s in range(0, len(images), batch_size):
        b, e = model.encode(images[s:s + batch_size], torch.ones(1, len(POOL)), skip_unselected=False)
        base.append(b)
        for j, t in enumerate(e):
            ex[j].append(resize_tokens(t, grid, align_corners=model.adapter.config.align_corners))
    return torch.cat(base), [torch.cat(t) for t in ex]


def _batch(feats, split: Split, i, routed):
    sc = split.scene[i]
    base, ex = feats
    return base[sc], [t[sc] for t in ex], split.q_ids[i], split.gate_ids[i], routed


def _log_probs(model, feats, split, idx, routed, batch_size):
    out = []
    for s in range(0, len(idx), batch_size):
        i = idx[s:s + batch_size]
        logits, _ = model.forward_features(*_batch(feats, split, i, routed[s:s + batch_size]))
        out.append(logits.log_softmax(-1).gather(1, split.answer[i, None])[:, 0])
    return torch.cat(out)


def train_qa(model: MoVAQA, feats, split: Split, routes: torch.Tensor, S: "MoVASettings", seed: int, steps: int,
             bar=None) -> list[float]:
    params = model.trainable()
    opt = adamw(params, S.lr, S.weight_decay)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        set_lr(opt, warmup_cosine(step, total_steps=steps, warmup_steps=min(S.warmup_steps, steps // 4), lr=S.lr,
                                  min_lr=S.lr * 0.01))
        i = torch.randint(0, len(split.answer), (S.batch_size,), generator=g)
        logits, _ = model.forward_features(*_batch(feats, split, i, routes[i]))
        loss = F.cross_entropy(logits, split.answer[i])
        optimizer_step(opt, loss, params, 1.0, f"MoVA step {step}")
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
    return losses


@torch.no_grad()
def evaluate(model: MoVAQA, feats, split: Split, routes: torch.Tensor, letters: list[str], batch_size: int = 256
             ) -> dict[str, Any]:
    """Accuracy (overall and per question type) and routing statistics per question type: the share of
    questions routing each expert, the most common routing text, and the block-averaged gate weights."""
    model.eval()
    preds, gates = [], []
    for s in range(0, len(split.answer), batch_size):
        i = torch.arange(s, min(s + batch_size, len(split.answer)))
        logits, w = model.forward_features(*_batch(feats, split, i, routes[i]))
        preds.append(logits.argmax(-1))
        gates.append(w.mean(1))
    pred, gate = torch.cat(preds), torch.cat(gates)
    correct = (pred == split.answer).float()
    res: dict[str, Any] = {"accuracy": float(correct.mean()),
                           "experts_per_question": float(routes.sum(1).mean()), "per_qtype": {}}
    for t, name in enumerate(QTYPES):
        m = split.qtype == t
        routed_any = (routes[m].sum(1) > 0).float()
        w = (gate[m] * routed_any[:, None]).sum(0) / max(float(routed_any.sum()), 1.0)
        common = Counter(letters[j] for j in torch.nonzero(m).flatten().tolist()).most_common(1)[0]
        res["per_qtype"][name] = {"accuracy": float(correct[m].mean()), "n": int(m.sum()),
                                  "routed_share": routes[m].mean(0).tolist(), "gate_weight": w.tolist(),
                                  "top_routing": common[0], "top_routing_share": common[1] / int(m.sum())}
    return res


# ---------------------------------------------------------------------------------------------------
# the experiment
@dataclass
class MoVASettings:
    """Sized for one CPU thread (the default grid: about 13 min on one thread of a shared 2-core machine)."""

    train_scenes: int = 2000
    test_scenes: int = 500
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    pretrain_steps: int = 150
    dim: int = 32  # C, the base width (grid R = 8)
    out_dim: int = 64  # D, the answer model width
    text_dim: int = 32
    num_blocks: int = 1  # [R] 3 in the paper's adapter
    num_heads: int = 2
    rope_base: float = 10000.0  # [R]
    reg_depth: int = 1  # [R]
    top_k: int = 3
    measure_steps: int = 250
    measure_records: int = 1500
    help_margin: float = 0.01
    router_steps: int = 150
    seeds: int = 3
    rows: tuple[str, ...] = tuple(ROWS)

    def validate(self) -> None:
        check_grid_settings(self, ("train_scenes", "test_scenes", "steps", "batch_size", "pretrain_steps", "dim",
                                   "out_dim", "text_dim", "num_blocks", "num_heads", "reg_depth", "top_k",
                                   "measure_steps", "measure_records", "router_steps", "seeds"), ROWS)
        if self.top_k > len(POOL):
            raise ConfigError(f"top_k={self.top_k}: must be <= {len(POOL)} (the experts)")
        if self.help_margin < 0:
            raise ConfigError(f"help_margin={self.help_margin}: must be >= 0")
        self.adapter_config().validate()

    def adapter_config(self) -> MoVAConfig:
        return MoVAConfig(dim=self.dim, grid=8, expert_dims=tuple(w for _, _, w in EXPERTS), out_dim=self.out_dim,
                          text_dim=self.text_dim, num_blocks=self.num_blocks, num_heads=self.num_heads,
                          top_k=self.top_k, reg_depth=self.reg_depth, rope_base=self.rope_base)


def _max_len(data: QAData) -> int:
    return max(data.train.q_ids.shape[1], data.test.q_ids.shape[1])


def run_row(row: str, seed: int, S: MoVASettings, data: QAData, encoders, progress: bool = True) -> dict[str, Any]:
    """Train and test configuration ``row`` with the frozen encoders of ``seed``."""
    from tqdm.auto import tqdm

    base, experts, pretrain_losses = encoders
    t0 = time.perf_counter()
    tr, te = data.train, data.test
    extra: dict[str, Any] = {}
    total = S.steps + (S.measure_steps if row == "learned_routing" else 0)
    bar = tqdm(total=total, desc=f"{row} seed {seed}", unit="step", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=1.0)

    def new_model(s):
        torch.manual_seed(s)
        return MoVAQA(base, experts, S.adapter_config(), data.vocab_size, _max_len(data))

    model = new_model(seed)
    feats_tr, feats_te = precompute(model, tr.images), precompute(model, te.images)
    if row == "base_only":
        l_tr, l_te = ["none"] * len(tr.answer), ["none"] * len(te.answer)
    elif row == "all_experts":
        l_tr, l_te = ["A, B, C"] * len(tr.answer), ["A, B, C"] * len(te.answer)
    elif row == "rule_routing":
        l_tr, l_te = rule_letters(tr), rule_letters(te)
    elif row == "random_routing":
        l_tr, l_te = random_letters(tr, seed), random_letters(te, seed + 1000)
    else:  # learned_routing
        train_qa(model, feats_tr, tr, torch.ones(len(tr.answer), len(POOL)), S, seed, S.measure_steps, bar)
        idx = torch.randperm(len(tr.answer), generator=torch.Generator().manual_seed(seed))[:S.measure_records]
        labels = measure_helps(model, feats_tr, tr, idx, S.help_margin)
        router = train_router(tr.q_ids[idx], labels, data.vocab_size, S.router_steps, seed)
        l_tr, l_te = router.letters(tr.q_ids), router.letters(te.q_ids)
        qt = tr.qtype[idx]
        extra["measured_helps"] = {name: labels[qt == t].mean(0).tolist() for t, name in enumerate(QTYPES)}
        extra["router_train_fit"] = float((letters_to_routes(router.letters(tr.q_ids[idx])) == labels)
                                          .all(1).float().mean())
        model = new_model(seed + 1)
    r_tr, r_te = letters_to_routes(l_tr), letters_to_routes(l_te)
    losses = train_qa(model, feats_tr, tr, r_tr, S, seed, S.steps, bar)
    bar.close()
    res = evaluate(model, feats_te, te, r_te, l_te)
    res.update(extra, row=row, seed=seed, steps=S.steps, pretrain_final_losses=pretrain_losses,
               final_train_loss=statistics.fmean(losses[-20:]), train_seconds=time.perf_counter() - t0,
               version=RESULT_VERSION, trainable_params=sum(p.numel() for p in model.trainable()))
    return res


def run_mova(S: MoVASettings, *, out: Path | None = None, work: Path | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Every row x seed (finished runs cached in ``work``); writes ``out`` (Markdown) and its .json."""
    S.validate()
    t0 = time.perf_counter()
    data = make_data(S.train_scenes, S.test_scenes)
    encoders: dict[int, Any] = {}  # per seed, pre-trained once and shared by the rows

    def compute(row, seed, cache):
        if seed not in encoders:
            encoders[seed] = pretrain_encoders(data.train, S.dim, S.pretrain_steps, seed)
        return run_row(row, seed, S, data, encoders[seed], progress)

    def refresh(row, seed, cached, cache):
        return compute(row, seed, cache) if cached.get("version") != RESULT_VERSION else None

    def describe(row, seed, r):
        per = ", ".join(f"{k} {100 * v['accuracy']:.1f}" for k, v in r["per_qtype"].items())
        return f"acc {100 * r['accuracy']:.1f}% ({per}), {r['experts_per_question']:.2f} experts/q, " \
               f"{r['train_seconds']:.0f} s"

    results = run_grid(S, work, compute, describe, refresh)
    return write_report(S, results, out, markdown, extra={
        "wall_seconds": time.perf_counter() - t0,
        "example_routing_prompt": routing_prompt(data.test.questions[0], POOL)})


def markdown(report: dict) -> str:
    S, res = report["settings"], report["results"]
    ms = mean_std
    n = S["seeds"]
    lines = [
        "# MoVA: coarse-to-fine mixture of vision experts, ShapeWorld miniature (spec §7.1, §7.4)", "",
        f"ShapeWorld VQA as 14-way classification: {S['train_scenes']} training and {S['test_scenes']} test scenes, "
        "two existence questions and one colour (open-ended), counting and spatial question per scene (where "
        "the scene allows). Frozen base: tiny ViT (8 x 8 tokens, width "
        f"{S['dim']}) pre-trained to count the objects. Frozen experts, pre-trained "
        f"{S['pretrain_steps']} steps on their own sub-task: **A** colour per cell (4 x 4 grid, width 32), **B** "
        "shape per cell (8 x 8, width 24), **C** cell occupancy + object count (16 x 16, width 16). Trained: the "
        f"MoV-Adapter ({S['num_blocks']} block(s), {S['num_heads']} heads, top-{S['top_k']}, RegStage depth "
        f"{S['reg_depth']}), its gate's text encoder and a FiLM answer reader (width {S['out_dim']}); "
        f"{S['steps']} AdamW steps, batch {S['batch_size']}, lr {S['lr']}. Each row's routing is written as "
        "letters and read back by `parse_routing`. Mean ± std over "
        f"{n} seed(s) (the seed sets the encoders' pre-training, the adapter init and the batch order; the data "
        "is the same). Made by `moevision mova`.", "",
        "| configuration | accuracy (%) | exist | colour | count | spatial | experts run / question | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, runs in res.items():
        if not runs:
            continue
        per = " | ".join(ms([r["per_qtype"][q]["accuracy"] for r in runs], 100, 1) for q in QTYPES)
        lines.append(f"| {ROWS[row]} | {ms([r['accuracy'] for r in runs], 100, 1)} | {per} | "
                     f"{ms([r['experts_per_question'] for r in runs])} | "
                     f"{ms([r['train_seconds'] for r in runs], digits=0)} |")
    lines += ["", "## Routing per question type (seed 0)", "",
              "Share of questions routing each expert (A colour, B shape, C layout), the most common routing "
              "text, and the adapter's gate weights (mean over blocks and over questions with a routed expert).",
              "", "| configuration | question type | routed A / B / C | most common routing | gate weight A / B / C |",
              "|---|---|---|---|---|"]
    for row, runs in res.items():
        if not runs or row == "base_only":
            continue
        for q in QTYPES:
            p = runs[0]["per_qtype"][q]
            lines.append(f"| {row} | {q} | {' / '.join(f'{v:.2f}' for v in p['routed_share'])} | "
                         f"`{p['top_routing']}` ({100 * p['top_routing_share']:.0f}%) | "
                         f"{' / '.join(f'{v:.2f}' for v in p['gate_weight'])} |")
    learned = res.get("learned_routing") or []
    if learned:
        lines += ["", "## Measured 'expert helps' labels (learned routing)", "",
                  f"Share of {S['measure_records']} training questions on which dropping the expert from an "
                  f"all-experts model ({S['measure_steps']} steps) raised the answer NLL by more than "
                  f"{S['help_margin']} nats, mean ± std over seeds; the router classifier's exact-match fit to "
                  "these labels: " + ms([r["router_train_fit"] for r in learned], 100, 1) + "%.", "",
                  "| question type | A colour | B shape | C layout |", "|---|---|---|---|"]
        for q in QTYPES:
            lines.append(f"| {q} | " + " | ".join(ms([r["measured_helps"][q][e] for r in learned], 100, 0) + "%"
                                                 for e in range(len(POOL))) + " |")
    if "wall_seconds" in report:
        lines += ["", f"Wall time of the command: {report['wall_seconds']:.0f} s (runs cached in the work "
                  "directory are not re-trained)."]
    return "\n".join(lines) + "\n"
