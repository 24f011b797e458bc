"""``moevision unimoe``: the Uni-MoE miniature (multimodal_compression_systems.md §4(d)) over seeds ->
docs/results/unimoe.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import add_miniature_args, miniature_settings

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
    add_miniature_args(p, "unimoe")
    p.add_argument("--speech-noise", type=float, default=None, help="std of the noise on the speech frames "
                   "(default 0.8)")
    return {"unimoe": _cmd}


def _cmd(args) -> int:
    from ..techniques.unimoe_experiment import UniMoESettings, run_unimoe

    S = miniature_settings(args, UniMoESettings, ("train_scenes", "vision_steps", "lm_steps", "stage1_steps",
                                                  "stage2_steps", "stage3_steps"))
    if args.speech_noise is not None:
        S.speech_noise = args.speech_noise
    rep = run_unimoe(S, out=Path(args.out), work=Path(args.work_dir))
    s = rep["summary"]
    print(f"\nUni-MoE: image {s['unimoe']['image']}, speech {s['unimoe']['speech']}, gap {s['unimoe']['gap']}")
    print(f"dense:   image {s['dense']['image']}, speech {s['dense']['speech']}, gap {s['dense']['gap']}")
    print(f"written: {args.out} (+ .json)")
    return 0
