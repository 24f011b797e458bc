"""``moevision unimoe``: the Uni-MoE miniature (multimodal_compression_systems.md §4(d)) over seeds ->
docs/results/unimoe.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MoEVisionError

DESCRIPTION = """Uni-MoE's progressive recipe on a CPU miniature. ShapeWorld scenes come in two modalities: the
image, and a noisy 1-D "speech" encoding of the scene's caption. A 2-layer LM answers existence, counting
and colour questions about them.

After two stand-in pre-stages (the ViT learns each grid cell's object; the LM answers from the caption as
text), the recipe runs three stages:
1. the connectors caption, the LM frozen;
2. one FFN copy per modality: the image and the speech expert;
3. every FFN becomes a top-2 MoE of experts {image, speech, base, base} with Mixtral routing; the
   routers, the projectors and LoRA (attention and every expert) train on the mixed questions.

A dense twin spends the same steps on the mixture. The command reports the accuracy per modality, the
modality gap and the routing of each modality's tokens (mean ± std over seeds), as Markdown and JSON.
Finished seeds are kept in --work-dir."""

EXAMPLES = """examples:
  moevision unimoe                                   # 3 seeds, ~3 min a seed on 2 cores
  moevision unimoe --seeds 1 --scale 0.25 --out runs/unimoe/quick.md
"""


def register(subparsers) -> dict:
    p = subparsers.add_parser("unimoe", help="Uni-MoE miniature: modality experts -> MoE vs a dense twin over seeds "
                              "-> docs/results/unimoe.md", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every stage's steps and the number of training scenes (default 1.0)")
    p.add_argument("--speech-noise", type=float, default=None, help="std of the noise on the speech frames "
                   "(default 0.8)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--work-dir", default="runs/unimoe", help="per-seed results (resumable)")
    p.add_argument("--out", default="docs/results/unimoe.md", help="the Markdown file to write (and .json)")
    return {"unimoe": _cmd}


def _cmd(args) -> int:
    from ..techniques.unimoe_experiment import UniMoESettings, run_unimoe

    if args.seeds < 1:
        raise MoEVisionError(f"--seeds must be >= 1, got {args.seeds}")
    if not args.scale > 0:
        raise MoEVisionError(f"--scale must be > 0, got {args.scale}")
    if args.threads < 0:
        raise MoEVisionError(f"--threads must be >= 0, got {args.threads}")
    S = UniMoESettings(seeds=args.seeds, threads=args.threads)
    if args.scale != 1.0:
        for k in ("train_scenes", "vision_steps", "lm_steps", "stage1_steps", "stage2_steps", "stage3_steps"):
            setattr(S, k, max(1, round(getattr(S, k) * args.scale)))
    if args.speech_noise is not None:
        S.speech_noise = args.speech_noise
    rep = run_unimoe(S, out=Path(args.out), work=Path(args.work_dir))
    s = rep["summary"]
    print(f"\nUni-MoE: image {s['unimoe']['image']}, speech {s['unimoe']['speech']}, gap {s['unimoe']['gap']}")
    print(f"dense:   image {s['dense']['image']}, speech {s['dense']['speech']}, gap {s['dense']['gap']}")
    print(f"written: {args.out} (+ .json)")
    return 0
