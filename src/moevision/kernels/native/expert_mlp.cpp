// moevision CPU kernels: the whole expert MLP of an MoE layer (``cpu_fused``) as a grouped computation.
//
// The expert-sorted rows are shared out among the threads (``thread_ranges``): whole experts when that
// balances the threads within 1% (on 2 threads the exact subset-sum split), else one contiguous block per
// thread (an equal share of the rows, so the work is balanced whatever the expert counts are); each
// thread runs, for every expert segment in its rows, the gather, both projections (bias fused), the
// activation and, in backward, the four GEMMs, the bias sums and the activation backward, each GEMM
// single-threaded on its own rows. GELU, SiLU and SwiGLU in fp32 run in kernels of ours (below: the bias
// added in the activation pass, the bias gradient summed in the activation backward's pass).
// MKL's own threading splits every GEMM across the threads instead, and per-expert GEMMs of a few
// hundred rows then pay its per-call split/pack overhead once per expert (measured ~5-10% over one
// GEMM of the same total size on 2 threads, docs/performance.md); here there is one parallel region
// per direction. In the block split an expert whose rows straddle two blocks has its weight gradient
// summed from two partial GEMMs (the thread holding its first row writes, the other adds after the region).
//
// The reference is the Python loop of ``kernels/cpu.py`` (same function, tested equal).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
// The row loops (gather-scale-dot, combine, K-copy sum) in AVX-512, AVX2 and baseline versions, the one
// the CPU runs picked at load time (the extension is built without -march): measured 0.88 -> 0.51 ms a
// thread for the gradient rows at T=6400, D=192.
#define MV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MV_CLONES
#endif

namespace {

enum Act : int64_t { GELU = 0, GELU_TANH = 1, RELU = 2, SILU = 3 };

void act_forward(at::Tensor& out, const at::Tensor& h, int64_t act) {
  switch (act) {
    case GELU: at::gelu_out(out, h, "none"); break;
    case GELU_TANH: at::gelu_out(out, h, "tanh"); break;
    case RELU: at::clamp_min_out(out, h, 0); break;
    case SILU: at::silu_out(out, h); break;
    default: TORCH_CHECK(false, "moevision expert_mlp: unknown activation code ", act);
  }
}

// grad_in = act'(h) * grad, in place allowed (grad_in may be grad)
void act_backward(at::Tensor& grad_in, const at::Tensor& grad, const at::Tensor& h, int64_t act) {
  switch (act) {
    case GELU: at::gelu_backward_out(grad_in, grad, h, "none"); break;
    case GELU_TANH: at::gelu_backward_out(grad_in, grad, h, "tanh"); break;
    case RELU: at::threshold_backward_out(grad_in, grad, h, 0); break;
    case SILU: at::silu_backward_out(grad_in, grad, h); break;
    default: TORCH_CHECK(false, "moevision expert_mlp: unknown activation code ", act);
  }
}

std::vector<int64_t> read_offsets(const at::Tensor& offs, int64_t E) {
  TORCH_CHECK(offs.dtype() == at::kLong && offs.dim() == 1 && offs.numel() == E + 1 && offs.is_contiguous(),
              "moevision expert_mlp: offsets must be a contiguous int64 vector of E+1 = ", E + 1, " entries");
  const int64_t* p = offs.data_ptr<int64_t>();
  std::vector<int64_t> o(p, p + E + 1);
  TORCH_CHECK(o[0] == 0, "moevision expert_mlp: offsets must start at 0");
  for (int64_t e = 0; e < E; e++) TORCH_CHECK(o[e] <= o[e + 1], "moevision expert_mlp: offsets must not decrease");
  return o;
}

// Run fn(tid, lo, hi) on nt threads, thread tid owning rows [lo, hi) of A.
template <typename F>
void for_blocks(int64_t A, int nt, const F& fn) {
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    // no autograd on the workers: every op here writes into preallocated buffers
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    for (int64_t t = b; t < e; t++) fn(t, t * A / nt, (t + 1) * A / nt);
  });
}

// The rows each thread runs, as ranges of the expert-sorted rows. Whole experts when they can be shared
// out evenly - the heaviest thread within 1% (+8 rows) of A / nt - so that no expert's GEMMs are cut in
// two and no weight gradient is summed from two parts; else equal contiguous blocks (an expert straddling
// two blocks is then computed in two parts). Two threads: the exact subset-sum split (a table of E x A/2
// bits, when that is small), more: largest expert first to the least-loaded thread.
using Ranges = std::vector<std::vector<std::pair<int64_t, int64_t>>>;

Ranges thread_ranges(const std::vector<int64_t>& o, int64_t A, int nt, bool whole_experts) {
  const int64_t E = static_cast<int64_t>(o.size()) - 1;
  Ranges r(nt);
  if (whole_experts && nt > 1 && E >= nt) {
    std::vector<int> owner(E, 0);
    std::vector<int64_t> load(nt, 0);
    const int64_t half = A / 2;
    if (nt == 2 && E * (half + 1) <= (int64_t(1) << 18)) {  // ~0.1 ms at most
      // reach(e, s): a subset of experts 0..e-1 sums to s rows (s <= A/2)
      const int64_t W = half + 1;
      std::vector<unsigned char> reach((E + 1) * W, 0);
      reach[0] = 1;
      for (int64_t e = 0; e < E; e++) {
        const int64_t c = o[e + 1] - o[e];
        const unsigned char* prev = reach.data() + e * W;
        unsigned char* cur = reach.data() + (e + 1) * W;
        for (int64_t s = 0; s < W; s++) cur[s] = prev[s] | (s >= c ? prev[s - c] : 0);
      }
      int64_t s = half;
      while (!reach[E * W + s]) s--;
      for (int64_t e = E; e > 0; e--) {  // walk back: expert e-1 is thread 1's when s is unreachable without it
        if (!reach[(e - 1) * W + s]) {
          owner[e - 1] = 1;
          s -= o[e] - o[e - 1];
        }
      }
      for (int64_t e = 0; e < E; e++) load[owner[e]] += o[e + 1] - o[e];
    } else {
      std::vector<int64_t> idx(E);
      for (int64_t e = 0; e < E; e++) idx[e] = e;
      std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return o[a + 1] - o[a] > o[b + 1] - o[b]; });
      for (int64_t e : idx) {
        const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
        owner[e] = t;
        load[t] += o[e + 1] - o[e];
      }
    }
    const int64_t heaviest = *std::max_element(load.begin(), load.end());
    if (heaviest * 100 <= (A / nt) * 101 + 800) {
      for (int64_t e = 0; e < E; e++) {
        if (o[e] == o[e + 1]) continue;
        auto& v = r[owner[e]];
        if (!v.empty() && v.back().second == o[e]) v.back().second = o[e + 1];  // adjacent: one range
        else v.emplace_back(o[e], o[e + 1]);
      }
      return r;
    }
  }
  for (int t = 0; t < nt; t++) r[t].emplace_back(t * A / nt, (t + 1) * A / nt);
  return r;
}

