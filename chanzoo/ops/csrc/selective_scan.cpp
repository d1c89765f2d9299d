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
// Built with AVX-512 and N = 16 (Mamba's and ViM2's state size), each channel runs a specialised path: the state is one
// register, exp is a polynomial on 16 lanes, delta' is computed for all L positions in one vectorised pass, and the
// per-step sums over the 16 states (C . h in the forward; B . dh and the delta gradient in the backward) are reduced
// 16 steps at a time by a transpose-and-add tree instead of one horizontal sum per step. Other N, or a build without
// AVX-512, take the generic loops.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
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

#if defined(__AVX512F__)
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

constexpr int64_t kLanes = 16;  // N = 16 states are one AVX-512 register

// exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-7 polynomial, times 2^n by
// scalef (which also flushes very negative arguments to 0). Relative error ~1e-7.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lane j of the result is the sum of the 16 lanes of v[j] (a transpose-and-add tree: 56 instructions for 16 sums).
inline __m512 sum_lanes16(const __m512* v) {
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

// One channel's forward scan with N = 16: h in a register, outputs reduced 16 steps at a time. dt holds delta' by
// position; writes (or adds, when !first) y_p = C_p . h_p + skip u_p; saves the state before every chunk start
// (chunk a multiple of 16).
inline void scan_channel16(const float* up, const float* dt, const float* a, const float* Bp, int64_t bst,
                           const float* Cp, int64_t cst, float skip, bool rev, bool first, int64_t L, int64_t chunk,
                           float* hsp, float* yp) {
  const __m512 av = _mm512_loadu_ps(a);
  __m512 h = _mm512_setzero_ps();
  __m512 tile[kLanes];
  alignas(64) float sums[kLanes];
  for (int64_t t0 = 0; t0 < L; t0 += kLanes) {
    if (t0 % chunk == 0) _mm512_storeu_ps(hsp + (t0 / chunk) * kLanes, h);
    const int64_t nb = std::min(kLanes, L - t0);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t p = rev ? L - 1 - (t0 + j) : t0 + j;
      const __m512 dtv = _mm512_set1_ps(dt[p]);
      const __m512 drive = _mm512_mul_ps(_mm512_set1_ps(dt[p] * up[p]), _mm512_loadu_ps(Bp + p * bst));
      h = _mm512_fmadd_ps(exp16(_mm512_mul_ps(dtv, av)), h, drive);
      tile[j] = _mm512_mul_ps(h, _mm512_loadu_ps(Cp + p * cst));
    }
    for (int64_t j = nb; j < kLanes; ++j) tile[j] = _mm512_setzero_ps();
    _mm512_store_ps(sums, sum_lanes16(tile));
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

// Scratch of one thread for scan_channel16_bwd: the chunk's states and decays, and delta' with its derivative.
struct Bwd16Scratch {
  std::vector<float> states, decays, dt, ddt;
  Bwd16Scratch(int64_t chunk, int64_t L) : states((chunk + 1) * kLanes), decays(chunk * kLanes), dt(L), ddt(L) {}
};

// One channel's backward with N = 16 (see chanzoo_scan_bwd): recomputes each chunk's states from the saved one,
// then runs the reverse scan 16 steps at a time, reducing the per-step sums over the states for 16 steps at once.
// Adds into dBp, dCp (this channel's direction's rows); writes du, ddelta; returns the dA, dD, dbias sums.
inline void scan_channel16_bwd(const float* up, const float* dp, const float* a, const float* Bp, int64_t bst,
                               const float* Cp, int64_t cst, const float* hsp, const float* dyp, float skip,
                               float db, int softplus, bool rev, int64_t L, int64_t chunk, float* dBp, float* dCp,
                               int64_t dst, float* dup, float* ddp, float* dAp, float* dD_out, float* dbias_out,
                               Bwd16Scratch& scratch) {
  float* dt = scratch.dt.data();
  float* ddt = scratch.ddt.data();
  transform_deltas_grad(dp, db, softplus, L, dt, ddt);
  const __m512 av = _mm512_loadu_ps(a);
  __m512 carry = _mm512_setzero_ps(), dA = _mm512_setzero_ps();
  __m512 tile_u[kLanes], tile_dt[kLanes];
  alignas(64) float sum_u[kLanes], sum_dt[kLanes];
  float dD_acc = 0.0f, dbias_acc = 0.0f;
  const int64_t n_chunks = (L + chunk - 1) / chunk;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * chunk, t1 = std::min(t0 + chunk, L);
    float* states = scratch.states.data();
    float* decays = scratch.decays.data();
    __m512 h = _mm512_loadu_ps(hsp + c * kLanes);
    _mm512_storeu_ps(states, h);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = rev ? L - 1 - t : t, k = t - t0;
      const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(dt[p]), av));
      h = _mm512_fmadd_ps(e, h, _mm512_mul_ps(_mm512_set1_ps(dt[p] * up[p]), _mm512_loadu_ps(Bp + p * bst)));
      _mm512_storeu_ps(decays + k * kLanes, e);
      _mm512_storeu_ps(states + (k + 1) * kLanes, h);
    }
    // Reverse pass over the chunk, in groups of up to 16 steps ending at t_end - 1.
    for (int64_t t_end = t1; t_end > t0; t_end -= kLanes) {
      const int64_t nb = std::min(kLanes, t_end - t0);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t t = t_end - 1 - j, p = rev ? L - 1 - t : t, k = t - t0;
        const __m512 dyv = _mm512_set1_ps(dyp[p]), uv = _mm512_set1_ps(up[p]);
        const __m512 Bv = _mm512_loadu_ps(Bp + p * bst);
        const __m512 g = _mm512_fmadd_ps(dyv, _mm512_loadu_ps(Cp + p * cst), carry);
        const __m512 e = _mm512_loadu_ps(decays + k * kLanes);
        const __m512 eh = _mm512_mul_ps(e, _mm512_loadu_ps(states + k * kLanes));
        float* dCt = dCp + p * dst;
        float* dBt = dBp + p * dst;
        _mm512_storeu_ps(dCt, _mm512_fmadd_ps(dyv, _mm512_loadu_ps(states + (k + 1) * kLanes), _mm512_loadu_ps(dCt)));
        _mm512_storeu_ps(dBt, _mm512_fmadd_ps(g, _mm512_set1_ps(dt[p] * up[p]), _mm512_loadu_ps(dBt)));
        tile_u[j] = _mm512_mul_ps(g, Bv);
        tile_dt[j] = _mm512_mul_ps(g, _mm512_fmadd_ps(uv, Bv, _mm512_mul_ps(av, eh)));
        dA = _mm512_fmadd_ps(_mm512_mul_ps(g, _mm512_set1_ps(dt[p])), eh, dA);
        carry = _mm512_mul_ps(e, g);
      }
      for (int64_t j = nb; j < kLanes; ++j) tile_u[j] = tile_dt[j] = _mm512_setzero_ps();
      _mm512_store_ps(sum_u, sum_lanes16(tile_u));
      _mm512_store_ps(sum_dt, sum_lanes16(tile_dt));
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t t = t_end - 1 - j, p = rev ? L - 1 - t : t;
        dup[p] = sum_u[j] * dt[p] + skip * dyp[p];
        const float ddraw = sum_dt[j] * ddt[p];
        ddp[p] = ddraw;
        dbias_acc += ddraw;
        dD_acc += dyp[p] * up[p];
      }
    }
  }
  _mm512_storeu_ps(dAp, dA);
  *dD_out = dD_acc;
  *dbias_out = dbias_acc;
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
    std::vector<float> h(N);  // per thread: the generic path's state; dts: delta' of one channel (AVX-512 path)
