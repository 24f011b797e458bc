"""Expert parallelism: each rank of an EP group holds E/ep experts; tokens travel to them by all-to-all.

GShard (Lepikhin et al. 2021) / Tutel (Hwang et al. 2023, spec multimodal_compression_systems.md §2(b)3)
for the fixed-shape layout, MegaBlocks / DeepSpeed-MoE style for the ragged (dropless) one. Expert e
lives on EP rank ``e // L`` (L = E/ep local experts, contiguous), as local expert ``e % L``.

``ShardedExperts`` is an ``Experts`` holding only the local slice of the stacked weights (state-dict keys
unchanged, expert axis L instead of E) and exposing the *global* view of the ``Experts`` contract:
``forward_sorted(x, counts)`` with E counts and ``forward_padded(x_ECD)`` with E buffers run the whole
exchange (send, local compute, send back), so soft MoE (which calls ``forward_padded`` directly) works
unchanged. The registered dispatcher ``expert_parallel`` routes locally with the replicated router, then:

- ``ragged`` (default when dropless): sort the kept assignments by expert, exchange the count matrix
  (one small all-to-all, then a host sync for the split sizes), send the rows, regroup them by local
  expert, run the local experts on contiguous slices, send the results back, scale by the gate and add.
- ``padded`` (default with a capacity): fill (E, G*C, D) buffers by slot as ``dispatch_padded`` does,
  all-to-all equal chunks, run the local experts as one batched matmul over (L, ep*G*C, D) (Tutel's
  "flexible" layout), send back. Shapes are fixed by the capacity; ranks whose buffers differ (a short
  last batch, or dropless: C = the largest per-expert count) are padded to the group maximum of G*C,
  found with ONE scalar all-reduce MAX per layer call (the only sync of this layout; Tutel's
  ``inequivalent_tokens`` / dropless ``capacity_factor=0``).

- ``gather`` (Tutel's adaptive parallelism degree r=0, "DP/ZeRO"): no token moves; the expert weights
  are all-gathered (differentiable: the backward sums every rank's weight gradient and keeps the
  owner's slice, so the gradients equal the ``padded`` ones) and every rank runs all E experts on its
  own padded buffers.
- ``adaptive`` (Tutel §2(b)5, r in {0, 1}): per call, ``gather`` when moving the expert weights is
  cheaper than moving the tokens (numel(expert weights) < 2 * E * R_max * D: dispatch + combine), else
  ``padded``; the decision uses only group-agreed sizes (R_max), so every rank takes the same branch.
  The parameter layout is the same for both, so switching costs nothing (Tutel's identical layout).

Semantics: the router is replicated, so routing, capacity, drops and the auxiliary losses are those of
the local batch, exactly as in data parallelism (capacity is per routing group, and a rank's group is
its local tokens). A model on W ranks therefore equals the single-process model applied to each rank's
batch separately (tests: outputs and gradients, 2 and 4 gloo processes).

Shape legend: T tokens, D width, E experts, L local experts, P ranks of the EP group, A assignments,
G groups, C capacity, R = G*C buffer rows per expert.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..moe.dispatch import register_dispatch
from ..moe.experts import Experts
from ..moe.layer import MoE
from ..moe.types import RoutingPlan
from . import all_to_all as A

LAYOUTS = ("auto", "ragged", "padded", "gather", "adaptive")


class ShardedExperts(Experts):
    """Experts ``[offset, offset + L)`` of an E-expert ``Experts``, sharded over an EP group.

    ``num_experts`` stays E (the global view dispatchers see); ``num_local_experts`` is L. Built from a
    full ``Experts`` with ``ShardedExperts.from_full``; ``gather_full()`` returns the full weights (a
    collective)."""

    expert_shard = True  # duck-typed marker: save_pretrained refuses to write a partial model

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, ep_rank: int, ep_size: int, group=None,
                 activation: str = "gelu", bias: bool = True, init: str = "independent"):
        if ep_size < 1 or not 0 <= ep_rank < ep_size:
            raise ConfigError(f"ep_rank={ep_rank} must be in [0, ep_size={ep_size})")
        if num_experts % ep_size:
            raise ConfigError(f"num_experts={num_experts} is not divisible by parallel.ep={ep_size}: every "
                              f"rank of the EP group must hold the same number of experts")
        L = num_experts // ep_size
        with torch.random.fork_rng(devices=[]):  # the local init is overwritten; keep the RNG stream
            super().__init__(L, dim, hidden_dim, activation=activation, bias=bias, init=init)
        self.num_experts, self.num_local_experts = num_experts, L
        self.ep_rank, self.ep_size, self.group = ep_rank, ep_size, group
        self.expert_offset = ep_rank * L
        self.param_mode = "tokens"  # padded exchange: "tokens" (all-to-all), "weights" (gather) or "adaptive"
        self.last_mode = None  # what the last padded call did ("tokens" / "weights"), for tests and logs
        self.a2a_2dh = None  # (nodes, local, intra_group, inter_group): padded exchanges in 2DH form
        self.overlap_degree = 1  # padded exchanges pipelined in this many capacity chunks (set_overlap_degree)
        self.overlap_tuner = None  # OverlapTuner: the degree (and 2DH or not) picked per capacity by timing
        self.last_overlap = None  # (degree, "linear" | "2dh") of the last token exchange, for tests and logs

    @classmethod
    def from_full(cls, full: Experts, *, ep_rank: int, ep_size: int, group=None) -> "ShardedExperts":
        sh = cls(full.num_experts, full.dim, full.hidden_dim, ep_rank=ep_rank, ep_size=ep_size, group=group,
                 activation=full.activation, bias=full.has_bias, init=full.init)
        sh.to(device=full.w1.device, dtype=full.w1.dtype)
        with torch.no_grad():
            for name, p in sh.named_parameters(recurse=False):
                p.copy_(getattr(full, name)[sh.expert_offset:sh.expert_offset + sh.num_local_experts])
        return sh

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", local experts [{self.expert_offset}, "
                f"{self.expert_offset + self.num_local_experts}) on EP rank {self.ep_rank}/{self.ep_size}")

    # -- what cannot run sharded -----------------------------------------------------------------
    def forward_expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        raise ConfigError("impl='loop' cannot run expert-parallel (each expert is on one rank); use the "
                          "'expert_parallel' dispatcher")

    def grouped_mm_ok(self, *args, **kwargs) -> bool:
        return False

    # -- the global view -------------------------------------------------------------------------
    def forward_sorted(self, x_ND: torch.Tensor, counts) -> torch.Tensor:
        """Rows sorted by global expert id, ``counts[e]`` rows for expert e (list or tensor of E)."""
        counts_E = torch.as_tensor(counts, dtype=torch.int64, device=x_ND.device)
        return ragged_exchange(self, x_ND, counts_E)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        return padded_exchange(self, x_ECD)

    # -- the local experts (Experts' own computation on the local slice) -------------------------
    def local_sorted(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        y = Experts.forward_sorted(self, x_ND, counts)
        if x_ND.requires_grad and not y.requires_grad:
            # no local token: keep the graph connected so the backward all-to-all runs on every rank
            y = y + x_ND.sum() * 0
        return y

    def local_padded(self, x_LCD: torch.Tensor) -> torch.Tensor:
        return Experts.forward_padded(self, x_LCD)

    @torch.no_grad()
    def gather_full(self) -> dict[str, torch.Tensor]:
        """The full (E, ...) tensors of every parameter, on every rank of the EP group (collective)."""
        return {name: A.all_gather_cat(p.detach(), self.group) for name, p in self.named_parameters(recurse=False)}


def ragged_exchange(ex: ShardedExperts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Send sorted rows to their experts' ranks, run them there, bring the results back in order."""
    P, L = ex.ep_size, ex.num_local_experts
    send_PL = counts_E.view(P, L)
    recv_PL = A.exchange_counts(send_PL, ex.group)
    sizes = torch.cat([send_PL.sum(1), recv_PL.reshape(-1)]).tolist()  # THE host sync: split sizes are sizes
    in_splits, flat = sizes[:P], sizes[P:]
    recv_list = [flat[s * L:(s + 1) * L] for s in range(P)]
    out_splits = [sum(r) for r in recv_list]
    x_recv = A.all_to_all(x_ND, out_splits, in_splits, ex.group)  # source-major, local expert minor
    # regroup source-major (s, j) segments into local-expert-major (j, s) order
    lens_sj = recv_PL.reshape(-1)
    starts_sj = torch.cumsum(lens_sj, 0) - lens_sj
    lens_js, starts_js = lens_sj.view(P, L).t().reshape(-1), starts_sj.view(P, L).t().reshape(-1)
    n = int(sum(out_splits))
    seg_start = torch.cumsum(lens_js, 0) - lens_js
    idx = (torch.repeat_interleave(starts_js - seg_start, lens_js, output_size=n)
           + torch.arange(n, device=x_ND.device))
    local_counts = [sum(recv_list[s][j] for s in range(P)) for j in range(L)]
    y_local = ex.local_sorted(x_recv.index_select(0, idx), local_counts)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(n, device=idx.device)
    y_recv = y_local.index_select(0, inv)
    return A.all_to_all(y_recv, in_splits, out_splits, ex.group)