// Run fn(tid, lo, hi) for each of thread tid's row ranges, the threads in one parallel region.
template <typename F>
void for_ranges(const Ranges& r, const F& fn) {
  const int nt = static_cast<int>(r.size());
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    for (int64_t t = b; t < e; t++)
      for (const auto& lh : r[t]) fn(t, lh.first, lh.second);
  });
}

bool whole_experts_enabled = true;  // set_whole_experts (A/B benchmarks, tests)

int threads_for(int64_t A) {
  int nt = at::get_num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, A / 16)));
}

// out[t] = sum_j g[t*K+j] * y[pos[t*K+j]] for tokens t of [t0, t1) (the gate-weighted combine).
template <typename scalar_t>
MV_CLONES void combine_rows(scalar_t* out, const scalar_t* y, const scalar_t* g, const int64_t* pos, int64_t K, int64_t D,
                  int64_t t0, int64_t t1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(D);
  for (int64_t t = t0; t < t1; t++) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t j = 0; j < K; j++) {
      const acc_t w = static_cast<acc_t>(g[t * K + j]);
      const scalar_t* src = y + pos[t * K + j] * D;
      for (int64_t d = 0; d < D; d++) acc[d] += w * static_cast<acc_t>(src[d]);
    }
    scalar_t* dst = out + t * D;
    for (int64_t d = 0; d < D; d++) dst[d] = static_cast<scalar_t>(acc[d]);
  }
}

// For expert-sorted rows i of [lo, hi): gy[i] = gate * gout[tok[i]] and, when ggate is given,
// ggate[order[i]] = <gout[tok[i]], y[i]> (d out / d gate; order is a permutation: no two rows write
// the same entry).
template <typename scalar_t>
MV_CLONES void grad_rows(scalar_t* gy, scalar_t* ggate, const scalar_t* gout, const scalar_t* y, const scalar_t* g,
               const int64_t* tok, const int64_t* order, int64_t D, int64_t lo, int64_t hi) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = lo; i < hi; i++) {
    const scalar_t* src = gout + tok[i] * D;
    const acc_t w = static_cast<acc_t>(g[order[i]]);
    scalar_t* dst = gy + i * D;
    if (ggate != nullptr) {
      const scalar_t* yr = y + i * D;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; d++) dot += static_cast<acc_t>(src[d]) * static_cast<acc_t>(yr[d]);
      ggate[order[i]] = static_cast<scalar_t>(dot);
    }
    for (int64_t d = 0; d < D; d++) dst[d] = static_cast<scalar_t>(w * static_cast<acc_t>(src[d]));
  }
}

// gx[t] = sum_j gxs[pos[t*K+j]] for tokens t of [t0, t1) (the K copies of each token back).
template <typename scalar_t>
MV_CLONES void gather_sum_rows(scalar_t* gx, const scalar_t* gxs, const int64_t* pos, int64_t K, int64_t D, int64_t t0,
                     int64_t t1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(D);
  for (int64_t t = t0; t < t1; t++) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t j = 0; j < K; j++) {
      const scalar_t* src = gxs + pos[t * K + j] * D;
      for (int64_t d = 0; d < D; d++) acc[d] += static_cast<acc_t>(src[d]);
    }
    scalar_t* dst = gx + t * D;
    for (int64_t d = 0; d < D; d++) dst[d] = static_cast<scalar_t>(acc[d]);
  }
}


// ---------------------------------------------------------------------------------------------------
// The activations in fp32 (GELU erf and tanh forms, SiLU, SwiGLU), written out so that they vectorise
// (AVX-512 / AVX2 clones). ATen's CPU GELU backward written in place (as this op does) measured ~2.2 ns an
// element on this machine (800 x 768 rows, one thread; ~1 ns out of place, the tanh form ~2.1 either
// way), against ~0.75 for this one with the bias gradient summed in the same pass. The forward adds the
// bias in the same pass (the GEMM before it then runs with beta = 0, no broadcast copy of the bias into
// its output). SwiGLU's forward and backward are one pass each instead of two and four.
// erfc(z) = q(t) exp(-z^2), t = 1 / (1 + p z), z = |x| / sqrt(2): Abramowitz & Stegun 7.1.26 (|error| <=
// 1.5e-7 on erf); exp by Cody-Waite reduction and a degree-7 polynomial. GELU's max abs error against
// fp64 is ~7e-7 over [-12, 12] (ATen's oneDNN kernel: ~1.2e-6). The backward shares the exp:
// GELU'(x) = Phi(x) + x exp(-x^2/2) / sqrt(2 pi). sigmoid(x) = 1 / (1 + e) or e / (1 + e), e = exp(-|x|).
// Used in fp32 for GELU, GELU_TANH, SILU and SwiGLU; ReLU and other dtypes run ATen's kernels.
// set_fast_act(false) switches them off (A/B benchmarks, tests).
constexpr float kErfP = 0.3275911f, kErfA1 = 0.254829592f, kErfA2 = -0.284496736f, kErfA3 = 1.421413741f,
                kErfA4 = -1.453152027f, kErfA5 = 1.061405429f;
constexpr float kInvSqrt2 = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;

