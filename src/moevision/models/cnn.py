"""MoE CNNs with per-image channel-group experts: AdvMoE's MoE-CNN (Zhang et al., ICCV 2023; vision_moe.md §11).

An ``MoEConv2d`` with E experts holds E groups of ``C_out`` output channels (weight ``[E*C_out, C_in, k, k]``;
expert e owns channels ``[e*C_out, (e+1)*C_out)``, ``C_out = int(r * C_out_dense)`` for width ratio r). A
router picks one expert per image (top-1, straight-through): the image then runs through a pathway of
width r. As in the reference code (OPTML-Group/Robust-MoE-CNN):

- the router is **one global router CNN on the input image** whose scores reach every MoE conv (so all
  layers use the same expert for an image); ``router_scope="per_layer"`` gives each MoE conv its own linear
  router on the global-average-pooled layer input instead (the paper's figure, [R]);
- selection is ``one_hot(argmax s)`` in the forward and passes the gradient of that mask unchanged to the
  scores s (straight-through);
- the stem conv, the 1x1 shortcut convs, the BatchNorms (shared by the experts, after the selection) and
  the classifier are dense.

The forward computes every expert's channels and masks them in training (the reference code does so, and
the straight-through gradient needs every expert's output: dL/ds_e = <dL/dout, conv_e(x)>); in eval mode
it computes only each image's selected group (``MoEConv2d.forward_selected``), which is where the
inference saving comes from. Tests hold the two equal.

Models: ``cnn4`` (the spec's small 4-conv CNN for the CPU experiment) and ``resnet18`` (CIFAR-style
ResNet-18, BasicBlocks with MoE convs), each dense (``num_experts=0``) or MoE; images are [0, 1] and the
model normalises them itself (attacks work in pixel space).

Shape legend: B batch, C channels, H x W spatial, E experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config as C
from ..errors import ConfigError


def straight_through_top1(scores_BE: torch.Tensor) -> torch.Tensor:
    """``one_hot(argmax s)`` in the forward; the backward hands the mask's gradient to s unchanged."""
    hard = F.one_hot(scores_BE.argmax(-1), scores_BE.shape[-1]).to(scores_BE.dtype)
    return hard + (scores_BE - scores_BE.detach())


class MoEConv2d(nn.Module):
    """A conv whose E experts are groups of ``out_per_expert`` output channels; ``forward(x, mask_BE)``
    returns the selected group's channels, (B, out_per_expert, H', W')."""

    def __init__(self, in_ch: int, out_per_expert: int, kernel_size: int, *, num_experts: int, stride: int = 1,
                 padding: int = 0, bias: bool = False):
        super().__init__()
        if num_experts < 1 or out_per_expert < 1:
            raise ConfigError(f"MoEConv2d needs num_experts >= 1 and out_per_expert >= 1, got {num_experts}, "
                              f"{out_per_expert}")
        self.num_experts, self.out_per_expert = num_experts, out_per_expert
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(num_experts * out_per_expert, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_experts * out_per_expert)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, mask_BE: torch.Tensor) -> torch.Tensor:
        if not self.training and not mask_BE.requires_grad:
            return self.forward_selected(x, mask_BE.argmax(-1))
        return self.forward_masked(x, mask_BE)

    def forward_masked(self, x: torch.Tensor, mask_BE: torch.Tensor) -> torch.Tensor:
        """Every expert's channels, masked and summed (the reference code's computation)."""
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)  # (B, E*C, H, W)
        B, _, H, W = y.shape
        y = y.view(B, self.num_experts, self.out_per_expert, H, W)
        return (y * mask_BE.view(B, self.num_experts, 1, 1, 1).to(y.dtype)).sum(1)

    def forward_selected(self, x: torch.Tensor, expert_B: torch.Tensor) -> torch.Tensor:
        """Only each image's selected channel group: one conv per expert on its images."""
        c = self.out_per_expert
        if x.shape[0] == 0:
            return F.conv2d(x, self.weight[:c], None if self.bias is None else self.bias[:c], self.stride,
                            self.padding)
        out = None
        for e in torch.unique(expert_B).tolist():
            idx = (expert_B == e).nonzero().squeeze(1)
            w = self.weight[e * c:(e + 1) * c]
            b = None if self.bias is None else self.bias[e * c:(e + 1) * c]
            y = F.conv2d(x.index_select(0, idx), w, b, self.stride, self.padding)
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[idx] = y
        return out


