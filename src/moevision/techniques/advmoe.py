"""AdvMoE: adversarially robust MoE-CNN training (Zhang et al., ICCV 2023; vision_moe.md §11).

Plain adversarial training of an MoE-CNN's router and experts together makes a less robust model than
adversarially training a dense CNN; AdvMoE splits robustness into router robustness and pathway
robustness and trains them by alternating TRADES steps (the official code, OPTML-Group/Robust-MoE-CNN):

    attack(θ, φ, x):  x_adv = x + 0.001·N(0, 1); K times:
                      x_adv = clip_{x,ε}(x_adv + η·sign ∇ [KL(p(x) ‖ p(x_adv)) + KL(r(x) ‖ r(x_adv))]),
                      then clamp to [0, 1]   (model and router in eval mode;
                      p = softmax of the classifier, r = softmax of the router; sum reduction)
    step 1 (θ: experts, stem, BN, classifier; φ fixed):  x_adv = attack(θ, φ, x);
                      L_θ = CE(f(x), y) + β · KL(softmax f(x) ‖ f(x_adv)) / B;  an SGD step on θ
    step 2 (φ: the router; θ fixed):  x_adv = attack(θ_new, φ, x);
                      ``router_loss="proxy_label"`` (the code):
                          L_φ = α·CE(R(x), y mod E) + β·KL(R(x) ‖ R(x_adv)) / B
                      ``router_loss="trades_through_moe"`` (the paper's bi-level form, [R]): the TRADES loss of
                      the whole MoE, its gradient reaching φ through the straight-through selection

with separate SGD optimisers for θ and φ (same hyper-parameters). The other half's *parameters* are frozen
during each step, but the model is in train mode for both (as in the code), so BatchNorm running statistics
move in both. ``joint_trades_step`` is the baseline: one TRADES step on all parameters (router and experts
together), as "conventional AT applied to MoE-CNN"; its attack has no router KL term (conventional TRADES).
Evaluation: SA (clean accuracy), RA (PGD white-box, ``pgd_attack``), router accuracy (the routing decision
against ``y mod E``) clean and under an attack on the router alone.

Defaults [V args.py]: ε = 8/255, K = 2 steps of η = 5/255 in training; PGD-10 with step 2/255 at test; β = 6,
α = 6; SGD lr 0.1, momentum 0.9, wd 5e-4, cosine. The CPU experiment (§11(e), Fashion-MNIST) uses ε = 0.1.

Shape legend: B batch, E experts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.cnn import CNNConfig, FixedRouting, MoECNN
from ._experiment import check_grid_settings, load_subsets, mean_std, run_grid, write_report


# ---------------------------------------------------------------------------------------------------
# attacks
def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(softmax(clean) ‖ softmax(adv)), summed over the batch (TRADES: ``KLDivLoss(reduction='sum')`` of
    log_softmax(adv) against softmax(clean)); callers divide by B where the loss is an average."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="sum")


def _eval_mode(model: nn.Module):
    class _Ctx:
        def __enter__(self):
            self.was = model.training
            model.eval()

        def __exit__(self, *a):
            model.train(self.was)
    return _Ctx()


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def trades_attack(model: MoECNN, x: torch.Tensor, *, eps: float, step: float, steps: int,
                  router_term: bool = True, generator: torch.Generator | None = None,
                  straight_through: bool = True) -> torch.Tensor:
    """AdvMoE's training attack: maximise KL(p(x) ‖ p(x_adv)) (+ KL(r(x) ‖ r(x_adv)) for the router, when the
    model has a global router and ``router_term``) by K signed-gradient steps inside the ε-ball and [0, 1].
    ``straight_through=False`` differentiates the classifier with the routing held fixed (the router term,
    if any, still moves the router's scores)."""
    with _eval_mode(model):
        with torch.no_grad():
            clean_logits, clean_scores = model.forward_with_router(x)
            use_router = router_term and model.router is not None
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None \
            else torch.randn_like(x)
        x_adv = _project(x + 0.001 * noise, x, eps).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits, scores = model.forward_with_router(x_adv, straight_through=straight_through)
            loss = trades_kl(clean_logits, logits)
            if use_router:
                loss = loss + trades_kl(clean_scores, scores)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = _project(x_adv.detach() + step * grad.sign(), x, eps)
    return x_adv.detach()


def pgd_attack(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, eps: float, step: float,
               steps: int, random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """L∞ PGD that maximises ``loss_fn(x_adv)`` (a scalar) within the ε-ball around x and the [0, 1] box."""
    if random_start:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None \
            else torch.rand_like(x)
        x_adv = _project(x + (2 * u - 1) * eps, x, eps)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
        x_adv = _project(x_adv.detach() + step * grad.sign(), x, eps)
    return x_adv.detach()


# ---------------------------------------------------------------------------------------------------
# training steps
@dataclass
class AdvConfig:
    eps: float = 8 / 255
    step: float = 5 / 255  # training attack step η
    steps: int = 2  # training attack steps K
    beta: float = 6.0  # TRADES 1/λ
    alpha: float = 6.0  # weight of the router's proxy-label CE
    router_loss: str = "proxy_label"  # "proxy_label" (code) | "trades_through_moe" (paper, [R])
    # training attacks through the straight-through surrogate (the code) or with routing held fixed (ours)
    attack_routing: str = "straight_through"

    def validate(self) -> None:
        if not (self.eps >= 0 and self.step >= 0 and isinstance(self.steps, int) and self.steps >= 0):
            raise ConfigError(f"eps, step must be >= 0 and steps a non-negative integer, got {self.eps}, "
                              f"{self.step}, {self.steps}")
        if self.attack_routing not in ("straight_through", "fixed"):
            raise ConfigError(f"attack_routing must be 'straight_through' or 'fixed', got {self.attack_routing!r}")
        if self.router_loss not in ("proxy_label", "trades_through_moe"):
            raise ConfigError(f"router_loss must be 'proxy_label' or 'trades_through_moe', got {self.router_loss!r}")


def trades_loss(model: MoECNN, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + β · KL(softmax f(x) ‖ f(x_adv)) / B."""
    logits = model(x)
    return F.cross_entropy(logits, y) + beta * trades_kl(logits, model(x_adv)) / x.shape[0]


def advmoe_step(model: MoECNN, x: torch.Tensor, y: torch.Tensor, opt_theta: torch.optim.Optimizer,
                opt_phi: torch.optim.Optimizer, cfg: AdvConfig) -> dict[str, float]:
    """One AdvMoE iteration: a TRADES step on θ (router fixed), then one on φ (θ fixed)."""
    if model.router is None:
        raise ConfigError("AdvMoE needs an MoE-CNN with a global router (num_experts > 0, router_scope='global')")
    theta, phi = model.expert_parameters(), model.router_parameters()
    # step 1: experts
    x_adv = trades_attack(model, x, eps=cfg.eps, step=cfg.step, steps=cfg.steps,
                          straight_through=cfg.attack_routing == "straight_through")
    _requires_grad(phi, False)
    loss_t = trades_loss(model, x, x_adv, y, cfg.beta)
    opt_theta.zero_grad(set_to_none=True)
    loss_t.backward()
    opt_theta.step()
    _requires_grad(phi, True)
    # step 2: router, against the updated experts
    x_adv = trades_attack(model, x, eps=cfg.eps, step=cfg.step, steps=cfg.steps,
                          straight_through=cfg.attack_routing == "straight_through")
    _requires_grad(theta, False)
    if cfg.router_loss == "proxy_label":
        E = model.config.num_experts
        s_clean, s_adv = model.router_scores(x), model.router_scores(x_adv)
        loss_p = cfg.alpha * F.cross_entropy(s_clean, y % E) + cfg.beta * trades_kl(s_clean, s_adv) / x.shape[0]
    else:
        loss_p = trades_loss(model, x, x_adv, y, cfg.beta)
    opt_phi.zero_grad(set_to_none=True)
    loss_p.backward()
    opt_phi.step()
    _requires_grad(theta, True)
    return {"loss_theta": float(loss_t.detach()), "loss_phi": float(loss_p.detach())}


def joint_trades_step(model: MoECNN, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                      cfg: AdvConfig) -> dict[str, float]:
    """Conventional TRADES on every parameter at once (dense CNNs, and the joint-AT MoE baseline)."""
    x_adv = trades_attack(model, x, eps=cfg.eps, step=cfg.step, steps=cfg.steps, router_term=False,
                          straight_through=cfg.attack_routing == "straight_through")
    loss = trades_loss(model, x, x_adv, y, cfg.beta)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach())}


def _requires_grad(params, flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------
# evaluation
EVAL_VERSION = 2  # cached results from an older evaluation are re-evaluated from the saved weights


def evaluate_robust(model: MoECNN, images01: torch.Tensor, labels: torch.Tensor, *, eps: float, step: float,
                    steps: int, batch_size: int = 500, seed: int = 0) -> dict[str, float]:
    """SA and RA under PGD-``steps`` (white-box, CE, random start); for MoE models also the routing accuracy
    against ``y mod E``, clean and under a PGD attack on the router alone (router robustness).

    An MoE-CNN's routing is discrete, so "the" gradient w.r.t. the input has two versions, and an MoE model
    is attacked with both:
    - ``ra_ste``: through the straight-through surrogate (the reference code's attack, as in training);
    - ``ra_fixed``: with each image's routing held fixed (the deployed model's own gradient almost
      everywhere; ``FixedRouting``).
    ``ra`` counts an image as robust only if it survives both (per-image worst case). Measured here: the
    straight-through gradient alone can leave a jointly trained MoE-CNN with RA close to its SA, a
    gradient-masking artefact that the fixed-routing attack removes."""
    model.eval()
    gen = torch.Generator(device=images01.device).manual_seed(seed)
    moe = model.is_moe  # global or per-layer routers: both are attacked with the routing held fixed too
    has_router = model.router is not None  # router metrics need the global router
    fixed = FixedRouting(model) if moe else model
    sa = ra = ra_ste = ra_fixed = r_clean = r_adv = 0
    n = len(labels)
    E = model.config.num_experts
    for s in range(0, n, batch_size):
        x, y = images01[s:s + batch_size], labels[s:s + batch_size]
        with torch.no_grad():
            sa += int((model(x).argmax(1) == y).sum())
        x_adv = pgd_attack(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x, eps=eps, step=step,
                           steps=steps, generator=gen)
        with torch.no_grad():
            ok = model(x_adv).argmax(1) == y
        ra_ste += int(ok.sum())
        if moe:
            x_fix = pgd_attack(lambda z: F.cross_entropy(fixed(z), y, reduction="sum"), x, eps=eps, step=step,
                               steps=steps, generator=gen)
            with torch.no_grad():
                ok_fix = model(x_fix).argmax(1) == y
            ra_fixed += int(ok_fix.sum())
            ok = ok & ok_fix
        if has_router:
            yr = y % E
            with torch.no_grad():
                r_clean += int((model.router_scores(x).argmax(1) == yr).sum())
            xr = pgd_attack(lambda z: F.cross_entropy(model.router_scores(z), yr, reduction="sum"), x, eps=eps,
                            step=step, steps=steps, generator=gen)
            with torch.no_grad():
                r_adv += int((model.router_scores(xr).argmax(1) == yr).sum())
        ra += int(ok.sum())
    out = {"sa": sa / n, "ra": ra / n, "eval_version": EVAL_VERSION}
    if moe:
        out.update(ra_ste=ra_ste / n, ra_fixed=ra_fixed / n)
    if has_router:
        out.update(router_acc=r_clean / n, router_ra=r_adv / n)
    return out


AA_ATTACKS = ("apgd-ce", "apgd-dlr")


def evaluate_autoattack(model: MoECNN, images01: torch.Tensor, labels: torch.Tensor, *, eps: float,
                        attacks: tuple[str, ...] = AA_ATTACKS, seed: int = 0, batch_size: int = 500) -> float:
    """Robust accuracy under AutoAttack's attacks (Croce & Hein 2020; the reference implementation, packaged
    on PyPI as ``pyautoattack``) with the standard version's settings (100 iterations, 1 restart), run in
    turn on the points still robust. Default: APGD-CE and APGD-DLR (the step-size-free PGD with the
    cross-entropy and with the scale-invariant DLR loss). The full standard set (``apgd-ce``, ``apgd-t``,
    ``fab-t``, ``square``) can be asked for. MoE models are attacked with their routing held fixed for the
    gradient (``FixedRouting``; the straight-through surrogate masks gradients, see ``evaluate_robust``);
    on 2 CPU cores APGD-T (9 targets) takes ~5 min and Square
    (5000 queries, gradient-free) ~10 min per small model on 500 images, so the default leaves them out."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise ImportError("AutoAttack needs the package pyautoattack: pip install 'moevision[robust]' "
                          "(or pip install pyautoattack)") from e
    import logging

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    model.eval()
    target = FixedRouting(model) if model.is_moe else model  # the deployed model's gradient
    aa = AutoAttack(target, norm="Linf", eps=eps, version="standard", seed=seed, device=images01.device)
    aa.verbose = False
    unknown = sorted(set(attacks) - {"apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"})
    if unknown or not attacks:
        raise ConfigError(f"unknown AutoAttack attack(s) {unknown}; choose from apgd-ce, apgd-dlr, apgd-t, fab, "
                          f"fab-t, square")
    aa.attacks_to_run = list(attacks)
    x_adv, _ = aa.run_standard_evaluation(images01, labels, batch_size=batch_size)
    if (x_adv - images01).abs().max() > eps + 1e-5:
        raise RuntimeError("AutoAttack returned points outside the eps-ball")
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------------
# the experiment (§11(e))
ROWS = {
    "dense_full": "dense CNN, full width, TRADES",
    "dense_half": "dense CNN, half width, TRADES",
    "moe_joint": "MoE-CNN (E=2, r=0.5), joint TRADES (router + experts together)",
    "advmoe": "MoE-CNN (E=2, r=0.5), AdvMoE (alternating θ / φ TRADES)",
    "advmoe_through": "MoE-CNN, AdvMoE with the router trained through the MoE's TRADES loss [R]",
    "moe_joint_fixed": "MoE-CNN, joint TRADES, training attacks with routing held fixed (ours)",
    "advmoe_fixed": "MoE-CNN, AdvMoE, training attacks with routing held fixed (ours)",
}


@dataclass
class AdvMoESettings:
    dataset: str = "fashion_mnist"
    train_subset: int = 10000
    test_subset: int = 1000
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 0.1
    train_step: float = 0.0625  # η: 5/8 of ε, the code's 5/255 for 8/255
    train_steps: int = 2
    test_step: float = 0.025  # 2/8 of ε, the code's 2/255 for 8/255
    test_steps: int = 10
    beta: float = 6.0
    alpha: float = 6.0
    width: int = 32
    num_experts: int = 2
    width_ratio: float = 0.5
    router_widths: tuple = (8, 16)
    router_blocks: int = 1
    seeds: int = 3
    rows: tuple = ("dense_full", "dense_half", "moe_joint", "advmoe")
    autoattack: int = 0  # test images also attacked with AutoAttack (0: off)
    autoattack_attacks: tuple = AA_ATTACKS

    def validate(self) -> None:
        check_grid_settings(self, ("train_subset", "test_subset", "epochs", "batch_size", "seeds", "test_steps"),
                            ROWS)
        if not 0 < self.eps <= 1:
            raise ConfigError(f"eps must be in (0, 1] (pixels in [0, 1]), got {self.eps}")


def build_row_model(row: str, S: AdvMoESettings, in_chans: int, num_classes: int, mean, std) -> MoECNN:
    kw: dict[str, Any] = dict(arch="cnn4", in_chans=in_chans, num_classes=num_classes, width=S.width,
                              mean=list(mean), std=list(std))
    if row == "dense_half":
        kw["width_ratio"] = S.width_ratio
    elif row != "dense_full":
        kw.update(num_experts=S.num_experts, width_ratio=S.width_ratio, router_widths=list(S.router_widths),
                  router_blocks=S.router_blocks)
    return MoECNN(CNNConfig(**kw))


def train_row(row: str, seed: int, S: AdvMoESettings, data, *, progress: bool = True,
              model_path: Path | None = None) -> dict[str, Any]:
    """Train configuration ``row`` with ``seed``, evaluate it; the weights go to ``model_path`` (safetensors,
    the model config in its metadata; ``load_row_model`` reads it back) when given."""
    from tqdm.auto import tqdm

    from ..data import iterate_batches

    train, test = data
    torch.manual_seed(seed)
    model = build_row_model(row, S, train.image_shape[0], train.num_classes, train.mean, train.std)
    cfg = AdvConfig(eps=S.eps, step=S.train_step, steps=S.train_steps, beta=S.beta, alpha=S.alpha,
                    router_loss="trades_through_moe" if row == "advmoe_through" else "proxy_label",
                    attack_routing="fixed" if row.endswith("_fixed") else "straight_through")
    cfg.validate()

    def sgd(params):
        return torch.optim.SGD(params, lr=S.lr, momentum=S.momentum, weight_decay=S.weight_decay)

    alternating = row.startswith("advmoe")
    if alternating:
        opts = [sgd(model.expert_parameters()), sgd(model.router_parameters())]
    else:
        opts = [sgd(model.parameters())]
    steps_per_epoch = len(train) // S.batch_size
    total = steps_per_epoch * S.epochs
    bar = tqdm(total=total, desc=f"{row} seed {seed}", unit="step", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=1.0)
    step, t0 = 0, time.perf_counter()
    for epoch in range(S.epochs):
        model.train()
        for x, y in iterate_batches(train, S.batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True):
            lr = 0.5 * S.lr * (1 + math.cos(math.pi * step / total))  # cosine, per step
            for o in opts:
                for g in o.param_groups:
                    g["lr"] = lr
            if alternating:
                info = advmoe_step(model, x, y, opts[0], opts[1], cfg)
            else:
                info = joint_trades_step(model, x, y, opts[0], cfg)
            if not all(math.isfinite(v) for v in info.values()):
                raise FloatingPointError(f"{row} seed {seed}: non-finite loss {info} at step {step}; lower lr")
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in info.items()})
    bar.close()
    train_s = time.perf_counter() - t0
    if model_path is not None:  # the weights first: an evaluation can be redone from them
        from safetensors.torch import save_file

        from ..utils import atomic_write

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": json.dumps(model.config.to_dict())}
        atomic_write(Path(model_path), lambda p: save_file(state, p, metadata=meta))
    res = evaluate_row(model, S, test, seed)
    res.update(row=row, seed=seed, steps=step, train_seconds=train_s,
               mflops=model.inference_flops(test.image_shape[-1]) / 1e6,
               params=sum(p.numel() for p in model.parameters()))
    return res


