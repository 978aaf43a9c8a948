// Native CPU kernels for moejax, as XLA:CPU FFI handlers (loaded by moejax/native/__init__.py).
//
// moejax_moe_swiglu: one MoE layer's routed experts, all of them in one call:
//
//   y[m] = sum over the k routes (e, g) of token m with e a local expert:  g * SwiGLU_e(x[m])
//   SwiGLU_e(v) = (silu(v @ Wg[layer, e]) * (v @ Wu[layer, e])) @ Wd[layer, e]
//
// reading each routed expert's weights once, in place in the stacked [L, E, D, F] / [L, E, F, D]
// arrays (no slice copy), on exactly the rows routed to it (no row-capacity padding), on XLA's
// intra-op threads. It replaces the "loop" dispatch's per-expert XLA dots on CPU in float32:
// XLA:CPU's dots reach 25-50% of the streaming bandwidth at 2-8 rows, copy the expert's slice out of the
// stacked array first, and the loop pads each expert to a power-of-two row count (up to 2x the FLOPs in
// prefill) (docs/benchmarks.md).
//
// moejax_matmul: y[R, N] = x[R, K] @ w[layer] for w [L, K, N], on the same micro-kernel, columns
// split over the threads: a layer's projection read in place in its stacked array (XLA:CPU copies
// a dynamic slice of a stacked array before its dot).
//
// moejax_paged_attention: causal GQA of new queries over a paged KV cache, the pages read in place
// (no gather of the row's whole page window, no masking copies): each query reads exactly the keys
// at positions it may see, in its own pages (the isolation invariant of moejax/model/attention.py).
// A page id the queries would read outside the pool is an error (InvalidArgument), not clamped.
//
// moejax_argmax: per row of logits, the first maximum (jnp.argmax: the first NaN if any) and whether
// the row is all finite, in one vectorized pass (the XLA path, moejax/model/layers.py, reads each row at
// least twice: a max, then the least index of its hits).
//
// Work of moejax_moe_swiglu: (caller) a counting sort of the (token, route) pairs by local expert, stable in
// token order; then phases separated by a barrier (no locks; see Job), items claimed by the caller and the pool:
//   0. items (pair block): the pairs' rows gathered into X [N, D].
//   1. items (expert, F chunk): H[pairs of e, chunk] = silu(X_e @ Wg[:, chunk]) * (X_e @ Wu[:, chunk]),
//      the experts with the most rows first.
//   2. items (expert, D chunk): O[pairs of e, chunk] = H_e @ Wd[:, chunk].
//   3. items (token block): y[token] = sum of gate * O[pair] over the token's pairs in expert order.
// Deterministic within one ISA variant (below), in every kernel: an output element is one fixed sequence of
// operations whatever the batch holds, how the columns are split, or which thread ran it (rows are
// independent; a column is in a whole vector or in `tail`, the same arithmetic, by its index alone; a token's
// routes are summed in expert order), so a request's tokens do not depend on the other requests in flight; a
// NaN row stays in its own row. tests/test_native.py checks this bitwise for every variant the host runs.
// Across variants, see "ISA variants".
//
// Element types: every kernel takes float32 or bfloat16 operands (one handler per kernel, dispatching on the
// buffers' type: ffi::AnyBuffer), all of one type. bfloat16 values are widened to float32 as they are loaded
// (`load`, `widen`: exact, a 16-bit shift) and everything runs in float32 on the same micro-kernel (the weights'
// element type is a template parameter of the register tile; x is widened into a float copy, tiny next to the
// weights); each output element is rounded once to bfloat16 (`narrow`: to nearest even, as XLA's convert). So a
// bfloat16 call is the float32 kernel on the widened operands, rounded, bit for bit, on the v4, v3 and baseline
// variants. Decode reads half the weight bytes (bench-moe-100m, one AVX-512 host: 1.7-1.9x the float32 kernels at
// 1-32 rows); prefill packs widened float32 panels and runs at the float32 kernels' speed. The avx512bf16 variant
// replaces the bf16 gemm by AVX512_BF16 dot products (namespace dp, below: twice the multiply-adds per
// instruction, float32 accumulation, not the float32 kernel's bits).
//
// int8 weights (moejax.quant's "int8", moejax_matmul_int8 and moejax_moe_swiglu_int8): the weights' element type
// int8, widened as loaded (`load`: vpmovsxbd + vcvtdq2ps, exact) on the same micro-kernel; one float32 scale per
// output column multiplied into the float32 sums once after the last K block (`scale_columns`; in the MoE layer
// before SiLU and before the gate), then the output rounded into x's type. Values and scales read in place
// ([L, K, N] / [L, 1, N]; experts [L, E, D, F] / [L, E, 1, F]), scales in x's type (bfloat16: widened per call).
//
// Micro-kernel: a register tile of R rows x NV vectors of W floats over a K block; per k, NV weight
// vectors loaded once and multiply-added into every row. At most kPackRows rows (decode), the weights are
// streamed in place; above, GotoBLAS-style packed weight panels (gemm_packed), the next one prefetched while
// the current one is used. GCC vector extensions.
//
// ISA variants (a fourth, avx512bf16, is v4 with dp::gemm for bf16 operands; see "bf16 dot products"): all of the
// vector code is compiled three times (MOEJAX_VARIANT): for x86-64-v4
// (AVX-512: W = 16, R <= 8), x86-64-v3 (AVX2 + FMA: W = 8, R <= 6) and the x86-64 baseline (SSE2: the
// x86-64-v3 code, W = 8, R <= 6, on SSE registers, each vector two of them, so its larger tiles spill, and
// no FMA: products rounded before they are added; the fallback for a CPU without AVX2, not tuned). One build
// runs on any x86-64 machine. The variant is chosen for the whole process (MoejaxIsaSelect: moejax/native's
// MOEJAX_NATIVE_ISA, else the best this CPU runs), so tests run each one the host can. Across variants: a
// gemm element (matmul, the MoE layer) is one FMA chain in k order on x86-64-v4 and x86-64-v3 alike, the same
// bits; attention's query-key dots are summed in trees of 16 lanes on x86-64-v4 and of 8 on x86-64-v3
// (hsums), and the baseline rounds each product before adding it, so those differ in the last bits
// (tests/test_native_isa.py).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOEJAX_X86_VARIANTS 1  // the x86-64-v4 and x86-64-v3 variants (GCC's target attribute and cpu tests)
#else
#define MOEJAX_X86_VARIANTS 0
#endif
#define MOEJAX_INLINE inline __attribute__((always_inline))

// Vectors of W floats: W = 16 in the x86-64-v4 variant (one AVX-512 register, 32 of them), W = 8 in the
// others (one AVX2 register, 16 of them, in x86-64-v3; two SSE registers in the baseline). Every routine that
// holds vectors is a template on W, and each variant instantiates it with its own W; a 16-float vector on AVX2
// is split into pieces and its register tile spills (measured: 6-7 GFLOP/s at every row count, 2026-12-03).
template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(W * 4)));
  typedef int32_t i __attribute__((vector_size(W * 4)));
  typedef uint32_t u __attribute__((vector_size(W * 4)));
  typedef uint16_t h __attribute__((vector_size(W * 2)));  // W bf16
};

constexpr int64_t kV = 64;        // column granularity of work items: a multiple of every W, so only a
                                  // matrix's last N % W columns run `tail`, however the columns are split
constexpr int64_t kChunk = 128;   // matmul: columns per work item, between half and 4x this (a multiple of kV)
// One row tile is bound by reading the weights: a short K block keeps all of a chunk's lines of a
// few weight rows in flight together (measured on bench-moe-100m shapes at 32 tokens: 1.34 -> 1.0 ms
// per layer, 2026-12-01), and each tile prefetches its lines one K block ahead, so the next block is
// on its way while a block's row tiles (4 + 4 rows for 8 rows on AVX2, tile_rows) run: 8 rows over 84 MB of
// expert weights 17-20 -> 11.5-12.4 ms on one AVX2 core against 16 rows ahead (2026-12-03).
constexpr int64_t kFewRowsKBlock = 32;
constexpr int64_t kPrefetchRows = kFewRowsKBlock;
// Those prefetches go to L2, not L1 (prefetcht2, not prefetcht0). A MoE layer of bench-moe-100m x 8 layers, weights
// from memory, 2-vCPU Zen 5, 2 / 8 tokens: avx512bf16 2.95-3.4 -> 1.6-1.8 / 6.1-6.4 -> 3.9-4.7 ms; v4 float32 at 1 / 8
// tokens 2.5-3.0 -> 2.0-2.5 / 11.8-13.2 -> 8.4-8.6 ms (prefetcht1 about the same; prefetchnta, none slower), 2026-12-06.
constexpr int kPrefetchLocality = 1;
// Above kPackRows rows: packed weight panels of [kGemmKBlock, kGemmColTiles register tiles wide]
// (gemm_packed); at most, the weights streamed in place (gemm_few). MoE layer of bench-moe-100m from
// memory, two AVX-512 threads, 64 / 96 / 128 tokens (16-32 rows per expert): packing above 8 rows
// 1.29-1.31 / 1.76-1.79 / 1.94-2.31 ms, above 32 rows 1.11-1.15 / 1.43-1.44 / 1.79-1.90; at 192 and 256
// tokens within noise of each other (2026-12-03).
constexpr int64_t kPackRows = 32;
// MoE gather and combine: rows per work item; routes per token at most.
constexpr int64_t kRowsPerItem = 64;
constexpr int64_t kMaxRoutes = 64;
constexpr int64_t kGemmKBlock = 256;
constexpr int64_t kGemmColTiles = 4;

// Rows per register tile: R rows x NV(R) vectors of accumulators, plus NV weight vectors and (AVX2) one
// broadcast, fit the register file (32 vectors at W = 16, where the FMA broadcasts from memory; 16 at
// W = 8 on AVX2; the baseline's SSE registers hold half a vector each, so its tiles spill).
template <int W>
constexpr int64_t kRowsOf = W == 16 ? 8 : 6;
// Rows per register tile of the packed path (gemm_packed): 6 x 4 vectors at W = 16 (the column
// tile, 64 floats, divides the usual model widths), 6 x 2 at W = 8.
constexpr int64_t kPackedRows = 6;

template <int W, int R>
constexpr int kVectorsOf = W == 16 ? (R <= 3 ? 8 : R == 4 ? 6 : R <= 6 ? 4 : 3)
                                   : (R == 1 ? 6 : R == 2 ? 4 : R == 3 ? 3 : 2);

// bfloat16, as its bits (XLA FFI's BF16 native type). Every kernel is a template on the element type T of its
// operands, float or bf16; the arithmetic is float32 on the values widened exactly (`widen`, `load`: a 16-bit
// shift), each output element rounded once to bf16 (`narrow`).
typedef uint16_t bf16;

