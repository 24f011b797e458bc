"""Evaluation protocols for the vision-language models (spec multimodal_compression_systems.md §12)."""

from .mcq import (can_infer, circular_copies, circular_eval, mmstar_match, mmstar_score, multimodal_gain,
                  multimodal_leakage)
from .pope import STRATEGIES, parse_yes_no, parse_yes_no_vlmevalkit, pope_metrics, pope_questions
from .vqa import normalize_answer, vqa_accuracy

__all__ = ["can_infer", "circular_copies", "circular_eval", "mmstar_match", "mmstar_score", "multimodal_gain",
           "multimodal_leakage", "STRATEGIES", "parse_yes_no", "parse_yes_no_vlmevalkit", "pope_metrics",
           "pope_questions", "normalize_answer", "vqa_accuracy"]
