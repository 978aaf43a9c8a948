// One routed expert's SwiGLU on a few rows, as an XLA:CPU FFI handler.
//
//   out[r, :] = (silu(x[r] @ Wg) * (x[r] @ Wu)) @ Wd    for r < count;  out[r, :] = 0 for r >= count
//
// Wg, Wu [D, F] and Wd [F, D] are the [layer, expert] blocks of the whole stacked weights
// ([L, E, D, F], [L, E, F, D]), addressed by pointer offset: no copy of the expert is made (XLA:CPU
// copies a dynamic slice of a stacked array before its dot). layer, expert and count are int32
// scalar buffers, so they can be traced values inside lax.scan / fori_loop.
//
// Why not XLA's dot: at 1-8 rows a decode step's matmuls are bound by reading the weights, and
// XLA:CPU's dots reach 25-45% of the streaming bandwidth there (docs/benchmarks.md). Here each
// weight matrix is streamed once, 8 weight rows at a time, and FMA'd into every row's accumulators
// (an L1-resident [rows, F-chunk] block); rows beyond 8 are handled in groups of 8.
//
// Threads (max_threads > 1; the Python side passes 1, measured faster on the shared 2-core host): F is
// split over XLA's intra-op pool. Each chunk computes its h columns and their
// contribution to out (a partial sum over F), so no barrier is needed until the final sum. Chunks
// are claimed from an atomic counter by the caller and the pool tasks alike; the caller only waits
// for chunks another thread has already started, so the call cannot deadlock on a busy pool.
//
// CPU features: the kernel is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the
// baseline (target_clones, chosen at load time), so one build runs on any x86-64 machine.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowGroup = 8;   // rows whose accumulators share one pass over the weights
constexpr int64_t kChunkAlign = 16;  // F chunk boundaries (floats): whole cache lines per weight row

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOEJAX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOEJAX_CLONES
#endif

// y[R, N] = x[R, K] @ w[K, N] (x row stride ldx, w row stride ldw, y dense). Weight rows are read
// 8 at a time and applied to all R rows while they sit in L1.
inline void rows_matmul(const float* __restrict x, int64_t ldx, int64_t R, const float* __restrict w,
                        int64_t ldw, int64_t K, int64_t N, float* __restrict y) {
  std::memset(y, 0, sizeof(float) * R * N);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const float* __restrict w0 = w + (k + 0) * ldw;
    const float* __restrict w1 = w + (k + 1) * ldw;
    const float* __restrict w2 = w + (k + 2) * ldw;
    const float* __restrict w3 = w + (k + 3) * ldw;
    const float* __restrict w4 = w + (k + 4) * ldw;
    const float* __restrict w5 = w + (k + 5) * ldw;
    const float* __restrict w6 = w + (k + 6) * ldw;
    const float* __restrict w7 = w + (k + 7) * ldw;
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + k;
      const float a0 = xr[0], a1 = xr[1], a2 = xr[2], a3 = xr[3];
      const float a4 = xr[4], a5 = xr[5], a6 = xr[6], a7 = xr[7];
      float* __restrict yr = y + r * N;
      for (int64_t j = 0; j < N; ++j) {
        yr[j] += ((a0 * w0[j] + a1 * w1[j]) + (a2 * w2[j] + a3 * w3[j])) +
                 ((a4 * w4[j] + a5 * w5[j]) + (a6 * w6[j] + a7 * w7[j]));
      }
    }
  }
  for (; k < K; ++k) {
    const float* __restrict wk = w + k * ldw;
    for (int64_t r = 0; r < R; ++r) {
      const float a = x[r * ldx + k];
      float* __restrict yr = y + r * N;
      for (int64_t j = 0; j < N; ++j) yr[j] += a * wk[j];
    }
  }
}

