// Selective scan (S6, Gu & Dao 2023) on the CPU, with the per-channel work around the scan fused in:
//   delta'_t = softplus(delta_t + bias) (or delta_t + bias),  h_t = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t,
//   y_t = C_t . h_t + D u_t.
// Plain C++ with an extern "C" interface (no torch headers, so it builds in seconds); chanzoo/ops/selective_scan.py
// compiles it at first use and registers it as torch.library ops.
// The channels are K directions x `inner` channels (dim = K * inner); direction k has its own B and C (groups = K),
// reads its input from source k / (K / S) and adds its output into output k / (K / O), at position
// p = t (forward) or L - 1 - t (reverse, bit k of `reverse`) of step t: several scan orders of one sequence and their
// sum are one call, with no reversed or stacked copies. Layouts (float32, the L positions contiguous):
//   u: (batch, S, inner, L) by strides (batch, source, channel); delta, du, ddelta: (batch, dim, L) contiguous;
//   y, dy: (batch, O, inner, L) contiguous; A: (dim, N); D, bias: (dim,) or null;
//   B, C: (batch, S, K / S, L, N) by strides (batch, source, direction within the source, position) with the N
//   states contiguous, so slices of one projection output per source are read in place;
//   hs: (batch, dim, n_chunks, N), the state before each chunk of `chunk` steps (saved by the forward pass so that
//   the backward pass recomputes one chunk of states at a time instead of storing all of them).
// Every exp() of the scan has a non-positive argument when delta' >= 0 and A <= 0: it only multiplies decays <= 1.
// Built with AVX-512, or with AVX2 and FMA, and N = 16 (Mamba's and ViM2's state size), each channel runs a specialised
// path: the state is one 16-lane vector (one AVX-512 register, or two AVX2 registers), exp is a polynomial on 16
// lanes, delta' is computed for all L positions in one vectorised pass, and the per-step sums over the 16 states
// (C . h in the forward; B . dh and the delta gradient in the backward) are reduced 16 steps at a time by a
// transpose-and-add tree instead of one horizontal sum per step; the backward runs four channels of a direction side
// by side, so they share each step's B and C loads and dB, dC updates. Other N, or a build with neither instruction
// set, take the generic loops.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define CHANZOO_SIMD16 1
#endif

namespace {

// delta' and d delta'/d delta for one step (softplus with torch's threshold of 20).
inline void transform_delta(float raw, float bias, int softplus, float* dt, float* ddt_draw) {
  const float x = raw + bias;
  if (!softplus) {
    *dt = x, *ddt_draw = 1.0f;
  } else if (x > 20.0f) {
    *dt = x, *ddt_draw = 1.0f;
  } else {
    const float e = std::exp(x);
    *dt = std::log1p(e), *ddt_draw = e / (1.0f + e);
  }
}

#if defined(CHANZOO_SIMD16)
// delta' for the L positions of one channel at once (a loop the compiler vectorises, exp and log1p included).
void transform_deltas(const float* raw, float bias, int softplus, int64_t L, float* dt) {
  if (!softplus) {
#pragma omp simd
    for (int64_t p = 0; p < L; ++p) dt[p] = raw[p] + bias;
    return;
  }
#pragma omp simd
  for (int64_t p = 0; p < L; ++p) {
    const float x = raw[p] + bias;
    dt[p] = x > 20.0f ? x : std::log1p(std::exp(std::min(x, 20.0f)));
  }
}

constexpr int64_t kLanes = 16;  // the N = 16 states of one channel are one V16

// exp(x) = 2^n exp(r), x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact n ln2), exp(r) = 1 + r +
// r^2 P(r) with Cephes' degree-5 P (coefficients from the highest power): relative error ~1e-7. Both backends.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// V16: 16 floats and the few operations the N = 16 paths use (vload/vstore unaligned); exp16(x) = exp of each lane;
// sum_lanes16(v): lane j of the result is the sum of the 16 lanes of v[j].
#if defined(__AVX512F__)
using V16 = __m512;
inline V16 vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V16 v) { _mm512_storeu_ps(p, v); }
inline V16 vset1(float x) { return _mm512_set1_ps(x); }
inline V16 vzero() { return _mm512_setzero_ps(); }
inline V16 vadd(V16 a, V16 b) { return _mm512_add_ps(a, b); }
inline V16 vmul(V16 a, V16 b) { return _mm512_mul_ps(a, b); }
inline V16 vfmadd(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a, b, c); }