class _FullWeights:
    """``Experts``' computation on given (gathered, full) weight tensors instead of its parameters."""

    def __init__(self, ex: Experts, weights: dict[str, torch.Tensor]):
        self.has_bias, self.swiglu, self.act = ex.has_bias, ex.swiglu, ex.act
        self.dim, self.hidden_dim = ex.dim, ex.hidden_dim
        self.__dict__.update(weights)


def weights_cheaper(ex: ShardedExperts, rows: int) -> bool:
    """Tutel's rule for r in {0, 1}: gather the weights iff they are fewer elements than the tokens that
    dispatch + combine would move (E * rows * D each way)."""
    n_weights = sum(p.numel() for p in ex.parameters(recurse=False)) * ex.ep_size
    return n_weights < 2 * ex.num_experts * rows * ex.dim


def gathered_padded(ex: ShardedExperts, x_ECD: torch.Tensor) -> torch.Tensor:
    """r = 0: all-gather the expert weights over the EP group and run every expert locally."""
    full = {name: A.all_gather_cat(p, ex.group) for name, p in ex.named_parameters(recurse=False)}
    return Experts.forward_padded(_FullWeights(ex, full), x_ECD)


def padded_exchange(ex: ShardedExperts, x_ECD: torch.Tensor) -> torch.Tensor:
    """(E, R, D) buffers -> the experts' ranks -> (L, P*R, D) batched matmul -> back to (E, R, D)."""
    R = x_ECD.shape[1]
    R_max = A.all_reduce_max(R, x_ECD.device, ex.group)  # the one sync of the fixed-shape layout
    if ex.param_mode == "weights" or (ex.param_mode == "adaptive" and weights_cheaper(ex, R_max)):
        ex.last_mode = "weights"
        return gathered_padded(ex, x_ECD)
    ex.last_mode = "tokens"
    if R_max > R:
        x_ECD = F.pad(x_ECD, (0, 0, 0, R_max - R))
    tuner = ex.overlap_tuner
    if tuner is None:
        return _token_exchange(ex, x_ECD, R, R_max, ex.overlap_degree, ex.a2a_2dh is not None)
    choice, timed = tuner.choose(R_max, two_dh=ex.a2a_2dh is not None)
    if not timed:
        return _token_exchange(ex, x_ECD, R, R_max, choice[0], choice[1] == "2dh")
    _device_sync(x_ECD.device)
    t0 = time.perf_counter()
    out = _token_exchange(ex, x_ECD, R, R_max, choice[0], choice[1] == "2dh")
    _device_sync(x_ECD.device)
    # every rank records the slowest rank's time, so all of them pick the same candidate
    tuner.record(R_max, choice, A.all_reduce_max_float(time.perf_counter() - t0, x_ECD.device, ex.group))
    return out