def evaluate_row(model: MoECNN, S: AdvMoESettings, test, seed: int) -> dict[str, Any]:
    """``evaluate_robust`` on the test set, then AutoAttack on its first ``S.autoattack`` images."""
    res = evaluate_robust(model, test.float_images(), test.labels, eps=S.eps, step=S.test_step,
                          steps=S.test_steps, seed=seed)
    if S.autoattack:
        n = min(S.autoattack, len(test))
        t1 = time.perf_counter()
        res["aa"] = evaluate_autoattack(model, test.float_images()[:n], test.labels[:n], eps=S.eps, seed=seed,
                                        attacks=tuple(S.autoattack_attacks))
        res["aa_images"], res["aa_seconds"] = n, time.perf_counter() - t1
    return res


def run_advmoe(S: AdvMoESettings, *, out: Path | None = None, work: Path | None = None,
               data_dir: str | None = None, download: bool = False, progress: bool = True) -> dict[str, Any]:
    """Every row x seed (finished runs cached in ``work``, with their weights); writes ``out`` (Markdown)
    and its .json."""
    S.validate()
    data = load_subsets(S.dataset, S.train_subset, S.test_subset, data_dir, download)

    def compute(row, seed, cache):
        return train_row(row, seed, S, data, progress=progress,
                         model_path=None if cache is None else cache.with_suffix(".safetensors"))

    def refresh(row, seed, res, cache):  # version 2 changed only how MoE models are attacked
        weights = cache.with_suffix(".safetensors")
        if res.get("eval_version", 1) < EVAL_VERSION and "router_acc" in res and weights.is_file():
            return {**res, **evaluate_row(load_row_model(weights), S, data[1], seed)}
        return None

    def describe(row, seed, res):
        extra = (f", router {100 * res['router_acc']:.1f}% / attacked {100 * res['router_ra']:.1f}%"
                 if "router_acc" in res else "")
        if "aa" in res:
            extra += f", AA {100 * res['aa']:.2f}% ({res['aa_images']} images)"
        return (f"SA {100 * res['sa']:.2f}%, RA {100 * res['ra']:.2f}%{extra}, {res['mflops']:.2f} MFLOPs, "
                f"{res['train_seconds']:.0f} s")

    return write_report(S, run_grid(S, work, compute, describe, refresh), out, markdown)