// 2^n applied by scalef, which also flushes very negative arguments to 0.
inline V16 exp16(V16 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[k]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// A transpose-and-add tree: 56 instructions for 16 sums.
inline V16 sum_lanes16(const V16* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  // x[i], 128-bit unit q: four partial sums of v[4i + q].
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  const __m512d s01d = _mm512_castps_pd(s01), s23d = _mm512_castps_pd(s23);
  const __m512 r = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(s01d, s23d)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(s01d, s23d)));
  // r lane 4q + i holds the sum of v[4i + q].
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, r);
}
#else
// AVX2: lanes 0-7 in lo, 8-15 in hi.
struct V16 {
  __m256 lo, hi;
};
inline V16 vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline V16 vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 vadd(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 vfmadd(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }

// 2^n is built in the exponent bits, so arguments are clamped at -87 (2^n stays a normal float) and lanes below -87.3
// are set to 0, as AVX-512's scalef flushes them.
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[k]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}
inline V16 exp16(V16 x) { return {exp8(x.lo), exp8(x.hi)}; }

// Lane j of the result is the sum of the 8 lanes of a[j] (two levels of hadd, then the 128-bit halves added).
inline __m256 sum_lanes8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
inline V16 sum_lanes16(const V16* v) {
  __m256 halves[kLanes];
  for (int j = 0; j < kLanes; ++j) halves[j] = _mm256_add_ps(v[j].lo, v[j].hi);
  return {sum_lanes8(halves), sum_lanes8(halves + 8)};
}
#endif

// One channel's forward scan with N = 16: h in a register, outputs reduced 16 steps at a time. dt holds delta' by
// position; writes (or adds, when !first) y_p = C_p . h_p + skip u_p; saves the state before every chunk start
// (chunk a multiple of 16).
inline void scan_channel16(const float* up, const float* dt, const float* a, const float* Bp, int64_t bst,
                           const float* Cp, int64_t cst, float skip, bool rev, bool first, int64_t L, int64_t chunk,
                           float* hsp, float* yp) {
  const V16 av = vload(a);
  V16 h = vzero();
  V16 tile[kLanes];
  alignas(64) float sums[kLanes];
  for (int64_t t0 = 0; t0 < L; t0 += kLanes) {
    if (t0 % chunk == 0) vstore(hsp + (t0 / chunk) * kLanes, h);
    const int64_t nb = std::min(kLanes, L - t0);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t p = rev ? L - 1 - (t0 + j) : t0 + j;
      const V16 dtv = vset1(dt[p]);
      const V16 drive = vmul(vset1(dt[p] * up[p]), vload(Bp + p * bst));
      h = vfmadd(exp16(vmul(dtv, av)), h, drive);
      tile[j] = vmul(h, vload(Cp + p * cst));
    }
    for (int64_t j = nb; j < kLanes; ++j) tile[j] = vzero();
    vstore(sums, sum_lanes16(tile));
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t p = rev ? L - 1 - (t0 + j) : t0 + j;
      const float out = sums[j] + skip * up[p];
      yp[p] = first ? out : yp[p] + out;
    }
  }
}

// delta' and d delta'/d delta for one channel's L positions (vectorised).
void transform_deltas_grad(const float* raw, float bias, int softplus, int64_t L, float* dt, float* ddt) {
  if (!softplus) {
#pragma omp simd
    for (int64_t p = 0; p < L; ++p) dt[p] = raw[p] + bias, ddt[p] = 1.0f;
    return;
  }
#pragma omp simd
  for (int64_t p = 0; p < L; ++p) {
    const float x = raw[p] + bias;
    const float e = std::exp(std::min(x, 20.0f));
    dt[p] = x > 20.0f ? x : std::log1p(e);
    ddt[p] = x > 20.0f ? 1.0f : e / (1.0f + e);
  }
}

constexpr int64_t kBlock = 4;  // channels of one direction whose backward scans run together

// Scratch of one thread for the N = 16 backward: per channel of a block, the chunk's states and decays, and delta'
// with its derivative.
struct Bwd16Scratch {
  int64_t chunk;
  std::vector<float> states, decays, dt, ddt;
  Bwd16Scratch(int64_t chunk, int64_t L)
      : chunk(chunk), states(kBlock * (chunk + 1) * kLanes), decays(kBlock * chunk * kLanes),
        dt(kBlock * L), ddt(kBlock * L) {}
};

// Consecutive channels of one direction: where each one's inputs and outputs start, and the stride to the next.
// skip (D) and bias may be null (0).
struct ChannelRun {
  const float* u; int64_t u_stride;   // input sequence
  const float* delta;                 // raw delta, stride L
  const float* a;                     // A rows, stride 16
  const float* hs; int64_t hs_stride; // states saved before each chunk
  const float* dy;                    // output gradient, stride L
  const float* skip; const float* bias;
  float* du; float* ddelta;           // stride L
  float* dA; float* dD; float* dbias; // stride 16, 1, 1

  ChannelRun at(int64_t i, int64_t L) const {
    return {u + i * u_stride, u_stride, delta + i * L, a + i * kLanes, hs + i * hs_stride, hs_stride, dy + i * L,
            skip ? skip + i : nullptr, bias ? bias + i : nullptr, du + i * L, ddelta + i * L, dA + i * kLanes,
            dD + i, dbias + i};
  }
};

