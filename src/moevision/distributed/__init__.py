"""Expert parallelism and multi-process training on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Importing this package registers the ``expert_parallel`` dispatchers with ``moevision.moe``; the core
never imports it. See ``docs/distributed.md`` for the design, the gradient semantics and the measured
throughput. Typical use on every rank::

    from moevision import distributed as mvd
    mvd.init_distributed()                      # from torchrun's environment
    mesh = mvd.build_mesh(ep=dist.get_world_size())
    model = mvd.shard_experts(model, mesh)      # each rank keeps E/ep experts of every MoE layer
    ...
    loss.backward(); mvd.reduce_gradients(model, mesh); optimizer.step()
    mvd.save_pretrained(model, "out", mesh)     # the full model, written by rank 0
"""

from .checkpoint import (
    full_model,
    full_model_state,
    load_checkpoint_distributed,
    load_full_state,
    save_checkpoint_distributed,
    save_pretrained_distributed as save_pretrained,
    shard_model_state,
)
from .expert_parallel import (
    ShardedExperts,
    dispatch_expert_parallel,
    enable_2dh,
    expert_parameters,
    is_sharded,
    set_overlap_degree,
    overlap_choices,
    OverlapTuner,
    shard_experts,
)
from .mesh import Mesh, build_mesh, init_distributed, is_main_process, launched
from .training import DistributedRun, SingleProcess, clip_grad_norm_, reduce_gradients, setup_parallel

__all__ = [
    "Mesh", "build_mesh", "init_distributed", "is_main_process", "launched", "ShardedExperts", "shard_experts", "enable_2dh", "set_overlap_degree",
    "overlap_choices", "OverlapTuner",
    "dispatch_expert_parallel", "expert_parameters", "is_sharded", "reduce_gradients", "clip_grad_norm_",
    "full_model", "full_model_state", "shard_model_state", "load_full_state", "save_pretrained",
    "save_checkpoint_distributed", "load_checkpoint_distributed", "setup_parallel", "DistributedRun",
    "SingleProcess",
]