template <int W>
MOEJAX_INLINE typename Vec<W>::f load(const float* p) {
  typename Vec<W>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// W bf16 values widened to float32: zero-extended to 32 bits and shifted into the high half (vpmovzxwd +
// vpslld), exact.
template <int W>
MOEJAX_INLINE typename Vec<W>::f load(const bf16* p) {
  typename Vec<W>::h h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<typename Vec<W>::f>(__builtin_convertvector(h, typename Vec<W>::u) << 16);
}
// W int8 weights widened to float32: sign-extended to 32 bits and converted (vpmovsxbd + vcvtdq2ps), exact. Written
// as a loop into int32 lanes, which GCC turns into one vpmovsxbd from memory; `__builtin_convertvector` from an
// int8 vector was compiled lane by lane (movsbl + inserts: the int8 kernels ran at 0.3-0.5x float32's speed).
template <int W>
MOEJAX_INLINE typename Vec<W>::f load(const int8_t* p) {
  int32_t wide[W];
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) wide[i] = p[i];
  typename Vec<W>::i v;
  std::memcpy(&v, wide, sizeof v);
  return __builtin_convertvector(v, typename Vec<W>::f);
}
template <int W>
MOEJAX_INLINE void store(float* p, typename Vec<W>::f v) {
  std::memcpy(p, &v, sizeof v);
}

MOEJAX_INLINE float widen(float v) { return v; }
MOEJAX_INLINE float widen(int8_t v) { return static_cast<float>(v); }
MOEJAX_INLINE float widen(bf16 h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// float32 -> bfloat16, round to nearest even (as XLA's convert); a NaN becomes the quiet NaN of its sign.
MOEJAX_INLINE bf16 narrow(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>(((bits >> 16) & 0x8000u) | 0x7fc0u);
  return static_cast<bf16>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// out[0, n) = in[0, n) in T: copied (float) or each rounded once (bf16).
template <typename T>
MOEJAX_INLINE void store_row(T* __restrict out, const float* __restrict in, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(out, in, sizeof(float) * n);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = narrow(in[j]);
  }
}

// in[0, n) widened into out (float: copied).
template <typename T>
MOEJAX_INLINE void widen_row(float* __restrict out, const T* __restrict in, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(out, in, sizeof(float) * n);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = widen(in[j]);
  }
}

// How a register tile reads its weights: in place (prefetching its own rows kPrefetchRows ahead),
// in place while copying them into a packed panel, or from a packed panel (prefetching another
// stream into L2: the next panel, see gemm_packed).
enum class Read { kInPlace, kPacking, kPacked };

// y[R, NV * W] (+)= x[R, K] @ w[K, NV * W]; acc reloaded from y when `accumulate` (a later K block).
// w's elements T (float or bf16, widened as loaded: the one micro-kernel for both). kPacking also stores the
// weights it reads, widened, into pack [K, NV * W]; kPacked prefetches one line at byte pf + k * pf_ld per k
// (none when pf is null).
template <int W, int R, int NV, Read How = Read::kInPlace, typename T = float>
MOEJAX_INLINE void tile(const float* __restrict x, int64_t ldx, const T* __restrict w, int64_t ldw, int64_t K,
                        float* __restrict y, int64_t ldy, bool accumulate, float* __restrict pack = nullptr,
                        const char* pf = nullptr, int64_t pf_ld = 0) {
  typedef typename Vec<W>::f vf;
  vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = accumulate ? load<W>(y + r * ldy + j * W) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict wk = w + k * ldw;
    vf wv[NV];
    if constexpr (How == Read::kPacked) {
      if (pf != nullptr) __builtin_prefetch(pf + k * pf_ld, 0, 2);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      if constexpr (How != Read::kPacked) {
        if (j * W * sizeof(T) % 64 == 0) {  // one per line
          __builtin_prefetch(wk + kPrefetchRows * ldw + j * W, 0, kPrefetchLocality);
        }
      }
      wv[j] = load<W>(wk + j * W);
      if constexpr (How == Read::kPacking) store<W>(pack + (k * NV + j) * W, wv[j]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // scalar * vector: one broadcast from memory (`vf{} + s` is an add the compiler must keep, as
      // -0.0 + 0.0 is +0.0; a shuffle or lane loop was built through a register: 2-3 uops per row).
      const float a = x[r * ldx + k];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] += a * wv[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store<W>(y + r * ldy + j * W, acc[r][j]);
}

// The last n < W columns (N not a multiple of W): the tiles' arithmetic on one zero-padded vector per row, so
// each element is the same sequence of multiply-adds as in a tile (fused or not as the tiles' are; a scalar
// loop here was compiled as products rounded, then added in order, against the tiles' FMAs).
template <int W, typename T>
MOEJAX_INLINE void tail(const float* __restrict x, int64_t ldx, int64_t R, const T* __restrict w, int64_t ldw,
                        int64_t K, int64_t n, float* __restrict y, int64_t ldy, bool accumulate) {
  typedef typename Vec<W>::f vf;
  for (int64_t r = 0; r < R; ++r) {
    vf acc{};
    for (int64_t j = 0; accumulate && j < n; ++j) acc[j] = y[r * ldy + j];
    for (int64_t k = 0; k < K; ++k) {
      vf wv{};
      for (int64_t j = 0; j < n; ++j) wv[j] = widen(w[k * ldw + j]);
      acc += x[r * ldx + k] * wv;
    }
    for (int64_t j = 0; j < n; ++j) y[r * ldy + j] = acc[j];
  }
}

// One row tile of R rows across N columns, one K block.
template <int W, int R, typename T>
MOEJAX_INLINE void row_tile(const float* x, int64_t ldx, const T* w, int64_t ldw, int64_t K, int64_t N,
                            float* y, int64_t ldy, bool acc) {
  constexpr int NV = kVectorsOf<W, R>;
  int64_t n = 0;
  for (; n + NV * W <= N; n += NV * W) tile<W, R, NV, Read::kInPlace, T>(x, ldx, w + n, ldw, K, y + n, ldy, acc);
  for (; n + W <= N; n += W) tile<W, R, 1, Read::kInPlace, T>(x, ldx, w + n, ldw, K, y + n, ldy, acc);  // the rest
  if (n < N) tail<W>(x, ldx, R, w + n, ldw, K, N - n, y + n, ldy, acc);
}

// Scratch that lives across calls on the calling thread (grown, never shrunk): large prefill
// buffers are not page-faulted in again every layer.
float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// The rows of the next register tile, at most `rows` per tile: the last two tiles share what is left
// between one and two tiles' rows (8 rows at 6 per tile: 4 + 4, not 6 + 2): a short tile does the
// same weight loads for fewer FMAs.
MOEJAX_INLINE int64_t tile_rows(int64_t left, int64_t rows) {
  return left > rows && left < 2 * rows ? (left + 1) / 2 : std::min(rows, left);
}

template <int W, typename T>
MOEJAX_INLINE void row_tiles(const float* x, int64_t ldx, int64_t R, const T* w, int64_t ldw, int64_t K,
                             int64_t N, float* y, int64_t ldy, bool acc) {
  constexpr int64_t rows = kRowsOf<W>;
  for (int64_t r0 = 0, n; r0 < R; r0 += n) {
    n = tile_rows(R - r0, rows);
    const float* xr = x + r0 * ldx;
    float* yr = y + r0 * ldy;
    switch (n) {
      case 8: row_tile<W, rows == 8 ? 8 : 1>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
      case 7: row_tile<W, rows == 8 ? 7 : 1>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
      case 6: row_tile<W, 6>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
      case 5: row_tile<W, 5>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
      case 4: row_tile<W, 4>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
      case 3: row_tile<W, 3>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
      case 2: row_tile<W, 2>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
      default: row_tile<W, 1>(xr, ldx, w, ldw, K, N, yr, ldy, acc); break;
    }
  }
}

// Few rows (decode, at most kPackRows): each K block's weight rows are streamed from memory once, in place, for every
// row tile while they sit in L1/L2.
template <int W, typename T>
MOEJAX_INLINE void gemm_few(const float* x, int64_t ldx, int64_t R, const T* w, int64_t ldw, int64_t K,
                            int64_t N, float* y, int64_t ldy) {
  for (int64_t k0 = 0; k0 < K; k0 += kFewRowsKBlock) {
    row_tiles<W>(x + k0, ldx, R, w + k0 * ldw, ldw, std::min(kFewRowsKBlock, K - k0), N, y, ldy, k0 > 0);
  }
}

// One row tile of n rows across a panel's register tiles: kPacking reads the weights in place from w
// and copies them into pack (each register tile's columns as [kb, NV * W]); kPacked reads pack and
// prefetches one line per k of pf (stride pf_ld) for each register tile t, at column offset t * TW.
// w and pf: the weights' elements T (kPacking reads w; the panel itself is float); pf_ld in bytes.
template <int W, int NV, Read How, typename T>
MOEJAX_INLINE void panel_row(const float* x, int64_t ldx, int64_t n, const T* w, int64_t ldw, float* pack,
                             int64_t kb, int64_t tiles, float* y, int64_t ldy, bool acc, const T* pf,
                             int64_t pf_ld) {
  constexpr int64_t TW = NV * W;
  typedef std::conditional_t<How == Read::kPacking, T, float> S;  // what the register tiles read
  for (int64_t t = 0; t < tiles; ++t) {
    float* pt = pack + t * kb * TW;
    const S* src;
    if constexpr (How == Read::kPacking) src = w + t * TW; else src = pt;
    const int64_t ld = How == Read::kPacking ? ldw : TW;
    const char* pft = pf == nullptr ? nullptr : reinterpret_cast<const char*>(pf + t * TW);
    float* yt = y + t * TW;
    switch (n) {
      case 6: tile<W, 6, NV, How, S>(x, ldx, src, ld, kb, yt, ldy, acc, pt, pft, pf_ld); break;
      case 5: tile<W, 5, NV, How, S>(x, ldx, src, ld, kb, yt, ldy, acc, pt, pft, pf_ld); break;
      case 4: tile<W, 4, NV, How, S>(x, ldx, src, ld, kb, yt, ldy, acc, pt, pft, pf_ld); break;
      case 3: tile<W, 3, NV, How, S>(x, ldx, src, ld, kb, yt, ldy, acc, pt, pft, pf_ld); break;
      case 2: tile<W, 2, NV, How, S>(x, ldx, src, ld, kb, yt, ldy, acc, pt, pft, pf_ld); break;
      default: tile<W, 1, NV, How, S>(x, ldx, src, ld, kb, yt, ldy, acc, pt, pft, pf_ld); break;
    }
  }
}

// Many rows (prefill): GotoBLAS blocking. Each [kb, cols] weight panel is copied once into a
// contiguous buffer, one register tile's columns after another ([tile][k][NV * W]), and used there by
// every row tile of all R rows: the tiles read it sequentially from L2, whatever the row stride of w
// (a power-of-two stride maps a panel's rows onto a few cache sets: 512-float rows ran at 190 against
// 228 GFLOP/s for 576 on one AVX-512 core, 2026-12-03). Columns past the last whole register tile
// run in place.
template <int W, typename T>
MOEJAX_INLINE void gemm_packed(const float* x, int64_t ldx, int64_t R, const T* w, int64_t ldw, int64_t K,
                               int64_t N, float* y, int64_t ldy) {
  constexpr int NV = kVectorsOf<W, kPackedRows>;
  constexpr int64_t TW = NV * W;
  const int64_t full = N / TW * TW;
  thread_local std::vector<float> pbuf;
  float* pack = scratch(pbuf, kGemmKBlock * kGemmColTiles * TW);
  // Cache lines per weight row of a register tile (bf16 at W = 8: half a line, the next tile's other half).
  constexpr int64_t kLines = std::max<int64_t>(1, TW * sizeof(T) / 64);
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t c0 = 0; c0 < full; c0 += kGemmColTiles * TW) {
    const int64_t tiles = std::min(kGemmColTiles * TW, full - c0) / TW;
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKBlock) {
      const int64_t kb = std::min(kGemmKBlock, K - k0);
      const bool acc = k0 > 0;
      // The next panel, prefetched into L2 by the row tiles after the first, one line per k each
      // (row tile i fetches line i of every row: the panel is in flight after kLines row tiles):
      // the first row tile then packs from L2 instead of waiting on memory (one AVX-512 core, a MoE
      // layer of bench-moe-100m at 256 tokens, weights from memory: 152 -> 189 GFLOP/s; the same
      // expert's weights every time, cache-resident: 195-220).
      const T* next = k0 + kb < K ? w + (k0 + kb) * ldw + c0
                          : c0 + kGemmColTiles * TW < full ? w + c0 + kGemmColTiles * TW : nullptr;
      const int64_t first = tile_rows(R, kPackedRows);  // the first row tile packs the panel as it reads it
      panel_row<W, NV, Read::kPacking, T>(x + k0, ldx, first, w + k0 * ldw + c0, ldw, pack, kb, tiles, y + c0,
                                          ldy, acc, nullptr, 0);
      int64_t i = 0;
      for (int64_t r0 = first, n; r0 < R; r0 += n, ++i) {
        n = tile_rows(R - r0, kPackedRows);
        const T* pf = next != nullptr && i < kLines ? next + i * kLine : nullptr;
        panel_row<W, NV, Read::kPacked, T>(x + r0 * ldx + k0, ldx, n, nullptr, 0, pack, kb, tiles,
                                           y + r0 * ldy + c0, ldy, acc, pf, ldw * sizeof(T));
      }
    }
  }
  if (full < N) {
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKBlock) {
      row_tiles<W>(x + k0, ldx, R, w + k0 * ldw + full, ldw, std::min(kGemmKBlock, K - k0), N - full, y + full,
                   ldy, k0 > 0);
    }
  }
}