// Backward of G channels that share B, C and their gradient rows (see chanzoo_scan_bwd): recomputes each chunk's
// states from the saved ones, then runs the G reverse scans side by side, 16 steps at a time, so that B and C are
// loaded and the dB, dC rows updated once per step for the G channels, and the G carry chains overlap. The per-step
// sums over the states (B . dh and the delta gradient) are reduced 16 steps at a time. Adds into dBp, dCp; writes
// du, ddelta, dA, dD, dbias.
template <int64_t G>
void scan_block16_bwd(const ChannelRun& run, const float* Bp, int64_t bst, const float* Cp, int64_t cst, int softplus,
                      bool rev, int64_t L, float* dBp, float* dCp, int64_t dst, Bwd16Scratch& scratch) {
  const int64_t chunk = scratch.chunk;
  const float* up[G];
  const float* dyp[G];
  float *dt[G], *ddt[G], *states[G], *decays[G];
  V16 av[G], carry[G], dA[G];
  float skip[G], dD_acc[G], dbias_acc[G];
  for (int64_t g = 0; g < G; ++g) {
    up[g] = run.u + g * run.u_stride;
    dyp[g] = run.dy + g * L;
    dt[g] = scratch.dt.data() + g * L;
    ddt[g] = scratch.ddt.data() + g * L;
    states[g] = scratch.states.data() + g * (chunk + 1) * kLanes;
    decays[g] = scratch.decays.data() + g * chunk * kLanes;
    transform_deltas_grad(run.delta + g * L, run.bias ? run.bias[g] : 0.0f, softplus, L, dt[g], ddt[g]);
    av[g] = vload(run.a + g * kLanes);
    carry[g] = dA[g] = vzero();
    skip[g] = run.skip ? run.skip[g] : 0.0f;
    dD_acc[g] = dbias_acc[g] = 0.0f;
  }
  V16 tile_u[G][kLanes], tile_dt[G][kLanes];
  alignas(64) float sum_u[kLanes], sum_dt[kLanes];
  const int64_t n_chunks = (L + chunk - 1) / chunk;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * chunk, t1 = std::min(t0 + chunk, L);
    V16 h[G];
    for (int64_t g = 0; g < G; ++g) {
      h[g] = vload(run.hs + g * run.hs_stride + c * kLanes);
      vstore(states[g], h[g]);
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = rev ? L - 1 - t : t, k = t - t0;
      const V16 Bv = vload(Bp + p * bst);
      for (int64_t g = 0; g < G; ++g) {
        const V16 e = exp16(vmul(vset1(dt[g][p]), av[g]));
        h[g] = vfmadd(e, h[g], vmul(vset1(dt[g][p] * up[g][p]), Bv));
        vstore(decays[g] + k * kLanes, e);
        vstore(states[g] + (k + 1) * kLanes, h[g]);
      }
    }
    // Reverse pass over the chunk, in groups of up to 16 steps ending at t_end - 1.
    for (int64_t t_end = t1; t_end > t0; t_end -= kLanes) {
      const int64_t nb = std::min(kLanes, t_end - t0);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t t = t_end - 1 - j, p = rev ? L - 1 - t : t, k = t - t0;
        const V16 Bv = vload(Bp + p * bst), Cv = vload(Cp + p * cst);
        V16 to_dB = vzero(), to_dC = vzero();
        for (int64_t g = 0; g < G; ++g) {
          const V16 dyv = vset1(dyp[g][p]), dtv = vset1(dt[g][p]);
          const V16 grad = vfmadd(dyv, Cv, carry[g]);
          const V16 e = vload(decays[g] + k * kLanes);
          const V16 eh = vmul(e, vload(states[g] + k * kLanes));
          to_dC = vfmadd(dyv, vload(states[g] + (k + 1) * kLanes), to_dC);
          to_dB = vfmadd(grad, vset1(dt[g][p] * up[g][p]), to_dB);
          tile_u[g][j] = vmul(grad, Bv);
          tile_dt[g][j] = vmul(grad, vfmadd(vset1(up[g][p]), Bv, vmul(av[g], eh)));
          dA[g] = vfmadd(vmul(grad, dtv), eh, dA[g]);
          carry[g] = vmul(e, grad);
        }
        float* dCt = dCp + p * dst;
        float* dBt = dBp + p * dst;
        vstore(dCt, vadd(vload(dCt), to_dC));
        vstore(dBt, vadd(vload(dBt), to_dB));
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = nb; j < kLanes; ++j) tile_u[g][j] = tile_dt[g][j] = vzero();
        vstore(sum_u, sum_lanes16(tile_u[g]));
        vstore(sum_dt, sum_lanes16(tile_dt[g]));
        float* dup = run.du + g * L;
        float* ddp = run.ddelta + g * L;
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t t = t_end - 1 - j, p = rev ? L - 1 - t : t;
          dup[p] = sum_u[j] * dt[g][p] + skip[g] * dyp[g][p];
          const float ddraw = sum_dt[j] * ddt[g][p];
          ddp[p] = ddraw;
          dbias_acc[g] += ddraw;
          dD_acc[g] += dyp[g][p] * up[g][p];
        }
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    vstore(run.dA + g * kLanes, dA[g]);
    run.dD[g] = dD_acc[g];
    run.dbias[g] = dbias_acc[g];
  }
}

