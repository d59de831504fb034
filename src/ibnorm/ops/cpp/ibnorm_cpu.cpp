// Vectorized CPU kernels for IBNormFunction: forward and analytic backward for every grouping.
//
// One normalization group is `segments` contiguous runs of `length` elements:
//   layer/RMS  (R, n)            a group is one row (one run of n); γ, β per element;
//   batch      (N, C, L)         a group is channel c: N runs of L, stride C·L; γ, β per channel;
//   group      (N, G, C/G, L)    a group is (n, g): C/G runs of L, contiguous; γ, β per channel.
//
// Forward, for one group of n elements (ψ_λ(z) = f(λz)/λ; RMS drops both centerings):
//   μ, σ² of x                  z = (x − μ)·rsqrt(σ² + eps)   ("standardized")
//                               z = x − μ                     ("centered"; RMS: z = x)
//   u = ψ_λ(z)   m, v of u      û = (u − m)·rsqrt(v + eps)    y = γ·û + β
// With frozen statistics (batch grouping in eval) μ, σ², m, v are given and nothing is reduced.
// Elementwise math and vector sums run in float32 (float64 for double input), in lanes that are
// moved into double totals every few thousand elements. The input's moments come from blocks of
// at most 2048 elements, each read twice while in L1 (its mean, then its squared deviations) and
// merged by Chan's update; ψ's output is cached and its moments summed as it is written (u is ψ
// of a centered input, so that one-pass variance does not cancel). So the forward reads x from
// memory twice (a row once: the later sweeps hit L1), caches u, and writes y once: float32
// outputs of kStreamBytes or more with non-temporal stores, which skip reading the line first.
//
// Backward (see ibnorm/ops/function.py for the derivation), with r₁, r₂ the two rsqrt factors:
//   g_û = γ·g_y
//   g_u = r₂·(g_û − mean g_û − û·mean(g_û·û))                (frozen: r₂·g_û)
//   g_z = g_u·ψ'(z)
//   g_x = r₁·(g_z − mean g_z − z·mean(g_z·z))                ("standardized"; frozen: r₁·g_z)
//   g_x = g_z − mean g_z                                      ("centered"; RMS or frozen: g_z)
//   g_γ = Σ g_y·û,  g_β = Σ g_y,  g_λ = Σ g_u·∂ψ/∂λ
// The mean(·) terms drop for RMS. γ/β gradients go to per-chunk partial sums reduced at the end.
// Two sweeps per group: one recomputes ψ and gathers every sum (those of g_z are linear in the
// sums of g_û, see GroupKernel::backward), one writes g_x.

#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::vec::Vectorized;

// ------------------------------------------------------------------ fast division and root
// A vector division or square root costs several times a multiply-add on wide vectors, and ψ
// needs them per element (twice more in the backward, which recomputes ψ). For float, the ISA's
// estimate (14 bits on AVX-512, 12 on AVX2) refined by one Newton step is within a few ulp of
// the exact result; other types and ISAs divide exactly. With kFull false (bfloat16 and float16
// inputs, whose outputs keep 8 or 11 bits) the estimate is used as it is.

// Whether V has the ISA's reciprocal and rsqrt estimates (float on AVX-512 or AVX2).
template <typename V>
constexpr bool kHasEstimates =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<V, Vectorized<float>>;
#else
    false;
#endif

// The estimates alone (only where kHasEstimates<V>).
template <typename V>
inline V reciprocal_estimate(V a) {
#if defined(CPU_CAPABILITY_AVX512)
  return V(_mm512_rcp14_ps(a));
#elif defined(CPU_CAPABILITY_AVX2)
  return V(_mm256_rcp_ps(a));
#else
  return a;
#endif
}

template <typename V>
inline V reciprocal_sqrt_estimate(V a) {
#if defined(CPU_CAPABILITY_AVX512)
  return V(_mm512_rsqrt14_ps(a));
#elif defined(CPU_CAPABILITY_AVX2)
  return V(_mm256_rsqrt_ps(a));
#else
  return a;
#endif
}

template <bool kFull = true, typename V>
inline V reciprocal(V a) {
  if constexpr (kHasEstimates<V>) {
    const V r = reciprocal_estimate(a);
    if constexpr (!kFull) return r;
    return at::vec::fmadd(r, at::vec::fnmadd(a, r, V(1)), r);  // r + r·(1 − a·r)
  }
  return V(1) / a;
}

template <bool kFull = true, typename V>
inline V reciprocal_sqrt(V a) {
  if constexpr (kHasEstimates<V>) {
    const V r = reciprocal_sqrt_estimate(a);
    if constexpr (!kFull) return r;
    return r * at::vec::fnmadd(V(0.5f) * a * r, r, V(1.5f));  // r·(3/2 − a·r²/2)
  }
  return V(1) / a.sqrt();
}

// log1p and tanh: Sleef's vectorized versions (what Vectorized<float> calls) cost several times
// the rest of ψ, and log1p's time even depends on its argument. On AVX-512, float gets its own:
//   log1p(t), t ≥ 0: 1 + t = m·2^k with m ∈ [0.75, 1.5); log m = 2·atanh(s), s = (m − 1)/(m + 1),
//     |s| ≤ 0.2, by its series to s⁹ (truncation < 1e-9); plus (t − ((1 + t) − 1))/(1 + t) for
//     the rounding of 1 + t.
//   tanh(u): for |u| < 0.625 u + u³·Q(u²), Q a degree-4 least-squares fit of (tanh u − u)/u³
//     (within 1.4 ulp in float); above, 1 − 2/(e^{2|u|} + 1) with e^x = 2^n·exp(r), |r| ≤ ln2/2,
//     exp(r) by its Taylor series to r⁷ (truncation < 5e-9).
// Both stay within a few ulp of the exact value; other types and ISAs use Sleef.

// ln 2 = kLn2High + kLn2Low, the high part exact in few bits so that n·kLn2High is exact.
constexpr float kLn2High = 0.693145751953125f;
constexpr float kLn2Low = 1.428606765330187e-06f;

template <bool kFull, typename V>
inline V log1p_nonnegative(V t) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    using at::vec::fmadd;
    const V one(1.0f);
    const V u = one + t;
    const V m(_mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src));
    V k(_mm512_getexp_ps(u));
    k = V::blendv(k, k + one, m < one);  // getexp is for m ∈ [1, 2): a mantissa below 1 adds one
    const V f = m - one;
    const V s = f * reciprocal<kFull>(f + V(2.0f)), s2 = s * s;
    const V series = fmadd(fmadd(fmadd(V(1.0f / 9), s2, V(1.0f / 7)), s2, V(1.0f / 5)), s2, V(1.0f / 3));
    const V log_m = fmadd(V(2.0f) * s * s2, series, V(2.0f) * s);
    const V rounding = (t - (u - one)) * reciprocal<kFull>(u);
    return fmadd(k, V(kLn2High), fmadd(k, V(kLn2Low), log_m + rounding));
  }
#endif
  return t.log1p();
}

template <bool kFull, typename V>
inline V tanh_fast(V u) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    using at::vec::fmadd;
    using at::vec::fnmadd;
    const V a = at::vec::minimum(u.abs(), V(20.0f));  // tanh(20) is 1 in float
    const V a2 = a * a;
    const V q = fmadd(fmadd(fmadd(fmadd(V(-5.923271787e-3f), a2, V(2.083773571e-2f)), a2, V(-5.380191463e-2f)), a2,
                            V(1.333220973e-1f)),
                      a2, V(-3.333331156e-1f));
    const V small = fmadd(a * a2, q, a);
    // e^{2a} = 2^n·exp(r), r = 2a − n·ln2 in two steps
    const V x = a + a;
    const V n = (x * V(1.44269504088896341f)).round();
    const V r = fnmadd(n, V(kLn2Low), fnmadd(n, V(kLn2High), x));
    V e = fmadd(r, V(1.0f / 5040), V(1.0f / 720));
    e = fmadd(e, r, V(1.0f / 120));
    e = fmadd(e, r, V(1.0f / 24));
    e = fmadd(e, r, V(1.0f / 6));
    e = fmadd(e, r, V(0.5f));
    e = fmadd(e, r, V(1.0f));
    e = fmadd(e, r, V(1.0f));
    e = V(_mm512_scalef_ps(e, n));
    const V large = fnmadd(V(2.0f), reciprocal<kFull>(e + V(1.0f)), V(1.0f));
    return V::blendv(large, small, a < V(0.625f)).copysign(u);
  }