template <int W, typename T>
MOEJAX_INLINE void gemm_w(const float* x, int64_t ldx, int64_t R, const T* w, int64_t ldw, int64_t K,
                          int64_t N, float* y, int64_t ldy) {
  if (K == 0) {
    for (int64_t r = 0; r < R; ++r) std::memset(y + r * ldy, 0, sizeof(float) * N);
  } else if (R <= kPackRows) {
    gemm_few<W>(x, ldx, R, w, ldw, K, N, y, ldy);
  } else {
    gemm_packed<W>(x, ldx, R, w, ldw, K, N, y, ldy);
  }
}

// ---- bf16 dot products: the "avx512bf16" variant's bf16 gemm (AVX512_BF16's vdpbf16ps) ----
//
// y[R, N] = x[R, K] @ w[K, N] with x rounded to bf16 (x comes in float32: exact for a bf16 call's own operands,
// rounded once for the MoE layer's float32 hidden activations, as a bf16 model computes them) and w bf16:
// vdpbf16ps multiplies two bf16 pairs per float32 lane and adds both products into the lane (16 lanes, 32
// products per instruction: twice an FMA's), so a k pair (x[r, 2kk], x[r, 2kk + 1]) is broadcast to every lane
// and the weights of 16 columns at rows 2kk and 2kk + 1 are interleaved into one register: in registers as they
// are read in place (few rows: two loads and two vpermt2w per 32 columns, shared by the tile's rows), or once
// into a packed panel (many rows). Every element is the same chain whatever the rows, columns or path: y's
// column j starts at 0 and takes the k pairs in order (an odd K's last pair is (x, 0) . (w, 0)), across K blocks
// through y (a float32 store and load: exact). Deterministic and rows independent as the other kernels; not the
// float32 kernel's bits (each pair of products is added by the instruction: AVX512_BF16 flushes denormals).
#if MOEJAX_X86_VARIANTS
#define MOEJAX_DP __attribute__((target("arch=x86-64-v4,avx512bf16"))) inline __attribute__((always_inline))
namespace dp {

constexpr int64_t kFewRows = 8;     // rows per register tile, few rows (in place)

constexpr int64_t kPackedRowsDp = 6;  // rows per register tile from a packed panel: 6 x 4 vectors
constexpr int64_t kPanelPairs = 128;  // k pairs per packed panel (256 k)
constexpr int64_t kPanelTiles = 4;    // 64-column register tiles per packed panel

// The column interleave of rows a (k even) and b (k odd), 32 columns each: lo = columns 0-15, hi = 16-31, each
// column's pair (a, b) in one 32-bit lane.
MOEJAX_DP __m512i interleave_lo(__m512i a, __m512i b) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(a, idx, b);
}
MOEJAX_DP __m512i interleave_hi(__m512i a, __m512i b) {
  const __m512i idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                       22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  return _mm512_permutex2var_epi16(a, idx, b);
}

// 32 columns of row k (n < 32: the first n, the rest 0), or zeros where the row is past K.
template <bool Masked>
MOEJAX_DP __m512i row32(const bf16* p, bool present, __mmask32 mask) {
  if (!present) return _mm512_setzero_si512();
  if constexpr (Masked) return _mm512_maskz_loadu_epi16(mask, p); else return _mm512_loadu_si512(p);
}

// Register tile: R rows x NP groups of 32 columns (2 NP vectors) over the k pairs [0, KP) of a K block of K
// rows (K = 2 KP, or 2 KP - 1: the last pair's second row absent). In place (Packed false): w [K, ldw] bf16,
// Masked: only the first n < 32 columns (NP 1). Packed: w the panel, per k pair 2 NP vectors of 16 interleaved
// columns. xp: the rows' k pairs (stride ldp, in 32-bit pairs). acc reloaded from y when `accumulate`.
template <int R, int NP, bool Packed, bool Masked = false>
MOEJAX_DP void tile(const uint32_t* __restrict xp, int64_t ldp, const bf16* __restrict w, int64_t ldw, int64_t K,
                    float* __restrict y, int64_t ldy, bool accumulate, int64_t n = 32) {
  constexpr int NV = 2 * NP;
  const int64_t KP = (K + 1) / 2;
  const __mmask32 mask = Masked ? static_cast<__mmask32>((uint64_t{1} << n) - 1) : ~__mmask32{0};
  const __mmask16 mlo = static_cast<__mmask16>(mask), mhi = static_cast<__mmask16>(mask >> 16);
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      if (!accumulate) {
        acc[r][j] = _mm512_setzero_ps();
      } else if constexpr (Masked) {
        acc[r][j] = _mm512_maskz_loadu_ps(j == 0 ? mlo : mhi, y + r * ldy + j * 16);
      } else {
        acc[r][j] = _mm512_loadu_ps(y + r * ldy + j * 16);
      }
    }
  for (int64_t kk = 0; kk < KP; ++kk) {
    __m512i wv[NV];
    if constexpr (Packed) {
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(w + (kk * NV + j) * 32);
    } else {
      const bf16* w0 = w + 2 * kk * ldw;
      const bool odd = 2 * kk + 1 < K;
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        // One line of each row per 32 columns, a K block ahead, into L2 (kPrefetchLocality).
        __builtin_prefetch(w0 + kPrefetchRows * ldw + p * 32, 0, kPrefetchLocality);
        __builtin_prefetch(w0 + (kPrefetchRows + 1) * ldw + p * 32, 0, kPrefetchLocality);
        const __m512i a = row32<Masked>(w0 + p * 32, true, mask), b = row32<Masked>(w0 + ldw + p * 32, odd, mask);
        wv[2 * p] = interleave_lo(a, b), wv[2 * p + 1] = interleave_hi(a, b);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * ldp + kk]));
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, (__m512bh)wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      if constexpr (Masked) {
        _mm512_mask_storeu_ps(y + r * ldy + j * 16, j == 0 ? mlo : mhi, acc[r][j]);
      } else {
        _mm512_storeu_ps(y + r * ldy + j * 16, acc[r][j]);
      }
    }
}

// One row tile of R rows across N columns, one K block, weights in place.
template <int R>
MOEJAX_DP void row_tile(const uint32_t* xp, int64_t ldp, const bf16* w, int64_t ldw, int64_t K, int64_t N, float* y,
                        int64_t ldy, bool acc) {
  constexpr int NP = R <= 2 ? 4 : R <= 4 ? 2 : 1;
  int64_t n = 0;
  for (; n + NP * 32 <= N; n += NP * 32) tile<R, NP, false>(xp, ldp, w + n, ldw, K, y + n, ldy, acc);
  for (; n + 32 <= N; n += 32) tile<R, 1, false>(xp, ldp, w + n, ldw, K, y + n, ldy, acc);
  if (n < N) tile<R, 1, false, true>(xp, ldp, w + n, ldw, K, y + n, ldy, acc, N - n);
}

MOEJAX_DP void row_tiles(const uint32_t* xp, int64_t ldp, int64_t R, const bf16* w, int64_t ldw, int64_t K, int64_t N,
                         float* y, int64_t ldy, bool acc) {
  for (int64_t r0 = 0, n; r0 < R; r0 += n) {
    n = tile_rows(R - r0, kFewRows);
    const uint32_t* xr = xp + r0 * ldp;
    float* yr = y + r0 * ldy;
    switch (n) {
      case 8: row_tile<8>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
      case 7: row_tile<7>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
      case 6: row_tile<6>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
      case 5: row_tile<5>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
      case 4: row_tile<4>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
      case 3: row_tile<3>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
      case 2: row_tile<2>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
      default: row_tile<1>(xr, ldp, w, ldw, K, N, yr, ldy, acc); break;
    }
  }
}

// The panel of K rows (K <= 2 kPanelPairs) x `tiles` 64-column tiles of w, interleaved: tile t at
// pack + t * KP * 128, per k pair 4 vectors (columns 0-15, 16-31, 32-47, 48-63 of the tile).
MOEJAX_DP void pack_panel(const bf16* w, int64_t ldw, int64_t K, int64_t tiles, bf16* pack) {
  const int64_t KP = (K + 1) / 2;
  for (int64_t kk = 0; kk < KP; ++kk) {
    const bf16* w0 = w + 2 * kk * ldw;
    const bool odd = 2 * kk + 1 < K;
    __builtin_prefetch(w0 + 16 * ldw);
    __builtin_prefetch(w0 + 17 * ldw);
    for (int64_t t = 0; t < tiles; ++t) {
      bf16* dst = pack + (t * KP + kk) * 128;
      for (int h = 0; h < 2; ++h) {
        const __m512i a = row32<false>(w0 + t * 64 + h * 32, true, 0);
        const __m512i b = row32<false>(w0 + ldw + t * 64 + h * 32, odd, 0);
        _mm512_storeu_si512(dst + h * 64, interleave_lo(a, b));
        _mm512_storeu_si512(dst + h * 64 + 32, interleave_hi(a, b));
      }
    }
  }
}