// exp(y) for y <= 0 (below -87 it is clamped: the result, < 2e-38, only ever multiplies a bounded factor;
// so is a NaN, which keeps the float -> int conversion defined: the callers' x carries the NaN through)
inline float exp_nonpos(float y) {
  y = y > -87.f ? y : -87.f;
  const float n = (y * 1.44269504088896341f + 12582912.f) - 12582912.f;  // nearest integer (1.5 * 2^23 trick)
  const float r = (y - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 in two parts
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return p * s;
}

// Phi(x) (the normal CDF) and exp(-x^2 / 2)
inline void normal_cdf(float x, float& cdf, float& e) {
  const float z = std::fabs(x) * kInvSqrt2;
  const float t = 1.f / (1.f + kErfP * z);
  const float q = t * (kErfA1 + t * (kErfA2 + t * (kErfA3 + t * (kErfA4 + t * kErfA5))));
  e = exp_nonpos(-z * z);
  const float half_erfc = 0.5f * q * e;
  cdf = 0.5f + std::copysign(0.5f - half_erfc, x);  // x < 0: erfc / 2, else 1 - erfc / 2
}

// sigmoid(x), from exp(-|x|) <= 1 (no overflow on either side)
inline float sigmoid(float x) {
  const float e = exp_nonpos(-std::fabs(x));
  const float r = 1.f / (1.f + e);
  return x >= 0.f ? r : e * r;
}

// act(x) and act'(x) for GELU (x Phi(x)), GELU_TANH (x (1 + tanh(u)) / 2, u = sqrt(2 / pi) (x + 0.044715 x^3);
// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|)) and SILU (x sigmoid(x)).
constexpr float kTanhC = 0.79788456080286536f, kTanhK = 0.044715f;
template <int64_t kAct>
inline float act_value(float x) {
  if constexpr (kAct == GELU_TANH) {
    const float u = kTanhC * (x + kTanhK * x * x * x);
    const float e = exp_nonpos(-2.f * std::fabs(u));
    const float th = std::copysign((1.f - e) / (1.f + e), u);
    return 0.5f * x * (1.f + th);
  } else if constexpr (kAct == SILU) {
    return x * sigmoid(x);
  } else {
    static_assert(kAct == GELU, "act_value: GELU, GELU_TANH or SILU");
    float cdf, e;
    normal_cdf(x, cdf, e);
    return x * cdf;
  }
}
template <int64_t kAct>
inline float act_derivative(float x) {
  if constexpr (kAct == GELU_TANH) {
    const float u = kTanhC * (x + kTanhK * x * x * x);
    const float e = exp_nonpos(-2.f * std::fabs(u));
    const float r = 1.f / (1.f + e);
    const float th = std::copysign((1.f - e) * r, u);
    const float sech2 = 4.f * e * r * r;  // 1 - tanh^2 without the cancellation near |tanh| = 1
    return 0.5f * (1.f + th) + 0.5f * x * sech2 * kTanhC * (1.f + 3.f * kTanhK * x * x);
  } else if constexpr (kAct == SILU) {
    const float sg = sigmoid(x);
    return sg * (1.f + x * (1.f - sg));
  } else {
    static_assert(kAct == GELU, "act_derivative: GELU, GELU_TANH or SILU");
    float cdf, e;
    normal_cdf(x, cdf, e);
    return cdf + x * e * kInvSqrt2Pi;
  }
}

bool fast_act_enabled = true;  // set_fast_act (A/B benchmarks, tests)

bool has_fast_act(int64_t act) { return act == GELU || act == GELU_TANH || act == SILU; }

// rows [0, n) of h (n, F): h += b (b may be null), a = act(h)
template <int64_t kAct>
MV_CLONES void bias_act_rows(float* h, float* a, const float* b, int64_t n, int64_t F) {
  std::vector<float> zero(b == nullptr ? F : 0, 0.f);
  const float* bias = b == nullptr ? zero.data() : b;
  for (int64_t i = 0; i < n; i++) {
    float* hr = h + i * F;
    float* ar = a + i * F;
#pragma omp simd
    for (int64_t f = 0; f < F; f++) {
      const float v = hr[f] + bias[f];
      hr[f] = v;
      ar[f] = act_value<kAct>(v);
    }
  }
}

// rows [0, n): g *= act'(h) in place; db (F,) = the column sums of the result when db is not null
// (float over blocks of 64 rows, double across blocks)
template <int64_t kAct>
MV_CLONES void act_backward_rows(float* g, const float* h, float* db, int64_t n, int64_t F) {
  std::vector<float> acc(db == nullptr ? 0 : F, 0.f);
  std::vector<double> total(db == nullptr ? 0 : F, 0.0);
  for (int64_t i = 0; i < n; i++) {
    float* gr = g + i * F;
    const float* hr = h + i * F;
    if (db == nullptr) {
#pragma omp simd
      for (int64_t f = 0; f < F; f++) gr[f] = gr[f] * act_derivative<kAct>(hr[f]);
      continue;
    }
    float* ac = acc.data();
#pragma omp simd
    for (int64_t f = 0; f < F; f++) {
      const float v = gr[f] * act_derivative<kAct>(hr[f]);
      gr[f] = v;
      ac[f] += v;
    }
    if ((i + 1) % 64 == 0 || i + 1 == n) {
      for (int64_t f = 0; f < F; f++) {
        total[f] += ac[f];
        ac[f] = 0.f;
      }
    }
  }
  if (db != nullptr)
    for (int64_t f = 0; f < F; f++) db[f] = static_cast<float>(total[f]);
}

// the two above for an activation code with has_fast_act
void bias_act(int64_t act, float* h, float* a, const float* b, int64_t n, int64_t F) {
  if (act == GELU_TANH) bias_act_rows<GELU_TANH>(h, a, b, n, F);
  else if (act == SILU) bias_act_rows<SILU>(h, a, b, n, F);
  else bias_act_rows<GELU>(h, a, b, n, F);
}
void act_backward_fused(int64_t act, float* g, const float* h, float* db, int64_t n, int64_t F) {
  if (act == GELU_TANH) act_backward_rows<GELU_TANH>(g, h, db, n, F);
  else if (act == SILU) act_backward_rows<SILU>(g, h, db, n, F);
  else act_backward_rows<GELU>(g, h, db, n, F);
}

// SwiGLU, rows [0, n): a = silu(h) * h3
MV_CLONES void swiglu_rows(const float* h, const float* h3, float* a, int64_t n, int64_t F) {
  for (int64_t i = 0; i < n * F; i += F) {
#pragma omp simd
    for (int64_t f = 0; f < F; f++) a[i + f] = act_value<SILU>(h[i + f]) * h3[i + f];
  }
}

// SwiGLU backward, rows [0, n): gh3 = ga * silu(h) (when gh3 is not null), then ga = ga * h3 * silu'(h) in place
MV_CLONES void swiglu_backward_rows(float* ga, const float* h, const float* h3, float* gh3, int64_t n, int64_t F) {
  for (int64_t i = 0; i < n * F; i += F) {
    if (gh3 != nullptr) {
#pragma omp simd
      for (int64_t f = 0; f < F; f++) {
        const float x = h[i + f], sg = sigmoid(x), g = ga[i + f];
        gh3[i + f] = g * (x * sg);
        ga[i + f] = g * h3[i + f] * (sg * (1.f + x * (1.f - sg)));
      }
    } else {
#pragma omp simd
      for (int64_t f = 0; f < F; f++) ga[i + f] = ga[i + f] * h3[i + f] * act_derivative<SILU>(h[i + f]);
    }
  }
}

void check_index(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dtype() == at::kLong && t.dim() == 1 && t.numel() == n && t.is_contiguous(),
              "moevision expert_mlp: ", name, " must be a contiguous int64 vector of ", n, " entries");
}