#endif
  return u.tanh();
}

// ------------------------------------------------------------------ compression families
// Each family is ψ_λ(z) = f(λz)/λ. eval gives ψ and ψ' = f'(λz) for λ > 0; value gives f(w) alone
// (for callers that fold λ into their own scales); dlam gives ∂ψ/∂λ from z, ψ and ψ', finite for
// every λ ≥ 0 (λ = 0 passes ψ = z, ψ' = 1). Where the direct form
// (z·ψ' − ψ)/λ cancels, a Taylor series takes over, as in ibnorm/compression.py: below a cutoff
// that depends on the precision, where the series' truncation error is below it.

// The series cutoff of |t| for V's precision: `for_double` in double, `for_float` otherwise.
template <typename V>
V series_cutoff(double for_double, double for_float) {
  return V(std::is_same_v<typename V::value_type, double> ? for_double : for_float);
}

struct SignedRoot {  // ψ = 2z / (s + 1),  ψ' = 1/s,  s = sqrt(1 + λ|z|)
  template <bool kFull, typename V>
  static void eval(V z, V lam, V /*inv_lam*/, V& psi, V& dpsi) {
    const V one(1);
    const V a = at::vec::fmadd(lam, z.abs(), one);
    dpsi = reciprocal_sqrt<kFull>(a);
    psi = V(2) * z * reciprocal<kFull>(at::vec::fmadd(a, dpsi, one));  // s = a / sqrt(a)
  }

  // f(w) = 2w·p, p = 1/(1 + s), s = sqrt(1 + t), t = |w|. From the estimates of 1/s and 1/(1 + s),
  // one Newton step on h(p) = t·p² + 2p − 1 (whose root is p) with h'(p) = 2(t·p + 1) = 2s, so
  // that the step needs only the estimate of 1/s at hand: 2p_next = 2p − h/s. Unrefined (kFull
  // false), 2p comes as the estimate of 1/q, q = (1 + s)/2 = b·rsqrt(b) + 1/2 with b = (1 + t)/4:
  // the factors of 2 ride on exact power-of-two constants instead of a multiply of their own.
  template <bool kFull, typename V>
  static V value(V w) {
    const V t = w.abs(), a = t + V(1);
    if constexpr (kHasEstimates<V> && !kFull) {
      const V b = at::vec::fmadd(t, V(0.25f), V(0.25f));
      return w * reciprocal_estimate(at::vec::fmadd(b, reciprocal_sqrt_estimate(b), V(0.5f)));
    }
    if constexpr (kHasEstimates<V>) {
      const V r = reciprocal_sqrt_estimate(a);
      const V p = reciprocal_estimate(at::vec::fmadd(a, r, V(1)));
      const V h = at::vec::fmadd(t * p, p, at::vec::fmadd(V(2), p, V(-1)));
      return w * at::vec::fnmadd(h, r, p + p);
    }
    return (w + w) / (V(1) + a.sqrt());
  }

  // −z|z| / (s·(s + 1)²) = −z|z|·ψ'·(ψ' / (1 + ψ'))²: no cancellation at any λ.
  template <bool kFull, typename V>
  static V dlam(V z, V /*lam*/, V /*inv_lam*/, V /*psi*/, V dpsi) {
    const V ratio = dpsi * reciprocal<kFull>(V(1) + dpsi);
    return (z * z.abs() * dpsi * ratio * ratio).neg();
  }
};

struct Logarithmic {  // ψ = sign(z)·log1p(t) / λ,  ψ' = 1 / (1 + t),  t = λ|z|
  template <bool kFull, typename V>
  static void eval(V z, V lam, V inv_lam, V& psi, V& dpsi) {
    const V t = lam * z.abs();
    psi = (log1p_nonnegative<kFull>(t) * inv_lam).copysign(z);
    dpsi = reciprocal<kFull>(V(1) + t);
  }

  template <bool kFull, typename V>
  static V value(V w) {
    return log1p_nonnegative<kFull>(w.abs()).copysign(w);
  }

  // z|z|·g(t), g(t) = (1/(1 + t) − log1p(t)/t)/t = −1/2 + 2t/3 − 3t²/4 + 4t³/5 − 5t⁴/6 + …
  template <bool kFull, typename V>
  static V dlam(V z, V lam, V inv_lam, V psi, V dpsi) {
    using at::vec::fmadd;
    const V t = lam * z.abs();
    const V g = fmadd(fmadd(fmadd(fmadd(V(-5.0 / 6), t, V(4.0 / 5)), t, V(-3.0 / 4)), t, V(2.0 / 3)), t, V(-0.5));
    return V::blendv((z * dpsi - psi) * inv_lam, z * z.abs() * g, t < series_cutoff<V>(1e-3, 0.05));
  }
};

struct Tanh {  // ψ = tanh(u) / λ,  ψ' = 1 − tanh²(u),  u = λz
  template <bool kFull, typename V>
  static void eval(V z, V lam, V inv_lam, V& psi, V& dpsi) {
    const V th = tanh_fast<kFull>(lam * z);
    psi = th * inv_lam;
    dpsi = V(1) - th * th;
  }

  template <bool kFull, typename V>
  static V value(V w) {
    return tanh_fast<kFull>(w);
  }

  // z²·h(u), h(u) = (1 − tanh²u − tanh(u)/u)/u = −2u/3 + 8u³/15 − 34u⁵/105 + …
  template <bool kFull, typename V>
  static V dlam(V z, V lam, V inv_lam, V psi, V dpsi) {
    using at::vec::fmadd;
    const V u = lam * z, u2 = u * u;
    const V h = u * fmadd(fmadd(V(-34.0 / 105), u2, V(8.0 / 15)), u2, V(-2.0 / 3));
    return V::blendv((z * dpsi - psi) * inv_lam, z * z * h, u.abs() < series_cutoff<V>(1e-2, 0.1));
  }
};

// ψ_λ of one family at a fixed λ ≥ 0 (λ = 0: the identity).
template <typename Family, typename acc_t, bool kFull>
class Psi {
  using Vec = Vectorized<acc_t>;

 public:
  explicit Psi(double lam)
      : lam_scalar_(lam), identity_(lam == 0.0), lam_(acc_t(lam)), inv_lam_(acc_t(identity_ ? 0.0 : 1.0 / lam)) {}

  void operator()(Vec z, Vec& psi, Vec& dpsi) const {
    if (identity_) {
      psi = z;
      dpsi = Vec(1);
    } else {
      Family::template eval<kFull>(z, lam_, inv_lam_, psi, dpsi);
    }
  }

  // ∂ψ/∂λ at z, given ψ(z) and ψ'(z) from operator().
  Vec dlam(Vec z, Vec psi, Vec dpsi) const { return Family::template dlam<kFull>(z, lam_, inv_lam_, psi, dpsi); }

  // k with ψ(z) = f(k·z)/k: λ where λ ∈ [2⁻²⁰, 2²⁰], else 1. Outside, λz and the statistics'
  // factors 1/k, 1/k² could leave float's range, and a negative λ (a tensor λ is not
  // range-checked) gets ψ's continuation in λ, as the other backends compute it (f(λz)/λ is even
  // in λ): there ψ is evaluated directly.
  double scale() const { return in_units() ? lam_scalar_ : 1.0; }

  // scale()·ψ(z) from w = scale()·z.
  Vec scaled(Vec w) const {
    if (identity_) return w;
    if (in_units()) return Family::template value<kFull>(w);
    Vec psi, dpsi;
    Family::template eval<kFull>(w, lam_, inv_lam_, psi, dpsi);
    return psi;
  }

 private:
  bool in_units() const { return lam_scalar_ >= 0x1p-20 && lam_scalar_ <= 0x1p20; }

  double lam_scalar_;
  bool identity_;
  Vec lam_;
  Vec inv_lam_;
};

// ------------------------------------------------------------------ vector helpers

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// `count` elements at p as acc_t lanes (the rest zero).
template <typename scalar_t>
inline Vectorized<acc_type<scalar_t>> load(const scalar_t* p, int64_t count) {
  using Vec = Vectorized<acc_type<scalar_t>>;
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return Vec::loadu(p, count);
  } else {
    if (count == Vec::size()) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return at::vec::convert<acc_type<scalar_t>>(Vectorized<scalar_t>::loadu(p, count));
  }
}

