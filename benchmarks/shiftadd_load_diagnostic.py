"""ShiftAddViT diagnostic (docs/shiftadd.md): after LL-loss fine-tuning (α = 6, 4) of seed 0's dense ViT,
per MoE linear, the smooth load the loss balances (mean P(shift in top-1) under the learned noise, training
mode) against the hard share of the noise-free router (evaluation), and the mean clean-logit gap in units
of the noise std; for the code's router init and the fan-in init.

Needs the dense model that ``moevision shiftadd`` (defaults) caches:
    PYTHONPATH=src python benchmarks/shiftadd_load_diagnostic.py     # ~3 min on 2 cores
"""
import copy, torch
from safetensors.torch import load_file
from moevision.techniques.shiftadd_experiment import ShiftAddSettings, _dense, _fit
from moevision.techniques.shiftadd import shiftadd_reparameterize, moe_linears, prob_in_top_k
from moevision.techniques._experiment import load_subsets
from moevision.data import normalize

S = ShiftAddSettings()
train, test = load_subsets("fashion_mnist", 10000, 5000)
dense = _dense(S, train.image_shape, 10)
path = "runs/shiftadd/fashion_mnist_n10000_t5000_p10_e5_lr0.0002/dense_seed0.safetensors"
try:
    dense.load_state_dict(load_file(path))
except FileNotFoundError:
    raise SystemExit(f"{path} not found: run `moevision shiftadd` first (it trains and caches the dense models)")
x = normalize(train.float_images()[:2000], train.mean, train.std)
for init in ("code", "fan_in"):
    m = copy.deepcopy(dense)
    torch.manual_seed(1000)
    shiftadd_reparameterize(m, "moe", alpha=(6.0, 4.0), router_init=init)
    _fit(m, train, S, epochs=S.epochs, lr=S.lr, seed=0, desc=init, progress=False)
    layers = moe_linears(m)
    smooth = {n: [] for n, _ in layers}
    clean_std = {n: [] for n, _ in layers}

    def hook(name):
        def h(mod, inp, out):
            xin = inp[0].reshape(-1, mod.in_features)
            clean, noisy, std = mod.router(xin)
            smooth[name].append(prob_in_top_k(clean, noisy, std, 1)[:, 1].mean().item())
            clean_std[name].append(((clean[:, 1] - clean[:, 0]).abs().mean() / std.mean()).item())
        return h

    hs = [mod.register_forward_hook(hook(n)) for n, mod in layers]
    m.train()
    with torch.no_grad():
        m(x)
    for h in hs:
        h.remove()
    m.eval()
    with torch.no_grad():
        m(x)
    print(f"init={init}")
    for n, mod in layers:
        hard = float(mod.tokens_per_expert[1] / mod.tokens_per_expert.sum())
        print(f"  {n.replace('.inner', ''):18s} smooth P(shift) {smooth[n][0]:.3f}  hard share {hard:.3f}  "
              f"|logit gap| / noise std {clean_std[n][0]:.2f}")