MOEJAX_DP void gemm(const float* x, int64_t ldx, int64_t R, const bf16* w, int64_t ldw, int64_t K, int64_t N, float* y,
                    int64_t ldy) {
  if (K == 0) {
    for (int64_t r = 0; r < R; ++r) std::memset(y + r * ldy, 0, sizeof(float) * N);
    return;
  }
  // x's rows as bf16 k pairs (the last pair of an odd K: (x, 0)).
  const int64_t ldp = (K + 1) / 2;
  thread_local std::vector<uint32_t> pbuf;
  if (static_cast<int64_t>(pbuf.size()) < R * ldp) pbuf.resize(R * ldp);
  uint32_t* xp = pbuf.data();
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t kk = 0; kk < ldp; ++kk) {
      const uint32_t lo = narrow(xr[2 * kk]), hi = 2 * kk + 1 < K ? narrow(xr[2 * kk + 1]) : 0;
      xp[r * ldp + kk] = lo | hi << 16;
    }
  }
  if (R <= kPackRows) {  // few rows: each K block of weight rows read in place, by every row tile
    for (int64_t k0 = 0; k0 < K; k0 += kFewRowsKBlock) {
      row_tiles(xp + k0 / 2, ldp, R, w + k0 * ldw, ldw, std::min(kFewRowsKBlock, K - k0), N, y, ldy, k0 > 0);
    }
    return;
  }
  // Many rows: panels of [2 kPanelPairs rows, kPanelTiles x 64 columns] packed once, read by every row tile.
  constexpr int64_t TW = 64, KB = 2 * kPanelPairs;
  const int64_t full = N / TW * TW;
  thread_local std::vector<bf16> packbuf;
  if (static_cast<int64_t>(packbuf.size()) < KB * kPanelTiles * TW) packbuf.resize(KB * kPanelTiles * TW);
  bf16* pack = packbuf.data();
  for (int64_t c0 = 0; c0 < full; c0 += kPanelTiles * TW) {
    const int64_t tiles = std::min(kPanelTiles * TW, full - c0) / TW;
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min(KB, K - k0), KP = (kb + 1) / 2;
      pack_panel(w + k0 * ldw + c0, ldw, kb, tiles, pack);
      for (int64_t r0 = 0, n; r0 < R; r0 += n) {
        n = tile_rows(R - r0, kPackedRowsDp);
        const uint32_t* xr = xp + r0 * ldp + k0 / 2;
        for (int64_t t = 0; t < tiles; ++t) {
          const bf16* pt = pack + t * KP * 128;
          float* yt = y + r0 * ldy + c0 + t * TW;
          switch (n) {
            case 6: tile<6, 2, true>(xr, ldp, pt, 0, kb, yt, ldy, k0 > 0); break;
            case 5: tile<5, 2, true>(xr, ldp, pt, 0, kb, yt, ldy, k0 > 0); break;
            case 4: tile<4, 2, true>(xr, ldp, pt, 0, kb, yt, ldy, k0 > 0); break;
            case 3: tile<3, 2, true>(xr, ldp, pt, 0, kb, yt, ldy, k0 > 0); break;
            case 2: tile<2, 2, true>(xr, ldp, pt, 0, kb, yt, ldy, k0 > 0); break;
            default: tile<1, 2, true>(xr, ldp, pt, 0, kb, yt, ldy, k0 > 0); break;
          }
        }
      }
    }
  }
  if (full < N) {
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      row_tiles(xp + k0 / 2, ldp, R, w + k0 * ldw + full, ldw, std::min(KB, K - k0), N - full, y + full, ldy, k0 > 0);
    }
  }
}

}  // namespace dp
#undef MOEJAX_DP
#endif

// exp(t): Cody-Waite reduction to 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial: relative error under 1e-7
// for t in [-87, 88]; t is clamped to [-88, 88], and below about -87.7 (exp(t) subnormal) the result is 0.
// Plain arithmetic, so the compiler vectorizes it. NaN stays NaN.
MOEJAX_INLINE float exp_approx(float t) {
  t = t < -88.0f ? -88.0f : t;
  t = t > 88.0f ? 88.0f : t;
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

// y[R, N] = x[R, K] @ w[K, N] (row strides ldx, ldw, ldy), float x and y, weights T: one variant's gemm_w.
template <typename T>
using GemmFn = void (*)(const float* x, int64_t ldx, int64_t R, const T* w, int64_t ldw, int64_t K, int64_t N,
                        float* y, int64_t ldy);
// Columns [f0, f0 + nf) of the MoE hidden activations (up_item), weights T; sg, su: int8 weights' scales.
template <typename T>
using UpFn = void (*)(const float* X, int64_t rows, int64_t D, int64_t F, const T* wg, const T* wu, int64_t f0,
                      int64_t nf, float* H, const float* sg, const float* su);

// y[r, j] *= scale[j] for r < R, j < n (row stride ldy): an int8 weight's per-output-column scale on the float32
// sums, once, after the last K block (one rounding: the same bits on every variant).
MOEJAX_INLINE void scale_columns(float* __restrict y, int64_t ldy, int64_t R, int64_t n,
                                 const float* __restrict scale) {
  for (int64_t r = 0; r < R; ++r) {
    float* __restrict yr = y + r * ldy;
    for (int64_t j = 0; j < n; ++j) yr[j] *= scale[j];
  }
}

// Columns [f0, f0 + nf) of H [rows, F]: silu(X @ wg) * (X @ wu) on those columns of wg and wu [D, F] (X [rows, D]).
// Quantized weights (int8): sg, su [F] their per-column scales, applied to the float32 sums before the
// activation (null: none).
template <typename T>
MOEJAX_INLINE void up_item(GemmFn<T> gemm, const float* X, int64_t rows, int64_t D, int64_t F, const T* wg,
                           const T* wu, int64_t f0, int64_t nf, float* H, const float* sg, const float* su) {
  thread_local std::vector<float> gbuf, ubuf;
  float* g = scratch(gbuf, rows * nf);
  float* u = scratch(ubuf, rows * nf);
  gemm(X, D, rows, wg + f0, F, D, nf, g, nf);
  gemm(X, D, rows, wu + f0, F, D, nf, u, nf);
  if (sg != nullptr) {
    scale_columns(g, nf, rows, nf, sg + f0);
    scale_columns(u, nf, rows, nf, su + f0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict h = H + r * F + f0;
    const float* __restrict gr = g + r * nf;
    const float* __restrict ur = u + r * nf;
    for (int64_t j = 0; j < nf; ++j) h[j] = gr[j] / (1.0f + exp_approx(-gr[j])) * ur[j];
  }
}

// The lanes of v[0], ..., v[W - 1] summed per vector: lane j of the result is the sum of v[j]'s
// lanes as a tree of halves (lane t + lane t + W/2, then t + W/4, ...: one fixed order for a given W, so a
// variant gives the same sums on every run and thread; W = 16 and W = 8 are different trees, so x86-64-v4's
// sums differ from the other variants' in the last bits), all W vectors together: one shuffle pair and one
// add per two vectors per level, where reducing each vector alone takes log2(W) dependent shuffle + add steps.
template <int W>
MOEJAX_INLINE typename Vec<W>::f hsums(typename Vec<W>::f* v) {
  typedef typename Vec<W>::i vi;
  for (int m = 1; m < W; m *= 2) {  // each v[i] holds m vectors' partial sums, W / m lanes each
    const int P = W / m, Q = P / 2;
    vi lo, hi;
    for (int i = 0; i < m; ++i) {
      for (int t = 0; t < Q; ++t) {
        lo[i * Q + t] = i * P + t, hi[i * Q + t] = i * P + Q + t;
        lo[(m + i) * Q + t] = W + i * P + t, hi[(m + i) * Q + t] = W + i * P + Q + t;
      }
    }
    for (int i = 0; i < W / (2 * m); ++i) {
      v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi);
    }
  }
  return v[0];
}

// out[j] = q . keys[j][0, H) for j < W: per lane multiply-adds over h (W at a time), hsums' tree, then the
// h past the last whole vector in order.
template <int W, typename T>
MOEJAX_INLINE void dots(const float* __restrict q, const T* const* keys, int64_t H, float* out) {
  typedef typename Vec<W>::f vf;
  vf p[W];
#pragma GCC unroll 16
  for (int j = 0; j < W; ++j) p[j] = vf{};
  int64_t h = 0;
  for (; h + W <= H; h += W) {
    const vf qv = load<W>(q + h);
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) p[j] += qv * load<W>(keys[j] + h);
  }
  store<W>(out, hsums<W>(p));
  for (; h < H; ++h) {
    for (int j = 0; j < W; ++j) out[j] += q[h] * widen(keys[j][h]);
  }
}

// Items of up to kPhases phases, run in phase order (a phase's items all done before the next phase's
// start), claimed from atomic counters by the caller and the pool tasks alike. A thread that runs out of a
// phase's items waits only for items of that phase other threads have already claimed (they are running),
// so the call cannot deadlock on a busy pool: the caller alone can finish every item.
struct Job {
  static constexpr int kPhases = 4;
  virtual ~Job() = default;
  virtual void item(int phase, int64_t i) = 0;
  int64_t items[kPhases] = {0, 0, 0, 0};
  std::atomic<int64_t> next[kPhases] = {0, 0, 0, 0};
  std::atomic<int64_t> done[kPhases] = {0, 0, 0, 0};

  void run() {
    for (int p = 0; p < kPhases; ++p) {
      for (int64_t i; (i = next[p].fetch_add(1, std::memory_order_relaxed)) < items[p];) {
        item(p, i);
        done[p].fetch_add(1, std::memory_order_acq_rel);
      }
      while (done[p].load(std::memory_order_acquire) < items[p]) std::this_thread::yield();
    }
  }
};

// Threads a call may use: the pool's, at most max_threads (0: no limit).
int64_t thread_cap(ffi::ThreadPool& pool, int64_t max_threads) {
  const int64_t pool_threads = std::max<int64_t>(1, pool.num_threads());
  return max_threads > 0 ? std::min(max_threads, pool_threads) : pool_threads;
}

void run_job(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t max_threads) {
  const int64_t most = *std::max_element(job->items, job->items + Job::kPhases);
  const int64_t threads = std::max<int64_t>(1, std::min(thread_cap(pool, max_threads), most));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([job] { job->run(); });
  job->run();
}

