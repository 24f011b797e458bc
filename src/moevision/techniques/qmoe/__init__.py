"""QMoE (Frantar & Alistarh 2023, arXiv 2310.16795; spec multimodal_compression_systems.md §1):
data-dependent GPTQ per expert to ternary or 2-bit grids, the sub-1-bit dictionary code, experts that
decode at run time, the compressed checkpoint format; and pruning / merging experts as alternatives."""

from .calibrate import QMoEConfig, gather_expert_inputs, quantize_layer, quantize_model
from .codec import build_dictionary, decode, decode_reference, encode
from .compressed import CompressedExperts
from .gptq import gptq, hessian, make_grid, rtn
from .prune import expert_usage, merge_by_similarity, merge_experts, prune_by_usage, prune_experts
from .storage import compress_model, compression_stats, expert_param_count, load_compressed, save_compressed

__all__ = [
    "QMoEConfig", "gather_expert_inputs", "quantize_layer", "quantize_model", "build_dictionary", "encode",
    "decode", "decode_reference", "CompressedExperts", "gptq", "hessian", "make_grid", "rtn", "expert_usage",
    "prune_experts", "prune_by_usage", "merge_experts", "merge_by_similarity", "compress_model",
    "compression_stats", "expert_param_count", "load_compressed", "save_compressed",
]
