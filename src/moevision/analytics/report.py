"""``moevision analyze``: one routing pass over a split, PNG plots and a self-contained ``report.html``.

The report embeds its images (base64 PNG), so the one file can be mailed or archived. Every section
carries a short interpretation computed from the numbers (``interpret``), summary tables, and the
plots of ``plots.py``; ``routing_summary.json`` holds all the numbers and ``report.md`` the same report
in Markdown (images linked, not embedded). Works on a run directory (its model, data set and
``metrics.jsonl``) and on a ``save_pretrained`` model directory (pass the data set).
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path

from ..errors import MoEVisionError
from . import plots as P
from .routing import collect_routing, summarize

SECTIONS = (("summary", "Summary"), ("load", "Expert load"), ("classes", "Class × expert affinity"),
            ("expert-maps", "Expert maps over images"), ("drops", "Dropped tokens"),
            ("similarity", "Expert weight similarity"), ("training", "Training curves"))


def load_source(source, *, split: str = "test", dataset: str | None = None, data_dir: str | None = None):
    """(model, data set split, run config, metrics records) of a run directory or a model directory."""
    from ..models import from_pretrained
    from ..train import RunConfig, load_checkpoint, read_run_config
    from ..train.engine import MODEL_DIR, METRICS_NAME, build_model, load_data

    src = Path(source)
    if split not in ("train", "test"):
        raise MoEVisionError(f"--split must be 'train' or 'test', got {split!r}")
    if not src.is_dir():
        raise MoEVisionError(f"{src} does not exist or is not a directory (expected a run directory or a model "
                             f"directory written by save_pretrained)")
    try:
        is_model_dir = "architecture" in json.loads((src / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        is_model_dir = False
    records: list[dict] = []
    if is_model_dir:
        model = from_pretrained(src)
        cfg = RunConfig(recipe="-", model_name=model.model_name or "?", model=model.config)
        cfg.data.dataset = dataset or "fashion_mnist"
    else:
        cfg = read_run_config(src)
        if dataset and dataset != cfg.data.dataset:
            raise MoEVisionError(f"--dataset {dataset!r} differs from the run's data.dataset={cfg.data.dataset!r}; "
                                 f"a run directory is analysed on its own data set")
        if (src / MODEL_DIR / "config.json").is_file():
            model = from_pretrained(src / MODEL_DIR)
        elif (src / "checkpoint.safetensors").is_file():
            model = build_model(cfg)
            load_checkpoint(src / "checkpoint.safetensors", model=model, restore_rng=False)
        else:
            raise MoEVisionError(f"{src} has neither model/ nor checkpoint.safetensors: nothing to analyse")
        mpath = src / METRICS_NAME
        if mpath.is_file():
            for line in mpath.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    if data_dir:
        cfg.data.data_dir = data_dir
    train, test = load_data(cfg)
    return model, (train if split == "train" else test), cfg, records


# ------------------------------------------------------------------ text computed from the numbers


def _pct(x: float) -> str:
    return "0%" if x == 0 else (f"{100 * x:.2f}%" if abs(x) < 0.01 else f"{100 * x:.1f}%")


def interpret(summary: dict, records: list[dict]) -> dict[str, list[str]]:
    """A few sentences per section, each computed from the statistics (no hand-written judgement)."""
    names, notes = summary["class_names"], {k: [] for k, _ in SECTIONS}
    layers = summary["layers"]
    acc = summary.get("accuracy")
    notes["summary"].append(f"{summary['images']} images of {summary['dataset']}"
                            + (f", accuracy {_pct(acc)} on them" if acc is not None else "") + ".")
    if not layers:
        notes["summary"].append("The model has no MoE layer: there is no routing to analyse.")
    for L in layers:
        b, E, share = L["block"], L["num_experts"], L["load_share"]
        hi, lo = max(range(E), key=share.__getitem__), min(range(E), key=share.__getitem__)
        unit = "combine mass" if L["kind"] == "soft" else "assignments"
        if share[hi] - share[lo] < 5e-4:
            msg = f"block {b}: every expert takes {_pct(share[hi])} of the {unit}"
        else:
            msg = (f"block {b}: expert {hi} takes the most {unit} ({_pct(share[hi])}), expert {lo} the least "
                   f"({_pct(share[lo])}); uniform is {_pct(1 / E)}, load CV {L['load_cv']:.2f}")
        notes["load"].append(msg + f". Router entropy {L['router_entropy_bits']:.2f} of {L['max_entropy_bits']:.2f} "
                             f"bits per token, mean top router probability {L['mean_top_prob']:.2f}"
                             + (" (confident routing)." if L["router_entropy_bits"] < 0.5 * L["max_entropy_bits"]
                                else "."))
        demand = L["choice_share"]
        if max(abs(x - y) for x, y in zip(demand, share)) > 0.01:
            chose = ", ".join(f"expert {e} {_pct(x)}" for e, x in enumerate(demand))
            notes["load"].append(f"block {b}: before capacity the router chose {chose}; capacity drops turned "
                                 f"this into the kept shares above.")
        if L["dead_experts"]:
            notes["load"].append(f"block {b}: dead experts {L['dead_experts']} (below {L['dead_threshold']:g} x "
                                 f"the uniform share).")
        elif L["kind"] != "soft":
            notes["load"].append(f"block {b}: no dead expert (every expert gets at least "
                                 f"{L['dead_threshold']:g} x the uniform share).")
        frac = L["mi_class_bits"] / max(min(L["class_entropy_bits"], L["expert_entropy_bits"]), 1e-12)
        notes["classes"].append(f"block {b}: I(class; expert) = {L['mi_class_bits']:.3f} bits, {_pct(frac)} of the "
                                f"most it could be (min(H(class), H(expert)) = "
                                f"{min(L['class_entropy_bits'], L['expert_entropy_bits']):.2f} bits).")
        pairs = [(L["class_expert"][c][e] / max(share[e], 1e-12), c, e) for c in range(len(names)) for e in range(E)
                 if L["class_expert"][c][e] > 0]
        for lift, c, e in sorted(pairs, reverse=True)[:3]:
            if lift < 1.2:
                break
            notes["classes"].append(f"block {b}: expert {e} takes {_pct(L['class_expert'][c][e])} of class "
                                    f"'{names[c]}' tokens ({lift:.1f}x its overall share {_pct(share[e])}).")
        if "cls_primary_share" in L:
            cs = L["cls_primary_share"]
            top = max(range(E), key=cs.__getitem__)
            msg = f"block {b}: the CLS token goes to expert {top} in {_pct(cs[top])} of the images"
            if "cls_with_image_majority" in L:
                msg += (f"; in {_pct(L['cls_with_image_majority'])} of the images to the expert that most of the "
                        f"image's patches go to")
            notes["expert-maps"].append(msg + ".")
        if "patch_mode" in L:
            P_ = len(L["patch_mode"])
            counts = {e: L["patch_mode"].count(e) for e in set(L["patch_mode"])}
            e_top = max(counts, key=counts.get)
            strong = sum(s > 0.8 for s in L["patch_mode_share"])
            notes["expert-maps"].append(
                f"block {b}: I(patch position; expert) = {L['mi_position_bits']:.3f} of "
                f"{L['position_entropy_bits']:.2f} bits; expert {e_top} is the most frequent expert at "
                f"{counts[e_top]}/{P_} positions, {len(counts)} expert(s) are the most frequent somewhere, and "
                f"at {strong}/{P_} positions one expert takes over 80% of the images.")
            notes["expert-maps"].append(
                f"block {b}: on average {_pct(L['image_purity'])} of an image's patch tokens go to the image's most "
                f"common expert ({_pct(L['image_purity_shuffled'])} with each position's experts shuffled across "
                f"images): " + ("tokens are routed largely by image, i.e. by what the image shows, more than by "
                                "where they sit." if L["image_purity"] - L["image_purity_shuffled"] > 0.1 else
                                "an image's tokens are routed about as independently as their positions allow."))
        if L["kind"] == "soft":
            notes["drops"].append(f"block {b}: soft MoE, so these do not apply: "
                                  + "; ".join(L["not_applicable"]) + ".")
        elif not L["assignment_drop_rate"] and not L["token_drop_rate"]:
            cf = L["eval_capacity_factor"]
            notes["drops"].append(f"block {b}: no token dropped ("
                                  + ("dropless" if cf is None else f"evaluation capacity factor {cf:g}") + ").")
        else:
            msg = f"block {b}: " + ("" if L["assignment_drop_rate"] is None else
                                    f"{_pct(L['assignment_drop_rate'])} of the assignments dropped, ")
            msg += (f"{_pct(L['token_drop_rate'])} of the tokens lost every expert (residual path only)"
                    + (" (expert choice: no expert picked them)" if L["kind"] == "expert" else ""))
            if "patch_drop_rate" in L:
                r = L["patch_drop_rate"]
                p = max(range(len(r)), key=r.__getitem__)
                g = L["grid_size"]
                msg += f"; most at patch (row {p // g}, col {p % g}): {_pct(r[p])}"
            cd = L["class_drop_rate"]
            c = max(range(len(cd)), key=cd.__getitem__)
            msg += f"; the class losing most tokens is '{names[c]}' ({_pct(cd[c])} of its tokens)"
            if "drop_rate_batch_halves" in L:
                first, second = L["drop_rate_batch_halves"]
                msg += (f"; images in the first half of their batch lose {_pct(first)} of their tokens, in the "
                        f"second half {_pct(second)}")
            notes["drops"].append(msg + ".")
        if L.get("similarity") is not None and E > 1:
            sim = L["similarity"]
            off = [(sim[i][j], i, j) for i in range(E) for j in range(i + 1, E)]
            m, i, j = max(off)
            mean = sum(v for v, _, _ in off) / len(off)
            kind = "near-identical" if m > 0.9 else ("partly shared" if m > 0.5 else "distinct")
            notes["similarity"].append(f"block {b}: most similar experts {i} and {j} (cosine {m:.2f}), mean "
                                       f"off-diagonal cosine {mean:.2f}: the experts are {kind}.")
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not records:
        notes["training"].append("No metrics.jsonl (a model directory, or a run that logged nothing).")
    if train:
        notes["training"].append(f"{train[-1]['step']} steps; training loss {train[0]['loss']:.3f} -> "
                                 f"{train[-1]['loss']:.3f}.")
    if evals:
        notes["training"].append("test accuracy by evaluation: "
                                 + ", ".join(_pct(r["test_accuracy"]) for r in evals) + ".")
    return notes


# ------------------------------------------------------------------ HTML / Markdown


def _table(header: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def summary_rows(summary: dict) -> tuple[list[str], list[list]]:
    header = ["block", "router", "E", "k", "load CV", "router entropy (bits)", "dropped assignments",
              "dropped tokens", "I(class; expert) bits", "I(position; expert) bits", "dead experts"]
    rows = []
    for L in summary["layers"]:
        drop = lambda v: "n/a" if v is None else _pct(v)  # noqa: E731
        rows.append([L["block"], L["router"], L["num_experts"], L["top_k"] or "-", f"{L['load_cv']:.3f}",
                     f"{L['router_entropy_bits']:.3f} / {L['max_entropy_bits']:.2f}", drop(L["assignment_drop_rate"]),
                     drop(L["token_drop_rate"]), f"{L['mi_class_bits']:.3f}",
                     f"{L['mi_position_bits']:.3f}" if "mi_position_bits" in L else "n/a",
                     ", ".join(map(str, L["dead_experts"])) or ("n/a" if L["kind"] == "soft" else "none")])
    return header, rows


def load_rows(summary: dict) -> tuple[list[str], list[list]]:
    E = max((L["num_experts"] for L in summary["layers"]), default=0)
    rows = []
    for L in summary["layers"]:
        kind = "kept" if L["kind"] != "soft" else "combine mass"
        rows.append([L["block"], kind] + [_pct(x) for x in L["load_share"]])
        if L["kind"] == "token" and L["assignment_drop_rate"]:
            rows.append([L["block"], "chosen (before capacity)"] + [_pct(x) for x in L["choice_share"]])
    return ["block", "assignments"] + [f"expert {e}" for e in range(E)], rows


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .meta{color:#666} section{margin:2em 0;border-top:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right} th{background:#f4f4f4} img{max-width:100%;display:block;margin:1em 0} li{margin:.2em 0}"""