def _device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _token_exchange(ex: ShardedExperts, x_ECD: torch.Tensor, R: int, R_max: int, d: int,
                    use_2dh: bool) -> torch.Tensor:
    """The (E, R_max, D) buffers to the experts' ranks and back: pipelined in d chunks, or in one exchange
    (flat, or 2DH when ``use_2dh``)."""
    E, _, D = x_ECD.shape
    P, L = ex.ep_size, ex.num_local_experts
    ex.last_overlap = (d if not use_2dh else 1, "2dh" if use_2dh else "linear")
    if d > 1 and not use_2dh:
        return _pipelined_exchange(ex, x_ECD, R, R_max, d)
    if use_2dh:  # Tutel's 2DH form of the same equal-chunk exchange (enable_2dh)
        def a2a(t):
            return A.all_to_all_2dh(t, *ex.a2a_2dh)
    else:
        def a2a(t):
            return A.all_to_all(t, [L * R_max] * P, [L * R_max] * P, ex.group)
    recv = a2a(x_ECD.reshape(E * R_max, D))
    x_LCD = recv.view(P, L, R_max, D).transpose(0, 1).reshape(L, P * R_max, D)
    y = ex.local_padded(x_LCD).view(L, P, R_max, D).transpose(0, 1).reshape(E * R_max, D)
    back = a2a(y).view(E, R_max, D)
    return back[:, :R] if R_max > R else back