template <typename T>
struct AttentionJob;
template <typename T>
struct ArgmaxJob;

// One ISA variant's entry points for operands of element type T (MOEJAX_VARIANT, below).
template <typename T>
struct Ops {
  GemmFn<T> gemm;
  UpFn<T> up;
  void (*attention)(const AttentionJob<T>& job, int64_t b, int64_t k);
  void (*argmax)(const ArgmaxJob<T>& job, int64_t b);
};

// One ISA variant: a call takes its variant once (`kernels()`) and runs every item on it.
struct Kernels {
  const char* name;  // "avx512bf16", "v4", "v3", "baseline": MOEJAX_NATIVE_ISA's values
  Ops<float> f32;
  Ops<bf16> b16;
  GemmFn<int8_t> gemm_i8;  // int8 weights (per-column scales applied by the caller: scale_columns)
  UpFn<int8_t> up_i8;
  template <typename T>
  const Ops<T>* of() const {
    if constexpr (std::is_same_v<T, float>) return &f32; else return &b16;
  }
  // The gemm and MoE up-projection for weights of element type Wt (float, bf16 or int8).
  template <typename Wt>
  GemmFn<Wt> gemm() const {
    if constexpr (std::is_same_v<Wt, int8_t>) return gemm_i8; else return of<Wt>()->gemm;
  }
  template <typename Wt>
  UpFn<Wt> up() const {
    if constexpr (std::is_same_v<Wt, int8_t>) return up_i8; else return of<Wt>()->up;
  }
};

// ---- paged attention ----

template <typename El>
struct AttentionJob final : Job {
  const Ops<El>* kernels;
  const El *q, *kpool, *vpool;  // kpool/vpool: this layer's [P, ps, K, H]
  const int32_t *table, *pos;
  El* o;
  int64_t B, T, N, K, H, P, ps, MP, window;
  float scale;

  void item(int, int64_t i) override { kernels->attention(*this, i / K, i % K); }

  // The keys a query at position p >= 0 reads: positions [lo, last] (lo > last: none, a query past its
  // page table by more than the window).
  int64_t lo_of(int64_t p) const { return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0; }
  int64_t last_of(int64_t p) const { return std::min(p, MP * ps - 1); }

  // The positions [first, last] row b's queries read, all of them together (first > last: none).
  void span(int64_t b, int64_t& first, int64_t& last) const {
    first = MP * ps, last = -1;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos[b * T + t];
      if (p < 0 || lo_of(p) > last_of(p)) continue;
      first = std::min(first, lo_of(p)), last = std::max(last, last_of(p));
    }
  }

  // Offset of position s of row b, kv head k, in a layer's pool (the row's own page: AttentionImpl has
  // checked every page id of the row's span).
  int64_t offset(int64_t b, int64_t k, int64_t s) const {
    const int64_t page = table[b * MP + s / ps];
    return ((page * ps + s % ps) * K + k) * H;
  }

  // sc[g * S + j] = scale * q_g . key at off[j], for j < S, W keys at a time (dots<W>).
  template <int W>
  MOEJAX_INLINE void scores(const int64_t* off, const float* qb, int64_t S, float* sc) const {
    const int64_t G = N / K;
    const El* keys[W];
    float out[W];
    for (int64_t s0 = 0; s0 < S; s0 += W) {
      const int64_t n = std::min<int64_t>(W, S - s0);
      for (int64_t j = 0; j < W; ++j) keys[j] = kpool + off[s0 + std::min(j, n - 1)];
      for (int64_t g = 0; g < G; ++g) {
        dots<W>(qb + g * H, keys, H, out);
        for (int64_t j = 0; j < n; ++j) sc[g * S + s0 + j] = out[j] * scale;
      }
    }
  }

  // acc[g, :] = sum over j < S, in order, of sc[g * S + j] * the value at off[j]: four vectors of a head at a
  // time held in registers across the keys.
  template <int W>
  MOEJAX_INLINE void values(const int64_t* off, int64_t S, const float* sc, float* acc) const {
    typedef typename Vec<W>::f vf;
    constexpr int64_t kBlock = 4 * W;
    const int64_t G = N / K;
    for (int64_t g = 0; g < G; ++g) {
      const float* wg = sc + g * S;
      float* ag = acc + g * H;
      int64_t h0 = 0;
      for (; h0 + kBlock <= H; h0 += kBlock) {
        vf a[4] = {};
        for (int64_t j = 0; j < S; ++j) {
          const El* v = vpool + off[j] + h0;
          const float w = wg[j];
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) a[i] += w * load<W>(v + i * W);
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) store<W>(ag + h0 + i * W, a[i]);
      }
      if (h0 < H) {
        for (int64_t h = h0; h < H; ++h) ag[h] = 0.0f;
        for (int64_t j = 0; j < S; ++j) {
          const El* v = vpool + off[j];
          const float w = wg[j];
          for (int64_t h = h0; h < H; ++h) ag[h] += w * widen(v[h]);
        }
      }
    }
  }

  // Queries of row b on kv head k (its G = N / K query heads), every t: keys at positions
  // [lo, last] of the row's own pages only (last: the query's position; lo: the window's start).
  template <int W>
  MOEJAX_INLINE void run(int64_t b, int64_t k) const {
    const int64_t G = N / K;
    thread_local std::vector<float> sbuf, obuf, qbuf;
    thread_local std::vector<int64_t> offsets;
    float* out_acc = scratch(obuf, G * H);
    float* q_wide = scratch(qbuf, G * H);
    int64_t first, last_row;
    span(b, first, last_row);
    if (offsets.size() < static_cast<size_t>(std::max<int64_t>(0, last_row - first + 1))) {
      offsets.resize(last_row - first + 1);
    }
    for (int64_t s = first; s <= last_row; ++s) offsets[s - first] = offset(b, k, s);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos[b * T + t];
      El* ob = o + ((b * T + t) * N + k * G) * H;
      if (p < 0 || lo_of(p) > last_of(p)) {  // padding (or no key to read): zeros
        std::memset(ob, 0, sizeof(El) * G * H);
        continue;
      }
      const int64_t lo = lo_of(p), S = last_of(p) - lo + 1;
      const int64_t* off = offsets.data() + (lo - first);
      float* sc = scratch(sbuf, G * S);
      const El* qt = q + ((b * T + t) * N + k * G) * H;
      const float* qw;
      if constexpr (std::is_same_v<El, float>) qw = qt; else widen_row(q_wide, qt, G * H), qw = q_wide;
      scores<W>(off, qw, S, sc);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = sc + g * S;
        float m = sg[0];
        for (int64_t j = 1; j < S; ++j) m = std::max(m, sg[j]);
        float total = 0.0f;
        for (int64_t j = 0; j < S; ++j) sg[j] = exp_approx(sg[j] - m);
        for (int64_t j = 0; j < S; ++j) total += sg[j];
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < S; ++j) sg[j] *= inv;
      }
      values<W>(off, S, sc, out_acc);
      store_row(ob, out_acc, G * H);
    }
  }
};

// ---- greedy: argmax and finiteness of each row ----

template <typename T>
struct ArgmaxJob final : Job {
  const Ops<T>* kernels;
  const T* x;
  int32_t *index, *finite;
  int64_t V;

  void item(int, int64_t b) override { kernels->argmax(*this, b); }

  // jnp.argmax semantics: the first maximum, or the first NaN if the row has one; a row of -inf: 0.
  template <int W>
  MOEJAX_INLINE void row(int64_t b) const {
    typedef typename Vec<W>::f vf;
    typedef typename Vec<W>::i vi;
    const T* xr = x + b * V;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    vf top = vf{} + neg_inf;
    vi odd{};  // lanes that saw inf or NaN (x - x is NaN exactly there)
    int64_t j = 0;
    for (; j + W <= V; j += W) {
      const vf v = load<W>(xr + j), d = v - v;
      top = v > top ? v : top;
      odd |= d != d;
    }
    float m = neg_inf;
    bool nonfinite = false;
    for (int i = 0; i < W; ++i) m = std::max(m, top[i]), nonfinite |= odd[i] != 0;
    for (; j < V; ++j) m = std::max(m, widen(xr[j])), nonfinite |= !std::isfinite(widen(xr[j]));
    int64_t at = -1;
    if (nonfinite) {  // the first NaN, if any, wins
      for (int64_t i = 0; i < V && at < 0; ++i) at = std::isnan(widen(xr[i])) ? i : -1;
    }
    if (at < 0) {
      for (j = 0; j + W <= V; j += W) {
        const vi hit = load<W>(xr + j) == m;
        bool any = false;
        for (int i = 0; i < W; ++i) any |= hit[i] != 0;
        if (any) break;
      }
      for (; j < V && widen(xr[j]) != m; ++j) {}
      at = j < V ? j : 0;
    }
    index[b] = static_cast<int32_t>(at);
    finite[b] = nonfinite ? 0 : 1;
  }
};

// ---- ISA variants ----

