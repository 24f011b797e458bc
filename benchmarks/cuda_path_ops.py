"""Count the ATen ops and Triton launches of the ``fused`` MoE layer's forward+backward on its CUDA code path,
without a GPU: CPU tensors take the CUDA branches (``is_cuda`` patched, an sm_90 capability reported), ATen ops
are recorded by a dispatch mode (views and ``empty`` left out: they launch nothing), and the Triton kernels are
recorded instead of run (the plan kernel's outputs are made by its PyTorch reference, so the layer still runs).
``torch.mm(..., out_dtype=float32)`` (the 16-bit router GEMM, CUDA only) is counted as the one op it is there.
On a GPU each op is at least one kernel (a sort is several); replayed from a CUDA graph, each small one still
costs a few microseconds (docs/performance.md, sessions 13-17). Three configurations: ``kernels.use_lean_routing``
off, on, and on with ``kernels.use_fused_x_grad`` (x's two gradients summed in the router's node, session 17). Usage: python benchmarks/cuda_path_ops.py [--noise 0.0 1.0] [--k 1 2] [--list]"""
import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from moevision import MoE, kernels  # noqa: E402
from moevision.kernels import fused as FU  # noqa: E402
from moevision.kernels.ops import plan_indices_torch  # noqa: E402
from moevision.moe import router as R  # noqa: E402

if not kernels.TRITON_AVAILABLE:
    sys.exit("this count needs Triton installed (its kernels are recorded, not run)")
import moevision.kernels.triton.bias_act as BA  # noqa: E402
import moevision.kernels.triton.combine as CB  # noqa: E402
import moevision.kernels.triton.router as TR  # noqa: E402

NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "select", "slice", "alias",
             "detach", "as_strided", "reshape", "permute", "split", "unbind", "empty", "empty_like", "empty_strided",
             "new_empty", "_reshape_alias"}
launches: list[str] = []
recording: list["Count"] = []


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __enter__(self):
        recording.append(self)
        return super().__enter__()

    def __exit__(self, *a):
        recording.remove(self)
        return super().__exit__(*a)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            if name in ("_to_copy", "copy_"):
                src = args[0].dtype
                dst = (kwargs or {}).get("dtype", args[1].dtype if len(args) > 1 and hasattr(args[1], "dtype") else "?")
                name += f"[{src}->{dst}]".replace("torch.", "")
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class Recorded:  # kernel[grid](...) appends the kernel's name instead of launching
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        return lambda *a, **k: launches.append(self.name)


def patch():
    for mod in (TR, BA, CB):
        for n in dir(mod):
            if n.endswith("_kernel"):
                setattr(mod, n, Recorded(n))
    torch.Tensor.is_cuda = property(lambda t: True)
    torch.cuda.get_device_capability = lambda *a: (9, 0)
    R._TRITON_ROUTER_CPU["on"] = True
    kernels.use_native(False)
    mm = torch.mm

    def mm_f32out(a, b, *args, out_dtype=None, **kw):
        if out_dtype is None:
            return mm(a, b, *args, **kw)
        with _disable_current_modes():
            r = mm(a.float(), b.float())
        for c in recording:
            c.ops.append("mm[out_dtype=float32]")
        return r
    torch.mm = mm_f32out
    plan_ref = FU._triton_plan

    def plan(order, e_sorted, E, K=1):  # one launch on a GPU; its outputs from the PyTorch ops here
        launches.append("_plan_index_kernel")
        with _disable_current_modes():
            return plan_indices_torch(order, e_sorted, E, K)
    FU._triton_plan = plan if plan_ref is not None else None


def count(k, noise, lean, xgrad):
    kernels.use_lean_routing(lean)
    kernels.use_fused_x_grad(xgrad)
    torch.manual_seed(0)
    m = MoE(64, 128, 8, k, impl="fused", noise_std=noise).to(torch.bfloat16)
    x = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(256, 64, dtype=torch.bfloat16)
    one = torch.ones((), dtype=torch.float32)
    launches.clear()
    with Count() as cf:
        o = m(x)
    nf = len(launches)
    with Count() as cb:
        torch.autograd.backward([o.out, o.aux_loss], [g, one])
    return cf.ops, cb.ops, launches[:nf], launches[nf:]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--noise", type=float, nargs="*", default=[0.0, 1.0])
    p.add_argument("--k", type=int, nargs="*", default=[1, 2])
    p.add_argument("--list", action="store_true", help="list the ops (with counts) too")
    a = p.parse_args()
    patch()
    print(f"{'K':>2} {'noise':>5} {'lean':>5} {'xgrad':>5} | {'fwd ATen':>8} {'Triton':>6} | {'bwd ATen':>8} "
          f"{'Triton':>6} | total")
    for k in a.k:
        for noise in a.noise:
            for lean, xgrad in ((False, False), (True, False), (True, True)):
                f, b, lf, lb = count(k, noise, lean, xgrad)
                print(f"{k:>2} {noise:>5} {str(lean):>5} {str(xgrad):>5} | {len(f):>8} {len(lf):>6} | {len(b):>8} "
                      f"{len(lb):>6} | {len(f) + len(lf) + len(b) + len(lb)}")
                if a.list:
                    print("   fwd:", dict(collections.Counter(f)), lf)
                    print("   bwd:", dict(collections.Counter(b)), lb)
    kernels.use_lean_routing(True)
    kernels.use_fused_x_grad(True)


if __name__ == "__main__":
    main()