class OverlapTuner:
    """Tutel's online strategy cache for adaptive pipelining (spec §2(b)6 [V]): for each capacity bucket
    (the all-reduced R_max of a padded exchange) the first calls try every candidate, each ``trials``
    times: overlap degrees ``degrees`` with the flat all-to-all, plus the unchunked 2DH exchange when
    ``enable_2dh`` is on. A call's time is the forward exchange and expert compute, synchronised, and the
    slowest rank's time is all-reduced to every rank, so the ranks record the same numbers and keep the
    same choice (their control flow stays in lockstep). Once every candidate is timed, the fastest by its
    best trial is kept for that bucket. Outputs are the same for every candidate, so the search changes
    nothing but speed. ``table()`` reports the choices and timings."""

    def __init__(self, degrees=(1, 2, 4, 8), trials: int = 2):
        degrees = tuple(degrees)
        if not degrees or any(not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 32 for d in degrees):
            raise ConfigError(f"overlap candidates must be integers in [1, 32] (Tutel's limit), got {degrees!r}")
        if not isinstance(trials, int) or trials < 1:
            raise ConfigError(f"overlap trials must be a positive integer, got {trials!r}")
        self.degrees, self.trials = tuple(dict.fromkeys(degrees)), trials
        self.best: dict[int, tuple[int, str]] = {}
        self.times: dict[int, dict[tuple[int, str], list[float]]] = {}
        self._two_dh: dict[int, bool] = {}  # per bucket: whether the 2DH exchange is a candidate

    def candidates(self, two_dh: bool) -> list[tuple[int, str]]:
        return [(d, "linear") for d in self.degrees] + ([(1, "2dh")] if two_dh else [])

    def choose(self, bucket: int, two_dh: bool = False) -> tuple[tuple[int, str], bool]:
        """(candidate, whether this call is a timed trial) for a capacity bucket."""
        if bucket in self.best:
            return self.best[bucket], False
        self._two_dh[bucket] = two_dh
        seen = self.times.setdefault(bucket, {})
        for c in self.candidates(two_dh):
            if len(seen.get(c, ())) < self.trials:
                return c, True
        raise RuntimeError("overlap tuner: every candidate timed but no choice recorded")  # unreachable

    def record(self, bucket: int, candidate: tuple[int, str], seconds: float) -> None:
        seen = self.times.setdefault(bucket, {})
        seen.setdefault(candidate, []).append(float(seconds))
        cands = self.candidates(self._two_dh.get(bucket, False))
        if all(len(seen.get(c, ())) >= self.trials for c in cands):
            self.best[bucket] = min(cands, key=lambda c: (min(seen[c]), cands.index(c)))

    def table(self) -> dict[int, dict]:
        """{capacity bucket: {"best": (degree, form) or None while searching, "ms": {candidate: best ms}}}."""
        return {b: {"best": self.best.get(b), "ms": {c: min(ts) * 1e3 for c, ts in seen.items()}}
                for b, seen in self.times.items()}


# -- the dispatcher ---------------------------------------------------------------------------------
def _kept(plan: RoutingPlan):
    if plan.capacity is None and plan.top_k > 0:
        return plan.token_idx, plan.expert_idx, plan.gates, None
    m = plan.kept
    return plan.token_idx[m], plan.expert_idx[m], plan.gates[m], (plan.slot[m] if plan.slot is not None else None)