// The backward of `count` consecutive channels of one direction, kBlock at a time.
void scan_channels16_bwd(int64_t count, const ChannelRun& run, const float* Bp, int64_t bst, const float* Cp,
                         int64_t cst, int softplus, bool rev, int64_t L, float* dBp, float* dCp, int64_t dst,
                         Bwd16Scratch& scratch) {
  static_assert(kBlock == 4, "the switch below lists the block sizes");
  for (int64_t i = 0; i < count; i += kBlock) {
    const ChannelRun block = run.at(i, L);
    switch (std::min(kBlock, count - i)) {
      case 4: scan_block16_bwd<4>(block, Bp, bst, Cp, cst, softplus, rev, L, dBp, dCp, dst, scratch); break;
      case 3: scan_block16_bwd<3>(block, Bp, bst, Cp, cst, softplus, rev, L, dBp, dCp, dst, scratch); break;
      case 2: scan_block16_bwd<2>(block, Bp, bst, Cp, cst, softplus, rev, L, dBp, dCp, dst, scratch); break;
      default: scan_block16_bwd<1>(block, Bp, bst, Cp, cst, softplus, rev, L, dBp, dCp, dst, scratch); break;
    }
  }
}
#endif

}  // namespace

extern "C" {

void chanzoo_scan_fwd(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                      const float* Dv, const float* bias, float* y, float* hs, int64_t batch, int64_t K, int64_t S,
                      int64_t O, int64_t inner, int64_t L, int64_t N, int64_t usb, int64_t uss, int64_t usc,
                      int64_t bsb, int64_t bss, int64_t bsj, int64_t bst, int64_t csb, int64_t css, int64_t csj,
                      int64_t cst, int64_t chunk, int64_t reverse, int softplus, int nthreads) {
  const int64_t n_chunks = (L + chunk - 1) / chunk;
  const int64_t dim = K * inner, per_out = K / O, per_src = K / S;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> h(N);  // per thread: the generic path's state; dts: delta' of one channel (N = 16 path)
#if defined(CHANZOO_SIMD16)
    std::vector<float> dts(N == kLanes ? L : 0);
#endif
#pragma omp for schedule(static)
    for (int64_t item = 0; item < batch * O * inner; ++item) {
      const int64_t b = item / (O * inner), o = (item / inner) % O, i = item % inner;
      float* yp = y + item * L;
      for (int64_t k = o * per_out; k < (o + 1) * per_out; ++k) {
        const int64_t d = k * inner + i, bd = b * dim + d;
        const bool rev = (reverse >> k) & 1, first = (k == o * per_out);
        const float* up = u + b * usb + (k / per_src) * uss + i * usc;
        const float* dp = delta + bd * L;
        const float* Bp = Bm + b * bsb + (k / per_src) * bss + (k % per_src) * bsj;
        const float* Cp = Cm + b * csb + (k / per_src) * css + (k % per_src) * csj;
        const float* a = A + d * N;
        const float skip = Dv ? Dv[d] : 0.0f, db = bias ? bias[d] : 0.0f;
        float* hsp = hs + bd * n_chunks * N;
#if defined(CHANZOO_SIMD16)
        if (N == kLanes && chunk % kLanes == 0) {
          transform_deltas(dp, db, softplus, L, dts.data());
          scan_channel16(up, dts.data(), a, Bp, bst, Cp, cst, skip, rev, first, L, chunk, hsp, yp);
          continue;
        }
#endif
        for (int64_t n = 0; n < N; ++n) h[n] = 0.0f;
        for (int64_t t = 0; t < L; ++t) {
          const int64_t p = rev ? L - 1 - t : t;
          if (t % chunk == 0) {
            float* dst = hsp + (t / chunk) * N;
            for (int64_t n = 0; n < N; ++n) dst[n] = h[n];
          }
          float dt, unused;
          transform_delta(dp[p], db, softplus, &dt, &unused);
          const float dtu = dt * up[p];
          const float* Bt = Bp + p * bst;
          const float* Ct = Cp + p * cst;
          float* hh = h.data();
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t n = 0; n < N; ++n) {
            const float hn = std::exp(dt * a[n]) * hh[n] + dtu * Bt[n];
            hh[n] = hn;
            acc += hn * Ct[n];
          }
          const float out = acc + skip * up[p];
          yp[p] = first ? out : yp[p] + out;
        }
      }
    }
  }
}