def load_row_model(path: str | Path) -> MoECNN:
    """A model saved by ``train_row`` (safetensors; weights only, never unpickled)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ConfigError(f"{path}: no model config in the file's metadata; not written by moevision advmoe")
    model = MoECNN(CNNConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def _ms(vals, scale=100.0, digits=2) -> str:
    return mean_std(vals, scale, digits)


def markdown(report: dict) -> str:
    S, res = report["settings"], report["results"]
    lines = [
        "# Adversarially robust MoE-CNN: AdvMoE vs adversarial training (vision_moe.md §11)", "",
        f"{S['dataset']}, {S['train_subset']} training / {S['test_subset']} test images, {S['epochs']} epochs, "
        f"batch {S['batch_size']}, SGD lr {S['lr']} (cosine), momentum {S['momentum']}, wd {S['weight_decay']}. "
        f"TRADES β = {S['beta']}; training attack: {S['train_steps']} steps of {S['train_step']} in an L∞ ball "
        f"of ε = {S['eps']} (pixels in [0, 1]); RA: PGD-{S['test_steps']} (step {S['test_step']}, random start, "
        f"white-box CE). Small 4-conv CNN (stem {S['width']} channels, then {S['width']}, {2 * S['width']}, "
        f"{2 * S['width']}); MoE rows: E = {S['num_experts']}, width ratio r = {S['width_ratio']}, a global "
        f"router CNN (widths {list(S['router_widths'])}, {S['router_blocks']} block per stage). Router accuracy: "
        f"the routing decision against the code's proxy target y mod E, clean / under PGD on the router "
        f"alone. FLOPs: one image at inference (only the selected pathway; router included). "
        "MoE models are attacked twice, through the straight-through surrogate (the reference code's attack) "
        "and with each image's routing held fixed (the deployed model's own gradient); RA, PGD counts an image "
        "as robust only if it survives both, and AutoAttack uses the fixed-routing gradient. "
        f"Mean ± std over {S['seeds']} seed(s). Made by `moevision advmoe`." + (
            f" AutoAttack: {', '.join(S.get('autoattack_attacks', AA_ATTACKS))} (the reference implementation, "
            f"standard settings) on the first {S['autoattack']} test images." if S.get("autoattack") else ""), "",
        "| configuration | SA (%) | RA, PGD (%) | RA, PGD straight-through / fixed routing (%) | "
        "RA, AutoAttack (%) | router acc. clean / attacked (%) | MFLOPs / image | params | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, runs in res.items():
        if not runs:
            continue
        router = (f"{_ms([r['router_acc'] for r in runs], digits=1)} / {_ms([r['router_ra'] for r in runs], digits=1)}"
                  if "router_acc" in runs[0] else "-")
        aa = _ms([r["aa"] for r in runs]) if all("aa" in r for r in runs) else "-"
        both = (f"{_ms([r['ra_ste'] for r in runs])} / {_ms([r['ra_fixed'] for r in runs])}"
                if all("ra_fixed" in r for r in runs) else "-")
        lines.append(f"| {ROWS[row]} | {_ms([r['sa'] for r in runs])} | {_ms([r['ra'] for r in runs])} | {both} | "
                     f"{aa} | "
                     f"{router} | "
                     f"{runs[0]['mflops']:.2f} | {runs[0]['params']:,} | "
                     f"{_ms([r['train_seconds'] for r in runs], scale=1.0, digits=0)} |")
    return "\n".join(lines) + "\n"