// `count` lanes of v at p, rounded to nearest even where scalar_t is narrower.
template <typename scalar_t>
inline void store(scalar_t* p, Vectorized<acc_type<scalar_t>> v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    v.store(p, count);
  } else {
#if defined(IBNORM_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // Unlike ATen's conversion this flushes float denormals (below 1.2e-38) to zero.
      const __m256i packed = (__m256i)_mm512_cvtneps_pbh(v);
      if (count == Vectorized<float>::size()) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
      } else {
        _mm256_mask_storeu_epi16(p, __mmask16((1u << count) - 1), packed);
      }
      return;
    }
#endif
    at::vec::convert<scalar_t>(v).store(p, count);
  }
}

// Outputs of at least this many bytes are written with non-temporal stores where they can be
// (float32, vector-aligned runs): a plain store first reads its line from memory (half as much
// again as the forward's own traffic, a third for the backward's), and an output this large is
// mostly out of cache by the time the next layer reads it: on a 2-vCPU EPYC, layer 8192×1024
// followed by y.sum() went from 1.00–1.03× to 0.80–0.95× the parent and its successor
// (benchmarks/kernel_consumer.py). A machine whose last-level cache holds the output would
// want a higher threshold. ATen's norms store plainly.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Whether full vectors of scalar_t at p (and at p + every multiple of the vector size) can be
// stored non-temporally.
template <typename scalar_t>
inline bool can_stream([[maybe_unused]] const scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return std::is_same_v<scalar_t, float> && reinterpret_cast<std::uintptr_t>(p) % sizeof(Vectorized<float>) == 0;
#else
  return false;
#endif
}

// store(), non-temporally for a full vector where `stream` (from can_stream of the run's start).
template <typename scalar_t>
inline void store_maybe_streaming(scalar_t* p, Vectorized<acc_type<scalar_t>> v, int64_t count,
                                  [[maybe_unused]] bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream && count == Vectorized<float>::size()) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_ps(p, v);
#else
      _mm256_stream_ps(p, v);
#endif
      return;
    }
  }
#endif
  store(p, v, count);
}

// Orders this thread's non-temporal stores before what follows (the end of a parallel chunk).
inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Zero the lanes past `count`, so a partial last vector adds nothing to a reduction.
template <typename acc_t>
inline Vectorized<acc_t> keep(Vectorized<acc_t> v, int64_t count) {
  using Vec = Vectorized<acc_t>;
  return count == Vec::size() ? v : Vec::set(Vec(0), v, count);
}

// The sum of v's lanes, in double. Once or twice per run and statistic: for a row of a few
// hundred elements a store-and-loop sum would cost as much as the sweeps themselves.
template <typename acc_t>
inline double hsum(Vectorized<acc_t> v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 lanes = v;
    const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(lanes));
    const __m512d high = _mm512_cvtps_pd(_mm512_extractf32x8_ps(lanes, 1));
    return _mm512_reduce_add_pd(_mm512_add_pd(low, high));
  }
#endif
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) total += lanes[k];
  return total;
}

// Call f(i, count) over [0, length) in whole vectors, then the remainder.
template <typename acc_t, typename F>
inline void for_vectors(int64_t length, const F& f) {
  constexpr int64_t kV = Vectorized<acc_t>::size();
  int64_t i = 0;
  for (; i + kV <= length; i += kV) f(i, kV);
  if (i < length) f(i, length - i);
}

// for_vectors for reductions: f(i, count, lane) with lane a compile-time 0..3 that picks one of
// four accumulators, so that consecutive adds do not wait on each other (with one accumulator
// each add waits out the last one's latency: 4 cycles a vector where the loads allow 1).
template <typename acc_t, typename F>
inline void for_vectors4(int64_t length, const F& f) {
  constexpr int64_t kV = Vectorized<acc_t>::size();
  using Lane0 = std::integral_constant<int, 0>;
  int64_t i = 0;
  for (; i + 4 * kV <= length; i += 4 * kV) {
    f(i, kV, Lane0());
    f(i + kV, kV, std::integral_constant<int, 1>());
    f(i + 2 * kV, kV, std::integral_constant<int, 2>());
    f(i + 3 * kV, kV, std::integral_constant<int, 3>());
  }
  for (; i + kV <= length; i += kV) f(i, kV, Lane0());
  if (i < length) f(i, length - i, Lane0());
}

// The sum of four accumulators' lanes, in double.
template <typename acc_t>
inline double hsum4(const std::array<Vectorized<acc_t>, 4>& v) {
  return hsum((v[0] + v[1]) + (v[2] + v[3]));
}

// Group sums are held in vector lanes across a group's runs and moved into double totals
// every kFlushElements elements, so that the float32 partial sums stay short and a run of a
// few vectors (a 7×7 feature map) costs no horizontal sum of its own.
constexpr int64_t kFlushElements = 2048;

// for_vectors over one run of a group's sweep in blocks of at most kFlushElements; flush() runs
// whenever `pending` (elements since the last flush, carried across runs) reaches kFlushElements,
// so the float32 lane sums stay short however long the run.
template <typename acc_t, typename F, typename Flush>
inline void for_vectors_flushed(int64_t length, int64_t& pending, const F& f, const Flush& flush) {
  for (int64_t start = 0; start < length; start += kFlushElements) {
    const int64_t block = std::min(kFlushElements, length - start);
    for_vectors<acc_t>(block, [&](int64_t i, int64_t c) { f(start + i, c); });
    if ((pending += block) >= kFlushElements) {
      flush();
      pending = 0;
    }
  }
}

// Count, mean and sum of squared deviations, merged across blocks by Chan et al.'s update.
// Without centering the mean stays 0 and m2 is the sum of squares (RMS statistics).
struct Moments {
  double count = 0, mean = 0, m2 = 0;

  void merge(double n, double block_mean, double block_m2) {
    const double total = count + n;
    const double delta = block_mean - mean;
    mean += delta * n / total;
    m2 += block_m2 + delta * delta * count * n / total;
    count = total;
  }

  double variance() const { return m2 / count; }
};

// ------------------------------------------------------------------ layout and options

enum Grouping : int64_t { kRows = 0, kBatch = 1, kGroups = 2 };

struct Layout {
  int64_t groups;
  int64_t segments;  // runs per group
  int64_t length;    // elements per run
  int64_t group_stride;
  int64_t segment_stride;
  // channel of run (g, s) = (g % channel_period)·channel_group_stride + s·channel_segment_stride
  int64_t channel_period;
  int64_t channel_group_stride;
  int64_t channel_segment_stride;
  int64_t affine_size;  // elements of γ and β

  int64_t numel() const { return segments * length; }
  int64_t offset(int64_t g, int64_t s) const { return g * group_stride + s * segment_stride; }
  int64_t channel(int64_t g, int64_t s) const {
    return (g % channel_period) * channel_group_stride + s * channel_segment_stride;
  }
  // The r-th run in memory: (g, s) with offset(g, s) increasing in r (whichever stride is larger
  // is the outer one; rows, with one run per group, are already in order).
  std::pair<int64_t, int64_t> run_in_memory_order(int64_t r) const {
    if (segment_stride > group_stride) return {r % groups, r / groups};
    return {r / segments, r % segments};
  }
};

Layout make_layout(const at::Tensor& x, int64_t grouping) {
  switch (grouping) {
    case kRows: {
      TORCH_CHECK(x.dim() == 2, "ibnorm_cpu: row grouping expects an (R, n) input, got ", x.sizes());
      const int64_t rows = x.size(0), n = x.size(1);
      return {rows, 1, n, n, 0, 1, 0, 0, n};
    }
    case kBatch: {
      TORCH_CHECK(x.dim() == 3, "ibnorm_cpu: batch grouping expects an (N, C, L) input, got ", x.sizes());
      const int64_t batch = x.size(0), channels = x.size(1), spatial = x.size(2);
      return {channels, batch, spatial, spatial, channels * spatial, channels, 1, 0, channels};
    }
    case kGroups: {
      TORCH_CHECK(x.dim() == 4, "ibnorm_cpu: group grouping expects an (N, G, C/G, L) input, got ", x.sizes());
      const int64_t batch = x.size(0), groups = x.size(1), per_group = x.size(2), spatial = x.size(3);
      return {batch * groups, per_group, spatial, per_group * spatial, spatial, groups, per_group, 1,
              groups * per_group};
    }
    default:
      TORCH_CHECK(false, "ibnorm_cpu: unknown grouping ", grouping);
  }
}