// The backward runs one work item per (split, batch, direction): the item owns dB[split, b, k] and dC[split, b, k]
// ((splits, batch, K, L, N), written here, summed over splits by the caller when splits > 1) and loops over its
// share of the direction's channels, so no thread ever adds into another's rows. du is per direction (the caller
// sums the directions that share a source); dA_part (batch, dim, N), dD_part and dbias_part (batch, dim) are
// per-channel partial sums for the caller to reduce over the batch. ddelta is the gradient with respect to the raw
// delta (before the bias and softplus).
void chanzoo_scan_bwd(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                      const float* Dv, const float* bias, const float* hs, const float* dy, float* du, float* ddelta,
                      float* dA_part, float* dD_part, float* dbias_part, float* dB, float* dC, int64_t batch,
                      int64_t K, int64_t S, int64_t O, int64_t inner, int64_t L, int64_t N, int64_t usb, int64_t uss,
                      int64_t usc, int64_t bsb, int64_t bss, int64_t bsj, int64_t bst, int64_t csb, int64_t css,
                      int64_t csj, int64_t cst, int64_t chunk, int64_t reverse, int softplus, int64_t splits, int nthreads) {
  const int64_t n_chunks = (L + chunk - 1) / chunk;
  const int64_t dim = K * inner, per_out = K / O, per_src = K / S;
  const int64_t per_split = (inner + splits - 1) / splits;
  const int64_t items = splits * batch * K;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> hprev((chunk + 1) * N), decay(chunk * N), dts(chunk), ddts(chunk), carry(N), dA_acc(N);
#if defined(CHANZOO_SIMD16)
    const bool fast = N == kLanes && chunk % kLanes == 0;
    Bwd16Scratch scratch(fast ? chunk : 0, fast ? L : 0);
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t s = item / (batch * K), b = (item / K) % batch, k = item % K;
      const bool rev = (reverse >> k) & 1;
      float* dBp = dB + ((s * batch + b) * K + k) * L * N;
      float* dCp = dC + ((s * batch + b) * K + k) * L * N;
      std::memset(dBp, 0, sizeof(float) * L * N);
      std::memset(dCp, 0, sizeof(float) * L * N);
      const float* Bp = Bm + b * bsb + (k / per_src) * bss + (k % per_src) * bsj;
      const float* Cp = Cm + b * csb + (k / per_src) * css + (k % per_src) * csj;
      const int64_t i_begin = s * per_split, i_end = std::min((s + 1) * per_split, inner);
#if defined(CHANZOO_SIMD16)
      if (fast) {
        if (i_end <= i_begin) continue;
        const int64_t d = k * inner + i_begin, bd = b * dim + d;
        const ChannelRun run{u + b * usb + (k / per_src) * uss + i_begin * usc, usc, delta + bd * L, A + d * N,
                             hs + bd * n_chunks * N, n_chunks * N, dy + ((b * O + k / per_out) * inner + i_begin) * L,
                             Dv ? Dv + d : nullptr, bias ? bias + d : nullptr, du + bd * L, ddelta + bd * L,
                             dA_part + bd * N, dD_part + bd, dbias_part + bd};
        scan_channels16_bwd(i_end - i_begin, run, Bp, bst, Cp, cst, softplus, rev, L, dBp, dCp, N, scratch);
        continue;
      }
#endif
      for (int64_t i = i_begin; i < i_end; ++i) {
        const int64_t d = k * inner + i, bd = b * dim + d;
        const float* up = u + b * usb + (k / per_src) * uss + i * usc;
        const float* dp = delta + bd * L;
        const float* dyp = dy + ((b * O + k / per_out) * inner + i) * L;
        const float* a = A + d * N;
        const float skip = Dv ? Dv[d] : 0.0f, db = bias ? bias[d] : 0.0f;
        float* dup = du + bd * L;
        float* ddp = ddelta + bd * L;
        float dD_acc = 0.0f, dbias_acc = 0.0f;
        for (int64_t n = 0; n < N; ++n) carry[n] = 0.0f, dA_acc[n] = 0.0f;
        for (int64_t c = n_chunks - 1; c >= 0; --c) {
          const int64_t t0 = c * chunk, t1 = (t0 + chunk < L) ? t0 + chunk : L;
          // Recompute the chunk's states from the saved state at its start.
          const float* h0 = hs + (bd * n_chunks + c) * N;
          for (int64_t n = 0; n < N; ++n) hprev[n] = h0[n];
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t k_ = t - t0, p = rev ? L - 1 - t : t;
            transform_delta(dp[p], db, softplus, &dts[k_], &ddts[k_]);
            const float dt = dts[k_], dtu = dt * up[p];
            const float* Bt = Bp + p * bst;
            const float* hk = hprev.data() + k_ * N;
            float* ek = decay.data() + k_ * N;
            float* hnext = hprev.data() + (k_ + 1) * N;
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) {
              const float e = std::exp(dt * a[n]);
              ek[n] = e;
              hnext[n] = e * hk[n] + dtu * Bt[n];
            }
          }
          // Reverse pass: carry = exp(delta'_{t+1} A) * grad(h_{t+1}).
          for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t k_ = t - t0, p = rev ? L - 1 - t : t;
            const float dt = dts[k_], ut = up[p], dtu = dt * ut, dyt = dyp[p];
            const float* Bt = Bp + p * bst;
            const float* Ct = Cp + p * cst;
            float* dBt = dBp + p * N;
            float* dCt = dCp + p * N;
            const float* hk = hprev.data() + k_ * N;
            const float* ek = decay.data() + k_ * N;
            float* cr = carry.data();
            float* dAa = dA_acc.data();
            float du_acc = 0.0f, ddt_acc = 0.0f;
#pragma omp simd reduction(+ : du_acc, ddt_acc)
            for (int64_t n = 0; n < N; ++n) {
              const float gn = cr[n] + dyt * Ct[n];
              const float eh = ek[n] * hk[n];
              dCt[n] += dyt * (eh + dtu * Bt[n]);
              dBt[n] += gn * dtu;
              du_acc += gn * Bt[n];
              ddt_acc += gn * (ut * Bt[n] + a[n] * eh);
              dAa[n] += gn * dt * eh;
              cr[n] = ek[n] * gn;
            }
            dup[p] = du_acc * dt + skip * dyt;
            const float ddraw = ddt_acc * ddts[k_];
            ddp[p] = ddraw;
            dbias_acc += ddraw;
            dD_acc += dyt * ut;
          }
        }
        float* dAp = dA_part + bd * N;
        for (int64_t n = 0; n < N; ++n) dAp[n] = dA_acc[n];
        dD_part[bd] = dD_acc;
        dbias_part[bd] = dbias_acc;
      }
    }
  }
}


}  // extern "C"