def _dropless_slots(tok: torch.Tensor, exp: torch.Tensor, E: int, S: int) -> tuple[torch.Tensor, int]:
    """Position of each assignment in its (group, expert) buffer, in assignment order, and the largest
    count (the local dropless capacity)."""
    key = (tok // S) * E + exp
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(key)
    slot[order] = torch.arange(key.numel(), device=key.device) - starts[key[order]]
    return slot, int(counts.max()) if key.numel() else 1


def _check(experts) -> ShardedExperts:
    if not isinstance(experts, ShardedExperts):
        raise ConfigError("impl='expert_parallel' needs sharded experts: call "
                          "moevision.distributed.shard_experts(model, mesh) first")
    return experts


def dispatch_ragged(x_TD: torch.Tensor, plan: RoutingPlan, experts, **_) -> torch.Tensor:
    ex = _check(experts)
    tok, exp, gate, _slot = _kept(plan)
    order = torch.argsort(exp, stable=True)
    tok, exp, gate = tok[order], exp[order], gate[order]
    counts_E = torch.bincount(exp, minlength=ex.num_experts)
    y = ragged_exchange(ex, x_TD.index_select(0, tok), counts_E)
    return torch.zeros_like(x_TD).index_add_(0, tok, y * gate.unsqueeze(-1).to(y.dtype))


def dispatch_padded(x_TD: torch.Tensor, plan: RoutingPlan, experts, *, num_groups: int, group_size: int,
                    **_) -> torch.Tensor:
    ex = _check(experts)
    G, S, E = num_groups, group_size, ex.num_experts
    tok, exp, gate, slot = _kept(plan)
    if slot is None or plan.capacity is None:  # dropless: the local capacity is the largest count
        slot, C = _dropless_slots(tok, exp, E, S)
    else:
        C = plan.capacity
    row = exp * (G * C) + (tok // S) * C + slot  # row in the flattened (E * G * C) buffer
    buf = x_TD.new_zeros(E * G * C, x_TD.shape[-1]).index_copy(0, row, x_TD.index_select(0, tok))
    y = padded_exchange(ex, buf.view(E, G * C, -1)).reshape(E * G * C, -1)
    return torch.zeros_like(x_TD).index_add_(0, tok, y.index_select(0, row) * gate.unsqueeze(-1).to(y.dtype))


def dispatch_expert_parallel(x_TD: torch.Tensor, plan: RoutingPlan, experts, **kw) -> torch.Tensor:
    """``padded`` (fixed shapes) when the plan has a capacity, ``ragged`` when it is dropless."""
    if plan.capacity is not None:
        return dispatch_padded(x_TD, plan, experts, **kw)
    return dispatch_ragged(x_TD, plan, experts, **kw)


register_dispatch("expert_parallel", dispatch_expert_parallel)
register_dispatch("expert_parallel_ragged", dispatch_ragged)
register_dispatch("expert_parallel_padded", dispatch_padded)
_IMPL = {"auto": "expert_parallel", "ragged": "expert_parallel_ragged", "padded": "expert_parallel_padded",
         "gather": "expert_parallel_padded", "adaptive": "expert_parallel_padded"}
_PARAM_MODE = {"gather": "weights", "adaptive": "adaptive"}


# -- model surgery ----------------------------------------------------------------------------------
def moe_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, mesh, *, layout: str = "auto", force: bool = False) -> nn.Module:
    """Replace every MoE layer's experts by this rank's shard and switch it to the expert-parallel
    dispatcher (in place; returns ``model``). ``mesh``: a ``Mesh``. With ``mesh.ep == 1`` the model is
    left as it is (pure data parallel) unless ``force`` (a one-rank EP group: the same code path)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"expert-parallel layout must be one of {LAYOUTS}, got {layout!r}")
    if mesh.ep == 1 and not force:
        return model
    for name, m in moe_layers(model):
        if isinstance(m.experts, ShardedExperts):
            raise ConfigError(f"{name or 'model'}: experts are already sharded")
        if m.num_experts % mesh.ep:
            raise ConfigError(f"{name}: model.num_experts={m.num_experts} is not divisible by "
                              f"parallel.ep={mesh.ep}; choose ep among the divisors of the expert count")
        m.experts = ShardedExperts.from_full(m.experts, ep_rank=mesh.ep_rank, ep_size=mesh.ep, group=mesh.ep_group)
        m.experts.param_mode = _PARAM_MODE.get(layout, "tokens")
        m.impl_local = m.impl
        m.impl = _IMPL[layout]
    return model


def sharded_modules(model: nn.Module) -> list[tuple[str, ShardedExperts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ShardedExperts)]


def is_sharded(model: nn.Module) -> bool:
    return bool(sharded_modules(model))


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that are expert shards (their gradients are reduced over DP only)."""
    return {id(p) for _, m in sharded_modules(model) for p in m.parameters(recurse=False)}


def _pipelined_exchange(ex: ShardedExperts, x_ECD: torch.Tensor, R: int, R_max: int, d: int) -> torch.Tensor:
    """Tutel's adaptive pipelining with overlap degree d (spec §2(b)6): the (E, R_max, D) buffers are cut
    along the capacity axis into d chunks (R_max padded up to a multiple of d); every chunk's dispatch
    all-to-all is started at once, and while chunk i's tokens run through the local experts the later
    chunks are still in flight, and chunk i's results travel back while chunk i+1 computes. Each expert
    sees the same rows as without chunking (a row's result does not depend on the others), so the output
    is the same for every d."""
    E, _, D = x_ECD.shape
    P, L = ex.ep_size, ex.num_local_experts
    Rc = -(-R_max // d)
    if Rc * d > x_ECD.shape[1]:  # x_ECD already holds R_max rows per expert
        x_ECD = F.pad(x_ECD, (0, 0, 0, Rc * d - x_ECD.shape[1]))
    chunks = x_ECD.split(Rc, dim=1)
    sends: list = []
    recv = [A.all_to_all_async(c.reshape(E * Rc, D), ex.group, sends) for c in chunks]
    backs: list = []
    outs = []
    for i in range(d):
        sends[i].wait()
        x_LCD = recv[i].view(P, L, Rc, D).transpose(0, 1).reshape(L, P * Rc, D)
        y = ex.local_padded(x_LCD).view(L, P, Rc, D).transpose(0, 1).reshape(E * Rc, D)
        outs.append(A.all_to_all_async(y, ex.group, backs))
    for h in backs:
        h.wait()
    return torch.cat([o.view(E, Rc, D) for o in outs], dim=1)[:, :R]


def set_overlap_degree(model: nn.Module, degree: int | str, *, candidates=(1, 2, 4, 8), trials: int = 2) -> nn.Module:
    """Pipeline the padded expert exchanges of a sharded model in ``degree`` chunks (Tutel's
    ``a2a_ffn_overlap_degree``; 1 = no pipelining). Same outputs for every degree. A fixed degree is not
    combined with 2DH (the 2DH exchange stays unchunked). ``degree="auto"``: Tutel's online choice per
    capacity bucket (``OverlapTuner``: each of ``candidates``, and the 2DH exchange when enabled, timed
    ``trials`` times on the first calls, then the fastest kept; ``overlap_choices(model)`` reports it)."""
    mods = sharded_modules(model)
    if degree == "auto":
        OverlapTuner(candidates, trials)  # validates before anything changes
        if not mods:
            raise ConfigError("set_overlap_degree needs a model sharded with shard_experts first")
        for _, ex in mods:  # one tuner per layer: layers see different capacities and widths
            ex.overlap_tuner, ex.overlap_degree = OverlapTuner(candidates, trials), 1
        return model
    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= 32:
        raise ConfigError(f"overlap degree must be an integer in [1, 32] (Tutel's limit) or 'auto', got {degree!r}")
    if not mods:
        raise ConfigError("set_overlap_degree needs a model sharded with shard_experts first")
    for _, ex in mods:
        ex.overlap_degree, ex.overlap_tuner = degree, None
    return model


def overlap_choices(model: nn.Module) -> dict[str, dict]:
    """Per sharded layer with ``set_overlap_degree(model, "auto")``: its ``OverlapTuner.table()``."""
    return {name: ex.overlap_tuner.table() for name, ex in sharded_modules(model) if ex.overlap_tuner is not None}


def enable_2dh(model: nn.Module, mesh, local: int) -> nn.Module:
    """Run the padded expert exchanges (layouts ``padded``, ``gather``'s token mode, ``adaptive``) of a
    sharded model in Tutel's two-dimensional hierarchical form (spec §2(b)4): each EP group of ``mesh.ep``
    consecutive ranks is ``mesh.ep // local`` nodes of ``local`` ranks; the result is the same as the flat
    all-to-all, with larger and fewer inter-node messages. Collective (it creates process groups): every
    rank calls it with the same arguments. The ``ragged`` layout (uneven splits) keeps the flat exchange."""
    if not isinstance(local, int) or local < 1 or mesh.ep % local:
        raise ConfigError(f"2DH: local={local!r} ranks per node must divide parallel.ep={mesh.ep}")
    mods = sharded_modules(model)
    if not mods:
        raise ConfigError("enable_2dh needs a model sharded with shard_experts first")
    mine = None
    for i in range(mesh.world_size // mesh.ep):  # every EP group's sub-groups, in the same order everywhere
        ranks = [i * mesh.ep + j for j in range(mesh.ep)]
        groups = A.hierarchical_groups(ranks, local)
        if mesh.rank in ranks:
            mine = groups
    intra, inter, nodes = mine
    for _, ex in mods:
        ex.a2a_2dh = (nodes, local, intra, inter)
    return model