struct Options {
  double eps;
  bool center;        // subtract means (all groupings but RMS)
  bool standardized;  // ψ on the standardized z, else on x − μ
  bool frozen;        // statistics given, not reduced
  bool stream;        // y or g_x large enough for non-temporal stores (kStreamBytes)
};

// Per-group statistics, flat over groups; mean arrays are null without centering.
template <typename acc_t>
struct StatArrays {
  acc_t* mean;
  acc_t* var;
  acc_t* rstd;
  acc_t* mean_psi;
  acc_t* var_psi;
  acc_t* rstd_psi;
};

// The rows of the one statistics tensor, (kStatRows, groups) in the accumulation dtype.
enum StatRow : int64_t { kMean = 0, kVar, kRstd, kMeanPsi, kVarPsi, kRstdPsi, kStatRows };

template <typename acc_t>
StatArrays<acc_t> stat_arrays(const at::Tensor& stats, bool center) {
  acc_t* base = stats.data_ptr<acc_t>();
  const int64_t groups = stats.size(1);
  auto row = [&](StatRow r) { return base + r * groups; };
  return {center ? row(kMean) : nullptr, row(kVar), row(kRstd), center ? row(kMeanPsi) : nullptr, row(kVarPsi),
          row(kRstdPsi)};
}

// One chunk's share of the γ, β and λ gradients (null: not needed).
template <typename acc_t>
struct GradSinks {
  acc_t* weight;
  acc_t* bias;
  bool lam_needed;
  double lam = 0;
};

// Below this many elements a chunk is not worth a thread (a quarter of ATen's grain size: a
// BatchNorm of 16×128×4×4 on 2 threads took 289 µs fwd+bwd with it, 356 µs with ATen's).
constexpr int64_t kGrain = 8192;

int64_t chunk_count(const Layout& layout) {
  const int64_t by_size = layout.groups * layout.numel() / kGrain;
  return std::max<int64_t>(1, std::min({layout.groups, int64_t(at::get_num_threads()), by_size}));
}

// f(chunk, first_group, end_group) for `chunks` contiguous ranges of groups, in parallel.
template <typename F>
void for_each_chunk(int64_t groups, int64_t chunks, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(k, groups * k / chunks, groups * (k + 1) / chunks);
  });
}

// ------------------------------------------------------------------ the group kernel

template <typename scalar_t, typename Family, bool kPerElement>
class GroupKernel {
 public:
  using scalar_type = scalar_t;
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;

  GroupKernel(const Layout& layout, const Options& options, double lam, const acc_t* weight, const acc_t* bias)
      : layout_(layout), opt_(options), psi_(lam), weight_(weight), bias_(bias) {}

  // y for group g with batch statistics (computed here, then y); `u` (numel) caches k·ψ (see write_run).
  void forward(int64_t g, const scalar_t* x, scalar_t* y, const StatArrays<acc_t>& st, acc_t* u) const {
    const int64_t len = layout_.length, n = layout_.numel();
    const Moments moments = input_moments(g, x);
    if (opt_.center) st.mean[g] = acc_t(moments.mean);
    st.var[g] = acc_t(moments.variance());
    const double rstd = 1.0 / std::sqrt(double(st.var[g]) + opt_.eps);
    st.rstd[g] = acc_t(rstd);
    const double k = psi_.scale();
    const Vec w_scale = splat(k * (opt_.standardized ? rstd : 1.0)), m1 = splat(opt_.center ? double(st.mean[g]) : 0.0);

    // k·u = f(k·z) into the cache with its sum and sum of squares in the same sweep: u is ψ of a
    // centered input (or, for RMS, only Σu² is used), so its mean is small against its spread and
    // the one-pass variance does not cancel.
    double sum = 0, squares = 0;
    Vec acc_u(0), acc_uu(0);
    auto flush = [&] {
      sum += hsum(acc_u);
      squares += hsum(acc_uu);
      acc_u = acc_uu = Vec(0);
    };
    // A group's ψ sweep reads only L1 and is the costly one, while the next group's moments sweep
    // waits on memory, and so do the stores of y (each line is read before it is written): where
    // groups are contiguous (rows, group grouping), this sweep fetches the next group's x and this
    // group's y, so that memory and ψ overlap.
    const bool contiguous = is_contiguous();
    const scalar_t* next = contiguous && g + 1 < layout_.groups ? x + layout_.offset(g + 1, 0) : nullptr;
    scalar_t* const group_y = y + layout_.offset(g, 0);
    scalar_t* own_y = contiguous && !streams(group_y) ? group_y : nullptr;
    int64_t pending = 0;
    for (int64_t s = 0; s < layout_.segments; ++s) {
      const scalar_t* xs = x + layout_.offset(g, s);
      acc_t* us = u + s * len;
      for_vectors_flushed<acc_t>(len, pending, [&](int64_t i, int64_t c) {
        if (next) __builtin_prefetch(next + s * len + i, 0, 2);
        if (own_y) __builtin_prefetch(own_y + s * len + i, 1, 3);
        const Vec value = keep(psi_.scaled((load(xs + i, c) - m1) * w_scale), c);
        value.store(us + i, c);
        acc_u += value;
        acc_uu = at::vec::fmadd(value, value, acc_uu);
      }, flush);
    }
    flush();
    const double mean_scaled = opt_.center ? sum / n : 0.0;
    if (opt_.center) st.mean_psi[g] = acc_t(mean_scaled / k);
    st.var_psi[g] = acc_t(std::max(squares / n - mean_scaled * mean_scaled, 0.0) / (k * k));
    st.rstd_psi[g] = acc_t(1.0 / std::sqrt(double(st.var_psi[g]) + opt_.eps));
    for (int64_t s = 0; s < layout_.segments; ++s) write_run<true>(g, s, x, y, st, u + s * len);
  }

  // Frozen statistics: rsqrt of the given variances, once per group before the runs.
  void frozen_rstd(int64_t g, const StatArrays<acc_t>& st) const {
    st.rstd[g] = acc_t(1.0 / std::sqrt(double(st.var[g]) + opt_.eps));
    st.rstd_psi[g] = acc_t(1.0 / std::sqrt(double(st.var_psi[g]) + opt_.eps));
  }

  // y of run s of group g: û = (u − m)·r₂ and y = γ·û + β. ψ runs in λ's units: k·u = f(k·z)
  // (k = λ, or 1 at λ = 0) with the 1/k folded into r₂, so it costs no multiply by λ or 1/λ.
  // k·u comes from the cache `us` (kCached) or from x (frozen statistics, where runs need no
  // reduction and can go in memory order), with k·z = (x − μ)·(k·r₁): x − μ is exact where x is
  // near μ, which the one multiply-add x·α − μ·α (BatchNorm's eval) is not once |μ| ≫ σ. For
  // bfloat16 and float16 inputs the multiply-add serves: its error, |μ·α|·2⁻²⁴, stays far below
  // the input's own rounding near μ, |μ·α|·2⁻⁹ or 2⁻¹².
  template <bool kCached>
  void write_run(int64_t g, int64_t s, const scalar_t* x, scalar_t* y, const StatArrays<acc_t>& st,
                 const acc_t* us) const {
    const int64_t len = layout_.length, offset = layout_.offset(g, s), channel = layout_.channel(g, s);
    const double rstd_psi = st.rstd_psi[g];
    const double k = psi_.scale();
    const double x_scale = k * (opt_.standardized ? double(st.rstd[g]) : 1.0);
    const double mean = opt_.center ? double(st.mean[g]) : 0.0;
    const Vec w_scale = splat(x_scale), m1 = splat(mean), w_shift = splat(-mean * x_scale);
    const Vec a2 = splat(rstd_psi / k), b2 = splat(-(opt_.center ? double(st.mean_psi[g]) : 0.0) * rstd_psi);
    const scalar_t* xs = x + offset;
    scalar_t* ys = y + offset;
    const bool stream = streams(ys);
    auto u_at = [&](int64_t i, int64_t c) {  // k·u
      if constexpr (kCached) return Vec::loadu(us + i, c);
      if constexpr (kFullPrecision) return psi_.scaled((load(xs + i, c) - m1) * w_scale);
      return psi_.scaled(at::vec::fmadd(load(xs + i, c), w_scale, w_shift));
    };
    if constexpr (kPerElement) {
      for_vectors<acc_t>(len, [&](int64_t i, int64_t c) {
        const Vec u_hat = at::vec::fmadd(u_at(i, c), a2, b2);
        store_maybe_streaming(ys + i, at::vec::fmadd(u_hat, affine(weight_, channel, i, c), affine(bias_, channel, i, c)), c, stream);
      });
    } else {  // one γ, β per run: y = u·(r₂γ) + (b₂γ + β), one multiply-add per element
      const Vec gamma(weight_[channel]);
      const Vec y_scale = a2 * gamma, y_shift = at::vec::fmadd(b2, gamma, Vec(bias_[channel]));
      for_vectors<acc_t>(len, [&](int64_t i, int64_t c) {
        store_maybe_streaming(ys + i, at::vec::fmadd(u_at(i, c), y_scale, y_shift), c, stream);
      });
    }
  }