// ---------------------------------------------------------------------------------------------------------------
// The scan with its input projections inside (for few channels per direction, as in ViM2's channel mixer, where the
// projections are products of (L x inner) by (inner x c) with inner = 2 that BLAS runs far below its rate and whose
// (batch, K, L, c) output is larger than everything else the layer touches). Per (batch item, direction) the kernel
// projects the L steps into local buffers: x_p = W_k u_p (c = R + 2N values) split into dt (L, R), B and C (L, N);
// channel i's raw delta is dtw_k[i] . dt_p. Layouts: u (batch, S, inner, L) by strides as above; WT (K, inner, c)
// (x_proj's weight transposed); dtw (K, inner, R); A, D, bias, y, hs as above. Only N = 16 with AVX-512 or AVX2 and
// at most chanzoo_scan_proj_max_inner() channels per direction (0 where the kernel was built with neither).

#if defined(CHANZOO_SIMD16)
namespace {

constexpr int64_t kProjMaxInner = 8;

// Thread-local buffers of one direction's projections and, for the backward, their gradients.
struct ProjScratch {
  std::vector<float> xdt, xB, xC, raw, dxdt, dB, dC, ddraw;
  ProjScratch(int64_t L, int64_t R, int64_t inner, bool grads)
      : xdt(L * R), xB(L * kLanes), xC(L * kLanes), raw(inner * L), dxdt(grads ? L * R : 0), dB(grads ? L * kLanes : 0),
        dC(grads ? L * kLanes : 0), ddraw(grads ? inner * L : 0) {}
};

// xdt (L, R), xB, xC (L, 16) = the projections of one direction's source; raw (inner, L) its channels' raw deltas.
template <int64_t inner>
void project_steps16(const float* u0, int64_t usc, const float* W, const float* dtw, int64_t L, int64_t R,
                     ProjScratch& x) {
  const int64_t c = R + 2 * kLanes;
  for (int64_t p = 0; p < L; ++p) {
    V16 b = vzero(), cv = vzero();
    float ut[inner];
    for (int64_t i = 0; i < inner; ++i) {
      ut[i] = u0[i * usc + p];
      const V16 uv = vset1(ut[i]);
      b = vfmadd(vload(W + i * c + R), uv, b);
      cv = vfmadd(vload(W + i * c + R + kLanes), uv, cv);
    }
    float* xr = x.xdt.data() + p * R;
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t i = 0; i < inner; ++i) acc += W[i * c + r] * ut[i];
      xr[r] = acc;
    }
    vstore(x.xB.data() + p * kLanes, b);
    vstore(x.xC.data() + p * kLanes, cv);
    for (int64_t i = 0; i < inner; ++i) {
      float acc = 0.0f;
      for (int64_t r = 0; r < R; ++r) acc += dtw[i * R + r] * xr[r];
      x.raw[i * L + p] = acc;
    }
  }
}