// Forward. x (T, D); tok (A,) the token of each expert-sorted row; w1 (E, D, F); b1 (E, F) or undefined;
// w2 (E, F, D); b2 (E, D) or undefined; w3 (E, D, F) or undefined (SwiGLU: a = silu(h) * h3);
// offs (E+1,) int64 row offsets of the experts; gates (A,) token-major, in x's dtype; pos (A,) the
// sorted row of each token-major assignment; K choices per token (A = T*K). Returns out (T, D) (the
// gate-weighted combine), xs (A, D), h (A, F), h3 (A, F) or empty, a (A, F), y (A, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_fwd(
    const at::Tensor& x, const at::Tensor& tok, const at::Tensor& gates, const at::Tensor& pos, int64_t K,
    const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2, const c10::optional<at::Tensor>& w3, const at::Tensor& offs,
    int64_t act) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3, "moevision expert_mlp: x must be 2-D, w1/w2 3-D");
  const int64_t E = w1.size(0), D = w1.size(1), Fh = w1.size(2), A = tok.numel();
  TORCH_CHECK(x.size(1) == D && w2.size(0) == E && w2.size(1) == Fh && w2.size(2) == D,
              "moevision expert_mlp: shapes x ", x.sizes(), " w1 ", w1.sizes(), " w2 ", w2.sizes(), " disagree");
  const auto o = read_offsets(offs, E);
  TORCH_CHECK(o[E] == A, "moevision expert_mlp: offsets end at ", o[E], " but there are ", A, " rows");
  TORCH_CHECK(x.is_contiguous() && K >= 1 && A == x.size(0) * K, "moevision expert_mlp: x must be contiguous "
              "and have A / K = ", A / std::max<int64_t>(K, 1), " rows");
  check_index(tok, A, "tok");
  check_index(pos, A, "pos");
  TORCH_CHECK(gates.numel() == A && gates.is_contiguous() && gates.scalar_type() == x.scalar_type(),
              "moevision expert_mlp: gates must be a contiguous vector of A entries in x's dtype");
  const bool glu = w3.has_value() && w3->defined();
  auto xs = at::empty({A, D}, x.options());
  auto h = at::empty({A, Fh}, x.options());
  auto h3 = glu ? at::empty({A, Fh}, x.options()) : at::empty({0}, x.options());
  auto a = at::empty({A, Fh}, x.options());
  auto y = at::empty({A, D}, x.options());
  const bool has_b1 = b1.has_value() && b1->defined(), has_b2 = b2.has_value() && b2->defined();
  TORCH_CHECK(!has_b1 || (b1->dim() == 2 && b1->size(0) == E && b1->size(1) == Fh), "moevision expert_mlp: b1 must "
              "be (E, F) = (", E, ", ", Fh, "), got ", has_b1 ? b1->sizes() : at::IntArrayRef{});
  TORCH_CHECK(!has_b2 || (b2->dim() == 2 && b2->size(0) == E && b2->size(1) == D), "moevision expert_mlp: b2 must "
              "be (E, D) = (", E, ", ", D, "), got ", has_b2 ? b2->sizes() : at::IntArrayRef{});
  // fp32 GELU / SiLU: the bias and the activation in one pass of ours (bias_act), the GEMM without bias;
  // SwiGLU: silu(h) * h3 in one pass (swiglu_rows; a bias, if any, is already in h)
  const bool fp32 = fast_act_enabled && x.scalar_type() == at::kFloat;
  const bool fast_act = fp32 && !glu && has_fast_act(act);
  const bool fast_glu = fp32 && glu && act == SILU;
  const at::Tensor b1c = (fast_act && has_b1) ? b1->contiguous() : at::Tensor();
  for_ranges(thread_ranges(o, A, threads_for(A), whole_experts_enabled), [&](int64_t, int64_t lo, int64_t hi) {
    if (lo >= hi) return;
    auto xs_t = xs.narrow(0, lo, hi - lo);
    at::index_select_out(xs_t, x, 0, tok.narrow(0, lo, hi - lo));
    for (int64_t e = 0; e < E; e++) {
      const int64_t s = std::max(lo, o[e]), f = std::min(hi, o[e + 1]);
      if (s >= f) continue;
      const int64_t n = f - s;
      auto xe = xs.narrow(0, s, n);
      auto he = h.narrow(0, s, n);
      auto ae = a.narrow(0, s, n);
      auto ye = y.narrow(0, s, n);
      if (fast_act) {
        at::mm_out(he, xe, w1[e]);
        bias_act(act, he.data_ptr<float>(), ae.data_ptr<float>(), has_b1 ? b1c.data_ptr<float>() + e * Fh : nullptr,
                 n, Fh);
      } else if (has_b1) {
        at::addmm_out(he, (*b1)[e], xe, w1[e]);
      } else {
        at::mm_out(he, xe, w1[e]);
      }
      if (glu) {
        auto h3e = h3.narrow(0, s, n);
        at::mm_out(h3e, xe, (*w3)[e]);
        if (fast_glu) {
          swiglu_rows(he.data_ptr<float>(), h3e.data_ptr<float>(), ae.data_ptr<float>(), n, Fh);
        } else {
          at::silu_out(ae, he);
          ae.mul_(h3e);
        }
      } else if (!fast_act) {  // (fast_act: a is written above)
        act_forward(ae, he, act);
      }
      if (has_b2) at::addmm_out(ye, (*b2)[e], ae, w2[e]); else at::mm_out(ye, ae, w2[e]);
    }
  });
  const int64_t T = x.size(0);
  auto out = at::empty({T, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moevision_combine", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gates.data_ptr<scalar_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) { combine_rows(op, yp, gp, pp, K, D, t0, t1); });
  });
  return {out, xs, h, h3, a, y};
}