  // g_x for group g and its share of the γ, β, λ gradients; `u`, `d` (numel) cache û and ψ'.
  //
  // g_u = r₂·g_û + shift + slope·û, with shift and slope known only after a sweep. Every sum the
  // rest needs is linear in g_u, so sweep 1 collects its three parts and the sum follows:
  //   Σ g_z   = Σ g_u·ψ'   = r₂·Σ g_û·ψ'   + shift·Σ ψ'   + slope·Σ û·ψ'
  //   Σ g_z·z = Σ g_u·ψ'·z = r₂·Σ g_û·ψ'·z + shift·Σ ψ'·z + slope·Σ û·ψ'·z    (standardized)
  //   g_λ     = Σ g_u·∂ψ/∂λ (likewise)
  // and sweep 2 writes g_x = scale·g_z + shift₁ + slope₁·z: two sweeps in all.
  void backward(int64_t g, const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x,
                const StatArrays<acc_t>& st, acc_t* u, acc_t* d, GradSinks<acc_t>& sinks) const {
    const int64_t len = layout_.length;
    const double inv_n = 1.0 / double(layout_.numel());
    const bool center = opt_.center, batch_stats = !opt_.frozen, standardized = opt_.standardized;
    const bool lam_needed = sinks.lam_needed;
    const double rstd = st.rstd[g], rstd_psi = st.rstd_psi[g];
    const double scale = standardized ? rstd : 1.0;
    const Vec s1 = splat(scale), m1 = splat(center ? double(st.mean[g]) : 0.0);
    const Vec a2 = splat(rstd_psi), b2 = splat(-(center ? double(st.mean_psi[g]) : 0.0) * rstd_psi);

    // Sweep 1: cache û and ψ'; the sums of g_û, g_û·û (→ shift, slope), the three parts of each
    // later sum, and the γ, β gradients.
    enum { kG, kGU, kGD, kD, kUD, kGDZ, kDZ, kUDZ, kGL, kL, kUL, kSums };
    double sums[kSums] = {};
    Vec acc[kSums];
    for (auto& v : acc) v = Vec(0);
    Vec acc_w(0), acc_b(0);
    int64_t channel = 0;
    // γ, β sums go to their channel (one per run for group grouping) at every flush and when the
    // next run belongs to another channel.
    auto flush_affine = [&] {
      if constexpr (!kPerElement) {
        if (sinks.weight) sinks.weight[channel] += acc_t(hsum(acc_w));
        if (sinks.bias) sinks.bias[channel] += acc_t(hsum(acc_b));
        acc_w = acc_b = Vec(0);
      }
    };
    auto flush = [&] {
      for (int k = 0; k < kSums; ++k) {
        sums[k] += hsum(acc[k]);
        acc[k] = Vec(0);
      }
      flush_affine();
    };
    // As in the forward, where groups are contiguous: sweep 1 fetches this group's g_x for writing,
    // sweep 2 the next group's x and g_y, so that the memory-bound parts overlap the computing ones.
    const bool contiguous = is_contiguous();
    scalar_t* const group_gx = grad_x == nullptr ? nullptr : grad_x + layout_.offset(g, 0);
    scalar_t* own_gx = contiguous && group_gx != nullptr && !streams(group_gx) ? group_gx : nullptr;
    int64_t pending = 0;
    for (int64_t s = 0; s < layout_.segments; ++s) {
      const int64_t offset = layout_.offset(g, s);
      channel = layout_.channel(g, s);
      const scalar_t *xs = x + offset, *gs = grad_y + offset;
      acc_t *us = u + s * len, *ds = d + s * len;
      // Lanes past the end load g_y = 0 and are masked where a sum carries no g_y.
      for_vectors_flushed<acc_t>(len, pending, [&](int64_t i, int64_t c) {
        using at::vec::fmadd;
        if (own_gx) __builtin_prefetch(own_gx + s * len + i, 1, 3);
        Vec value, slope;
        const Vec z = (load(xs + i, c) - m1) * s1;
        psi_(z, value, slope);
        slope = keep(slope, c);
        const Vec u_hat = keep(fmadd(value, a2, b2), c);
        u_hat.store(us + i, c);
        slope.store(ds + i, c);
        const Vec go = load(gs + i, c);
        const Vec g_u_hat = go * affine(weight_, channel, i, c);
        acc[kG] += g_u_hat;
        acc[kGU] = fmadd(g_u_hat, u_hat, acc[kGU]);
        const Vec g_slope = g_u_hat * slope, u_slope = u_hat * slope;
        acc[kGD] += g_slope;
        acc[kD] += slope;
        acc[kUD] += u_slope;
        if (standardized) {
          acc[kGDZ] = fmadd(g_slope, z, acc[kGDZ]);
          acc[kDZ] = fmadd(slope, z, acc[kDZ]);
          acc[kUDZ] = fmadd(u_slope, z, acc[kUDZ]);
        }
        if (lam_needed) {
          const Vec dl = keep(psi_.dlam(z, value, slope), c);
          acc[kGL] = fmadd(g_u_hat, dl, acc[kGL]);
          acc[kL] += dl;
          acc[kUL] = fmadd(u_hat, dl, acc[kUL]);
        }
        if constexpr (kPerElement) {
          if (sinks.weight) accumulate(sinks.weight + i, go * u_hat, c);
          if (sinks.bias) accumulate(sinks.bias + i, go, c);
        } else {
          acc_w = fmadd(go, u_hat, acc_w);
          acc_b += go;
        }
      }, flush);
      if (s + 1 < layout_.segments && layout_.channel(g, s + 1) != channel) flush_affine();
    }
    flush();

    // g_u = r₂·g_û + shift + slope·û (batch statistics add the projection terms).
    const double shift = batch_stats && center ? -rstd_psi * sums[kG] * inv_n : 0.0;
    const double slope = batch_stats ? -rstd_psi * sums[kGU] * inv_n : 0.0;
    auto total = [&](int k) { return rstd_psi * sums[k] + shift * sums[k + 1] + slope * sums[k + 2]; };
    if (lam_needed) sinks.lam += total(kGL);
    if (grad_x == nullptr) return;  // only γ, β, λ were asked for
    // g_x = scale·g_z + shift₁ + slope₁·z; without the first step's projection (frozen
    // statistics, or RMS with the centered placement) shift₁ = slope₁ = 0.
    const bool project = !opt_.frozen && (standardized || center);
    const double gx_shift = project && center ? -scale * total(kGD) * inv_n : 0.0;
    const double gx_slope = project && standardized ? -scale * total(kGDZ) * inv_n : 0.0;

    // Sweep 2: g_x.
    const bool has_next = contiguous && g + 1 < layout_.groups;
    const scalar_t* next_x = has_next ? x + layout_.offset(g + 1, 0) : nullptr;
    const scalar_t* next_gy = has_next ? grad_y + layout_.offset(g + 1, 0) : nullptr;
    const Vec gu_scale = splat(rstd_psi), gu_shift = splat(shift), gu_slope = splat(slope);
    const Vec gx_scale = splat(scale), gx_shift_v = splat(gx_shift), gx_slope_v = splat(gx_slope);
    for (int64_t s = 0; s < layout_.segments; ++s) {
      const int64_t offset = layout_.offset(g, s), channel = layout_.channel(g, s);
      const scalar_t *xs = x + offset, *gs = grad_y + offset;
      scalar_t* gxs = grad_x + offset;
      const bool stream = streams(gxs);
      const acc_t *us = u + s * len, *ds = d + s * len;
      for_vectors<acc_t>(len, [&](int64_t i, int64_t c) {
        using at::vec::fmadd;
        if (next_x) {
          __builtin_prefetch(next_x + s * len + i, 0, 2);
          __builtin_prefetch(next_gy + s * len + i, 0, 2);
        }
        const Vec g_u_hat = load(gs + i, c) * affine(weight_, channel, i, c);
        const Vec g_u = fmadd(g_u_hat, gu_scale, fmadd(Vec::loadu(us + i, c), gu_slope, gu_shift));
        Vec g_x = fmadd(g_u * Vec::loadu(ds + i, c), gx_scale, gx_shift_v);
        if (standardized && gx_slope != 0.0) g_x = fmadd((load(xs + i, c) - m1) * s1, gx_slope_v, g_x);
        store_maybe_streaming(gxs + i, g_x, c, stream);
      });
    }
  }