// One variant's entry points, compiled for TARGET. Everything they call above is always_inline (or scalar
// code), and GCC compiles an inlined callee for its caller's target: each variant is a whole copy of the
// vector code for its ISA.
#define MOEJAX_VARIANT(NAME, TARGET, W)                                                                         \
  template <typename T>                                                                                         \
  TARGET __attribute__((noinline)) void gemm_##NAME(const float* x, int64_t ldx, int64_t R, const T* w,         \
                                                    int64_t ldw, int64_t K, int64_t N, float* y, int64_t ldy) { \
    gemm_w<W>(x, ldx, R, w, ldw, K, N, y, ldy);                                                                 \
  }                                                                                                             \
  template <typename T>                                                                                         \
  TARGET void up_##NAME(const float* X, int64_t rows, int64_t D, int64_t F, const T* wg, const T* wu,           \
                        int64_t f0, int64_t nf, float* H, const float* sg, const float* su) {                   \
    up_item<T>(gemm_##NAME<T>, X, rows, D, F, wg, wu, f0, nf, H, sg, su);                                       \
  }                                                                                                             \
  template <typename T>                                                                                         \
  TARGET void attention_##NAME(const AttentionJob<T>& job, int64_t b, int64_t k) { job.template run<W>(b, k); } \
  template <typename T>                                                                                         \
  TARGET void argmax_##NAME(const ArgmaxJob<T>& job, int64_t b) { job.template row<W>(b); }                    \
  template <typename T>                                                                                         \
  constexpr Ops<T> ops_##NAME = {gemm_##NAME<T>, up_##NAME<T>, attention_##NAME<T>, argmax_##NAME<T>};          \
  constexpr Kernels k_##NAME = {#NAME, ops_##NAME<float>, ops_##NAME<bf16>, gemm_##NAME<int8_t>,              \
                                 up_##NAME<int8_t>};

#if MOEJAX_X86_VARIANTS
MOEJAX_VARIANT(v4, __attribute__((target("arch=x86-64-v4"))), 16)
MOEJAX_VARIANT(v3, __attribute__((target("arch=x86-64-v3"))), 8)
#endif
MOEJAX_VARIANT(baseline, , 8)  // the build's default target (x86-64: SSE2)
#undef MOEJAX_VARIANT

#if MOEJAX_X86_VARIANTS
// x86-64-v4 with AVX512_BF16: the v4 variant but for bf16 operands' gemm (dp::gemm, vdpbf16ps).
__attribute__((target("arch=x86-64-v4,avx512bf16"), noinline)) void gemm_avx512bf16(
    const float* x, int64_t ldx, int64_t R, const bf16* w, int64_t ldw, int64_t K, int64_t N, float* y, int64_t ldy) {
  dp::gemm(x, ldx, R, w, ldw, K, N, y, ldy);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void up_avx512bf16(const float* X, int64_t rows, int64_t D,
                                                                      int64_t F, const bf16* wg, const bf16* wu,
                                                                      int64_t f0, int64_t nf, float* H,
                                                                      const float* sg, const float* su) {
  up_item<bf16>(gemm_avx512bf16, X, rows, D, F, wg, wu, f0, nf, H, sg, su);
}
constexpr Ops<bf16> ops_avx512bf16 = {gemm_avx512bf16, up_avx512bf16, attention_v4<bf16>, argmax_v4<bf16>};
constexpr Kernels k_avx512bf16 = {"avx512bf16", ops_v4<float>, ops_avx512bf16, gemm_v4<int8_t>, up_v4<int8_t>};
#endif

// The variants this CPU runs, best first (__builtin_cpu_supports: the CPU's features and the OS's support for
// their registers).
struct Runnable {
  const Kernels* list[4];
  int count;
};

const Runnable& runnable() {
  static const Runnable found = [] {
    Runnable r{{}, 0};
#if MOEJAX_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16")) {
      r.list[r.count++] = &k_avx512bf16;
    }
    if (__builtin_cpu_supports("x86-64-v4")) r.list[r.count++] = &k_v4;
    if (__builtin_cpu_supports("x86-64-v3")) r.list[r.count++] = &k_v3;
#endif
    r.list[r.count++] = &k_baseline;
    return r;
  }();
  return found;
}

std::atomic<const Kernels*> selected{nullptr};

// The variant a call runs: the one selected last (MoejaxIsaSelect), else the best this CPU runs.
const Kernels* kernels() {
  const Kernels* k = selected.load(std::memory_order_acquire);
  return k != nullptr ? k : runnable().list[0];
}

// ---- MoE layer ----

// x and y of element type T (float or bf16), the weights Wt (T, or int8 with per-column scales).
template <typename T, typename Wt = T>
struct MoeJob final : Job {
  GemmFn<Wt> gemm;
  UpFn<Wt> up;
  float* X;                // the sorted pairs' rows [pairs, D] (gathered, widened, in phase 0)
  const Wt *wg, *wu, *wd;  // this layer's [E, D, F] / [E, F, D] block
  const float *sg = nullptr, *su = nullptr, *sd = nullptr;  // int8: this layer's scales [E, F] / [E, D]
  float *H, *O;
  int64_t D, F;
  std::vector<int64_t> expert, start, count;  // routed experts only
  // Gather and combine (phases 0 and 3): x [tokens, D] and y [tokens, D] (the call's buffers); the
  // sorted pairs' tokens and gates; each (token, route)'s slot among the sorted pairs (-1: not here).
  const T* x;
  T* y;
  int64_t tokens, routes, pairs;
  const int64_t *pair_token, *token_slot;
  const float* pair_gate;
  int64_t f_chunk, d_chunk, f_chunks, d_chunks;  // column chunk widths and counts per expert

  // The routed experts (counts[e]: start of expert e's pairs, counts[E]: all pairs), most rows first
  // (the longest items are claimed first: the threads finish a phase together), and the column
  // chunks per expert for `threads` threads.
  void plan(const int64_t* counts, int64_t E, int64_t threads) {
    const auto rows = [counts](int64_t e) { return counts[e + 1] - counts[e]; };
    for (int64_t e = 0; e < E; ++e) {
      if (rows(e) > 0) expert.push_back(e);
    }
    std::stable_sort(expert.begin(), expert.end(), [&](int64_t a, int64_t b) { return rows(a) > rows(b); });
    for (const int64_t e : expert) start.push_back(counts[e]), count.push_back(rows(e));
    const int64_t used = expert.size();
    // Column chunks per expert: as few as still give every thread two items (wide chunks read each
    // weight row in long contiguous runs: 8 rows over 84 MB of expert weights, whole 640-wide rows
    // against 128-wide chunks, 12.8-13.6 -> 7.2-9.8 ms on one AVX2 core, 2026-12-03; with the items
    // longest first, four or eight items per thread were no faster at 256 or 1024 tokens), in whole
    // vectors.
    const int64_t per_expert = std::max<int64_t>(1, (2 * threads + used - 1) / used);
    const auto chunk_of = [&](int64_t width) {
      const int64_t c = (width + per_expert - 1) / per_expert;
      return std::max<int64_t>(kV, (c + kV - 1) / kV * kV);
    };
    f_chunk = chunk_of(F), d_chunk = chunk_of(D);
    f_chunks = (F + f_chunk - 1) / f_chunk;
    d_chunks = (D + d_chunk - 1) / d_chunk;
    items[1] = used * f_chunks;
    items[2] = used * d_chunks;
  }

  void item(int phase, int64_t i) override {
    if (phase == 0) {  // gather: pairs [i * kRowsPerItem, ...) of the sorted pairs get their token's row
      for (int64_t r = i * kRowsPerItem; r < std::min(pairs, (i + 1) * kRowsPerItem); ++r) {
        widen_row(X + r * D, x + pair_token[r] * D, D);
      }
    } else if (phase == 1) {
      const int64_t u = i / f_chunks, f0 = (i % f_chunks) * f_chunk;
      const int64_t block = expert[u] * D * F;
      up(X + start[u] * D, count[u], D, F, wg + block, wu + block, f0, std::min(f_chunk, F - f0), H + start[u] * F,
         sg == nullptr ? nullptr : sg + expert[u] * F, su == nullptr ? nullptr : su + expert[u] * F);
    } else if (phase == 2) {
      const int64_t u = i / d_chunks, d0 = (i % d_chunks) * d_chunk, n = std::min(d_chunk, D - d0);
      gemm(H + start[u] * F, F, count[u], wd + expert[u] * F * D + d0, D, F, n, O + start[u] * D + d0, D);
      if (sd != nullptr) scale_columns(O + start[u] * D + d0, D, count[u], n, sd + expert[u] * D + d0);
    } else {  // combine: tokens [i * kRowsPerItem, ...), each token's pairs in expert (slot) order
      for (int64_t m = i * kRowsPerItem; m < std::min(tokens, (i + 1) * kRowsPerItem); ++m) {
        int64_t slots[kMaxRoutes];
        int64_t n = 0;
        for (int64_t r = 0; r < routes; ++r) {
          const int64_t slot = token_slot[m * routes + r];
          if (slot < 0) continue;
          int64_t at = n++;
          for (; at > 0 && slots[at - 1] > slot; --at) slots[at] = slots[at - 1];
          slots[at] = slot;
        }
        thread_local std::vector<float> rowbuf;
        float* __restrict yr;
        if constexpr (std::is_same_v<T, float>) yr = y + m * D; else yr = scratch(rowbuf, D);
        std::memset(yr, 0, sizeof(float) * D);
        for (int64_t a = 0; a < n; ++a) {
          const float* __restrict o = O + slots[a] * D;
          const float g = pair_gate[slots[a]];
          for (int64_t j = 0; j < D; ++j) yr[j] += g * o[j];
        }
        if constexpr (!std::is_same_v<T, float>) store_row(y + m * D, yr, D);
      }
    }
  }
};

// ---- the FFI handlers: each takes float32 or bfloat16 operands (ffi::AnyBuffer), all of one type ----

// The element type all of `buffers` share, F32 or BF16; INVALID where they are not all one of those.
ffi::DataType common_type(std::initializer_list<ffi::DataType> types) {
  const ffi::DataType t = *types.begin();
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16) return ffi::DataType::INVALID;
  for (const ffi::DataType u : types) {
    if (u != t) return ffi::DataType::INVALID;
  }
  return t;
}

template <typename T>
const T* data(const ffi::AnyBuffer& b) {
  return static_cast<const T*>(b.untyped_data());
}
template <typename T>
T* data(ffi::Result<ffi::AnyBuffer>& b) {
  return static_cast<T*>(b->untyped_data());
}

// A layer's per-column scales of int8 weights, as float32: in place (float32) or widened into buf (bf16).
template <typename T>
const float* layer_scales(const ffi::AnyBuffer& scale, int64_t offset, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return data<float>(scale) + offset;
  } else {
    widen_row(scratch(buf, n), data<T>(scale) + offset, n);
    return buf.data();
  }
}

