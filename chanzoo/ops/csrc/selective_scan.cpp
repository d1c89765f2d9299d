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
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include <omp.h>

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

}  // namespace

extern "C" {

void chanzoo_scan_fwd(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                      const float* Dv, const float* bias, float* y, float* hs, int64_t batch, int64_t K, int64_t S,
                      int64_t O, int64_t inner, int64_t L, int64_t N, int64_t usb, int64_t uss, int64_t usc,
                      int64_t bsb, int64_t bss, int64_t bsj, int64_t bst, int64_t csb, int64_t css, int64_t csj,
                      int64_t cst, int64_t chunk, int64_t reverse, int softplus, int nthreads) {
  const int64_t n_chunks = (L + chunk - 1) / chunk;
  const int64_t dim = K * inner, per_out = K / O, per_src = K / S;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t item = 0; item < batch * O * inner; ++item) {
    const int64_t b = item / (O * inner), o = (item / inner) % O, i = item % inner;
    float* yp = y + item * L;
    std::vector<float> h(N);
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