// Back through raw_i = dtw_i . dt_p and x_p = W u_p for one direction: adds W's and dtw's gradients into dW (inner, c)
// and ddtw (inner, R), and the input gradient into du0 (inner, L); the per-position sums over the 16 B and C lanes are
// reduced 16 positions at a time.
template <int64_t inner>
void project_steps16_bwd(const float* u0, int64_t usc, const float* W, const float* dtw, int64_t L, int64_t R,
                         ProjScratch& x, float* dW, float* ddtw, float* du0) {
  const int64_t c = R + 2 * kLanes;
  const float* xdt = x.xdt.data();
  const float* ddraw = x.ddraw.data();
  float* dxdt = x.dxdt.data();
  // The dt rows: each step's dt gradient, then dtw's and W's dt-row gradients as sums over the steps (in registers).
  for (int64_t p = 0; p < L; ++p)
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t i = 0; i < inner; ++i) acc += ddraw[i * L + p] * dtw[i * R + r];
      dxdt[p * R + r] = acc;
    }
  for (int64_t i = 0; i < inner; ++i)
    for (int64_t r = 0; r < R; ++r) {
      float to_dtw = 0.0f, to_w = 0.0f;
#pragma omp simd reduction(+ : to_dtw, to_w)
      for (int64_t p = 0; p < L; ++p) {
        to_dtw += ddraw[i * L + p] * xdt[p * R + r];
        to_w += dxdt[p * R + r] * u0[i * usc + p];
      }
      ddtw[i * R + r] += to_dtw;
      dW[i * c + r] += to_w;
    }
  // The B and C rows, and the input gradient (the per-step sums over the 16 lanes reduced 16 steps at a time).
  V16 dWB[inner], dWC[inner], WB[inner], WC[inner];
  V16 tiles[inner][kLanes];
  alignas(64) float sums[kLanes];
  float from_dt[inner][kLanes];
  for (int64_t i = 0; i < inner; ++i) {
    dWB[i] = dWC[i] = vzero();
    WB[i] = vload(W + i * c + R);
    WC[i] = vload(W + i * c + R + kLanes);
  }
  for (int64_t p0 = 0; p0 < L; p0 += kLanes) {
    const int64_t nb = std::min(kLanes, L - p0);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t p = p0 + j;
      const V16 gB = vload(x.dB.data() + p * kLanes), gC = vload(x.dC.data() + p * kLanes);
      for (int64_t i = 0; i < inner; ++i) {
        const V16 uv = vset1(u0[i * usc + p]);
        dWB[i] = vfmadd(gB, uv, dWB[i]);
        dWC[i] = vfmadd(gC, uv, dWC[i]);
        float acc = 0.0f;
        for (int64_t r = 0; r < R; ++r) acc += dxdt[p * R + r] * W[i * c + r];
        from_dt[i][j] = acc;
        tiles[i][j] = vfmadd(gB, WB[i], vmul(gC, WC[i]));
      }
    }
    for (int64_t i = 0; i < inner; ++i) {
      for (int64_t j = nb; j < kLanes; ++j) tiles[i][j] = vzero();
      vstore(sums, sum_lanes16(tiles[i]));
      for (int64_t j = 0; j < nb; ++j) du0[i * L + p0 + j] += sums[j] + from_dt[i][j];
    }
  }
  for (int64_t i = 0; i < inner; ++i) {
    float* row = dW + i * c + R;
    vstore(row, vadd(vload(row), dWB[i]));
    vstore(row + kLanes, vadd(vload(row + kLanes), dWC[i]));
  }
}

// The projections with the channel count as a compile-time constant (1..kProjMaxInner), so that their loops unroll.
void project_fwd(int64_t inner, const float* u0, int64_t usc, const float* W, const float* dtw, int64_t L, int64_t R,
                 ProjScratch& x) {
  switch (inner) {
    case 1: return project_steps16<1>(u0, usc, W, dtw, L, R, x);
    case 2: return project_steps16<2>(u0, usc, W, dtw, L, R, x);
    case 3: return project_steps16<3>(u0, usc, W, dtw, L, R, x);
    case 4: return project_steps16<4>(u0, usc, W, dtw, L, R, x);
    case 5: return project_steps16<5>(u0, usc, W, dtw, L, R, x);
    case 6: return project_steps16<6>(u0, usc, W, dtw, L, R, x);
    case 7: return project_steps16<7>(u0, usc, W, dtw, L, R, x);
    default: return project_steps16<8>(u0, usc, W, dtw, L, R, x);
  }
}

void project_bwd(int64_t inner, const float* u0, int64_t usc, const float* W, const float* dtw, int64_t L, int64_t R,
                 ProjScratch& x, float* dW, float* ddtw, float* du0) {
  switch (inner) {
    case 1: return project_steps16_bwd<1>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
    case 2: return project_steps16_bwd<2>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
    case 3: return project_steps16_bwd<3>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
    case 4: return project_steps16_bwd<4>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
    case 5: return project_steps16_bwd<5>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
    case 6: return project_steps16_bwd<6>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
    case 7: return project_steps16_bwd<7>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
    default: return project_steps16_bwd<8>(u0, usc, W, dtw, L, R, x, dW, ddtw, du0);
  }
}

}  // namespace
#endif