// exp(t) for t in [-88, 88]: Cody-Waite reduction to 2^n * exp(r), |r| <= ln2/2, degree-6
// polynomial (relative error ~1e-7); plain arithmetic, so the compiler vectorizes it.
inline float exp_approx(float t) {
  t = std::min(88.0f, std::max(-88.0f, t));
  const float n = std::nearbyint(t * 1.44269504088896341f);
  float r = t - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// One F chunk [f0, f1) for rows [0, R): part[R, D] = (silu(x @ Wg[:, f]) * (x @ Wu[:, f])) @ Wd[f, :].
MOEJAX_CLONES
void chunk(const float* x, int64_t R, int64_t D, int64_t F, const float* wg, const float* wu, const float* wd,
           int64_t f0, int64_t f1, float* part) {
  const int64_t Nf = f1 - f0;
  std::vector<float> g(kRowGroup * Nf), u(kRowGroup * Nf);
  for (int64_t r0 = 0; r0 < R; r0 += kRowGroup) {
    const int64_t Rg = std::min(kRowGroup, R - r0);
    rows_matmul(x + r0 * D, D, Rg, wg + f0, F, D, Nf, g.data());
    rows_matmul(x + r0 * D, D, Rg, wu + f0, F, D, Nf, u.data());
    float* __restrict gp = g.data();
    const float* __restrict up = u.data();
    for (int64_t i = 0; i < Rg * Nf; ++i) {
      const float a = gp[i];
      gp[i] = a / (1.0f + exp_approx(-a)) * up[i];
    }
    rows_matmul(g.data(), Nf, Rg, wd + f0 * D, D, Nf, D, part + r0 * D);
  }
}

struct Work {
  const float* x;
  int64_t R, D, F;
  const float* wg;
  const float* wu;
  const float* wd;
  int64_t chunks, chunk_f;
  float* out;                  // chunk 0's partial sum (the output itself)
  std::vector<float> scratch;  // chunks 1.. partial sums, [chunks - 1, R, D]
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void run() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t f0 = i * chunk_f, f1 = std::min(F, f0 + chunk_f);
      chunk(x, R, D, F, wg, wu, wd, f0, f1, i == 0 ? out : scratch.data() + (i - 1) * R * D);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error ExpertSwigluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wg,
                            ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd, ffi::Buffer<ffi::S32> layer,
                            ffi::Buffer<ffi::S32> expert, ffi::Buffer<ffi::S32> count,
                            ffi::ResultBuffer<ffi::F32> out, int64_t max_threads) {
  const auto xd = x.dimensions(), gd = wg.dimensions(), ud = wu.dimensions(), dd = wd.dimensions();
  if (xd.size() != 2 || gd.size() != 4 || ud.size() != 4 || dd.size() != 4) {
    return ffi::Error::InvalidArgument("expert_swiglu: x must be [C, D] and weights [L, E, ., .]");
  }
  const int64_t C = xd[0], D = xd[1], L = gd[0], E = gd[1], F = gd[3];
  for (int i = 0; i < 4; ++i) {
    if (ud[i] != gd[i]) return ffi::Error::InvalidArgument("expert_swiglu: wg and wu shapes differ");
  }
  if (gd[2] != D || dd[0] != L || dd[1] != E || dd[2] != F || dd[3] != D) {
    return ffi::Error::InvalidArgument("expert_swiglu: wg [L, E, D, F], wd [L, E, F, D] expected");
  }
  // Indices clamp like XLA's dynamic_slice; count clamps to [0, C].
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  const int64_t e = std::clamp<int64_t>(expert.typed_data()[0], 0, E - 1);
  const int64_t R = std::clamp<int64_t>(count.typed_data()[0], 0, C);
  float* y = out->typed_data();
  std::memset(y + R * D, 0, sizeof(float) * (C - R) * D);
  if (R == 0) return ffi::Error::Success();

  const int64_t block = (l * E + e) * D * F;
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->R = R, work->D = D, work->F = F;
  work->wg = wg.typed_data() + block, work->wu = wu.typed_data() + block, work->wd = wd.typed_data() + block;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(max_threads, pool.num_threads()));
  threads = std::min(threads, std::max<int64_t>(1, F / (4 * kChunkAlign)));  // chunks of >= 64 columns
  work->chunk_f = (F + threads - 1) / threads;
  work->chunk_f = (work->chunk_f + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  work->chunks = (F + work->chunk_f - 1) / work->chunk_f;
  work->out = y;
  work->scratch.resize((work->chunks - 1) * R * D);
  for (int64_t t = 1; t < work->chunks; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  for (int64_t i = 1; i < work->chunks; ++i) {
    const float* __restrict p = work->scratch.data() + (i - 1) * R * D;
    for (int64_t j = 0; j < R * D; ++j) y[j] += p[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxExpertSwiglu, ExpertSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [C, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wg [L, E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wu [L, E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wd [L, E, F, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count []
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [C, D]
                                  .Attr<int64_t>("max_threads"));