#if defined(__AVX512F__)
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
#if defined(__AVX512F__)
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
#if defined(__AVX512F__)
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
      const int64_t i_end = std::min((s + 1) * per_split, inner);
      for (int64_t i = s * per_split; i < i_end; ++i) {
        const int64_t d = k * inner + i, bd = b * dim + d;
        const float* up = u + b * usb + (k / per_src) * uss + i * usc;
        const float* dp = delta + bd * L;
        const float* dyp = dy + ((b * O + k / per_out) * inner + i) * L;
        const float* a = A + d * N;
        const float skip = Dv ? Dv[d] : 0.0f, db = bias ? bias[d] : 0.0f;
        float* dup = du + bd * L;
        float* ddp = ddelta + bd * L;
#if defined(__AVX512F__)
        if (fast) {
          scan_channel16_bwd(up, dp, a, Bp, bst, Cp, cst, hs + bd * n_chunks * N, dyp, skip, db, softplus, rev, L,
                             chunk, dBp, dCp, N, dup, ddp, dA_part + bd * N, dD_part + bd, dbias_part + bd, scratch);
          continue;
        }
#endif
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
// (x_proj's weight transposed); dtw (K, inner, R); A, D, bias, y, hs as above. Only N = 16 with AVX-512 and at most
// chanzoo_scan_proj_max_inner() channels per direction (0 where the kernel was built without AVX-512).

#if defined(__AVX512F__)
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
    __m512 b = _mm512_setzero_ps(), cv = _mm512_setzero_ps();
    float ut[inner];
    for (int64_t i = 0; i < inner; ++i) {
      ut[i] = u0[i * usc + p];
      const __m512 uv = _mm512_set1_ps(ut[i]);
      b = _mm512_fmadd_ps(_mm512_loadu_ps(W + i * c + R), uv, b);
      cv = _mm512_fmadd_ps(_mm512_loadu_ps(W + i * c + R + kLanes), uv, cv);
    }
    float* xr = x.xdt.data() + p * R;
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t i = 0; i < inner; ++i) acc += W[i * c + r] * ut[i];
      xr[r] = acc;
    }
    _mm512_storeu_ps(x.xB.data() + p * kLanes, b);
    _mm512_storeu_ps(x.xC.data() + p * kLanes, cv);
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
  __m512 dWB[inner], dWC[inner], WB[inner], WC[inner];
  __m512 tiles[inner][kLanes];
  alignas(64) float sums[kLanes];
  float from_dt[inner][kLanes];
  for (int64_t i = 0; i < inner; ++i) {
    dWB[i] = dWC[i] = _mm512_setzero_ps();
    WB[i] = _mm512_loadu_ps(W + i * c + R);
    WC[i] = _mm512_loadu_ps(W + i * c + R + kLanes);
  }
  for (int64_t p0 = 0; p0 < L; p0 += kLanes) {
    const int64_t nb = std::min(kLanes, L - p0);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t p = p0 + j;
      const __m512 gB = _mm512_loadu_ps(x.dB.data() + p * kLanes), gC = _mm512_loadu_ps(x.dC.data() + p * kLanes);
      for (int64_t i = 0; i < inner; ++i) {
        const __m512 uv = _mm512_set1_ps(u0[i * usc + p]);
        dWB[i] = _mm512_fmadd_ps(gB, uv, dWB[i]);
        dWC[i] = _mm512_fmadd_ps(gC, uv, dWC[i]);
        float acc = 0.0f;
        for (int64_t r = 0; r < R; ++r) acc += dxdt[p * R + r] * W[i * c + r];
        from_dt[i][j] = acc;
        tiles[i][j] = _mm512_fmadd_ps(gB, WB[i], _mm512_mul_ps(gC, WC[i]));
      }
    }
    for (int64_t i = 0; i < inner; ++i) {
      for (int64_t j = nb; j < kLanes; ++j) tiles[i][j] = _mm512_setzero_ps();
      _mm512_store_ps(sums, sum_lanes16(tiles[i]));
      for (int64_t j = 0; j < nb; ++j) du0[i * L + p0 + j] += sums[j] + from_dt[i][j];
    }
  }
  for (int64_t i = 0; i < inner; ++i) {
    float* row = dW + i * c + R;
    _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), dWB[i]));
    _mm512_storeu_ps(row + kLanes, _mm512_add_ps(_mm512_loadu_ps(row + kLanes), dWC[i]));
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
#if defined(__AVX512F__)
  return kProjMaxInner;
#else
  return 0;
#endif
}

void chanzoo_scan_proj_fwd(const float* u, const float* WT, const float* dtw, const float* A, const float* Dv,
                           const float* bias, float* y, float* hs, int64_t batch, int64_t K, int64_t S, int64_t O,
                           int64_t inner, int64_t L, int64_t N, int64_t R, int64_t usb, int64_t uss, int64_t usc,
                           int64_t chunk, int64_t reverse, int softplus, int nthreads) {
#if defined(__AVX512F__)
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
#if defined(__AVX512F__)
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
      for (int64_t i = 0; i < inner; ++i) {
        const int64_t d = k * inner + i, bd = b * dim + d;
        scan_channel16_bwd(u0 + i * usc, x.raw.data() + i * L, A + d * N, x.xB.data(), kLanes, x.xC.data(), kLanes,
                           hs + bd * n_chunks * N, dy + ((b * O + k / per_out) * inner + i) * L, Dv ? Dv[d] : 0.0f,
                           bias ? bias[d] : 0.0f, softplus, rev, L, chunk, x.dB.data(), x.dC.data(), kLanes,
                           du0 + i * L, x.ddraw.data() + i * L, dA_part + bd * N, dD_part + bd, dbias_part + bd,
                           scratch);
      }
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
