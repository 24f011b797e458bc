"""``moevision moai``: the MoAI miniature (multimodal_compression_systems.md §8(d)) over seeds ->
docs/results/moai.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._experiment import add_miniature_args, miniature_settings

DESCRIPTION = """MoAI on a CPU miniature: does a frozen vision-language model answer counting and existence
questions better when MoAI's compressor and mixers feed it the verbalised output of an external "CV
model"?

The frozen LVLM (a tiny ViT and a 2-layer LM of width 64) is first trained to answer existence and
counting questions about noisy ShapeWorld images, then frozen. The "CV model" is the scene's object list
written out as text ("detections : red circle at row 0 col 1 ; ..."), exact or through a detector that
drops or mislabels 10% of the objects. A MoAI-Mixer goes in front of every 2nd layer; only the compressor
and the mixer train, first with one random expert per side (step 1), then the soft mixture (step 2).

Rows: the frozen LVLM alone; MoAI with an uninformative aux text (same parameters and steps, no
information); MoAI with the noisy detector; MoAI with the exact list. The command reports the accuracy
per question type and the mean gate of each of the six experts (mean ± std over seeds), as Markdown and
JSON. Finished seeds are kept in --work-dir."""

EXAMPLES = """examples:
  moevision moai                                     # 3 seeds, ~6 min a seed on 2 cores
  moevision moai --seeds 1 --scale 0.25 --out runs/moai/quick.md
"""


def register(subparsers) -> dict:
    p = subparsers.add_parser("moai", help="MoAI miniature: verbalised detections through the compressor and mixers "
                              "of a frozen LVLM, over seeds -> docs/results/moai.md", description=DESCRIPTION,
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_miniature_args(p, "moai")
    p.add_argument("--image-noise", type=float, default=None, help="std of the pixel noise on the scenes, in [0, 1] "
                   "(default 0.1)")
    p.add_argument("--detector-noise", type=float, default=None, help="the noisy detector's per-object error rate "
                   "(default 0.1)")
    return {"moai": _cmd}


def _cmd(args) -> int:
    from ..techniques.moai_experiment import MoAISettings, run_moai

    S = miniature_settings(args, MoAISettings, ("train_scenes", "vision_steps", "lm_steps", "base_steps",
                                                "step1_steps", "step2_steps"))
    if args.image_noise is not None:
        S.image_noise = args.image_noise
    if args.detector_noise is not None:
        S.detector_noise = args.detector_noise
    rep = run_moai(S, out=Path(args.out), work=Path(args.work_dir))
    s = rep["summary"]
    for row in ("base", "no_aux", "noisy", "exact"):
        print(f"{row:7s} count {s[row]['count']}, exist {s[row]['exist']}, all {s[row]['all']}")
    print(f"written: {args.out} (+ .json)")
    return 0