 private:
  static Vec splat(double value) { return Vec(acc_t(value)); }

  // Whether each group is one contiguous block and the next group follows it (rows, group grouping).
  bool is_contiguous() const {
    return (layout_.segments == 1 || layout_.segment_stride == layout_.length) && layout_.group_stride == layout_.numel();
  }

  // f(first, end, start, count) for group g's blocks of at most kFlushElements elements: runs
  // [first, end) restricted to [start, start + count) — whole short runs, or pieces of a long one.
  template <typename F>
  void for_blocks(const F& f) const {
    const int64_t len = layout_.length, segments = layout_.segments;
    if (len >= kFlushElements) {
      for (int64_t s = 0; s < segments; ++s) {
        for (int64_t start = 0; start < len; start += kFlushElements) f(s, s + 1, start, std::min(kFlushElements, len - start));
      }
    } else {
      const int64_t per_block = std::max<int64_t>(1, kFlushElements / len);
      for (int64_t s = 0; s < segments; s += per_block) f(s, std::min(s + per_block, segments), int64_t(0), len);
    }
  }

  // The moments of group g's input: per block (in L1) its mean, then its squared deviations
  // from that mean, merged across blocks — no cancellation, whatever the data's offset or order.
  Moments input_moments(int64_t g, const scalar_t* x) const {
    Moments moments;
    for_blocks([&](int64_t first, int64_t end, int64_t start, int64_t count) {
      auto block = [&](const auto& f) {
        for (int64_t s = first; s < end; ++s) {
          const scalar_t* xs = x + layout_.offset(g, s) + start;
          for_vectors4<acc_t>(count, [&](int64_t i, int64_t c, auto lane) { f(load(xs + i, c), c, lane); });
        }
      };
      const double n = double((end - first) * count);
      double mean = 0;
      if (opt_.center) {
        std::array<Vec, 4> sum{Vec(0), Vec(0), Vec(0), Vec(0)};  // the padding lanes load as 0
        block([&](Vec v, int64_t, auto lane) { sum[lane] += v; });
        mean = hsum4(sum) / n;
      }
      const Vec mu = splat(mean);
      std::array<Vec, 4> squares{Vec(0), Vec(0), Vec(0), Vec(0)};
      block([&](Vec v, int64_t c, auto lane) {
        const Vec dev = keep(v - mu, c);
        squares[lane] = at::vec::fmadd(dev, dev, squares[lane]);
      });
      moments.merge(n, mean, hsum4(squares));
    });
    return moments;
  }

  // γ or β at element i of a run of `channel`: a vector for layer/RMS, one value per channel otherwise.
  static Vec affine(const acc_t* values, int64_t channel, int64_t i, int64_t c) {
    if constexpr (kPerElement) {
      return Vec::loadu(values + i, c);
    } else {
      return Vec(values[channel]);
    }
  }

  static void accumulate(acc_t* p, Vec v, int64_t c) { (Vec::loadu(p, c) + v).store(p, c); }

  // Whether a run of output starting at p is stored non-temporally (there, and only there, the
  // sweeps do not prefetch it for writing).
  bool streams(const scalar_t* p) const { return opt_.stream && can_stream(p); }

  Layout layout_;
  Options opt_;
  // Whether the input carries acc_t's precision; bfloat16 and float16 inputs (8 and 11 bits) take
  // ψ from the unrefined reciprocal estimates (see reciprocal), and frozen k·z from x·α + β.
  static constexpr bool kFullPrecision = std::is_same_v<scalar_t, acc_t>;
  Psi<Family, acc_t, kFullPrecision> psi_;
  const acc_t* weight_;
  const acc_t* bias_;
};

// ------------------------------------------------------------------ entry points

// f(Family{}) for family code 0 (S), 1 (L) or 2 (T).
template <typename F>
void with_family(int64_t family, const F& f) {
  switch (family) {
    case 0:
      return f(SignedRoot{});
    case 1:
      return f(Logarithmic{});
    case 2:
      return f(Tanh{});
    default:
      TORCH_CHECK(false, "ibnorm_cpu: unknown compression family code ", family);
  }
}

// f(Kernel*) with a null pointer whose type names the GroupKernel for x's dtype, the family and
// the affine layout (per element for rows, per channel otherwise).
template <typename F>
void dispatch(const at::Tensor& x, int64_t family, int64_t grouping, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ibnorm_cpu", [&] {
    with_family(family, [&](auto fam) {
      if (grouping == kRows) {
        f(static_cast<GroupKernel<scalar_t, decltype(fam), true>*>(nullptr));
      } else {
        f(static_cast<GroupKernel<scalar_t, decltype(fam), false>*>(nullptr));
      }
    });
  });
}

at::Tensor flat_acc(const at::Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() == acc && t.is_contiguous()) return t;  // read through data_ptr only: any shape serves
  return t.to(acc).contiguous();
}

// γ or β (`name`) as a flat acc-type vector; ones (γ) or zeros (β) when absent.
at::Tensor affine_or(const std::optional<at::Tensor>& t, const Layout& layout, at::ScalarType acc, double fill,
                     const char* name) {
  if (t.has_value()) {
    TORCH_CHECK(t->numel() == layout.affine_size, "ibnorm: ", name, " has ", t->numel(), " elements, expected ",
                layout.affine_size);
    return flat_acc(*t, acc);
  }
  return at::full({layout.affine_size}, fill, at::TensorOptions().dtype(acc));
}

// Batch grouping with runs shorter than a vector (BatchNorm1d on (N, C), maps of 2×2 or 3×3):
// (N, C, L) → (1, C, N·L) holds the same groups in one long run each, and the two copies cost
// less than N runs of a few elements per channel.
constexpr int64_t kShortRun = 16;

bool short_runs(const at::Tensor& x, int64_t grouping) {
  return grouping == kBatch && x.dim() == 3 && x.size(0) > 1 && x.size(2) < kShortRun;
}

at::Tensor to_long_runs(const at::Tensor& t) {
  return t.transpose(0, 1).contiguous().view({1, t.size(1), t.size(0) * t.size(2)});
}

at::Tensor from_long_runs(const at::Tensor& t, at::IntArrayRef shape) {
  return t.view({shape[1], shape[0], shape[2]}).transpose(0, 1).contiguous();
}

// `values` (a CPU tensor of any floating dtype and shape, `groups` elements) into row `row` of the statistics.
void copy_row(const at::Tensor& stats, StatRow row, const at::Tensor& values) {
  TORCH_CHECK(values.device().is_cpu() && values.is_floating_point(),
              "ibnorm_cpu: the given statistics must be floating CPU tensors, got ", values.scalar_type(), " on ",
              values.device());
  const at::Tensor flat = values.contiguous();
  const int64_t groups = stats.size(1);
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "ibnorm_stats", [&] {
    using stat_t = scalar_t;
    stat_t* out = stats.data_ptr<stat_t>() + row * groups;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, flat.scalar_type(), "ibnorm_given", [&] {
      const scalar_t* in = flat.data_ptr<scalar_t>();
      for (int64_t g = 0; g < groups; ++g) out[g] = static_cast<stat_t>(in[g]);
    });
  });
}