// Backward. gout (T, D): grad of the layer output. tok, order (the token-major index of each sorted row),
// pos, gates, K as in the forward; saved xs, h, h3 (or empty), a, y from the forward. Returns gx (T, D),
// grad_gates (A,) token-major in gout's dtype, gw1, gb1, gw2, gb2, gw3 (each empty when not asked for).
// need: [x, gates, w1, b1, w2, b2, w3].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_bwd(
    const at::Tensor& gout_in, const at::Tensor& tok, const at::Tensor& order, const at::Tensor& pos,
    const at::Tensor& gates, int64_t K, const at::Tensor& xs, const at::Tensor& h, const at::Tensor& h3,
    const at::Tensor& a, const at::Tensor& y, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& w3, const at::Tensor& offs, int64_t act, bool need_x, bool need_g,
    bool need_w1, bool need_b1, bool need_w2, bool need_b2, bool need_w3) {
  const int64_t E = w1.size(0), D = w1.size(1), Fh = w1.size(2), A = xs.size(0);
  const auto o = read_offsets(offs, E);
  const auto gout = gout_in.contiguous();
  const int64_t T = gout.size(0);
  TORCH_CHECK(K >= 1 && T * K == A && gout.size(1) == D, "moevision expert_mlp: grad of shape ", gout.sizes(),
              " does not match A = ", A, " rows of width ", D, " with K = ", K);
  check_index(tok, A, "tok");
  check_index(order, A, "order");
  check_index(pos, A, "pos");
  TORCH_CHECK(gates.numel() == A && gates.is_contiguous() && gates.scalar_type() == gout.scalar_type(),
              "moevision expert_mlp: gates must be a contiguous vector of A entries in the grad's dtype");
  TORCH_CHECK(o[E] == A && xs.size(0) == A && h.size(0) == A && a.size(0) == A,
              "moevision expert_mlp: saved tensors and offsets disagree on the number of rows");
  const bool glu = w3.has_value() && w3->defined();
  TORCH_CHECK(h.dim() == 2 && h.size(1) == Fh && a.dim() == 2 && a.size(1) == Fh && (!glu || h3.sizes() == h.sizes()),
              "moevision expert_mlp: saved h / a / h3 must be (A, F) with F = ", Fh, ", got h ", h.sizes(), " a ",
              a.sizes(), " h3 ", h3.sizes());
  need_w3 = need_w3 && glu;
  auto opt = gout.options();
  auto empty = at::empty({0}, opt);
  auto gy = at::empty({A, D}, opt);
  auto ggate = need_g ? at::empty({A}, opt) : empty;
  auto gw1 = need_w1 ? at::empty_like(w1) : empty;
  auto gw2 = need_w2 ? at::empty_like(w2) : empty;
  auto gw3 = need_w3 ? at::empty_like(*w3) : empty;
  auto gb1 = need_b1 ? at::empty({E, Fh}, opt) : empty;
  auto gb2 = need_b2 ? at::empty({E, D}, opt) : empty;
  const bool need_h = need_x || need_w1 || need_b1 || need_w3;
  auto ga = need_h ? at::empty({A, Fh}, opt) : empty;
  auto gh3 = (glu && (need_x || need_w3)) ? at::empty({A, Fh}, opt) : empty;
  auto gxs = need_x ? at::empty({A, D}, opt) : empty;
  for (int64_t e = 0; e < E; e++) {
    if (o[e] == o[e + 1]) {  // an expert with no rows gets a zero gradient
      for (auto* t : {&gw1, &gw2, &gw3, &gb1, &gb2})
        if (t->numel()) (*t)[e].zero_();
    }
  }
  const int nt = threads_for(A);
  const bool fp32 = fast_act_enabled && gout.scalar_type() == at::kFloat && h.scalar_type() == at::kFloat &&
                    h.is_contiguous() && (!glu || (h3.scalar_type() == at::kFloat && h3.is_contiguous()));
  const bool fast_act = fp32 && !glu && has_fast_act(act);
  const bool fast_glu = fp32 && glu && act == SILU;
  // per thread: the expert whose rows it holds but does not start (at most one), and its partial grads
  std::vector<int64_t> part_e(nt, -1);
  std::vector<std::vector<at::Tensor>> part(nt);
  for_ranges(thread_ranges(o, A, nt, whole_experts_enabled), [&](int64_t t, int64_t lo, int64_t hi) {
    if (lo >= hi) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gout.scalar_type(), "moevision_grad_rows", [&] {
      grad_rows(gy.data_ptr<scalar_t>(), need_g ? ggate.data_ptr<scalar_t>() : nullptr, gout.data_ptr<scalar_t>(),
                y.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(),
                order.data_ptr<int64_t>(), D, lo, hi);
    });
    for (int64_t e = 0; e < E; e++) {
      const int64_t s = std::max(lo, o[e]), f = std::min(hi, o[e + 1]);
      if (s >= f) continue;
      const int64_t n = f - s;
      const bool owner = (s == o[e]);
      at::Tensor dw1, db1, dw2, db2, dw3;
      if (owner) {
        if (need_w1) dw1 = gw1[e];
        if (need_b1) db1 = gb1[e];
        if (need_w2) dw2 = gw2[e];
        if (need_b2) db2 = gb2[e];
        if (need_w3) dw3 = gw3[e];
      } else {
        if (need_w1) dw1 = at::empty({D, Fh}, opt);
        if (need_b1) db1 = at::empty({Fh}, opt);
        if (need_w2) dw2 = at::empty({Fh, D}, opt);
        if (need_b2) db2 = at::empty({D}, opt);
        if (need_w3) dw3 = at::empty({D, Fh}, opt);
        part_e[t] = e;
        part[t] = {dw1, db1, dw2, db2, dw3};
      }
      auto gye = gy.narrow(0, s, n);
      if (need_w2) at::mm_out(dw2, a.narrow(0, s, n).t(), gye);
      if (need_b2) at::sum_out(db2, gye, {0});
      if (!need_h) continue;
      auto gae = ga.narrow(0, s, n);
      at::mm_out(gae, gye, w2[e].t());
      auto he = h.narrow(0, s, n);
      auto xe = xs.narrow(0, s, n);
      at::Tensor gh3e;
      if (glu) {  // a = silu(h) * h3
        auto h3e = h3.narrow(0, s, n);
        if (gh3.numel()) gh3e = gh3.narrow(0, s, n);
        if (fast_glu) {
          swiglu_backward_rows(gae.data_ptr<float>(), he.data_ptr<float>(), h3e.data_ptr<float>(),
                               gh3.numel() ? gh3e.data_ptr<float>() : nullptr, n, Fh);
        } else {
          if (gh3.numel()) {
            at::silu_out(gh3e, he);
            gh3e.mul_(gae);
          }
          gae.mul_(h3e);
          at::silu_backward_out(gae, gae, he);
        }
      } else if (fast_act) {  // the bias gradient summed in the same pass
        act_backward_fused(act, gae.data_ptr<float>(), he.data_ptr<float>(), need_b1 ? db1.data_ptr<float>() : nullptr,
                           n, Fh);
      } else {
        act_backward(gae, gae, he, act);
      }
      if (need_w1) at::mm_out(dw1, xe.t(), gae);
      if (need_b1 && !fast_act) at::sum_out(db1, gae, {0});
      if (need_w3) at::mm_out(dw3, xe.t(), gh3e);
      if (need_x) {
        auto gxe = gxs.narrow(0, s, n);
        at::mm_out(gxe, gae, w1[e].t());
        if (glu) gxe.addmm_(gh3e, (*w3)[e].t());
      }
    }
  });
  for (int t = 0; t < nt; t++) {
    const int64_t e = part_e[t];
    if (e < 0) continue;
    at::Tensor* dst[5] = {&gw1, &gb1, &gw2, &gb2, &gw3};
    for (int i = 0; i < 5; i++)
      if (part[t][i].defined()) (*dst[i])[e].add_(part[t][i]);
  }
  auto gx = empty;
  if (need_x) {
    gx = at::empty({T, D}, opt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gout.scalar_type(), "moevision_gather_sum", [&] {
      scalar_t* gp = gx.data_ptr<scalar_t>();
      const scalar_t* sp = gxs.data_ptr<scalar_t>();
      const int64_t* pp = pos.data_ptr<int64_t>();
      at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) { gather_sum_rows(gp, sp, pp, K, D, t0, t1); });
    });
  }
  return {gx, ggate, gw1, gb1, gw2, gb2, gw3};
}