def write_report(summary: dict, notes: dict, images: dict[str, list[Path]], out_dir: Path,
                 meta: dict) -> tuple[Path, Path]:
    """Write ``report.html`` (images embedded) and ``report.md`` (images linked) into ``out_dir``."""
    title = f"Routing report: {meta['source']}"
    tables = {"summary": summary_rows(summary), "load": load_rows(summary)}
    h = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body><h1>Routing report</h1>"
         f"<p class='meta'>{html.escape(meta['line'])}</p>"]
    md = [f"# {title}", "", meta["line"], ""]
    for key, heading in SECTIONS:
        h.append(f"<section id='{key}'><h2>{html.escape(heading)}</h2>")
        md += [f"## {heading}", ""]
        if notes.get(key):
            h.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes[key]) + "</ul>")
            md += [f"- {n}" for n in notes[key]] + [""]
        if key in tables and summary["layers"]:
            h.append(_table(*tables[key]))
            md += [_md_table(*tables[key]), ""]
        for img in images.get(key, []):
            data = base64.b64encode(img.read_bytes()).decode("ascii")
            h.append(f"<img alt='{html.escape(img.stem)}' src='data:image/png;base64,{data}'>")
            md += [f"![{img.stem}]({img.name})", ""]
        h.append("</section>")
    h.append("</body></html>")
    out_html, out_md = out_dir / "report.html", out_dir / "report.md"
    out_html.write_text("\n".join(h) + "\n")
    out_md.write_text("\n".join(md) + "\n")
    return out_html, out_md


