"""Vision-language recipes: MoE-LLaVA's MoE-tuning of a small VLM on easy-VQA + ShapeWorld
(``moevision.train.vlm``). Each returns a ``VLMRunConfig``; ``moevision train --recipe NAME`` runs it."""

from __future__ import annotations

from ..models import create_model
from ..train.vlm import VLMDataConfig, VLMEvalConfig, VLMRunConfig, VLMTrainConfig
from . import register_recipe


def _vlm(model_name: str, **model_over) -> VLMRunConfig:
    model = create_model(model_name, **model_over).config
    return VLMRunConfig(model_name=model_name, model=model, data=VLMDataConfig(), train=VLMTrainConfig(),
                        eval=VLMEvalConfig())


@register_recipe
def vlm_moe_easyvqa() -> VLMRunConfig:
    """MoE-LLaVA miniature: ViT (64x64, patch 8, d=64, 3 blocks, frozen after attribute pre-training;
    16 pooled image tokens) -> mlp2x_gelu projector -> LM d=128, 2 layers, SwiGLU 256; stage III
    upcycles layer 0 to E=4 top-2 MoE (capacity 1.5/2.0, Switch loss 0.01). Data: easy-VQA train
    (38.6k questions) + ShapeWorld (2,000 images, ~9k questions). Stages: vision 6 ep, LM text 2 ep,
    I 1 ep, II 0.5 ep, III 0.5 ep; evaluation on 2,000 easy-VQA test questions and ShapeWorld probes.

    Measured (torch 2.13 CPU, fp32, 1 niced thread of a shared 2-core Xeon, seed 0): about 5 minutes of
    training (vision 117 s, LM 30 s, I 15 s, II 72 s, III 70 s) plus about 1 minute of evaluation;
    easy-VQA test 82.6% (colour 100%, shape 68%, yes/no 82%); the ShapeWorld probes stay at chance at
    this training length. Over 3 seeds, with the dense twin: docs/results/vlm.md (``moevision vlm-results``).
    """
    return _vlm("moe_vlm_easyvqa")


@register_recipe
def vlm_dense_easyvqa() -> VLMRunConfig:
    """Dense twin of ``vlm_moe_easyvqa``: identical stages, data and steps; stage III keeps the dense
    FFNs and trains the same parameter set (every FFN). Seed 0: easy-VQA test 82.9% in about the same
    time. Results over 3 seeds: docs/results/vlm.md."""
    return _vlm("vlm_easyvqa")


@register_recipe
def vlm_moma_easyvqa() -> VLMRunConfig:
    """``vlm_moe_easyvqa`` with MoMa-style modality groups: experts 0-1 take image tokens, 2-3 text
    tokens (top-2 inside the group). Results: docs/results/vlm.md."""
    return _vlm("moe_vlm_easyvqa", image_experts=2)


@register_recipe
def vlm_pill_easyvqa() -> VLMRunConfig:
    """PILL (spec §9) on the same VLM, data and pre-stages: after the text-only LM stage the LM stays
    frozen and gets PILL's adapters (GLU, rank 32) in both layers; stage I trains the projector + the
    vision adapters with MAG off (captions, 1 epoch), stage II the projector + every adapter + the MAG
    gates (VQA mixture, 0.5 epoch); no stage III. Results beside MoE-LLaVA: docs/results/vlm.md."""
    return _vlm("vlm_easyvqa", adapter="pill")


@register_recipe
def vlm_pill_nomag_easyvqa() -> VLMRunConfig:
    """``vlm_pill_easyvqa`` without modality-attention gating (an ablation: the image values are never
    gated, so stage II starts from what stage I learnt)."""
    return _vlm("vlm_easyvqa", adapter="pill", pill_mag=False)


@register_recipe
def vlm_smoke() -> VLMRunConfig:
    """Seconds-long smoke run for tests: the tiny MoE VLM on 64 ShapeWorld images, no easy-VQA."""
    cfg = _vlm("moe_vlm_tiny_test")
    cfg.data = VLMDataConfig(easy_vqa=False, shapeworld_train_images=64, shapeworld_eval_images=16, batch_size=32,
                             eval_batch_size=64)
    cfg.train = VLMTrainConfig(vision_epochs=1, lm_epochs=1, stage1_epochs=1, stage2_epochs=1, stage3_epochs=1,
                               log_every=5)
    cfg.eval = VLMEvalConfig(pope_images=6, mcq_items=4)
    return cfg