// ---------------------------------------------------------------------------------------------------
// Router core (top-k token choice): logits = x @ w^T, probs = softmax(logits + noise), the K largest
// probabilities and their experts (ties: the lower expert index first, as a max scan). One GEMM and one
// pass over the (T, E) rows; backward one pass and two GEMMs. The Python router builds the losses on
// these outputs with autograd, so any loss reaches the core as grads of logits, probs and top_v.

// The K largest of each row of probs (ties: the lower expert index first).
template <typename scalar_t>
void topk_rows(const scalar_t* probs, scalar_t* top_v, int64_t* top_i, int64_t E, int64_t K, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; t++) {
    const scalar_t* p = probs + t * E;
    for (int64_t j = 0; j < K; j++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        bool taken = false;
        for (int64_t q = 0; q < j; q++) taken |= (top_i[t * K + q] == e);
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      top_i[t * K + j] = best;
      top_v[t * K + j] = p[best];
    }
  }
}

// exp in place of n values <= 0 (the max-shifted logits): fp32 by exp_nonpos (vectorised by the compiler, ~1e-7
// relative; NaN and -inf kept exact), fp64 by std::exp. ATen's exp_ was used here, on each thread's block: in about one process in ten
// (2 threads) one block came out with errors up to 2e-5 relative in fp32 and 7e-10 in fp64 - nondeterministic,
// the same inputs exact in the other processes (tests/test_native.py holds the softmax to the eager one).
MV_CLONES void exp_nonpos_rows(float* v, int64_t n) {
  for (int64_t i = 0; i < n; i++) {  // below -87: 0 (so exp(-inf) = 0 exactly); a NaN stays NaN
    const float y = v[i], e = exp_nonpos(y);
    v[i] = y < -87.f ? 0.f : (y == y ? e : y);
  }
}
void exp_nonpos_rows(double* v, int64_t n) {
  for (int64_t i = 0; i < n; i++) v[i] = std::exp(v[i]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_fwd(
    const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& noise_opt, int64_t K) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "moevision router: x (T, D) and w "
              "(E, D) must agree on D, got ", x_in.sizes(), " and ", w.sizes());
  TORCH_CHECK(x_in.scalar_type() == w.scalar_type() &&
              (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble),
              "moevision router: x and w must both be float32 or float64");
  const auto x = x_in.contiguous();
  const int64_t T = x.size(0), E = w.size(0);
  TORCH_CHECK(K >= 1 && K <= E, "moevision router: top_k must be in [1, E = ", E, "], got ", K);
  at::Tensor noise;
  if (noise_opt.has_value() && noise_opt->defined()) {
    noise = noise_opt->contiguous();
    TORCH_CHECK(noise.dim() == 2 && noise.size(0) == T && noise.size(1) == E && noise.scalar_type() == x.scalar_type(),
                "moevision router: noise must be (T, E) in x's dtype");
  }
  const auto wt = w.t();
  auto logits = at::empty({T, E}, x.options());
  auto probs = at::empty({T, E}, x.options());
  auto top_v = at::empty({T, K}, x.options());
  auto top_i = at::empty({T, K}, x.options().dtype(at::kLong));
  // One parallel region: each thread takes a block of rows and runs its logits GEMM (single-threaded),
  // the max-shifted exp (ATen's vectorised kernel on the block: a scalar exp per element cost ~3x more
  // at E = 8), the normalisation and the top-k while the block is in cache.
  for_blocks(T, threads_for(T), [&](int, int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    auto lb = logits.narrow(0, lo, hi - lo), pb = probs.narrow(0, lo, hi - lo);
    at::mm_out(lb, x.narrow(0, lo, hi - lo), wt);
    if (noise.defined()) at::add_out(pb, lb, noise.narrow(0, lo, hi - lo)); else pb.copy_(lb);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moevision_router_fwd", [&] {
      scalar_t* pp = pb.data_ptr<scalar_t>();
      for (int64_t t = 0; t < hi - lo; t++) {
        scalar_t* r = pp + t * E;
        scalar_t m = r[0];
        for (int64_t e = 1; e < E; e++) m = std::max(m, r[e]);
        for (int64_t e = 0; e < E; e++) r[e] -= m;
      }
      exp_nonpos_rows(pp, (hi - lo) * E);
      for (int64_t t = 0; t < hi - lo; t++) {
        scalar_t* r = pp + t * E;
        scalar_t sum = 0;
        for (int64_t e = 0; e < E; e++) sum += r[e];
        const scalar_t inv = scalar_t(1) / sum;
        for (int64_t e = 0; e < E; e++) r[e] *= inv;
      }
      topk_rows(probs.data_ptr<scalar_t>(), top_v.data_ptr<scalar_t>(), top_i.data_ptr<int64_t>(), E, K, lo, hi);
    });
  });
  return {logits, probs, top_v, top_i};
}