// scales: null (float weights), or the int8 weights' [L, E, F] / [L, E, F] / [L, E, D] scales (x's type).
template <typename T, typename Wt = T>
ffi::Error MoeSwiglu(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, const float* gp, const int32_t* ep,
                     const ffi::AnyBuffer& wg, const ffi::AnyBuffer& wu, const ffi::AnyBuffer& wd,
                     const ffi::AnyBuffer* const* scales, int64_t l, ffi::Result<ffi::AnyBuffer>& out, int64_t X,
                     int64_t E, int64_t F, int64_t max_threads) {
  const int64_t M = x.dimensions()[0], D = x.dimensions()[1];
  T* y = data<T>(out);
  // Counting sort of the pairs on this shard (ids outside [0, E): another shard's, or none), stable
  // in token order; then phases 0-3 (MoeJob) on the pool: gather, up, down, combine.
  thread_local std::vector<int64_t> counts, pair_token, token_slot;
  thread_local std::vector<float> pair_gate, xbuf, hbuf, obuf;
  counts.assign(E + 1, 0);
  for (int64_t p = 0; p < M * X; ++p) {
    const int32_t e = ep[p];
    if (e >= 0 && e < E) ++counts[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) counts[e + 1] += counts[e];  // counts[e]: start of expert e
  const int64_t N = counts[E];
  if (N == 0) {
    std::memset(y, 0, sizeof(T) * M * D);
    return ffi::Error::Success();
  }
  pair_token.resize(N);
  pair_gate.resize(N);
  token_slot.assign(M * X, -1);
  {
    std::vector<int64_t> fill(counts.begin(), counts.end() - 1);
    for (int64_t p = 0; p < M * X; ++p) {
      const int32_t e = ep[p];
      if (e < 0 || e >= E) continue;
      const int64_t slot = fill[e]++;
      pair_token[slot] = p / X;
      pair_gate[slot] = gp[p];
      token_slot[p] = slot;
    }
  }
  auto job = std::make_shared<MoeJob<T, Wt>>();
  job->gemm = kernels()->gemm<Wt>(), job->up = kernels()->up<Wt>();
  job->X = scratch(xbuf, N * D);
  job->H = scratch(hbuf, N * F);
  job->O = scratch(obuf, N * D);
  const int64_t layer_block = l * E * D * F;
  job->wg = data<Wt>(wg) + layer_block, job->wu = data<Wt>(wu) + layer_block, job->wd = data<Wt>(wd) + layer_block;
  if (scales != nullptr) {
    thread_local std::vector<float> sgbuf, subuf, sdbuf;
    job->sg = layer_scales<T>(*scales[0], l * E * F, E * F, sgbuf);
    job->su = layer_scales<T>(*scales[1], l * E * F, E * F, subuf);
    job->sd = layer_scales<T>(*scales[2], l * E * D, E * D, sdbuf);
  }
  job->D = D, job->F = F;
  job->x = data<T>(x), job->y = y, job->tokens = M, job->routes = X, job->pairs = N;
  job->pair_token = pair_token.data(), job->token_slot = token_slot.data(), job->pair_gate = pair_gate.data();
  job->items[0] = (N + kRowsPerItem - 1) / kRowsPerItem;
  job->items[3] = (M + kRowsPerItem - 1) / kRowsPerItem;
  job->plan(counts.data(), E, thread_cap(pool, max_threads));
  run_job(pool, job, max_threads);
  return ffi::Error::Success();
}

// The shapes of one MoE call: x [M, D], gate / experts [M, X], wg = wu [L, E, D, F], wd [L, E, F, D] (L >= 1).
ffi::Error check_moe(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::F32>& gate, const ffi::Buffer<ffi::S32>& experts,
                     const ffi::AnyBuffer& wg, const ffi::AnyBuffer& wu, const ffi::AnyBuffer& wd) {
  const auto xd = x.dimensions(), rd = experts.dimensions(), gd = wg.dimensions(), ud = wu.dimensions(),
             dd = wd.dimensions();
  if (xd.size() != 2 || rd.size() != 2 || gate.dimensions().size() != 2 || gd.size() != 4 || ud.size() != 4 ||
      dd.size() != 4) {
    return ffi::Error::InvalidArgument("moe_swiglu: x [M, D], gate/experts [M, X], weights [L, E, ., .] expected");
  }
  const int64_t M = xd[0], D = xd[1], X = rd[1], L = gd[0], E = gd[1], F = gd[3];
  if (rd[0] != M || gate.dimensions()[0] != M || gate.dimensions()[1] != X) {
    return ffi::Error::InvalidArgument("moe_swiglu: gate and experts must both be [M, X] for x [M, D]");
  }
  for (int i = 0; i < 4; ++i) {
    if (ud[i] != gd[i]) return ffi::Error::InvalidArgument("moe_swiglu: wg and wu shapes differ");
  }
  if (gd[2] != D || dd[0] != L || dd[1] != E || dd[2] != F || dd[3] != D || L == 0) {
    return ffi::Error::InvalidArgument("moe_swiglu: wg [L, E, D, F], wd [L, E, F, D] (L >= 1) expected for x [M, D]");
  }
  if (X > kMaxRoutes) {
    return ffi::Error::InvalidArgument("moe_swiglu: at most " + std::to_string(kMaxRoutes) + " routes per token");
  }
  return ffi::Error::Success();
}

ffi::Error MoeSwigluImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> gate,
                         ffi::Buffer<ffi::S32> experts, ffi::AnyBuffer wg, ffi::AnyBuffer wu, ffi::AnyBuffer wd,
                         ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out, int64_t max_threads) {
  const ffi::DataType type = common_type(
      {x.element_type(), wg.element_type(), wu.element_type(), wd.element_type(), out->element_type()});
  if (type == ffi::DataType::INVALID) {
    return ffi::Error::InvalidArgument("moe_swiglu: x, the weights and y must be all float32 or all bfloat16");
  }
  if (ffi::Error err = check_moe(x, gate, experts, wg, wu, wd); err.failure()) return err;
  const int64_t X = experts.dimensions()[1], L = wg.dimensions()[0], E = wg.dimensions()[1], F = wg.dimensions()[3];
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);  // clamps like dynamic_slice
  const auto run = type == ffi::DataType::F32 ? MoeSwiglu<float> : MoeSwiglu<bf16>;
  return run(pool, x, gate.typed_data(), experts.typed_data(), wg, wu, wd, nullptr, l, out, X, E, F, max_threads);
}

// int8 weights (moejax.quant's "int8": one scale per output channel), read in place: wg, wu [L, E, D, F] and
// wd [L, E, F, D] int8, their scales [L, E, (1,) F] / [L, E, (1,) D] in x's type (float32 or bfloat16).
ffi::Error MoeSwigluInt8Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> gate,
                             ffi::Buffer<ffi::S32> experts, ffi::AnyBuffer wg, ffi::AnyBuffer wu, ffi::AnyBuffer wd,
                             ffi::AnyBuffer sg, ffi::AnyBuffer su, ffi::AnyBuffer sd, ffi::Buffer<ffi::S32> layer,
                             ffi::Result<ffi::AnyBuffer> out, int64_t max_threads) {
  const ffi::DataType type =
      common_type({x.element_type(), sg.element_type(), su.element_type(), sd.element_type(), out->element_type()});
  if (type == ffi::DataType::INVALID || wg.element_type() != ffi::DataType::S8 ||
      wu.element_type() != ffi::DataType::S8 || wd.element_type() != ffi::DataType::S8) {
    return ffi::Error::InvalidArgument(
        "moe_swiglu_int8: int8 weights; x, the scales and y all float32 or all bfloat16 expected");
  }
  if (ffi::Error err = check_moe(x, gate, experts, wg, wu, wd); err.failure()) return err;
  const int64_t X = experts.dimensions()[1], L = wg.dimensions()[0], E = wg.dimensions()[1], D = wg.dimensions()[2],
                F = wg.dimensions()[3];
  if (static_cast<int64_t>(sg.element_count()) != L * E * F || static_cast<int64_t>(su.element_count()) != L * E * F ||
      static_cast<int64_t>(sd.element_count()) != L * E * D) {
    return ffi::Error::InvalidArgument("moe_swiglu_int8: scales [L, E, F], [L, E, F], [L, E, D] expected");
  }
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  const ffi::AnyBuffer* scales[3] = {&sg, &su, &sd};
  const auto run = type == ffi::DataType::F32 ? MoeSwiglu<float, int8_t> : MoeSwiglu<bf16, int8_t>;
  return run(pool, x, gate.typed_data(), experts.typed_data(), wg, wu, wd, scales, l, out, X, E, F, max_threads);
}

// ---- plain matmul ----

// Phase 0 (bf16 only): x's rows widened into a float copy, kRowsPerItem per item. Phase 1: column chunks,
// each computed in float (in place in y for float; bf16: in a scratch block, then rounded into y). Weights Wt:
// T, or int8 with per-column scales (`scale`, float32) applied to the float32 sums before the store.
template <typename T, typename Wt = T>
struct MatmulJob final : Job {
  GemmFn<Wt> gemm;
  const T* x_in;
  const float* x;
  float* x_wide;
  const Wt* w;
  const float* scale = nullptr;  // int8 weights: this layer's [N]
  T* y;
  int64_t R, K, N, chunk;
  void item(int phase, int64_t i) override {
    if (phase == 0) {
      const int64_t r0 = i * kRowsPerItem, rows = std::min(kRowsPerItem, R - r0);
      widen_row(x_wide + r0 * K, x_in + r0 * K, rows * K);
      return;
    }
    const int64_t n0 = i * chunk, n = std::min(chunk, N - n0);
    if constexpr (std::is_same_v<T, float>) {
      gemm(x, K, R, w + n0, N, K, n, y + n0, N);
      if (scale != nullptr) scale_columns(y + n0, N, R, n, scale + n0);
    } else {
      thread_local std::vector<float> ybuf;
      float* yf = scratch(ybuf, R * n);
      gemm(x, K, R, w + n0, N, K, n, yf, n);
      if (scale != nullptr) scale_columns(yf, n, R, n, scale + n0);
      for (int64_t r = 0; r < R; ++r) store_row(y + r * N + n0, yf + r * n, n);
    }
  }
};

// scale: null (float weights), or the int8 weights' [L, N] scales (x's type).
template <typename T, typename Wt = T>
ffi::Error Matmul(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
                  const ffi::AnyBuffer* scale, int64_t l, ffi::Result<ffi::AnyBuffer>& out, int64_t max_threads) {
  auto job = std::make_shared<MatmulJob<T, Wt>>();
  job->gemm = kernels()->gemm<Wt>();
  job->R = x.dimensions()[0], job->K = x.dimensions()[1], job->N = w.dimensions()[2];
  job->x_in = data<T>(x), job->w = data<Wt>(w) + l * job->K * job->N, job->y = data<T>(out);
  if (job->R == 0 || job->N == 0) return ffi::Error::Success();
  if (scale != nullptr) {
    thread_local std::vector<float> sbuf;
    job->scale = layer_scales<T>(*scale, l * job->N, job->N, sbuf);
  }
  if constexpr (std::is_same_v<T, float>) {
    job->x = job->x_in;
  } else {
    thread_local std::vector<float> xbuf;
    job->x = job->x_wide = scratch(xbuf, job->R * job->K);
    job->items[0] = (job->R + kRowsPerItem - 1) / kRowsPerItem;
  }
  // Column chunks: about two per thread (whole vectors), between one and four work-item widths.
  const int64_t threads = thread_cap(pool, max_threads);
  const int64_t per = (job->N + 2 * threads - 1) / (2 * threads);
  job->chunk = std::clamp<int64_t>((per + kV - 1) / kV * kV, kChunk / 2, 4 * kChunk);
  job->items[1] = (job->N + job->chunk - 1) / job->chunk;
  run_job(pool, job, max_threads);
  return ffi::Error::Success();
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                      ffi::Result<ffi::AnyBuffer> out, int64_t max_threads) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const ffi::DataType type = common_type({x.element_type(), w.element_type(), out->element_type()});
  if (type == ffi::DataType::INVALID) {
    return ffi::Error::InvalidArgument("matmul: x, w and y must be all float32 or all bfloat16");
  }
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[0] == 0) {
    return ffi::Error::InvalidArgument("matmul: x [R, K] and w [L, K, N] (L >= 1) expected");
  }
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, wd[0] - 1);  // clamps like dynamic_slice
  return (type == ffi::DataType::F32 ? Matmul<float> : Matmul<bf16>)(pool, x, w, nullptr, l, out, max_threads);
}

