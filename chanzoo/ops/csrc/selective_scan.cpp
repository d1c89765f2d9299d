// Selective scan (S6, Gu & Dao 2023) core on the CPU: y_t = C_t . h_t, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t.
// Plain C++ with an extern "C" interface (no torch headers, so it builds in seconds); chanzoo/ops/selective_scan.py
// compiles it at first use and registers it as torch.library ops. Layouts (all float32, contiguous):
//   u, delta, y, dy, du, ddelta: (batch, dim, L); A: (dim, N); B, C, dB, dC: (batch, groups, L, N);
//   hs: (batch, dim, n_chunks, N), the state before each chunk of `chunk` steps (saved by the forward pass so that
//   the backward pass recomputes one chunk of states at a time instead of storing all of them).
// Every exp() has a non-positive argument when delta >= 0 and A <= 0: the scan only multiplies decays <= 1.
#include <cmath>
#include <cstdint>
#include <vector>
#include <omp.h>

extern "C" {

void chanzoo_scan_fwd(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm, float* y,
                      float* hs, int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t groups, int64_t chunk,
                      int nthreads) {
  const int64_t n_chunks = (L + chunk - 1) / chunk;
  const int64_t dim_per_group = dim / groups;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t bd = 0; bd < batch * dim; ++bd) {
    const int64_t b = bd / dim, d = bd % dim, g = d / dim_per_group;
    const float* up = u + bd * L;
    const float* dp = delta + bd * L;
    const float* Bp = Bm + (b * groups + g) * L * N;
    const float* Cp = Cm + (b * groups + g) * L * N;
    const float* a = A + d * N;
    float* yp = y + bd * L;
    float* hsp = hs + bd * n_chunks * N;
    std::vector<float> h(N, 0.0f);
    for (int64_t t = 0; t < L; ++t) {
      if (t % chunk == 0) {
        float* dst = hsp + (t / chunk) * N;
        for (int64_t n = 0; n < N; ++n) dst[n] = h[n];
      }
      const float dt = dp[t], dtu = dt * up[t];
      const float* Bt = Bp + t * N;
      const float* Ct = Cp + t * N;
      float* hh = h.data();
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < N; ++n) {
        const float hn = std::exp(dt * a[n]) * hh[n] + dtu * Bt[n];
        hh[n] = hn;
        acc += hn * Ct[n];
      }
      yp[t] = acc;
    }
  }
}

// dB_partial and dC_partial are (nthreads, batch, groups, L, N) zero-filled buffers (each thread adds the
// contributions of its channels; the caller sums over the first axis); dA_partial is (batch, dim, N).
void chanzoo_scan_bwd(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                      const float* hs, const float* dy, float* du, float* ddelta, float* dA_partial,
                      float* dB_partial, float* dC_partial, int64_t batch, int64_t dim, int64_t L, int64_t N,
                      int64_t groups, int64_t chunk, int nthreads) {
  const int64_t n_chunks = (L + chunk - 1) / chunk;
  const int64_t dim_per_group = dim / groups;
  const int64_t bc_size = batch * groups * L * N;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    float* dBt_all = dB_partial + tid * bc_size;
    float* dCt_all = dC_partial + tid * bc_size;
    std::vector<float> hprev(chunk * N), decay(chunk * N), carry(N), dA_acc(N);
#pragma omp for schedule(static)
    for (int64_t bd = 0; bd < batch * dim; ++bd) {
      const int64_t b = bd / dim, d = bd % dim, g = d / dim_per_group;
      const float* up = u + bd * L;
      const float* dp = delta + bd * L;
      const float* dyp = dy + bd * L;
      const float* Bp = Bm + (b * groups + g) * L * N;
      const float* Cp = Cm + (b * groups + g) * L * N;
      float* dBp = dBt_all + (b * groups + g) * L * N;
      float* dCp = dCt_all + (b * groups + g) * L * N;
      const float* a = A + d * N;
      float* dup = du + bd * L;
      float* ddp = ddelta + bd * L;
      for (int64_t n = 0; n < N; ++n) carry[n] = 0.0f, dA_acc[n] = 0.0f;
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * chunk, t1 = (t0 + chunk < L) ? t0 + chunk : L;
        // Recompute the chunk's states from the saved state at its start.
        const float* h0 = hs + (bd * n_chunks + c) * N;
        for (int64_t n = 0; n < N; ++n) hprev[n] = h0[n];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t k = t - t0;
          const float dt = dp[t], dtu = dt * up[t];
          const float* Bt = Bp + t * N;
          float* hk = hprev.data() + k * N;
          float* ek = decay.data() + k * N;
          float* hnext = hprev.data() + (k + 1) * N;
          const bool last = (k + 1 == chunk);
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) {
            const float e = std::exp(dt * a[n]);
            ek[n] = e;
            if (!last) hnext[n] = e * hk[n] + dtu * Bt[n];
          }
        }
        // Reverse pass: carry = exp(delta_{t+1} A) * grad(h_{t+1}).
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t k = t - t0;
          const float dt = dp[t], ut = up[t], dtu = dt * ut, dyt = dyp[t];
          const float* Bt = Bp + t * N;
          const float* Ct = Cp + t * N;
          float* dBt = dBp + t * N;
          float* dCt = dCp + t * N;
          const float* hk = hprev.data() + k * N;
          const float* ek = decay.data() + k * N;
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
          dup[t] = du_acc * dt;
          ddp[t] = ddt_acc;
        }
      }
      float* dAp = dA_partial + bd * N;
      for (int64_t n = 0; n < N; ++n) dAp[n] = dA_acc[n];
    }
  }
}

}  // extern "C"