// dlogits = p * (dp - <dp, p>) + g_logits, with dp = g_probs + the grads of top_v scattered to top_i; then
// dx = dlogits @ w and dw = dlogits^T @ x. One parallel region over row blocks (each thread its block's
// dlogits, its dx rows and a partial dw, summed after the region). The incoming grads may be broadcast
// views (a loss on a sum over tokens sends a stride-0 grad): read through their strides, never copied.
// With ``dx_acc`` (a contiguous (T, D) buffer, e.g. the experts' grad of the same x) dx is added into it
// by the GEMM itself (beta = 1; the returned dx is then empty): no separate (T, D) tensor and no later
// pass to sum the two.
std::tuple<at::Tensor, at::Tensor> router_bwd(
    const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& probs, const at::Tensor& top_i,
    const c10::optional<at::Tensor>& g_logits_opt, const c10::optional<at::Tensor>& g_probs_opt,
    const c10::optional<at::Tensor>& g_topv_opt, bool need_x, bool need_w,
    const c10::optional<at::Tensor>& dx_acc_opt) {
  const int64_t T = probs.size(0), E = probs.size(1), K = top_i.size(1);
  TORCH_CHECK(probs.is_contiguous() && top_i.is_contiguous(), "moevision router: probs and top_i must be contiguous");
  const auto x = x_in.contiguous();
  auto dl = at::empty_like(probs);
  auto get = [&](const c10::optional<at::Tensor>& t, int64_t cols) {
    if (!(t.has_value() && t->defined())) return at::Tensor();
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == cols && t->scalar_type() == probs.scalar_type(),
                "moevision router: a gradient has the wrong shape or dtype");
    return *t;
  };
  const auto gl = get(g_logits_opt, E), gp = get(g_probs_opt, E), gv = get(g_topv_opt, K);
  const int nt = threads_for(T);
  const bool acc = need_x && dx_acc_opt.has_value() && dx_acc_opt->defined();
  if (acc)
    TORCH_CHECK(dx_acc_opt->dim() == 2 && dx_acc_opt->size(0) == T && dx_acc_opt->size(1) == w.size(1) &&
                dx_acc_opt->is_contiguous() && dx_acc_opt->scalar_type() == x.scalar_type(),
                "moevision router: dx_acc must be a contiguous (T, D) tensor in x's dtype, got ", dx_acc_opt->sizes());
  auto dx = acc ? *dx_acc_opt : (need_x ? at::empty({T, w.size(1)}, x.options()) : at::empty({0}, x.options()));
  auto dw = need_w ? at::zeros_like(w) : at::empty({0}, x.options());
  std::vector<at::Tensor> dw_part(nt);
  for_blocks(T, nt, [&](int tid, int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moevision_router_bwd", [&] {
      const scalar_t* p = probs.data_ptr<scalar_t>();
      const int64_t* ti = top_i.data_ptr<int64_t>();
      const scalar_t* glp = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
      const scalar_t* gpp = gp.defined() ? gp.data_ptr<scalar_t>() : nullptr;
      const scalar_t* gvp = gv.defined() ? gv.data_ptr<scalar_t>() : nullptr;
      const int64_t gl0 = gl.defined() ? gl.stride(0) : 0, gl1 = gl.defined() ? gl.stride(1) : 0;
      const int64_t gp0 = gp.defined() ? gp.stride(0) : 0, gp1 = gp.defined() ? gp.stride(1) : 0;
      const int64_t gv0 = gv.defined() ? gv.stride(0) : 0, gv1 = gv.defined() ? gv.stride(1) : 0;
      scalar_t* d = dl.data_ptr<scalar_t>();
      for (int64_t t = lo; t < hi; t++) {
        scalar_t* dr = d + t * E;
        const scalar_t* pr = p + t * E;
        for (int64_t e = 0; e < E; e++) dr[e] = gpp ? gpp[t * gp0 + e * gp1] : scalar_t(0);
        if (gvp)
          for (int64_t j = 0; j < K; j++) dr[ti[t * K + j]] += gvp[t * gv0 + j * gv1];
        scalar_t dot = 0;
        for (int64_t e = 0; e < E; e++) dot += dr[e] * pr[e];
        for (int64_t e = 0; e < E; e++) dr[e] = pr[e] * (dr[e] - dot) + (glp ? glp[t * gl0 + e * gl1] : scalar_t(0));
      }
    });
    auto db = dl.narrow(0, lo, hi - lo);
    if (need_x) {
      auto dxb = dx.narrow(0, lo, hi - lo);
      if (acc) dxb.addmm_(db, w); else at::mm_out(dxb, db, w);
    }
    if (need_w) {
      if (nt == 1) at::mm_out(dw, db.t(), x.narrow(0, lo, hi - lo));
      else dw_part[tid] = at::mm(db.t(), x.narrow(0, lo, hi - lo));
    }
  });
  if (need_w && nt > 1)
    for (int t = 0; t < nt; t++)
      if (dw_part[t].defined()) dw.add_(dw_part[t]);
  if (acc) return {at::empty({0}, x.options()), dw};  // dx went into dx_acc (not returned: no output aliases an input)
  return {dx, dw};
}

// Stable counting sort of the token-major expert ids (A,): order (A,) the token-major index of each
// expert-sorted row, pos (A,) its inverse, offs (E+1,) the row offsets. One pass to count, one to place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& expert_in, int64_t E) {
  TORCH_CHECK(expert_in.dim() == 1 && !expert_in.is_floating_point() && !expert_in.is_complex(),
              "moevision sort_by_expert: expert ids must be a 1-D integer tensor");
  const auto expert = expert_in.to(at::kLong).contiguous();
  const int64_t A = expert.numel();
  const int64_t* ex = expert.data_ptr<int64_t>();
  auto offs = at::zeros({E + 1}, expert.options());
  auto order = at::empty({A}, expert.options());
  auto pos = at::empty({A}, expert.options());
  int64_t* o = offs.data_ptr<int64_t>();
  for (int64_t a = 0; a < A; a++) {
    TORCH_CHECK(ex[a] >= 0 && ex[a] < E, "moevision sort_by_expert: expert id ", ex[a], " out of [0, ", E, ")");
    o[ex[a] + 1]++;
  }
  for (int64_t e = 0; e < E; e++) o[e + 1] += o[e];
  std::vector<int64_t> next(o, o + E);
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t a = 0; a < A; a++) {
    const int64_t i = next[ex[a]]++;
    op[i] = a;
    pp[a] = i;
  }
  return {order, pos, offs};
}