// Writes y into `y` (contiguous, as many elements as the input, of its dtype: the caller's tensor,
// so that an output made here is not a view) and returns the statistics: one (kStatRows, groups)
// tensor in the accumulation dtype, rows mean, var, rstd, mean_psi, var_psi, rstd_psi (the mean
// rows unused without centering). Given statistics, which freeze the group, are copied into it.
at::Tensor forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& lam,
                   const std::optional<at::Tensor>& given_mean, const std::optional<at::Tensor>& given_var,
                   const std::optional<at::Tensor>& given_mean_psi, const std::optional<at::Tensor>& given_var_psi,
                   int64_t grouping, int64_t family, double eps, bool center, bool standardized, const at::Tensor& y) {
  TORCH_CHECK(input.device().is_cpu(), "ibnorm_cpu: input must be on the CPU");
  TORCH_CHECK(y.is_contiguous() && y.numel() == input.numel() && y.scalar_type() == input.scalar_type(),
              "ibnorm_cpu: the output must be contiguous, with the input's size and dtype");
  if (short_runs(input, grouping)) {
    const at::Tensor long_input = to_long_runs(input), long_y = at::empty_like(long_input);
    at::Tensor stats = forward(long_input, weight, bias, lam, given_mean, given_var, given_mean_psi, given_var_psi,
                               grouping, family, eps, center, standardized, long_y);
    const auto n = input.size(0), c = input.size(1), l = input.size(2);
    y.view(input.sizes()).copy_(long_y.view({c, n, l}).transpose(0, 1));
    return stats;
  }
  const at::Tensor x = input.contiguous();
  const Layout layout = make_layout(x, grouping);
  const Options options{eps, center, standardized, given_var.has_value(), y.nbytes() >= kStreamBytes};
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  at::Tensor stats = at::empty({kStatRows, layout.groups}, at::TensorOptions().dtype(acc));
  if (options.frozen) {
    auto given = [&](const std::optional<at::Tensor>& t, StatRow row, const char* name) {
      TORCH_CHECK(t.has_value() && t->numel() == layout.groups, "ibnorm: the running statistics need one value per ",
                  "group (", layout.groups, "), got ", t.has_value() ? t->numel() : 0, " for ", name);
      copy_row(stats, row, *t);
    };
    if (center) {
      given(given_mean, kMean, "the mean");
      given(given_mean_psi, kMeanPsi, "the mean of u");
    }
    given(given_var, kVar, "the variance");
    given(given_var_psi, kVarPsi, "the variance of u");
  }
  const at::Tensor w = affine_or(weight, layout, acc, 1.0, "weight"), b = affine_or(bias, layout, acc, 0.0, "bias");
  const double lam_value = lam.item<double>();

  dispatch(x, family, grouping, [&](auto* tag) {
    using Kernel = std::remove_pointer_t<decltype(tag)>;
    using acc_t = typename Kernel::acc_t;
    const Kernel kernel(layout, options, lam_value, w.data_ptr<acc_t>(), b.data_ptr<acc_t>());
    const StatArrays<acc_t> st = stat_arrays<acc_t>(stats, center);
    const auto* xp = x.data_ptr<typename Kernel::scalar_type>();
    auto* yp = y.data_ptr<typename Kernel::scalar_type>();
    if (options.frozen) {
      // No reductions: every run on its own, in memory order (group-major order jumps a page per
      // run of a batch grouping, where the hardware prefetcher restarts).
      for (int64_t g = 0; g < layout.groups; ++g) kernel.frozen_rstd(g, st);
      const int64_t runs = layout.groups * layout.segments;
      at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / layout.length), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const auto [g, s] = layout.run_in_memory_order(r);
          kernel.template write_run<false>(g, s, xp, yp, st, nullptr);
        }
        if (options.stream) fence_streaming_stores();
      });
      return;
    }
    for_each_chunk(layout.groups, chunk_count(layout), [&](int64_t, int64_t begin, int64_t end) {
      std::vector<acc_t> u(layout.numel());
      for (int64_t g = begin; g < end; ++g) kernel.forward(g, xp, yp, st, u.data());
      if (options.stream) fence_streaming_stores();
    });
  });
  return stats;
}

// Returns g_x (x's dtype), g_γ and g_β (flat, accumulation dtype) and g_λ (0-dim), each
// undefined when not requested (without g_x the second sweep is skipped).
std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& lam,
                                 const at::Tensor& stats, int64_t grouping, int64_t family, bool center,
                                 bool standardized, bool frozen, bool need_input, bool need_weight, bool need_bias,
                                 bool need_lam) {
  TORCH_CHECK(input.device().is_cpu() && grad_output.device().is_cpu(), "ibnorm_cpu: tensors must be on the CPU");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "ibnorm_cpu: grad_output and input shapes differ");
  if (short_runs(input, grouping)) {
    auto g = backward(to_long_runs(grad_output.to(input.scalar_type())), to_long_runs(input), weight, lam, stats,
                      grouping, family, center, standardized, frozen, need_input, need_weight, need_bias, need_lam);
    if (need_input) g[0] = from_long_runs(g[0], input.sizes());
    return g;
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor grad_y = grad_output.to(x.scalar_type()).contiguous();
  const Layout layout = make_layout(x, grouping);
  const Options options{0.0, center, standardized, frozen, need_input && x.nbytes() >= kStreamBytes};
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = at::TensorOptions().dtype(acc);
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == kStatRows &&
                  stats.size(1) == layout.groups,
              "ibnorm_cpu: the statistics must be (", int64_t(kStatRows), ", ", layout.groups, ") of ", acc);
  const at::Tensor w = affine_or(weight, layout, acc, 1.0, "weight");
  at::Tensor grad_x = need_input ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_weight = need_weight ? at::empty({layout.affine_size}, acc_options) : at::Tensor();
  at::Tensor grad_bias = need_bias ? at::empty({layout.affine_size}, acc_options) : at::Tensor();
  const int64_t chunks = chunk_count(layout);
  std::vector<double> lam_partials(chunks, 0.0);
  const double lam_value = lam.item<double>();

  dispatch(x, family, grouping, [&](auto* tag) {
    using Kernel = std::remove_pointer_t<decltype(tag)>;
    using acc_t = typename Kernel::acc_t;
    const Kernel kernel(layout, options, lam_value, w.data_ptr<acc_t>(), nullptr);
    const StatArrays<acc_t> st = stat_arrays<acc_t>(stats, center);
    const auto* xp = x.data_ptr<typename Kernel::scalar_type>();
    const auto* gyp = grad_y.data_ptr<typename Kernel::scalar_type>();
    auto* gxp = need_input ? grad_x.data_ptr<typename Kernel::scalar_type>() : nullptr;
    // Each chunk's share of g_γ and g_β, added in chunk order afterwards (a result that does not
    // depend on timing); plain vectors, as two zeroed tensors and their sum cost a small layer more.
    const int64_t stride = layout.affine_size;
    std::vector<acc_t> weight_partials(need_weight ? chunks * stride : 0), bias_partials(need_bias ? chunks * stride : 0);
    acc_t* wp = need_weight ? weight_partials.data() : nullptr;
    acc_t* bp = need_bias ? bias_partials.data() : nullptr;
    for_each_chunk(layout.groups, chunks, [&](int64_t k, int64_t begin, int64_t end) {
      std::vector<acc_t> u(layout.numel()), d(layout.numel());
      GradSinks<acc_t> sinks{wp ? wp + k * stride : nullptr, bp ? bp + k * stride : nullptr, need_lam};
      for (int64_t g = begin; g < end; ++g) kernel.backward(g, gyp, xp, gxp, st, u.data(), d.data(), sinks);
      if (options.stream) fence_streaming_stores();
      lam_partials[k] = sinks.lam;
    });
    auto total = [&](const std::vector<acc_t>& partials, at::Tensor& out) {
      acc_t* o = out.data_ptr<acc_t>();
      std::copy_n(partials.begin(), stride, o);
      for (int64_t k = 1; k < chunks; ++k) {
        for (int64_t i = 0; i < stride; ++i) o[i] += partials[k * stride + i];
      }
    };
    if (need_weight) total(weight_partials, grad_weight);
    if (need_bias) total(bias_partials, grad_bias);
  });

  at::Tensor grad_lam;
  if (need_lam) {
    double total = 0;
    for (double part : lam_partials) total += part;
    grad_lam = at::scalar_tensor(total, acc_options);
  }
  return {grad_x, grad_weight, grad_bias, grad_lam};
}

// The statistics' shape: the grouping shape with 1 at the reduced dims.
std::vector<int64_t> statistics_shape(const std::vector<int64_t>& shape, int64_t grouping) {
  switch (grouping) {
    case kRows:
      TORCH_CHECK(shape.size() == 2, "ibnorm_cpu: row grouping expects an (R, n) shape");
      return {shape[0], 1};
    case kBatch:
      TORCH_CHECK(shape.size() == 3, "ibnorm_cpu: batch grouping expects an (N, C, L) shape");
      return {1, shape[1], 1};
    case kGroups:
      TORCH_CHECK(shape.size() == 4, "ibnorm_cpu: group grouping expects an (N, G, C/G, L) shape");
      return {shape[0], shape[1], 1, 1};
    default:
      TORCH_CHECK(false, "ibnorm_cpu: unknown grouping ", grouping);
  }
}