// int8 weights w [L, K, N] with one scale per output column, scale [L, (1,) N] in x's type (moejax.quant's "int8"),
// read in place.
ffi::Error MatmulInt8Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale,
                          ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out, int64_t max_threads) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const ffi::DataType type = common_type({x.element_type(), scale.element_type(), out->element_type()});
  if (type == ffi::DataType::INVALID || w.element_type() != ffi::DataType::S8) {
    return ffi::Error::InvalidArgument("matmul_int8: w int8; x, the scale and y all float32 or all bfloat16 expected");
  }
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[0] == 0 ||
      static_cast<int64_t>(scale.element_count()) != wd[0] * wd[2]) {
    return ffi::Error::InvalidArgument("matmul_int8: x [R, K], w [L, K, N] (L >= 1) and scale [L, N] expected");
  }
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, wd[0] - 1);
  const auto run = type == ffi::DataType::F32 ? Matmul<float, int8_t> : Matmul<bf16, int8_t>;
  return run(pool, x, w, &scale, l, out, max_threads);
}

// ---- paged attention ----

template <typename T>
ffi::Error Attention(ffi::ThreadPool& pool, const ffi::AnyBuffer& q, const ffi::AnyBuffer& kpool,
                     const ffi::AnyBuffer& vpool, int64_t layer, const int32_t* table, const int32_t* pos,
                     ffi::Result<ffi::AnyBuffer>& out, int64_t MP, int64_t window, float scale, int64_t max_threads) {
  const auto qd = q.dimensions(), kd = kpool.dimensions();
  auto job = std::make_shared<AttentionJob<T>>();
  job->kernels = kernels()->of<T>();
  job->B = qd[0], job->T = qd[1], job->N = qd[2], job->H = qd[3];
  job->P = kd[1], job->ps = kd[2], job->K = kd[3], job->MP = MP;
  const int64_t l = std::clamp<int64_t>(layer, 0, kd[0] - 1);
  const int64_t per_layer = job->P * job->ps * job->K * job->H;
  job->q = data<T>(q), job->kpool = data<T>(kpool) + l * per_layer, job->vpool = data<T>(vpool) + l * per_layer;
  job->table = table, job->pos = pos, job->o = data<T>(out);
  job->window = window, job->scale = scale;
  job->items[0] = job->B * job->K;
  if (job->items[0] == 0 || job->T == 0) return ffi::Error::Success();
  // The pages each row's queries read must be in the pool: an id outside it is a broken page table (clamped,
  // it would read another row's page).
  for (int64_t b = 0; b < job->B; ++b) {
    int64_t first, last;
    job->span(b, first, last);
    if (first > last) continue;
    for (int64_t j = first / job->ps; j <= last / job->ps; ++j) {
      const int32_t page = job->table[b * job->MP + j];
      if (page < 0 || page >= job->P) {
        return ffi::Error::InvalidArgument("paged_attention: page id " + std::to_string(page) + " of row " +
                                           std::to_string(b) + " (page table entry " + std::to_string(j) +
                                           ") outside the pool's [0, " + std::to_string(job->P) + ")");
      }
    }
  }
  run_job(pool, job, max_threads);
  return ffi::Error::Success();
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kpool, ffi::AnyBuffer vpool,
                         ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> pos,
                         ffi::Result<ffi::AnyBuffer> out, int64_t window, float scale, int64_t max_threads) {
  const auto qd = q.dimensions(), kd = kpool.dimensions(), vd = vpool.dimensions(), td = table.dimensions(),
             pd = pos.dimensions();
  const ffi::DataType type =
      common_type({q.element_type(), kpool.element_type(), vpool.element_type(), out->element_type()});
  if (type == ffi::DataType::INVALID) {
    return ffi::Error::InvalidArgument("paged_attention: q, the pools and o must be all float32 or all bfloat16");
  }
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || td.size() != 2 || pd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "paged_attention: q [B, T, N, H], pools [L, P, page, K, H], table [B, pages], pos [B, T] expected");
  }
  for (int i = 0; i < 5; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("paged_attention: k and v pools differ in shape");
  }
  if (kd[4] != qd[3] || kd[3] == 0 || qd[2] % kd[3] != 0 || td[0] != qd[0] || pd[0] != qd[0] || pd[1] != qd[1] ||
      kd[1] == 0 || kd[0] == 0) {
    return ffi::Error::InvalidArgument("paged_attention: inconsistent shapes (heads, head_dim, rows, pages or layers)");
  }
  const auto run = type == ffi::DataType::F32 ? Attention<float> : Attention<bf16>;
  return run(pool, q, kpool, vpool, layer.typed_data()[0], table.typed_data(), pos.typed_data(), out, td[1], window,
             scale, max_threads);
}

// ---- argmax ----

template <typename T>
ffi::Error Argmax(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, int32_t* index, int32_t* finite,
                  int64_t max_threads) {
  const auto xd = x.dimensions();
  auto job = std::make_shared<ArgmaxJob<T>>();
  job->kernels = kernels()->of<T>();
  job->x = data<T>(x), job->index = index, job->finite = finite;
  job->V = xd[1];
  job->items[0] = xd[1] == 0 ? 0 : xd[0];
  if (job->items[0] == 0) {
    for (int64_t b = 0; b < xd[0]; ++b) job->index[b] = 0, job->finite[b] = 1;
    return ffi::Error::Success();
  }
  run_job(pool, job, max_threads);
  return ffi::Error::Success();
}

ffi::Error ArgmaxImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::ResultBuffer<ffi::S32> index,
                      ffi::ResultBuffer<ffi::S32> finite, int64_t max_threads) {
  if (x.dimensions().size() != 2) return ffi::Error::InvalidArgument("argmax: x [B, V] expected");
  const ffi::DataType type = common_type({x.element_type()});
  if (type == ffi::DataType::INVALID) return ffi::Error::InvalidArgument("argmax: x must be float32 or bfloat16");
  const auto run = type == ffi::DataType::F32 ? Argmax<float> : Argmax<bf16>;
  return run(pool, x, index->typed_data(), finite->typed_data(), max_threads);
}

// pool [L, P, S, ...] with row m of rows [M, ...] written at (layer, page[m], slot[m]), in place (the result is
// aliased to the pool); a page outside [0, P) or a slot outside [0, S) is dropped (as a scatter's mode="drop").
// Bytes only: any element type, the pool's and the rows' one. XLA:CPU scatters into a bfloat16 array by converting
// all of it to float32 and back (moejax/model/attention.py's write_pages).
ffi::Error WriteRowsImpl(ffi::AnyBuffer pool, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> page, ffi::Buffer<ffi::S32> slot, ffi::Result<ffi::AnyBuffer> out) {
  const auto pd = pool.dimensions();
  if (pd.size() < 3 || rows.element_type() != pool.element_type() || out->element_type() != pool.element_type())
    return ffi::Error::InvalidArgument("write_rows: pool [L, P, S, ...] and rows [M, ...] of one type expected");
  const int64_t L = pd[0], P = pd[1], S = pd[2];
  const size_t M = page.element_count(), row_bytes = pool.size_bytes() / static_cast<size_t>(L * P * S);
  if (M != slot.element_count() || rows.size_bytes() != M * row_bytes)
    return ffi::Error::InvalidArgument("write_rows: rows, pages and slots disagree with the pool's row size");
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != pool.untyped_data()) std::memcpy(dst, pool.untyped_data(), pool.size_bytes());  // not aliased
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  const char* src = static_cast<const char*>(rows.untyped_data());
  for (size_t m = 0; m < M; ++m) {
    const int64_t p = page.typed_data()[m], s = slot.typed_data()[m];
    if (p < 0 || p >= P || s < 0 || s >= S) continue;
    std::memcpy(dst + static_cast<size_t>((l * P + p) * S + s) * row_bytes, src + m * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

// ---- ISA selection (plain C, for ctypes: moejax/native/__init__.py) ----

// The variants this CPU runs, best first, comma-separated ("v4,v3,baseline" where it runs AVX-512 without
// AVX512_BF16).
extern "C" const char* MoejaxIsaRunnable() {
  static const std::string names = [] {
    std::string out;
    for (int i = 0; i < runnable().count; ++i) out += (i > 0 ? "," : "") + std::string(runnable().list[i]->name);
    return out;
  }();
  return names.c_str();
}

// From now on, every call runs the variant `name`: 0, or -1 (nothing changed) where the name is unknown or
// this CPU does not run it.
extern "C" int MoejaxIsaSelect(const char* name) {
  for (int i = 0; i < runnable().count; ++i) {
    if (std::strcmp(runnable().list[i]->name, name) == 0) {
      selected.store(runnable().list[i], std::memory_order_release);
      return 0;
    }
  }
  return -1;
}

// The variant the next call runs.
extern "C" const char* MoejaxIsa() { return kernels()->name; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMoeSwiglu, MoeSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [M, D], float32 or bfloat16
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate [M, X]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // experts [M, X], local ids (else: not here)
                                  .Arg<ffi::AnyBuffer>()         // wg [L, E, D, F], x's type
                                  .Arg<ffi::AnyBuffer>()         // wu [L, E, D, F]
                                  .Arg<ffi::AnyBuffer>()         // wd [L, E, F, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::AnyBuffer>()         // y [M, D], x's type
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [R, K], float32 or bfloat16
                                  .Arg<ffi::AnyBuffer>()         // w [L, K, N], x's type
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::AnyBuffer>()         // y [R, N], x's type
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMoeSwigluInt8, MoeSwigluInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [M, D], float32 or bfloat16
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate [M, X]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // experts [M, X], local ids (else: not here)
                                  .Arg<ffi::AnyBuffer>()         // wg [L, E, D, F], int8
                                  .Arg<ffi::AnyBuffer>()         // wu [L, E, D, F], int8
                                  .Arg<ffi::AnyBuffer>()         // wd [L, E, F, D], int8
                                  .Arg<ffi::AnyBuffer>()         // wg's scale [L, E, 1, F], x's type
                                  .Arg<ffi::AnyBuffer>()         // wu's scale [L, E, 1, F]
                                  .Arg<ffi::AnyBuffer>()         // wd's scale [L, E, 1, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::AnyBuffer>()         // y [M, D], x's type
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxMatmulInt8, MatmulInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [R, K], float32 or bfloat16
                                  .Arg<ffi::AnyBuffer>()         // w [L, K, N], int8
                                  .Arg<ffi::AnyBuffer>()         // scale [L, (1,) N], x's type
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::AnyBuffer>()         // y [R, N], x's type
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxPagedAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // q [B, T, N, H], float32 or bfloat16
                                  .Arg<ffi::AnyBuffer>()         // k pool [L, P, page, K, H], q's type
                                  .Arg<ffi::AnyBuffer>()         // v pool [L, P, page, K, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page table [B, pages]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B, T] (< 0: padding)
                                  .Ret<ffi::AnyBuffer>()         // o [B, T, N, H], q's type
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxArgmax, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [B, V], float32 or bfloat16
                                  .Ret<ffi::Buffer<ffi::S32>>()  // index [B]: first maximum (first NaN)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // finite [B]: 1 where the row is all finite
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxWriteRows, WriteRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // pool [L, P, S, ...], any type
                                  .Arg<ffi::AnyBuffer>()         // rows [M, ...], the pool's type
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page [M] (outside [0, P): dropped)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot [M]
                                  .Ret<ffi::AnyBuffer>());       // the pool, aliased to the first operand