// thread_ranges as a (R, 3) int64 tensor of (thread, first row, end row), for tests and diagnostics.
at::Tensor expert_thread_ranges(const at::Tensor& offs, int64_t nt, bool whole_experts) {
  TORCH_CHECK(nt >= 1, "moevision expert_thread_ranges: nt must be >= 1, got ", nt);
  const int64_t E = offs.numel() - 1;
  TORCH_CHECK(E >= 1, "moevision expert_thread_ranges: offsets need E + 1 >= 2 entries");
  const auto o = read_offsets(offs, E);
  const auto r = thread_ranges(o, o[E], static_cast<int>(nt), whole_experts);
  std::vector<int64_t> flat;
  for (int64_t t = 0; t < nt; t++)
    for (const auto& lh : r[t]) flat.insert(flat.end(), {t, lh.first, lh.second});
  return at::tensor(flat, at::kLong).view({-1, 3});
}

// Switch the whole-expert thread split on or off (returns the previous setting).
bool set_whole_experts(bool on) {
  const bool was = whole_experts_enabled;
  whole_experts_enabled = on;
  return was;
}

// Switch the fp32 activation kernels on or off (returns the previous setting).
bool set_fast_act(bool on) {
  const bool was = fast_act_enabled;
  fast_act_enabled = on;
  return was;
}

// The fp32 activation kernels on their own, for tests: act a code with has_fast_act; h (n, F) float, b (F,)
// or none, g (n, F) or none. Returns (h + b, act(h + b), g * act'(h + b), the column sums of that) - the
// last two empty without g. With h3 (n, F) (SwiGLU; act must be SILU, no b): (h, silu(h) * h3, the grad of h,
// the grad of h3) for the grad g of the output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_fp32(
    const at::Tensor& h_in, int64_t act, const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& g_in,
    const c10::optional<at::Tensor>& h3_in) {
  TORCH_CHECK(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat, "moevision act_fp32: h must be a 2-D float32 tensor");
  TORCH_CHECK(has_fast_act(act), "moevision act_fp32: no fp32 kernel for activation code ", act);
  const int64_t n = h_in.size(0), F = h_in.size(1);
  auto h = h_in.contiguous().clone();
  auto a = at::empty_like(h);
  const bool has_g = g_in.has_value() && g_in->defined();
  if (has_g)
    TORCH_CHECK(g_in->sizes() == h.sizes() && g_in->scalar_type() == at::kFloat,
                "moevision act_fp32: g must be float32 of h's shape");
  auto g = has_g ? g_in->contiguous().clone() : at::empty({0}, h.options());
  if (h3_in.has_value() && h3_in->defined()) {
    TORCH_CHECK(act == SILU && !(b_in.has_value() && b_in->defined()) && h3_in->sizes() == h.sizes() &&
                h3_in->scalar_type() == at::kFloat, "moevision act_fp32: SwiGLU takes act SILU, no b, h3 like h");
    const auto h3 = h3_in->contiguous();
    swiglu_rows(h.data_ptr<float>(), h3.data_ptr<float>(), a.data_ptr<float>(), n, F);
    auto gh3 = has_g ? at::empty_like(h) : at::empty({0}, h.options());
    if (has_g) swiglu_backward_rows(g.data_ptr<float>(), h.data_ptr<float>(), h3.data_ptr<float>(), gh3.data_ptr<float>(), n, F);
    return {h, a, g, gh3};
  }
  at::Tensor b;
  if (b_in.has_value() && b_in->defined()) {
    b = b_in->contiguous();
    TORCH_CHECK(b.numel() == F && b.scalar_type() == at::kFloat, "moevision act_fp32: b must be (F,) float32");
  }
  bias_act(act, h.data_ptr<float>(), a.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, n, F);
  auto db = has_g ? at::empty({F}, h.options()) : at::empty({0}, h.options());
  if (has_g) act_backward_fused(act, g.data_ptr<float>(), h.data_ptr<float>(), db.data_ptr<float>(), n, F);
  return {h, a, g, db};
}

}  // namespace

TORCH_LIBRARY(moevision_cpu, m) {
  m.def("set_whole_experts(bool on) -> bool");
  m.def("set_fast_act(bool on) -> bool");
  m.def("act_fp32(Tensor h, int act, Tensor? b, Tensor? g, Tensor? h3=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("expert_thread_ranges(Tensor offs, int nt, bool whole_experts) -> Tensor");
  m.def("sort_by_expert(Tensor expert, int E) -> (Tensor, Tensor, Tensor)");
  m.def("router_fwd(Tensor x, Tensor w, Tensor? noise, int K) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("router_bwd(Tensor x, Tensor w, Tensor probs, Tensor top_i, Tensor? g_logits, Tensor? g_probs, "
        "Tensor? g_topv, bool need_x, bool need_w, Tensor(a!)? dx_acc=None) -> (Tensor, Tensor)");
  m.def("expert_mlp_fwd(Tensor x, Tensor tok, Tensor gates, Tensor pos, int K, Tensor w1, Tensor? b1, "
        "Tensor w2, Tensor? b2, Tensor? w3, Tensor offs, int act) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("expert_mlp_bwd(Tensor gout, Tensor tok, Tensor order, Tensor pos, Tensor gates, int K, Tensor xs, "
        "Tensor h, Tensor h3, Tensor a, Tensor y, Tensor w1, Tensor w2, Tensor? w3, Tensor offs, int act, "
        "bool need_x, bool need_g, bool need_w1, bool need_b1, bool need_w2, bool need_b2, bool need_w3) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moevision_cpu, CPU, m) {
  m.impl("expert_mlp_fwd", &expert_mlp_fwd);
  m.impl("expert_mlp_bwd", &expert_mlp_bwd);
  m.impl("router_fwd", &router_fwd);
  m.impl("router_bwd", &router_bwd);
  m.impl("sort_by_expert", &sort_by_expert);
  m.impl("expert_thread_ranges", &expert_thread_ranges);
  m.impl("act_fp32", &act_fp32);
}

TORCH_LIBRARY_IMPL(moevision_cpu, CatchAll, m) {
  m.impl("set_whole_experts", &set_whole_experts);
  m.impl("set_fast_act", &set_fast_act);
}