// ------------------------------------------------------------------ running statistics

constexpr const char* kRunningNames[] = {"running_mean", "running_var", "running_mean_psi", "running_var_psi"};

// running ← running + factor·(scale·batch − running) per group, in double, for each buffer given,
// from the rows mean, var, mean_psi, var_psi of the batch statistics (the means only with
// centering); a buffer may be any floating dtype.
void update_running(const std::array<std::optional<at::Tensor>, 4>& buffers, const at::Tensor& stats, bool center,
                    double factor, const std::vector<double>& scale) {
  TORCH_CHECK(scale.size() == buffers.size(), "ibnorm_cpu: one running-statistics scale per buffer");
  constexpr StatRow kRows[] = {kMean, kVar, kMeanPsi, kVarPsi};
  const int64_t groups = stats.size(1);
  for (size_t i = 0; i < buffers.size(); ++i) {
    const bool is_mean = kRows[i] == kMean || kRows[i] == kMeanPsi;
    if (!buffers[i].has_value() || (is_mean && !center)) continue;
    const at::Tensor& buffer = *buffers[i];
    TORCH_CHECK(buffer.device().is_cpu() && !buffer.requires_grad() && buffer.numel() == groups,
                "ibnorm: ", kRunningNames[i], " must be a CPU tensor without grad with one value per group (",
                groups, "), got ", buffer.sizes(), " on ", buffer.device());
    at::Tensor running = buffer.contiguous();  // the buffer itself, or a copy written back below
    AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "ibnorm_stats", [&] {
      const scalar_t* batch = stats.data_ptr<scalar_t>() + kRows[i] * groups;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running.scalar_type(), "ibnorm_running", [&] {
        scalar_t* r = running.data_ptr<scalar_t>();
        for (int64_t c = 0; c < groups; ++c) {
          const double old = static_cast<double>(r[c]);
          r[c] = static_cast<scalar_t>(old + factor * (scale[i] * static_cast<double>(batch[c]) - old));
        }
      });
    });
    if (!running.is_same(buffer)) {
      buffer.copy_(running);
    } else if (!buffer.is_inference()) {
      torch::autograd::increment_version(buffer);  // as an in-place op would: a saved buffer is now stale
    }
  }
}

// ------------------------------------------------------------------ the autograd node

std::optional<at::Tensor> given_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// IBNormFunction's contract (ibnorm/ops/function.py) as a C++ autograd node, so that a call
// costs no Python beyond the one that makes it. apply(input, weight, bias, λ, the given statistics
// (undefined: batch statistics), the running buffers (undefined: none), running factor and scales,
// grouping shape, grouping, family, eps, center, standardized, statistics) → y in the input's shape
// and, where `statistics` is true, mean, var, mean_psi, var_psi (non-differentiable, shaped to
// broadcast against the grouping shape; the given ones themselves when given; without centering
// (RMS) the means are left out: var, var_psi). The input is viewed in the grouping shape, and γ, β
// may have any shape with one value per affine position, inside the node: those views cost
// autograd nothing. The running buffers are updated in place with the batch statistics
// (update_running above). Small layers are dominated by this node's fixed cost, so it saves one
// statistics tensor and few entries, and makes the statistics' outputs only when asked.
class IBNormNode : public torch::autograd::Function<IBNormNode> {
 public:
  using Optional = std::optional<at::Tensor>;
  enum Config : size_t { kGrouping = 0, kFamily, kCenter, kStandardized, kFrozen, kConfigSize };

  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& input, const Optional& weight, const Optional& bias,
      const at::Tensor& lam, const Optional& given_mean, const Optional& given_var, const Optional& given_mean_psi,
      const Optional& given_var_psi, const Optional& running_mean, const Optional& running_var,
      const Optional& running_mean_psi, const Optional& running_var_psi, double running_factor,
      const std::vector<double>& running_scale, const std::vector<int64_t>& shape, int64_t grouping, int64_t family,
      double eps, bool center, bool standardized, bool statistics) {
    const bool frozen = given_var.has_value();
    const std::vector<int64_t> stat_shape = statistics_shape(shape, grouping);
    at::Tensor y = at::empty(input.sizes(), input.options());
    const at::Tensor stats = ::forward(input.reshape(shape), weight, bias, lam, given_mean, given_var, given_mean_psi,
                                       given_var_psi, grouping, family, eps, center, standardized, y);
    if (!frozen) {
      update_running({running_mean, running_var, running_mean_psi, running_var_psi}, stats, center, running_factor,
                     running_scale);
    }
    ctx->save_for_backward({input, weight.has_value() ? *weight : at::Tensor(), lam, stats});
    ctx->saved_data["shape"] = shape;
    ctx->saved_data["config"] = std::vector<int64_t>{grouping, family, center, standardized, frozen};
    if (bias.has_value()) ctx->saved_data["bias_shape"] = bias->sizes().vec();
    ctx->set_materialize_grads(false);  // the statistics get no gradient: no zeros made for them
    torch::autograd::variable_list outputs{y};
    if (!statistics) return outputs;
    auto row = [&](StatRow r, const Optional& given) {
      return frozen ? *given : stats.select(0, r).view(stat_shape);
    };
    if (center) outputs.push_back(row(kMean, given_mean));
    outputs.push_back(row(kVar, given_var));
    if (center) outputs.push_back(row(kMeanPsi, given_mean_psi));
    outputs.push_back(row(kVarPsi, given_var_psi));
    ctx->mark_non_differentiable(torch::autograd::variable_list(outputs.begin() + 1, outputs.end()));
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "ibnorm: the C++ kernels' backward is not differentiable (double backward, create_graph=True); "
                "use ibnorm.use_backend('reference') for it");
    torch::autograd::variable_list result(21);
    if (!grads[0].defined()) return result;  // y reached no loss
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &lam = saved[2], &stats = saved[3];
    const std::vector<int64_t> shape = ctx->saved_data["shape"].toIntVector();
    const std::vector<int64_t> config = ctx->saved_data["config"].toIntVector();
    // needs_input_grad counts the tensor inputs only: x, then weight and bias where given, then λ
    const auto bias_shape = ctx->saved_data.find("bias_shape");
    const bool has_bias = bias_shape != ctx->saved_data.end();
    const size_t bias_edge = weight.defined() ? 2 : 1, lam_edge = bias_edge + (has_bias ? 1 : 0);
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = weight.defined() && ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(bias_edge);
    const bool need_lam = ctx->needs_input_grad(lam_edge);
    auto g = ::backward(grads[0].reshape(shape), input.reshape(shape), given_or_none(weight), lam, stats,
                        config[kGrouping], config[kFamily], config[kCenter], config[kStandardized], config[kFrozen],
                        need_input, need_weight, need_bias, need_lam);
    // each gradient in its input's shape; γ's and λ's in their dtypes (β's: x's accumulation type)
    if (need_input) result[0] = g[0].view(input.sizes());
    if (need_weight) result[1] = g[1].view(weight.sizes()).to(weight.scalar_type());
    if (need_bias) result[2] = g[2].view(bias_shape->second.toIntVector());
    if (need_lam) result[3] = g[3].view(lam.sizes()).to(lam.scalar_type());
    return result;
  }
};

std::vector<at::Tensor> apply(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lam,
                              const std::optional<at::Tensor>& given_mean, const std::optional<at::Tensor>& given_var,
                              const std::optional<at::Tensor>& given_mean_psi,
                              const std::optional<at::Tensor>& given_var_psi,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& running_mean_psi,
                              const std::optional<at::Tensor>& running_var_psi, double running_factor,
                              const std::vector<double>& running_scale, const std::vector<int64_t>& shape,
                              int64_t grouping, int64_t family, double eps, bool center, bool standardized,
                              bool statistics) {
  return IBNormNode::apply(input, weight, bias, lam, given_mean, given_var, given_mean_psi, given_var_psi, running_mean,
                           running_var, running_mean_psi, running_var_psi, running_factor, running_scale, shape,
                           grouping, family, eps, center, standardized, statistics);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &apply, "IBNorm through a C++ autograd node: y and, where asked, mean, var, mean_psi, var_psi");
  m.def("stream_bytes", [] { return kStreamBytes; }, "outputs of at least this many bytes are stored non-temporally");
}