def analyze(source, *, split: str = "test", max_images: int | None = None, out_dir=None, dataset: str | None = None,
            data_dir: str | None = None, device: str = "cpu", batch_size: int | None = None, num_samples: int = 6,
            dead_threshold: float = 0.05, progress: bool = True, markdown=None,
            eval_capacity_factor: float | None = None) -> Path:
    """Analyse the routing of ``source`` (run or model directory) on a split; return report.html's path.
    ``markdown``: also write the Markdown report there, its image links pointing into ``out_dir``.
    ``eval_capacity_factor``: override every capacity-limited layer's evaluation capacity factor (as
    ``moevision eval --eval-capacity-factor``), e.g. to see where tokens drop at the training capacity."""
    from ..train.engine import resolve_device

    if max_images is not None and max_images < 1:
        raise MoEVisionError(f"--max-images must be >= 1, got {max_images}")
    if batch_size is not None and batch_size < 1:
        raise MoEVisionError(f"--batch-size must be >= 1, got {batch_size}")
    if num_samples < 1:
        raise MoEVisionError(f"--samples must be >= 1, got {num_samples}")
    if not 0 <= dead_threshold <= 1:
        raise MoEVisionError(f"--dead-threshold must be in [0, 1], got {dead_threshold}")
    if eval_capacity_factor is not None and not eval_capacity_factor > 0:
        raise MoEVisionError(f"--eval-capacity-factor must be > 0, got {eval_capacity_factor}")
    P._mpl()  # fail before the pass when matplotlib is missing
    dev = resolve_device(device)  # a bad --device fails before anything is loaded or written
    t0 = time.perf_counter()
    model, data, cfg, records = load_source(source, split=split, dataset=dataset, data_dir=data_dir)
    if max_images is not None and max_images < len(data):
        data = data.subset(max_images, seed=0)
    out = Path(out_dir) if out_dir is not None else Path(source) / "analysis"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoEVisionError(f"cannot write the report to {out} ({e.strerror}); pass --out DIR") from None
    if eval_capacity_factor is not None:
        for m in model.modules():
            if hasattr(m, "eval_capacity_factor") and m.__class__.__name__.endswith("Router"):
                m.eval_capacity_factor = eval_capacity_factor
    model.to(dev)
    record = collect_routing(model, data, batch_size=batch_size or cfg.data.eval_batch_size, device=dev,
                             progress=progress)
    summary = summarize(record, dead_threshold=dead_threshold)
    summary.update(source=str(source), split=split, model_name=getattr(model, "model_name", None))
    images: dict[str, list[Path]] = {}
    if record.layers:
        images["load"] = [P.plot_load(summary, out / "load.png")]
        images["classes"] = [P.plot_class_expert(summary, out / "class_expert.png")]
        images["similarity"] = [P.plot_similarity(summary, out / "expert_similarity.png")]
        if record.grid_size is not None:
            images["expert-maps"] = [P.plot_expert_maps(record, summary, out / "expert_maps.png", num_samples)]
            images["drops"] = [P.plot_drops(record, summary, out / "dropped_tokens.png", min(num_samples, 4))]
    if any(r.get("type") == "train" for r in records):
        images["training"] = [P.plot_training_curves(records, out / "training_curves.png")]
    notes = interpret(summary, records)
    line = (f"{summary['model_name'] or 'model'} from {source}; {summary['images']} images of the {split} split of "
            f"{summary['dataset']}; MoE blocks {[L['block'] for L in summary['layers']]}; "
            + ("" if eval_capacity_factor is None else f"evaluation capacity factor set to {eval_capacity_factor:g}; ")
            + f"batches of {batch_size or cfg.data.eval_batch_size} images; "
            f"written {time.strftime('%Y-%m-%d %H:%M')} by moevision analyze in {time.perf_counter() - t0:.0f} s.")
    (out / "routing_summary.json").write_text(json.dumps({**summary, "notes": notes}, indent=1) + "\n")
    html_path, md_path = write_report(summary, notes, images, out, {"source": source, "line": line})
    if markdown is not None:
        md = Path(markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(out, md.parent)
        text = md_path.read_text()
        for imgs in images.values():
            for img in imgs:
                text = text.replace(f"]({img.name})", f"]({Path(rel, img.name).as_posix()})")
        md.write_text(text)
    return html_path