extern "C" {

int64_t chanzoo_scan_proj_max_inner() {
#if defined(CHANZOO_SIMD16)
  return kProjMaxInner;
#else
  return 0;
#endif
}

void chanzoo_scan_proj_fwd(const float* u, const float* WT, const float* dtw, const float* A, const float* Dv,
                           const float* bias, float* y, float* hs, int64_t batch, int64_t K, int64_t S, int64_t O,
                           int64_t inner, int64_t L, int64_t N, int64_t R, int64_t usb, int64_t uss, int64_t usc,
                           int64_t chunk, int64_t reverse, int softplus, int nthreads) {
#if defined(CHANZOO_SIMD16)
  const int64_t n_chunks = (L + chunk - 1) / chunk, c = R + 2 * N;
  const int64_t dim = K * inner, per_out = K / O, per_src = K / S;
#pragma omp parallel num_threads(nthreads)
  {
    ProjScratch x(L, R, inner, false);
    std::vector<float> dts(L);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < batch * O; ++item) {
      const int64_t b = item / O, o = item % O;
      for (int64_t k = o * per_out; k < (o + 1) * per_out; ++k) {
        const bool rev = (reverse >> k) & 1, first = (k == o * per_out);
        const float* u0 = u + b * usb + (k / per_src) * uss;
        project_fwd(inner, u0, usc, WT + k * inner * c, dtw + k * inner * R, L, R, x);
        for (int64_t i = 0; i < inner; ++i) {
          const int64_t d = k * inner + i, bd = b * dim + d;
          transform_deltas(x.raw.data() + i * L, bias ? bias[d] : 0.0f, softplus, L, dts.data());
          scan_channel16(u0 + i * usc, dts.data(), A + d * N, x.xB.data(), kLanes, x.xC.data(), kLanes,
                         Dv ? Dv[d] : 0.0f, rev, first, L, chunk, hs + bd * n_chunks * N,
                         y + ((b * O + o) * inner + i) * L);
        }
      }
    }
  }
#endif
}

// Gradients of chanzoo_scan_proj_fwd. One work item per (batch item, direction): it recomputes the projections,
// runs each channel's reverse scan into local dB, dC rows and then goes back through the projections. du is per
// direction, (batch, K, inner, L) (the caller sums the directions that share a source); dWT_part (batch, K, inner, c),
// dtw_part (batch, K, inner, R), dA_part (batch, dim, N), dD_part and dbias_part (batch, dim) are per batch item,
// for the caller to sum.
void chanzoo_scan_proj_bwd(const float* u, const float* WT, const float* dtw, const float* A, const float* Dv,
                           const float* bias, const float* hs, const float* dy, float* du, float* dWT_part,
                           float* dtw_part, float* dA_part, float* dD_part, float* dbias_part, int64_t batch,
                           int64_t K, int64_t S, int64_t O, int64_t inner, int64_t L, int64_t N, int64_t R,
                           int64_t usb, int64_t uss, int64_t usc, int64_t chunk, int64_t reverse, int softplus,
                           int nthreads) {
#if defined(CHANZOO_SIMD16)
  const int64_t n_chunks = (L + chunk - 1) / chunk, c = R + 2 * N;
  const int64_t dim = K * inner, per_out = K / O, per_src = K / S;
#pragma omp parallel num_threads(nthreads)
  {
    ProjScratch x(L, R, inner, true);
    Bwd16Scratch scratch(chunk, L);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < batch * K; ++item) {
      const int64_t b = item / K, k = item % K;
      const bool rev = (reverse >> k) & 1;
      const float* u0 = u + b * usb + (k / per_src) * uss;
      const float* W = WT + k * inner * c;
      const float* dw = dtw + k * inner * R;
      project_fwd(inner, u0, usc, W, dw, L, R, x);
      std::fill(x.dB.begin(), x.dB.end(), 0.0f);
      std::fill(x.dC.begin(), x.dC.end(), 0.0f);
      float* du0 = du + item * inner * L;
      const int64_t d = k * inner, bd = b * dim + d;
      const ChannelRun run{u0, usc, x.raw.data(), A + d * N, hs + bd * n_chunks * N, n_chunks * N,
                           dy + (b * O + k / per_out) * inner * L, Dv ? Dv + d : nullptr, bias ? bias + d : nullptr,
                           du0, x.ddraw.data(), dA_part + bd * N, dD_part + bd, dbias_part + bd};
      scan_channels16_bwd(inner, run, x.xB.data(), kLanes, x.xC.data(), kLanes, softplus, rev, L, x.dB.data(),
                          x.dC.data(), kLanes, scratch);
      float* dW = dWT_part + item * inner * c;
      float* ddw = dtw_part + item * inner * R;
      std::fill(dW, dW + inner * c, 0.0f);
      std::fill(ddw, ddw + inner * R, 0.0f);
      project_bwd(inner, u0, usc, W, dw, L, R, x, dW, ddw, du0);
    }
  }
#endif
}

}  // extern "C"
