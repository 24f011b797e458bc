"""Plots of routing statistics and training curves (matplotlib, the optional extra ``plots``).

matplotlib is imported lazily, only when a plot is drawn, with a one-line error naming the extra when
it is missing. Figures are drawn on the Agg canvas directly (``matplotlib.figure.Figure``, never
``pyplot``), so the global backend of an interactive session is left alone and nothing needs a display.
Each function writes one PNG and returns its path. Inputs are ``routing.summarize`` dicts and a
``RoutingRecord`` (for the sample images); see ``routing.py`` for what the numbers mean.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MoEVisionError

DPI = 80


def _mpl():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MoEVisionError("plots need matplotlib: pip install 'moevision[plots]' (or pip install matplotlib)") \
            from None
    return matplotlib, Figure, FigureCanvasAgg


def _figure(w: float, h: float):
    _, Figure, Canvas = _mpl()
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    Canvas(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def expert_colors(num_experts: int) -> list:
    """One distinct colour per expert (tab10, tab20, then evenly spaced hues)."""
    mpl, _, _ = _mpl()
    name = "tab10" if num_experts <= 10 else ("tab20" if num_experts <= 20 else "hsv")
    cmap = mpl.colormaps[name]
    return [cmap(i if num_experts <= 20 else i / num_experts) for i in range(num_experts)]


def _cmap(num_experts: int):
    mpl, _, _ = _mpl()
    return mpl.colors.ListedColormap(expert_colors(num_experts))


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_load(summary: dict, path) -> Path:
    """Per-layer bars of each expert's share of the kept assignments; black ticks mark the router's
    choices before capacity (token choice), the dashed line the uniform share; dead experts are hatched."""
    layers = summary["layers"]
    rows, cols = _grid(len(layers))
    fig = _figure(3.6 * cols, 2.8 * rows)
    for i, L in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        E = L["num_experts"]
        bars = ax.bar(range(E), [100 * x for x in L["load_share"]], color=expert_colors(E))
        for e in L["dead_experts"]:
            bars[e].set_hatch("//")
        ax.axhline(100 / E, ls="--", c="k", lw=1)
        if L["kind"] == "token" and L["assignment_drop_rate"]:
            ax.scatter(range(E), [100 * x for x in L["choice_share"]], marker="_", s=400, c="k", lw=2,
                       label="chosen", zorder=3)
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_ylabel("% of assignments" if L["kind"] != "soft" else "% of combine mass")
        ax.set_title(f"block {L['block']} ({L['router']}), CV {L['load_cv']:.2f}", fontsize=10)
    return _save(fig, path)


def plot_class_expert(summary: dict, path) -> Path:
    """Per-layer heatmaps of P(expert | class), annotated in %, with I(class; expert) in the title."""
    layers, names = summary["layers"], summary["class_names"]
    fig = _figure(0.6 + (1.2 + 0.45 * layers[0]["num_experts"]) * len(layers), 0.9 + 0.32 * len(names))
    for i, L in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), i + 1)
        m = torch.tensor(L["class_expert"])
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for c in range(m.shape[0]):
            for e in range(m.shape[1]):
                ax.text(e, c, f"{100 * m[c, e]:.0f}", ha="center", va="center", fontsize=7,
                        color="w" if m[c, e] < 0.6 else "k")
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if i == 0 else [""] * len(names), fontsize=8)
        ax.set_title(f"block {L['block']}: I = {L['mi_class_bits']:.2f} bits", fontsize=10)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="P(expert | class)")
    return _save(fig, path)


def _overlay(ax, image_CHW: torch.Tensor, grid_BP, num_experts: int, alpha: float = 0.45, mask=None):
    """The image in grey (or RGB) with the patch grid coloured by expert; ``mask`` marks patches with a
    red cross (dropped tokens)."""
    img = image_CHW.permute(1, 2, 0).numpy()
    H, W = img.shape[:2]
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1, extent=(0, W, H, 0))
    g = grid_BP.shape[0]
    if num_experts:
        ax.imshow(grid_BP.numpy(), cmap=_cmap(num_experts), vmin=-0.5, vmax=num_experts - 0.5, alpha=alpha,
                  extent=(0, W, H, 0), interpolation="nearest")
    if mask is not None:
        for r, c in torch.nonzero(mask).tolist():
            cy, cx = (r + 0.5) * H / g, (c + 0.5) * W / g
            ax.plot(cx, cy, "x", color="red", ms=10, mew=2.5)
    for k in range(1, g):
        ax.axhline(k * H / g, c="w", lw=0.4)
        ax.axvline(k * W / g, c="w", lw=0.4)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(fig, num_experts: int) -> None:
    mpl, _, _ = _mpl()
    handles = [mpl.patches.Patch(color=c, label=f"expert {e}") for e, c in enumerate(expert_colors(num_experts))]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(num_experts, 8), fontsize=8)


def plot_expert_maps(record, summary: dict, path, num_samples: int = 6) -> Path:
    """One row per MoE layer: sample images with the layer's primary expert per patch overlaid (the CLS
    token's expert in the title), then the most frequent expert per patch position over the whole pass
    with its share in % (last column)."""
    g, prefix, layers = record.grid_size, record.num_prefix_tokens, record.layers
    picks = record.one_per_class(num_samples)
    S = len(picks)
    E = max(l.num_experts for l in layers)
    cols = S + 1
    fig = _figure(1.75 * cols, 1.9 * len(layers) + 0.5)
    names = record.class_names
    for j, (layer, L) in enumerate(zip(layers, summary["layers"])):
        prim = layer.primary_BN()
        for r, i in enumerate(picks):
            ax = fig.add_subplot(len(layers), cols, j * cols + r + 1)
            _overlay(ax, record.image(i), prim[i, prefix:].view(g, g), E)
            title = f"{names[int(record.labels[i])]}" + (f", CLS→{int(prim[i, 0])}" if prefix else "")
            ax.set_title(title, fontsize=8)
            if r == 0:
                ax.set_ylabel(f"block {layer.block}", fontsize=9)
        ax = fig.add_subplot(len(layers), cols, j * cols + cols)
        ax.imshow(torch.tensor(L["patch_mode"]).view(g, g).numpy(), cmap=_cmap(E), vmin=-0.5, vmax=E - 0.5)
        _annotate(ax, torch.tensor(L["patch_mode_share"]).view(g, g), "{:.0f}")
        ax.set_title(f"block {L['block']}: mode, %", fontsize=8)
    _legend(fig, E)
    return _save(fig, path)


def _annotate(ax, values_GG: torch.Tensor, fmt: str, scale: float = 100.0) -> None:
    g = values_GG.shape[0]
    for y in range(g):
        for x in range(values_GG.shape[1]):
            ax.text(x, y, fmt.format(scale * float(values_GG[y, x])), ha="center", va="center", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_drops(record, summary: dict, path, num_samples: int = 4) -> Path:
    """One row per MoE layer: the dropped-token rate per patch position (%, first column) and the
    images that lost the most tokens over all layers, dropped patches crossed out (none when nothing
    dropped). Patch cells are drawn as an even grid over the image (for a conv stem an approximation
    of where each token's receptive field is centred)."""
    g, prefix, layers = record.grid_size, record.num_prefix_tokens, record.layers
    lost = sum(l.dropped_BN().sum(1) for l in layers)  # tokens lost per image, all layers
    picks = torch.sort(lost, descending=True, stable=True).indices[:num_samples].tolist() if lost.any() else []
    S = len(picks)
    cols = S + 1
    fig = _figure(max(1.9 * cols + 0.6, 3.0), 2.0 * len(layers))
    for j, (layer, L) in enumerate(zip(layers, summary["layers"])):
        ax = fig.add_subplot(len(layers), cols, j * cols + 1)
        if L.get("patch_drop_rate") is None:
            ax.text(0.5, 0.5, f"block {L['block']}:\nsoft MoE,\nno drops", ha="center", va="center", fontsize=9)
            ax.set_axis_off()
            continue
        rate = torch.tensor(L["patch_drop_rate"]).view(g, g)
        im = ax.imshow(100 * rate.numpy(), cmap="Reds", vmin=0, vmax=max(1.0, 100 * float(rate.max())))
        _annotate(ax, rate, "{:.1f}")
        dropped = layer.dropped_BN()
        cls = f", CLS {100 * float(dropped[:, 0].double().mean()):.1f}" if prefix else ""
        ax.set_title(f"block {L['block']}: dropped %{cls}", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.7)
        for r, i in enumerate(picks):
            ax = fig.add_subplot(len(layers), cols, j * cols + r + 2)
            _overlay(ax, record.image(i), layer.primary_BN()[i, prefix:].view(g, g), 0,
                     mask=dropped[i, prefix:].view(g, g))
            ax.set_title(f"#{i} {record.class_names[int(record.labels[i])]}: {int(dropped[i].sum())}/"
                         f"{dropped.shape[1]} lost", fontsize=8)
    return _save(fig, path)


def plot_similarity(summary: dict, path) -> Path:
    """Per-layer cosine similarity between the experts' flattened weights."""
    layers = [L for L in summary["layers"] if L.get("similarity") is not None]
    fig = _figure(0.8 + 2.6 * len(layers), 2.6)
    for i, L in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), i + 1)
        m = torch.tensor(L["similarity"])
        im = ax.imshow(m.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        if m.shape[0] <= 12:
            for a in range(m.shape[0]):
                for b in range(m.shape[1]):
                    ax.text(b, a, f"{m[a, b]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(m.shape[0]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_title(f"block {L['block']}", fontsize=10)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="cosine")
    return _save(fig, path)


def plot_training_curves(records: list[dict], path) -> Path:
    """Training loss and accuracy, test accuracy, aux loss, and the per-MoE-layer load CV and dropped
    fraction at each evaluation, from the run's ``metrics.jsonl`` records."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig = _figure(11, 3.0)
    ax = fig.add_subplot(1, 4, 1)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax.set_xlabel("step")
    ax.set_title("training loss", fontsize=10)
    ax = fig.add_subplot(1, 4, 2)
    ax.plot([r["step"] for r in train], [100 * r["train_accuracy"] for r in train], lw=1, label="train")
    ax.plot([r["step"] for r in evals], [100 * r["test_accuracy"] for r in evals], "o-", label="test")
    ax.set_xlabel("step")
    ax.set_title("accuracy %", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 4, 3)
    ax.plot([r["step"] for r in train], [r.get("aux_loss", float("nan")) for r in train], lw=1)
    ax.set_xlabel("step")
    ax.set_title("aux loss (weighted)", fontsize=10)
    ax = fig.add_subplot(1, 4, 4)
    blocks = sorted({m["block"] for r in evals for m in r.get("moe_layers", [])})
    for b in blocks:
        pts = [(r["step"], m) for r in evals for m in r.get("moe_layers", []) if m["block"] == b]
        ax.plot([s for s, _ in pts], [m["load_cv"] for _, m in pts], "o-", label=f"block {b} load CV")
        ax.plot([s for s, _ in pts], [100 * m["dropped_fraction"] for _, m in pts], "x--",
                label=f"block {b} dropped %")
    ax.set_xlabel("step")
    ax.set_title("routing at each evaluation", fontsize=10)
    if blocks:
        ax.legend(fontsize=7)
    return _save(fig, path)