class RouterCNN(nn.Module):
    """AdvMoE's global router: a small CIFAR ResNet on the input image -> E scores. ``widths`` per stage,
    ``blocks`` BasicBlocks per stage (reference code: (16, 32, 64) x 3, a ResNet-20)."""

    def __init__(self, in_chans: int, num_experts: int, widths=(16, 32, 64), blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(_DenseBasicBlock(c, w, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class _DenseBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


@dataclass
class CNNConfig:
    """A dense or MoE CNN (``num_experts`` 0 = dense). ``width_ratio`` r scales the channels of the MoE
    convs (each expert has int(r * C) of them); a dense model with r < 1 is the narrow dense baseline."""

    arch: str = "cnn4"  # "cnn4" | "resnet18"
    in_chans: int = 1
    num_classes: int = 10
    width: int = 32  # base channels (cnn4: 32, 64, 64 after the stem; resnet18: 64, 128, 256, 512)
    num_experts: int = 0
    width_ratio: float = 1.0
    router_scope: str = "global"  # "global" (reference code) | "per_layer" ([R], the paper's figure)
    router_widths: list = field(default_factory=lambda: [16, 32, 64])
    router_blocks: int = 3
    mean: list = field(default_factory=lambda: [0.2860])  # input normalisation (Fashion-MNIST)
    std: list = field(default_factory=lambda: [0.3530])

    def validate(self) -> None:
        C.check(self.arch in ("cnn4", "resnet18"), "model.arch", self.arch, "must be 'cnn4' or 'resnet18'")
        for k in ("in_chans", "num_classes", "width"):
            C.check(isinstance(getattr(self, k), int) and getattr(self, k) >= 1, f"model.{k}", getattr(self, k),
                    "must be a positive integer")
        C.check(isinstance(self.num_experts, int) and self.num_experts >= 0, "model.num_experts",
                self.num_experts, "must be >= 0 (0 = dense)")
        C.check(0 < self.width_ratio <= 1, "model.width_ratio", self.width_ratio, "must be in (0, 1]")
        C.check(self.router_scope in ("global", "per_layer"), "model.router_scope", self.router_scope,
                "must be 'global' or 'per_layer'")
        C.check(len(self.mean) == self.in_chans and len(self.std) == self.in_chans, "model.mean/std",
                (self.mean, self.std), f"need {self.in_chans} entries")
        C.check(int(self.width * self.width_ratio) >= 1, "model.width_ratio", self.width_ratio,
                f"leaves no channel of width {self.width}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ConvBN(nn.Module):
    """conv (dense or MoE) -> BN (shared by the experts, after selection)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, E: int, per_layer_router: bool):
        super().__init__()
        self.moe = E > 0
        self.conv = (MoEConv2d(cin, cout, k, num_experts=E, stride=stride, padding=k // 2) if self.moe
                     else nn.Conv2d(cin, cout, k, stride, k // 2, bias=False))
        self.bn = nn.BatchNorm2d(cout)
        self.router = nn.Linear(cin, E) if (self.moe and per_layer_router) else None

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        if not self.moe:
            return self.bn(self.conv(x))
        if self.router is not None:
            s = self.router(F.adaptive_avg_pool2d(x, 1).flatten(1))
            ctx.setdefault("scores", []).append(s)
            mask = (straight_through_top1(s) if ctx.get("straight_through", True)
                    else F.one_hot(s.argmax(-1), s.shape[-1]).to(s.dtype))
        else:
            mask = ctx["mask"]
        return self.bn(self.conv(x, mask))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, E: int, per_layer_router: bool):
        super().__init__()
        self.a = _ConvBN(cin, cout, 3, stride, E, per_layer_router)
        self.b = _ConvBN(cout, cout, 3, 1, E, per_layer_router)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x, ctx):
        return F.relu(self.b(F.relu(self.a(x, ctx)), ctx) + self.short(x))


class MoECNN(nn.Module):
    """``forward(images01)`` -> logits; ``forward_with_router(images01)`` -> (logits, router scores (B, E)
    or None). The selected expert of image b is ``scores[b].argmax()``."""

    arch_name = "cnn"

    def __init__(self, config: CNNConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        E, r = cfg.num_experts, cfg.width_ratio
        per_layer = E > 0 and cfg.router_scope == "per_layer"
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        w = cfg.width
        narrow = lambda c: max(1, int(c * r))  # noqa: E731  (int(r * C), floor, as the reference code)
        # the stem keeps the dense width
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_chans, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        if cfg.arch == "cnn4":
            chans, strides = [w, 2 * w, 2 * w], [1, 2, 2]
            self.body = nn.ModuleList()
            cin = w
            for c, s in zip(chans, strides):
                self.body.append(_ConvBN(cin, narrow(c), 3, s, E, per_layer))
                cin = narrow(c)
        else:  # resnet18 (CIFAR variant: 3x3 stem, no max-pool)
            self.body = nn.ModuleList()
            cin = w
            for i, c in enumerate([w, 2 * w, 4 * w, 8 * w]):
                for j in range(2):
                    self.body.append(_BasicBlock(cin, narrow(c), 2 if (i > 0 and j == 0) else 1, E, per_layer))
                    cin = narrow(c)
        self.feat_dim = cin
        self.fc = nn.Linear(cin, cfg.num_classes)
        self.router = (RouterCNN(cfg.in_chans, E, tuple(cfg.router_widths), cfg.router_blocks)
                       if E > 0 and not per_layer else None)

    @property
    def is_moe(self) -> bool:
        return self.config.num_experts > 0

    def router_parameters(self) -> list[nn.Parameter]:
        """φ: the global router CNN, or the per-layer routers."""
        return [p for n, p in self.named_parameters() if n.startswith("router.") or ".router." in n]

    def expert_parameters(self) -> list[nn.Parameter]:
        """θ: everything but the routers (experts, stem, shortcuts, BatchNorms, classifier)."""
        ids = {id(p) for p in self.router_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def router_scores(self, images01: torch.Tensor) -> torch.Tensor:
        """The global router's scores (B, E) on [0, 1] images."""
        if self.router is None:
            raise ConfigError("this model has no global router (dense, or router_scope='per_layer')")
        return self.router(self._norm(images01))

    def _norm(self, x):
        return (x - self.mean) / self.std

    def forward_with_router(self, images01: torch.Tensor, *, straight_through: bool = True):
        """``straight_through=False`` holds each image's routing fixed: the selection carries no gradient,
        so the gradient w.r.t. the input is the deployed (piecewise) model's own, almost everywhere. With
        the straight-through surrogate (default, as in training) an attack also follows dL/ds through the
        router, which can point away from any real change of the output (see ``evaluate_robust``)."""
        if images01.dim() != 4 or images01.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images (B, {self.config.in_chans}, H, W), got {tuple(images01.shape)}")
        x = self._norm(images01)
        ctx: dict = {"straight_through": straight_through}
        scores = None
        if self.router is not None:
            scores = self.router(x)
            ctx["mask"] = (straight_through_top1(scores) if straight_through
                           else F.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype))
        h = self.stem(x)
        for layer in self.body:
            h = F.relu(layer(h, ctx)) if isinstance(layer, _ConvBN) else layer(h, ctx)
        if scores is None and ctx.get("scores"):
            scores = ctx["scores"][0]  # per-layer routers: report the first layer's
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1)), scores

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.forward_with_router(images01)[0]

    @torch.no_grad()
    def inference_flops(self, image_size: int) -> int:
        """Multiply-adds x 2 per image at inference, counted by hooks on one eval forward: only the
        selected pathway of each MoE conv, plus the router(s), stem, shortcuts and classifier."""
        counts = []

        def hook(mod, inp, out):
            if isinstance(mod, MoEConv2d):
                k = mod.weight.shape[-1]
                counts.append(2 * mod.weight.shape[1] * k * k * out[0].numel())
            elif isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                counts.append(2 * (mod.in_channels // mod.groups) * k * out[0].numel())
            elif isinstance(mod, nn.Linear):
                counts.append(2 * mod.in_features * mod.out_features)

        handles = [m.register_forward_hook(hook) for m in self.modules()
                   if isinstance(m, (MoEConv2d, nn.Conv2d, nn.Linear))]
        was = self.training
        self.eval()
        try:
            self(torch.zeros(1, self.config.in_chans, image_size, image_size, device=self.mean.device))
        finally:
            self.train(was)
            for h in handles:
                h.remove()
        return int(sum(counts))


class FixedRouting(nn.Module):
    """``model`` with its routing held fixed for gradients (``straight_through=False``): what an attack on
    the deployed model differentiates (``moevision.techniques.advmoe.evaluate_robust``, AutoAttack)."""

    def __init__(self, model: MoECNN):
        super().__init__()
        self.model = model

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model.forward_with_router(images01, straight_through=False)[0]


def build_cnn(**kw) -> MoECNN:
    return MoECNN(CNNConfig(**kw))
