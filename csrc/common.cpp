// Shared by the walk and the entry points: argument checks and the raw-pointer GEMMs.
#include "fastrnn.h"

#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <cstdlib>
#include <limits>
#include <sstream>
#include <type_traits>
#include <utility>

// The Fortran BLAS that torch links (MKL in the x86 wheels, OpenBLAS elsewhere). Weak, so an extension loaded into
// a torch without these symbols still imports and takes the at::addmm_out path.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a, const int* lda,
            const float* x, const int* incx, const float* beta, float* y, const int* incy) __attribute__((weak));
void dgemv_(const char* trans, const int* m, const int* n, const double* alpha, const double* a, const int* lda,
            const double* x, const int* incx, const double* beta, double* y, const int* incy) __attribute__((weak));
// MKL's packed GEMM (CBLAS enums passed as int: RowMajor 101, NoTrans 111, Trans 112, Packed 151, BMatrix 162).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
                      float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
// MKL's bfloat16 GEMM (MKL_BF16 is uint16_t), float32 accumulation and C.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace fastrnn {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

void check_dtype(const Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), "fastrnn: ", what, " is required");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, "fastrnn: ", what,
              " must be float32 or float64 (or bfloat16) for the cpp kernels, got ", dt,
              " (fastrnn.backends.cpp runs float16 on the float32 kernels)");
}

void check_tensor(const Tensor& t, const char* what, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "fastrnn: ", what, " is required (expected shape ", shape_str(shape), ")");
  TORCH_CHECK(t.device().is_cpu(), "fastrnn: ", what, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastrnn: ", what, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fastrnn: ", what, " must have shape ", shape_str(shape), ", got ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), "fastrnn: ", what, " must be contiguous");
  TORCH_CHECK(t.numel() == 0 || t.data_ptr() != nullptr, "fastrnn: ", what, " has no storage");
}

void check_opt(const OptTensor& t, const char* what, at::IntArrayRef shape, at::ScalarType dtype) {
  if (t.has_value() && t->defined()) check_tensor(*t, what, shape, dtype);
}

std::vector<int64_t> batch_sizes_vec(const OptTensor& batch_sizes, int64_t T, int64_t B) {
  if (!batch_sizes.has_value() || !batch_sizes->defined()) return std::vector<int64_t>(T, B);
  const Tensor& bs = *batch_sizes;
  TORCH_CHECK(bs.device().is_cpu(), "fastrnn: batch_sizes must be a CPU tensor, got device ", bs.device());
  TORCH_CHECK(bs.scalar_type() == at::kLong, "fastrnn: batch_sizes must be int64, got ", bs.scalar_type());
  TORCH_CHECK(bs.dim() == 1 && bs.size(0) == T, "fastrnn: batch_sizes must have shape [T=", T, "], got ",
              shape_str(bs.sizes()));
  TORCH_CHECK(bs.is_contiguous(), "fastrnn: batch_sizes must be contiguous");
  const int64_t* p = bs.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + T);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(v[t] >= 0 && v[t] <= B, "fastrnn: batch_sizes[", t, "] = ", v[t], " is outside [0, B=", B, "]");
    TORCH_CHECK(t == 0 || v[t] <= v[t - 1], "fastrnn: batch_sizes must be non-increasing (rows sorted by length), "
                "got batch_sizes[", t - 1, "] = ", v[t - 1], " < batch_sizes[", t, "] = ", v[t]);
  }
  return v;
}

void check_blas_size(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "fastrnn: ", what, " = ", v, " is too large for the BLAS interface");
}

Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  Tensor t = at::empty(shape, opts);
  const char* poison = std::getenv("FASTRNN_POISON_OUTPUTS");
  if (poison != nullptr && std::string(poison) == "1") t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

bool has_direct_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

namespace {

// Fallback without a BLAS symbol: the same product through ATen on tensors that borrow the memory.
template <typename T>
void gemm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor A = at::from_blob(const_cast<T*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, opts);
  Tensor Bt = at::from_blob(const_cast<T*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, opts);
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (ta) A = A.t();
  if (tb) Bt = Bt.t();
  if (beta == T(0)) C.zero_();
  C.addmm_(A, Bt, beta == T(0) ? T(1) : beta, alpha);
}

template <typename T, typename F>
void gemm_impl(F* blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (blas == nullptr) return gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  if (K == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  blas(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_impl<double>(dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
constexpr int64_t kPackMinRows = 3;  // measured: at 1-2 rows plain gemv-like sgemm wins, from 4 rows packing

bool packing_enabled() {
  const char* v = std::getenv("FASTRNN_CPP_PACKED");
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr &&
         !(v != nullptr && std::string(v) == "0");
}
}  // namespace

// Without AVX-512 (dot_gemm and axpy_gemm below take every GEMM of up to 16 rows there), one row against a small W
// (a Cell's step, a B=1 layer's): c = op(W) a + beta c as a vectorised loop. MKL's sgemv costs about 1.5 us for
// W [256, 64] and 3.7 us for [1024, 64] at 2 threads (torch.mv, dispatch taken off), several times what these loops
// take. trans: W [N, K], c[n] = W[n, :] . a (four rows at a time); else W [K, N], c += a[k] W[k, :] row by row.
// elements of W (256 KB); at 2^18 MKL threaded over 2 cores won (measured)
constexpr int64_t kOwnGemvMax = int64_t(1) << 16;

#if defined(CPU_CAPABILITY_AVX512)
// Rows of A that dot_gemm and axpy_gemm take (a Cell's batch); beyond, MKL's packing of W pays.
constexpr int64_t kDotMaxRows = 16;

// out[j] = the sum of v[j]'s 16 lanes, j = 0..15: a transposing tree of 15 shuffles and adds, where summing each
// vector on its own costs 8 (a dot product over K = 64 is only four FMAs).
__attribute__((always_inline)) inline __m512 lane_sums16(const __m512* v) {
  // (unrolled: a loop here would keep v, the caller's accumulators, in memory through its whole K loop)
  __m512 s2[8], s4[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // [a0+a2, b0+b2, a1+a3, b1+b3] in each 128-bit lane
    s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // [a, b, c, d] partials in each 128-bit lane
    const __m512d x = _mm512_castps_pd(s2[2 * i]), y = _mm512_castps_pd(s2[2 * i + 1]);
    s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // across the 128-bit lanes: [A0+A1, A2+A3, B0+B1, B2+B3], then [A, B, C, D]
  auto pair = [](__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  };
  return pair(pair(s4[0], s4[1]), pair(s4[2], s4[3]));
}

// The element types the small-M kernels take: float32, and bfloat16 where the CPU has AVX512-BF16 (vdpbf16ps:
// pairs of products, exact in float32, accumulated in float32, as oneDNN's and MKL's bfloat16 GEMMs do; a Cell's
// unpacked step on a CPU without AMX, where MKL's bfloat16 GEMM ran it at 0.23x-0.47x torch's cell at H >= 256).
#if defined(__AVX512BF16__)
#define FASTRNN_DOT_BF16 1
#endif
// A column of K a step takes: 16 float32, or 16 pairs of bfloat16. mask: the elements of that column there.
template <typename E>
constexpr int64_t kLanesK = 64 / int64_t(sizeof(E));
template <typename E>
using KMask = std::conditional_t<std::is_same_v<E, float>, __mmask16, __mmask32>;
template <typename E>
inline KMask<E> k_mask(int64_t n) {
  return n >= kLanesK<E> ? KMask<E>(~KMask<E>(0)) : KMask<E>((uint64_t(1) << n) - 1);
}

// A column of K as a vector, and one multiply-add of two columns into 16 float32 lanes: FMA on float32, vdpbf16ps
// (a pair a lane) on bfloat16.
inline __m512 k_load(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 k_madd(__m512 acc, __m512 a, __m512 w) { return _mm512_fmadd_ps(a, w, acc); }
#if defined(FASTRNN_DOT_BF16)
inline __m512i k_load(const BF16* p, __mmask32 mask) { return _mm512_maskz_loadu_epi16(mask, p); }
inline __m512 k_madd(__m512 acc, __m512i a, __m512i w) { return _mm512_dpbf16_ps(acc, __m512bh(a), __m512bh(w)); }
#endif

// One column of K for a block's 16 dot products (mask: the elements of K that are there); inlined and unrolled,
// so that acc stays in registers.
template <int Mr, int Nr, typename E>
__attribute__((always_inline)) inline void dot_step(__m512* acc, const E* a, int64_t lda, const E* w, int64_t ldw,
                                                    KMask<E> mask) {
  decltype(k_load(a, mask)) av[Mr];
#pragma GCC unroll 4
  for (int m = 0; m < Mr; ++m) av[m] = k_load(a + m * lda, mask);
#pragma GCC unroll 16
  for (int n = 0; n < Nr; ++n) {
    const auto wv = k_load(w + n * ldw, mask);
#pragma GCC unroll 4
    for (int m = 0; m < Mr; ++m) acc[m * Nr + n] = k_madd(acc[m * Nr + n], av[m], wv);
  }
}

// C[0:Mr, 0:Nr] = A[0:Mr, :K] . W[0:Nr, :K] (+ beta C), Mr * Nr = 16 dot products over K at once: A's Mr rows and
// W's Nr rows are loaded once per column of K (kLanesK) and meet in 16 FMAs (or dpbf16s); their lanes are summed
// once at the end.
template <int Mr, int Nr, typename E>
inline void dot_block(int64_t K, const E* a, int64_t lda, const E* w, int64_t ldw, float beta, float* c,
                      int64_t ldc) {
  static_assert(Mr * Nr == 16, "a block is 16 dot products");
  constexpr int64_t L = kLanesK<E>;
  __m512 acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + L <= K; k += L) dot_step<Mr, Nr, E>(acc, a + k, lda, w + k, ldw, k_mask<E>(L));
  if (k < K) dot_step<Mr, Nr, E>(acc, a + k, lda, w + k, ldw, k_mask<E>(K - k));
  alignas(64) float r[16];
  _mm512_store_ps(r, lane_sums16(acc));
  for (int m = 0; m < Mr; ++m)
    for (int n = 0; n < Nr; ++n) {
      float* dst = c + m * ldc + n;
      *dst = beta == 0.f ? r[m * Nr + n] : r[m * Nr + n] + beta * *dst;
    }
}

// One dot product at a time: the columns a panel's blocks leave over.
template <typename E>
inline void dot_one(int64_t K, const E* a, const E* w, float beta, float* c) {
  __m512 acc[1] = {_mm512_setzero_ps()};
  constexpr int64_t L = kLanesK<E>;
  int64_t k = 0;
  for (; k + L <= K; k += L) dot_step<1, 1, E>(acc, a + k, 0, w + k, 0, k_mask<E>(L));
  if (k < K) dot_step<1, 1, E>(acc, a + k, 0, w + k, 0, k_mask<E>(K - k));
  const float r = _mm512_reduce_add_ps(acc[0]);
  *c = beta == 0.f ? r : r + beta * *c;
}

// C[m, N] = A[m, K] W^T + beta C for W [N, K] row-major and m <= kDotMaxRows: dot products in blocks of 16
// (dot_block) over panels of 16 rows of W, each panel walked 4 rows at a time (see panel below). MKL's sgemm at
// these shapes packs W on every call and ran at 95 GFLOP/s a core for [16, 512] x [512, 512] (no_grad torch.mm, 1
// thread). Panels are split over the threads when the call is outside a parallel region and carries the work for it.
template <typename E>
void dot_gemm(int64_t m, int64_t N, int64_t K, const E* a, int64_t lda, const E* w, float beta, float* c,
              int64_t ldc) {
  constexpr int64_t kPanel = 16;
  auto panel = [&](int64_t n0, int64_t n1) {
    // rows in groups of 4, W's rows 4 at a time in the outer loop: those 4 rows stay in L1 while every group meets
    // them (at K = 512 the 16 rows of A and 4 of W are 40 KB; a 16-row W panel with A was 64 KB, and ran from L2)
    const int64_t m4 = m / 4 * 4;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4)
      for (int64_t r = 0; r < m4; r += 4)
        dot_block<4, 4, E>(K, a + r * lda, lda, w + n * K, K, beta, c + r * ldc + n, ldc);
    for (; n < n1; ++n)
      for (int64_t r = 0; r < m4; ++r) dot_one(K, a + r * lda, w + n * K, beta, c + r * ldc + n);
    int64_t r = m4;
    auto blocks = [&](auto mr, auto nr) {
      constexpr int Mr = decltype(mr)::value, Nr = decltype(nr)::value;
      int64_t j = n0;
      for (; j + Nr <= n1; j += Nr)
        dot_block<Mr, Nr, E>(K, a + r * lda, lda, w + j * K, K, beta, c + r * ldc + j, ldc);
      for (; j < n1; ++j)
        for (int i = 0; i < Mr; ++i) dot_one(K, a + (r + i) * lda, w + j * K, beta, c + (r + i) * ldc + j);
      r += Mr;
    };
    using std::integral_constant;
    if (m - r >= 2) blocks(integral_constant<int, 2>{}, integral_constant<int, 8>{});
    if (m - r >= 1) blocks(integral_constant<int, 1>{}, integral_constant<int, 16>{});
  };
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(2 * m * kPanel * K, 1));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    panel(p0 * kPanel, std::min(N, p1 * kPanel));
  });
}

// ---- one row against a W that every step meets: W^T in blocks of 16 rows x 16 columns of K ----
// dot_gemm at one row reads 16 rows of W at once, 16 streams the prefetcher tracks poorly: a step [1, 256] x
// [256, 1024] (LSTM H=256, W 1 MB, in L2 on 2 cores) took 5.2 us a core where the same products on this layout,
// one stream, took 3.7 (an EPYC, Zen 5, a stand-alone loop). Group g of 16 rows of W, chunk q of 16 columns of K
// is the block at (g * chunks + q) * 256 floats, row-major; rows past N and columns past K are zero.
constexpr int64_t kDotBlk = 16;
// The W that StepGemm packs so for one-row steps: 1 MB. One step in us, old layout -> packed, W in L2 (2 threads, a
// 2-core EPYC, 256 steps): LSTM H=64 1.19 -> 1.02, H=256 10.1 -> 8.5; GRU H=256 8.1 -> 7.4; RNN H=512 12.2 -> 10.8.
constexpr int64_t kDotPackMin = int64_t(1) << 13, kDotPackMax = int64_t(1) << 18;

int64_t dot_packed_floats(int64_t N, int64_t K) {
  return (N + kDotBlk - 1) / kDotBlk * ((K + kDotBlk - 1) / kDotBlk) * kDotBlk * kDotBlk;
}

// W [N, K] row-major (row stride ld) into that layout.
void pack_dot(const float* w, int64_t N, int64_t K, int64_t ld, float* p) {
  const int64_t groups = (N + kDotBlk - 1) / kDotBlk, chunks = (K + kDotBlk - 1) / kDotBlk;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(kDotBlk * K, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t q = 0; q < chunks; ++q) {
        float* blk = p + (g * chunks + q) * kDotBlk * kDotBlk;
        const __mmask16 cols = k_mask<float>(K - q * kDotBlk);
        for (int64_t j = 0; j < kDotBlk; ++j) {
          const int64_t n = g * kDotBlk + j;
          const __m512 v = n < N ? _mm512_maskz_loadu_ps(cols, w + n * ld + q * kDotBlk) : _mm512_setzero_ps();
          _mm512_storeu_ps(blk + j * kDotBlk, v);
        }
      }
  });
}

// One row of C against group g's 16 columns of C (rows of W): 16 accumulators, one load of A and one of each row of
// the block every column of K, their lanes summed once (lane_sums16).
inline void dot_packed_group(int64_t K, const float* a, const float* pg, int64_t width, float beta, float* c) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const float* pb = pg;
  for (int64_t k = 0; k < K; k += kDotBlk, pb += kDotBlk * kDotBlk) {
    const __m512 av = _mm512_maskz_loadu_ps(k_mask<float>(K - k), a + k);
#pragma GCC unroll 16
    for (int n = 0; n < 16; ++n) acc[n] = _mm512_fmadd_ps(av, _mm512_loadu_ps(pb + n * kDotBlk), acc[n]);
  }
  alignas(64) float r[16];
  _mm512_store_ps(r, lane_sums16(acc));
  for (int64_t n = 0; n < width; ++n) c[n] = beta == 0.f ? r[n] : r[n] + beta * c[n];
}

// C[m, N] = A[m, K] W^T + beta C for W packed by pack_dot (StepGemm packs so for one-row steps only; more rows are
// taken one at a time), groups split over the threads as dot_gemm splits its panels.
void dot_packed_gemm(int64_t m, int64_t N, int64_t K, const float* a, int64_t lda, const float* p, float beta,
                     float* c, int64_t ldc) {
  const int64_t groups = (N + kDotBlk - 1) / kDotBlk, chunks = (K + kDotBlk - 1) / kDotBlk;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(2 * m * kDotBlk * K, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kDotBlk, width = std::min(kDotBlk, N - n0);
      for (int64_t r = 0; r < m; ++r)
        dot_packed_group(K, a + r * lda, p + g * chunks * kDotBlk * kDotBlk, width, beta, c + r * ldc + n0);
    }
  });
}

// 16 elements of a W row as float32 (bfloat16 widened exactly).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BF16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// C's 16 lanes stored: float32, or bfloat16 (a weight gradient written in the call's own type: rounded once, to
// nearest even, from its float32 sums). They are read back with load16.
inline void c_store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
#if defined(FASTRNN_DOT_BF16)
inline void c_store(BF16* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, __m256i(_mm512_cvtneps_pbh(v))); }
#endif

// C[0:Mr, n:n+16*Nv] (+)= A[0:Mr, k0:k1] W[k0:k1, n:n+16*Nv] for W [K, N] row-major: each step of k broadcasts Mr
// elements of A against Nv vectors of W's row k (no lane sums: the columns are C's). last: the lanes of the last
// vector that are there. load: start from C (a later chunk of K, or beta = 1), else from zero.
template <int Mr, int Nv, typename EA, typename EW, typename EC>
inline void axpy_block(int64_t k0, int64_t k1, const EA* a, int64_t sm, int64_t sk, const EW* w, int64_t ldw, EC* c,
                       int64_t ldc, __mmask16 last, bool load) {
  __m512 acc[Mr][Nv];
  auto mask = [&](int v) { return v == Nv - 1 ? last : __mmask16(0xFFFF); };
#pragma GCC unroll 8
  for (int m = 0; m < Mr; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < Nv; ++v)
      acc[m][v] = load ? load16(c + m * ldc + 16 * v, mask(v)) : _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    __m512 wv[Nv];
#pragma GCC unroll 8
    for (int v = 0; v < Nv; ++v) wv[v] = load16(w + k * ldw + 16 * v, mask(v));
#pragma GCC unroll 8
    for (int m = 0; m < Mr; ++m) {
      const __m512 av = _mm512_set1_ps(float(a[m * sm + k * sk]));
#pragma GCC unroll 8
      for (int v = 0; v < Nv; ++v) acc[m][v] = _mm512_fmadd_ps(av, wv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < Mr; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < Nv; ++v) c_store(c + m * ldc + 16 * v, mask(v), acc[m][v]);
}

// axpy_block of nv (1-4) vectors of columns, the count known at run time (EA: A's elements, EW: W's, EC: C's)
template <int Mr, typename EA, typename EW, typename EC>
inline void axpy_block_cols(int64_t nv, int64_t k0, int64_t k1, const EA* a, int64_t sm, int64_t sk, const EW* w,
                            int64_t ldw, EC* c, int64_t ldc, __mmask16 last, bool load) {
  switch (nv) {
    case 1: return axpy_block<Mr, 1>(k0, k1, a, sm, sk, w, ldw, c, ldc, last, load);
    case 2: return axpy_block<Mr, 2>(k0, k1, a, sm, sk, w, ldw, c, ldc, last, load);
    case 3: return axpy_block<Mr, 3>(k0, k1, a, sm, sk, w, ldw, c, ldc, last, load);
    default: return axpy_block<Mr, 4>(k0, k1, a, sm, sk, w, ldw, c, ldc, last, load);
  }
}

// C[m, N] = A[m, K] W + beta C for W [K, N] (row stride ldw) where m or K is at most kDotMaxRows: the backward's
// d h = d_gates W_hh of a Cell or a B <= 2 layer (bfloat16 W widened as it is read), or a Cell's weight gradient
// d_gates^T h (trans_a, K = B). Blocks of 4 rows x 64 columns (axpy_block) over chunks of 128 rows of W (32 KB, in L1
// while every group of rows meets them), column blocks split over the threads outside a parallel region. A bfloat16
// C (EC) is written once, rounded from the float32 sums: beta 0 and K in one chunk only.
template <typename E, typename EC = float>
void axpy_gemm(int64_t m, int64_t N, int64_t K, const E* a, int64_t lda, const E* w, int64_t ldw, float beta,
               EC* c, int64_t ldc, bool trans_a = false) {
  // A's element (r, k): a[r * lda + k], or a[k * lda + r] when trans_a (A^T stored: a weight gradient's d_gates)
  const int64_t sm = trans_a ? 1 : lda, sk = trans_a ? lda : 1;
  constexpr int64_t kCols = 64, kChunk = 128;
  if constexpr (!std::is_same_v<EC, float>) {
    TORCH_INTERNAL_ASSERT(beta == 0.f && K <= kChunk, "fastrnn: a bfloat16 C is written once, not accumulated");
  } else if (beta != 0.f && beta != 1.f) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t n = 0; n < N; ++n) c[r * ldc + n] *= beta;
  }
  const int64_t blocks = (N + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(2 * m * kCols * K, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kCols, cols = std::min(kCols, N - n0), nv = (cols + 15) / 16;
      const __mmask16 last = __mmask16(cols % 16 == 0 ? 0xFFFF : (1u << (cols % 16)) - 1);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        const bool load = k0 > 0 || beta != 0.f;
        auto rows = [&](auto mr, int64_t r) {
          constexpr int Mr = decltype(mr)::value;
          axpy_block_cols<Mr>(nv, k0, k1, a + r * sm, sm, sk, w + n0, ldw, c + r * ldc + n0, ldc, last, load);
        };
        using std::integral_constant;
        int64_t r = 0;
        for (; r + 4 <= m; r += 4) rows(integral_constant<int, 4>{}, r);
        switch (m - r) {
          case 3: rows(integral_constant<int, 3>{}, r); break;
          case 2: rows(integral_constant<int, 2>{}, r); break;
          case 1: rows(integral_constant<int, 1>{}, r); break;
          default: break;
        }
      }
    }
  });
}

// ---- the extension's own packed float32 GEMM: C[m, N] = A[m, K] op(W) for a W that many rows meet ----
// MKL runs its AVX-512 kernels on Intel CPUs only: on an AMD EPYC (Zen 5) its sgemm ran the LSTM's step GEMM
// [64, 1024] x [1024, 4096] at 170 GFLOP/s on 2 cores, this kernel at 485 (oneDNN's RNN, torch.nn's LSTM, about
// 382). op(W) [K, N] is packed once into panels of kPanelCols columns, each [K, kPanelCols] row-major and zero past N,
// so a panel's rows are 256 bytes apart whatever N is. A block of kPanelRows rows of A meets a panel's chunk of kKc
// rows (64 KB, in L2 while every block of the task's rows meets it) in axpy_block: 24 accumulators, each step of k
// one broadcast of A per row against four vectors of W.
constexpr int64_t kPanelCols = 64, kPanelRows = 6, kKc = 256, kMc = 192;

int64_t panel_floats(int64_t N, int64_t K) { return (N + kPanelCols - 1) / kPanelCols * kPanelCols * K; }

// Panel columns [n0, n0 + cols) of op(W) = W^T for W [N, K] (row stride ld), into pq: a transpose. Row k of the
// panel's 16 columns j0.. is two 8-lane gathers down 16 rows of W (their lines stay in L1 over 16 steps of k; 64-bit
// offsets, so any ld); columns past N are zero.
void transpose_panel(const float* w, int64_t ld, int64_t K, int64_t n0, int64_t cols, float* pq) {
  for (int64_t j0 = 0; j0 < kPanelCols; j0 += 16) {
    const int64_t jn = std::clamp<int64_t>(cols - j0, 0, 16);
    float* dst = pq + j0;
    if (jn == 0) {
      for (int64_t k = 0; k < K; ++k) _mm512_storeu_ps(dst + k * kPanelCols, _mm512_setzero_ps());
      continue;
    }
    const __mmask16 lanes = __mmask16((1u << jn) - 1);
    const __m512i idx = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(ld));
    const __m512i idx8 = _mm512_add_epi64(idx, _mm512_set1_epi64(8 * ld));
    const float* src = w + (n0 + j0) * ld;
    for (int64_t k = 0; k < K; ++k) {
      const __m256 lo = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), __mmask8(lanes), idx, src + k, 4);
      const __m256 hi = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), __mmask8(lanes >> 8), idx8, src + k, 4);
      _mm512_storeu_ps(dst + k * kPanelCols, _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
    }
  }
}

// op(W) into panels. S: float, or bfloat16 widened as it is packed (a bfloat16 call's weight gradients: W [K, N]
// only, which is all they pass).
template <typename S>
void pack_panels(const S* w, bool trans, int64_t N, int64_t K, float* p, int64_t ld) {
  TORCH_INTERNAL_ASSERT((std::is_same_v<S, float> || !trans), "fastrnn: pack_panels packs no transposed bfloat16 W");
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(kPanelCols * K, 1));
  at::parallel_for(0, panels, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * kPanelCols, cols = std::min(kPanelCols, N - n0);
      float* pq = p + q * K * kPanelCols;
      if (!trans) {  // W [K, N]: each row of the panel is a piece of one row of W
        for (int64_t k = 0; k < K; ++k) {
          std::copy(w + k * ld + n0, w + k * ld + n0 + cols, pq + k * kPanelCols);
          std::fill(pq + k * kPanelCols + cols, pq + (k + 1) * kPanelCols, 0.f);
        }
      } else if constexpr (std::is_same_v<S, float>) {
        transpose_panel(w, ld, K, n0, cols, pq);
      }
    }
  });
}

// C (ldc) = beta C + A op(W) (+ bias, a row of N added to every row, when bias is given) for W packed by pack_panels;
// A's element (r, k) at a[r * sm + k * sk]. Tasks of kMc rows by one panel, split over the threads outside a parallel
// region when the call carries the work for it.
template <typename EA>
void panel_gemm(int64_t m, int64_t N, int64_t K, const EA* a, int64_t sm, int64_t sk, const float* p, float beta,
                const float* bias, float* c, int64_t ldc) {
  if (m <= 0 || N <= 0) return;
  if (beta != 0.f && beta != 1.f)
    for (int64_t r = 0; r < m; ++r)
      for (int64_t n = 0; n < N; ++n) c[r * ldc + n] *= beta;
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols, chunks = (m + kMc - 1) / kMc;
  const int64_t rows = std::min(m, kMc);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(2 * rows * kPanelCols * K, 1));
  at::parallel_for(0, chunks * panels, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q = t % panels, r0 = (t / panels) * kMc, r1 = std::min(m, r0 + kMc);
      const int64_t n0 = q * kPanelCols, cols = std::min(kPanelCols, N - n0), nv = (cols + 15) / 16;
      const __mmask16 last = __mmask16(cols % 16 == 0 ? 0xFFFF : (1u << (cols % 16)) - 1);
      const float* pq = p + q * K * kPanelCols;
      if (K == 0 || bias != nullptr) {  // the bias rows first (the block is in cache for its first chunk of K)
        for (int64_t r = r0; r < r1; ++r) {
          float* cr = c + r * ldc + n0;
          for (int64_t j = 0; j < cols; ++j) cr[j] = (beta == 0.f ? 0.f : cr[j]) + (bias ? bias[n0 + j] : 0.f);
        }
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t k1 = std::min(K, k0 + kKc);
        const bool load = k0 > 0 || beta != 0.f || bias != nullptr;
        auto block = [&](auto mr, int64_t r) {
          constexpr int Mr = decltype(mr)::value;
          axpy_block_cols<Mr>(nv, k0, k1, a + r * sm, sm, sk, pq, kPanelCols, c + r * ldc + n0, ldc, last,
                                     load);
        };
        using std::integral_constant;
        int64_t r = r0;
        for (; r + kPanelRows <= r1; r += kPanelRows) block(integral_constant<int, kPanelRows>{}, r);
        switch (r1 - r) {
          case 5: block(integral_constant<int, 5>{}, r); break;
          case 4: block(integral_constant<int, 4>{}, r); break;
          case 3: block(integral_constant<int, 3>{}, r); break;
          case 2: block(integral_constant<int, 2>{}, r); break;
          case 1: block(integral_constant<int, 1>{}, r); break;
          default: break;
        }
      }
    }
  });
}
// C = beta C + op(A) op(B) on the own kernel with op(B) packed for this one call: gemm()'s GEMMs of kOwnGemmMinRows
// rows or more where own_gemm_enabled. S: float, or bfloat16 widened as it is read (then op(B) = B: pack_panels).
template <typename S>
void own_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const S* a, int64_t lda, const S* b, int64_t ldb,
              float beta, float* c, int64_t ldc) {
  Tensor p = at::empty({panel_floats(n, k)}, at::TensorOptions().dtype(at::kFloat));
  pack_panels(b, tb, n, k, p.data_ptr<float>(), ldb);
  panel_gemm(m, n, k, a, ta ? 1 : lda, ta ? lda : 1, p.data_ptr<float>(), beta, nullptr, c, ldc);
}
#endif

bool own_gemm_enabled() {
#if defined(CPU_CAPABILITY_AVX512)
  if (const char* v = std::getenv("FASTRNN_CPP_OWN_GEMM")) {
    if (std::string(v) == "1") return true;
    if (std::string(v) == "0") return false;
  }
  return !__builtin_cpu_is("intel");
#else
  return false;
#endif
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#if defined(CPU_CAPABILITY_AVX512)
  // Where the own kernel runs (own_gemm_enabled), a GEMM of enough rows to repay packing op(B) (a pass over it) runs
  // there too: the weight gradients over all T*B rows, the projections. Up to kOnceMaxUnpackedRows rows against a
  // B [n, k] (op(B) = B^T), dot_gemm's passes of 16 rows over B as it is cost less than the packing.
  if (alpha == 1.f && m >= kOwnGemmMinRows && n > 0 && k > 0 && own_gemm_enabled()) {
    if (!ta && tb && ldb == k && m <= kOnceMaxUnpackedRows) {  // passes of 16 rows over B [n, k] as it is
      for (int64_t r = 0; r < m; r += kDotMaxRows)
        dot_gemm(std::min(kDotMaxRows, m - r), n, k, a + r * lda, lda, b, beta, c + r * ldc, ldc);
      return;
    }
    return own_gemm(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
#endif
  gemm_impl<float>(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void small_gemv(bool trans, int64_t N, int64_t K, const float* w, const float* a, float beta, float* c) {
  using V = Vec<float>;
  constexpr int64_t L = V::size();
  auto sum = [](const V& v) {
    float t[L];
    v.store(t);
    float s = 0.f;
    for (int64_t i = 0; i < L; ++i) s += t[i];
    return s;
  };
  auto put = [&](int64_t n, float r) { c[n] = beta == 0.f ? r : r + beta * c[n]; };
  if (trans) {
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
      const float *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
      V s0(0.f), s1(0.f), s2(0.f), s3(0.f);
      int64_t k = 0;
      for (; k + L <= K; k += L) {
        const V x = V::loadu(a + k);
        s0 = at::vec::fmadd(V::loadu(w0 + k), x, s0);
        s1 = at::vec::fmadd(V::loadu(w1 + k), x, s1);
        s2 = at::vec::fmadd(V::loadu(w2 + k), x, s2);
        s3 = at::vec::fmadd(V::loadu(w3 + k), x, s3);
      }
      float r0 = sum(s0), r1 = sum(s1), r2 = sum(s2), r3 = sum(s3);
      for (; k < K; ++k) {
        r0 += w0[k] * a[k];
        r1 += w1[k] * a[k];
        r2 += w2[k] * a[k];
        r3 += w3[k] * a[k];
      }
      put(n, r0);
      put(n + 1, r1);
      put(n + 2, r2);
      put(n + 3, r3);
    }
    for (; n < N; ++n) {
      const float* wn = w + n * K;
      V s(0.f);
      int64_t k = 0;
      for (; k + L <= K; k += L) s = at::vec::fmadd(V::loadu(wn + k), V::loadu(a + k), s);
      float r = sum(s);
      for (; k < K; ++k) r += wn[k] * a[k];
      put(n, r);
    }
    return;
  }
  if (beta == 0.f) std::fill(c, c + N, 0.f);
  else if (beta != 1.f) for (int64_t n = 0; n < N; ++n) c[n] *= beta;
  for (int64_t k = 0; k < K; ++k) {
    const V ak(a[k]);
    const float* wk = w + k * N;
    int64_t n = 0;
    for (; n + L <= N; n += L) at::vec::fmadd(ak, V::loadu(wk + n), V::loadu(c + n)).store(c + n);
    for (; n < N; ++n) c[n] += a[k] * wk[n];
  }
}

template <typename T>
StepGemm<T>::StepGemm(const T* w, bool trans, int64_t N, int64_t K, int64_t max_m)
    : w_(w), trans_(trans), N_(N), K_(K) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (max_m >= kPackMinRows && N > 0 && K > 0 && own_gemm_enabled()) {
      own_ = at::empty({panel_floats(N, K)}, at::TensorOptions().dtype(at::kFloat));
      pack_panels(w, trans, N, K, own_.data_ptr<float>(), trans ? K : N);
      return;
    }
    // one row against a W of kDotPackMin to kDotPackMax elements: dot_packed_gemm (where W leaves L2, its one stream
    // lost to dot_gemm's 16: LSTM B=1 H=512, 4 MB, 0.80x; in L1, RNN H=64 (16 KB) lost 0.89x; at two rows the blocks'
    // second pass lost, 0.82x-0.87x at H=64)
    if (max_m == 1 && trans && N * K >= kDotPackMin && N * K <= kDotPackMax && own_gemm_enabled()) {
      dot_ = at::empty({dot_packed_floats(N, K)}, at::TensorOptions().dtype(at::kFloat));
      pack_dot(w, N, K, K, dot_.data_ptr<float>());
      return;
    }
#endif
    // One or two rows are a matrix-vector product in all but name: plain sgemm beats the packed weight there.
    if (max_m < kPackMinRows || N <= 0 || K <= 0 || !packing_enabled()) return;
    const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(max_m), int(N), int(K));
    packed_ = at::empty({int64_t(bytes / sizeof(float)) + 16}, at::TensorOptions().dtype(at::kFloat));
    cblas_sgemm_pack(kRowMajor, kBMatrix, trans ? kTrans : kNoTrans, int(max_m), int(N), int(K), 1.0f, w,
                     int(trans ? K : N), packed_.data_ptr<float>());
  }
}

template <typename T>
void StepGemm<T>::operator()(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
  if (m <= 0 || N_ <= 0) return;
  if (K_ <= 0) {  // an empty sum (H == 0): BLAS refuses the zero leading dimensions this would pass
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < N_; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (own_.defined()) return panel_gemm(m, N_, K_, a, lda, 1, own_.data_ptr<float>(), beta, nullptr, c, ldc);
    if (dot_.defined()) return dot_packed_gemm(m, N_, K_, a, lda, dot_.data_ptr<float>(), beta, c, ldc);
#endif
    if (packed_.defined()) {
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m), int(N_), int(K_), a, int(lda),
                          packed_.data_ptr<float>(), int(trans_ ? K_ : N_), beta, c, int(ldc));
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (m <= kDotMaxRows) {
      if (trans_) return dot_gemm(m, N_, K_, a, lda, w_, beta, c, ldc);
      return axpy_gemm(m, N_, K_, a, lda, w_, N_, beta, c, ldc);
    }
#endif
    if (m == 1 && N_ * K_ <= kOwnGemvMax) return small_gemv(trans_, N_, K_, w_, a, beta, c);
  }
  auto* gemv = [] {
    if constexpr (std::is_same_v<T, float>) return sgemv_;
    else return dgemv_;
  }();
  if (m == 1 && gemv != nullptr) {
    // one row: c = op(W) a as a matrix-vector product (column-major W^T when W is [N, K] row-major)
    const char tr = trans_ ? 'T' : 'N';
    const int M = int(trans_ ? K_ : N_), N = int(trans_ ? N_ : K_), one = 1;
    const T alpha = T(1);
    gemv(&tr, &M, &N, &alpha, w_, &M, a, &one, &beta, c, &one);
    return;
  }
  gemm(false, trans_, m, N_, K_, T(1), a, lda, w_, trans_ ? K_ : N_, beta, c, ldc);
}

template <typename T>
void StepGemm<T>::with_bias(int64_t m, const T* a, int64_t lda, const T* bias, T* c, int64_t ldc) const {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (own_.defined()) return panel_gemm(m, N_, K_, a, lda, 1, own_.data_ptr<float>(), 0.f, bias, c, ldc);
#endif
  }
  for (int64_t r = 0; r < m; ++r) std::copy(bias, bias + N_, c + r * ldc);
  (*this)(m, a, lda, T(1), c, ldc);
}

template class StepGemm<float>;
template class StepGemm<double>;

// ---- bfloat16 operands, float32 accumulation ----

namespace {

// C = beta C for an empty sum (k == 0), which BLAS refuses.
void scale_rows(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
}

// Without MKL: the product in float32 through ATen on tensors that borrow the memory.
void gemm_bf16_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const BF16* a, int64_t lda,
                    const BF16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(at::kBFloat16);
  Tensor A = at::from_blob(const_cast<BF16*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, opts).to(at::kFloat);
  Tensor Bt = at::from_blob(const_cast<BF16*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, opts).to(at::kFloat);
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (ta) A = A.t();
  if (tb) Bt = Bt.t();
  if (beta == 0.f) C.zero_();
  C.addmm_(A, Bt, beta == 0.f ? 1.f : beta, alpha);
}

// oneDNN's brgemm ukernel (ATen's cpublas) has bfloat16 kernels for AMX and for AVX512-BF16; could_pack answers only
// for AMX, but on AVX512-BF16 alone (AMD Zen 4/5, Intel Cooper Lake) the same VNNI-packed call runs too: Zen 5, B = 64,
// K = 1024: 487 GFLOP/s on 2 cores, where MKL's cblas_gemm_bf16bf16f32 is not tuned for the CPU (0.3x torch.nn's LSTM).
// AMX-BF16 (which ATen's could_pack answers for bfloat16): where MKL's bfloat16 GEMM runs on AMX tiles.
bool has_amx_bf16() {
  static const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  return amx;
}

bool brgemm_enabled() {
  const char* v = std::getenv("FASTRNN_CPP_AMX");
  if (v != nullptr && std::string(v) == "0") return false;
  return has_amx_bf16() || __builtin_cpu_supports("avx512bf16");
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const BF16* a, int64_t lda, const BF16* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_rows(m, n, beta, c, ldc);
#if defined(CPU_CAPABILITY_AVX512) && defined(FASTRNN_DOT_BF16)
  // A^T B over a few rows (a Cell's weight gradient: k is its batch) on a CPU without AMX: the rank-k update in the
  // extension's own kernel, where MKL's bfloat16 GEMM widens both operands first and is not tuned for the CPU
  if (ta && !tb && alpha == 1.f && k <= kDotMaxRows && !has_amx_bf16())
    return axpy_gemm(m, n, k, a, lda, b, ldb, beta, c, ldc, /*trans_a=*/true);
#endif
#if defined(CPU_CAPABILITY_AVX512)
  // Many rows (the weight gradients over all T*B rows) where the own float32 kernel runs: own_gemm_enabled's CPUs are
  // those whose MKL has no tuned path, and its bfloat16 GEMM widens both operands into its AVX2 sgemm (an EPYC: 23% of
  // LSTM T=32 B=64 H=256 training). Here op(B) is widened into the kernel's panels and A as it is read: a product of
  // two bfloat16 is exact in float32 and the sums are float32, as MKL's.
  if (!tb && alpha == 1.f && m >= kOwnGemmMinRows && own_gemm_enabled())
    return own_gemm(ta, false, m, n, k, a, lda, b, ldb, beta, c, ldc);
#endif
  if (cblas_gemm_bf16bf16f32 == nullptr) return gemm_bf16_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(m), int(n), int(k), alpha,
                         reinterpret_cast<const uint16_t*>(a), int(lda), reinterpret_cast<const uint16_t*>(b),
                         int(ldb), beta, c, int(ldc));
}

bool has_small_bf16_gemm(int64_t rows) {
#if defined(CPU_CAPABILITY_AVX512) && defined(FASTRNN_DOT_BF16)
  // on AMX, MKL's bfloat16 GEMM keeps these (as Bf16Gemm's small steps): not measured against the own kernels there
  return rows >= 0 && rows <= kDotMaxRows && !has_amx_bf16();
#else
  (void)rows;
  return false;
#endif
}

void small_k_gemm_bf16(int64_t m, int64_t n, int64_t k, const BF16* a, int64_t lda, const BF16* b, int64_t ldb,
                       BF16* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(has_small_bf16_gemm(k), "fastrnn: small_k_gemm_bf16 has no kernel for k = ", k, " here");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, BF16(0.f));
    return;
  }
#if defined(CPU_CAPABILITY_AVX512) && defined(FASTRNN_DOT_BF16)
  axpy_gemm(m, n, k, a, lda, b, ldb, 0.f, c, ldc, /*trans_a=*/true);
#endif
}

void small_rows_gemm_bf16(int64_t m, int64_t n, int64_t k, const BF16* a, const BF16* w, bool trans_w,
                          const BF16* bias, BF16* c) {
  TORCH_INTERNAL_ASSERT(has_small_bf16_gemm(m), "fastrnn: small_rows_gemm_bf16 has no kernel for ", m, " rows here");
  if (m == 0 || n == 0) return;
#if defined(CPU_CAPABILITY_AVX512) && defined(FASTRNN_DOT_BF16)
  thread_local std::vector<float> acc;  // at most 16 rows of C: kept, so a Cell's every call does not allocate it
  acc.resize(size_t(m * n));
  for (int64_t r = 0; r < m; ++r) {
    float* row = acc.data() + r * n;
    if (bias != nullptr) {
      for (int64_t j = 0; j < n; ++j) row[j] = float(bias[j]);
    } else {
      std::fill(row, row + n, 0.f);
    }
  }
  if (k > 0) {
    if (trans_w) dot_gemm(m, n, k, a, k, w, 1.f, acc.data(), n);
    else axpy_gemm(m, n, k, a, k, w, n, 1.f, acc.data(), n);
  }
  const float* src = acc.data();
  at::parallel_for(0, m * n, 1 << 14, [&](int64_t i0, int64_t i1) {
    vec_range<float>(i0, i1, [&](int64_t i, int64_t cnt) { vstore(vload(src + i, cnt), c + i, cnt); });
  });
#endif
}

namespace {

// One VNNI block of kBlock columns of op(W) (Bf16Gemm), o: [ceil(K/2)][kBlock] 32-bit pairs; columns >= width zero.
constexpr int64_t kVnniBlock = Bf16Gemm::kBlock;

// op(W) = W^T, W [N, K]: the pair (k, k+1) of column n is 32 contiguous bits of row n of W, so the block is a
// transpose of 32-bit elements: 16 rows gathered per store.
void pack_rows_t(const uint16_t* w, int64_t K, int64_t n0, int64_t width, uint32_t* o) {
  const int64_t K2 = K / 2, half = (K + 1) / 2;
  for (int64_t g = 0; g < kVnniBlock; g += 16) {
    const int64_t rows = std::clamp<int64_t>(width - g, 0, 16);
    const uint16_t* base = w + (n0 + g) * K;
    int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
    const __mmask16 m = rows >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(int(K)));
    for (; i < K2; ++i) {
      const __m512i v = rows ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, base + 2 * i, 2)
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(o + i * kVnniBlock + g, v);
    }
#endif
    for (; i < half; ++i)
      for (int64_t j = 0; j < 16; ++j) {
        const uint16_t* row = base + j * K;
        o[i * kVnniBlock + g + j] =
            j >= rows ? 0u : 2 * i + 1 < K ? uint32_t(row[2 * i]) | uint32_t(row[2 * i + 1]) << 16 : row[2 * i];
      }
  }
}

// op(W) = W, W [K, N]: rows 2i and 2i+1 of W interleaved.
void pack_rows_n(const uint16_t* w, int64_t K, int64_t N, int64_t n0, int64_t width, uint16_t* o) {
  const int64_t half = (K + 1) / 2;
  for (int64_t i = 0; i < half; ++i) {
    const uint16_t* r0 = w + 2 * i * N + n0;
    const uint16_t* r1 = 2 * i + 1 < K ? r0 + N : nullptr;
    uint16_t* oi = o + i * kVnniBlock * 2;
    int64_t nn = 0;
#if defined(CPU_CAPABILITY_AVX512)
    for (; nn < kVnniBlock; nn += 16) {
      const int64_t cnt = std::clamp<int64_t>(width - nn, 0, 16);
      const __mmask16 m = cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + nn));
      const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + nn)) : _mm512_setzero_si512();
      _mm512_storeu_si512(oi + 2 * nn, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
#endif
    for (; nn < kVnniBlock; ++nn) {
      oi[2 * nn] = nn < width ? r0[nn] : 0;
      oi[2 * nn + 1] = nn < width && r1 ? r1[nn] : 0;
    }
  }
}

}  // namespace

template <typename S, typename T>
void column_sums(const S* a, int64_t rows, int64_t cols, T* out) {
  constexpr int64_t W = Vec<T>::size(), kCols = 4 * W;  // four accumulators a task
  const int64_t tasks = (cols + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(rows * kCols, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kCols, c1 = std::min(cols, c0 + kCols);
      Vec<T> acc[4] = {Vec<T>(T(0)), Vec<T>(T(0)), Vec<T>(T(0)), Vec<T>(T(0))};
      for (int64_t r = 0; r < rows; ++r) {
        const S* row = a + r * cols;
        for (int64_t q = 0; q < 4 && c0 + q * W < c1; ++q) {
          const int64_t j = c0 + q * W;
          acc[q] = acc[q] + vload(row + j, std::min(W, c1 - j));
        }
      }
      for (int64_t q = 0; q < 4 && c0 + q * W < c1; ++q) {
        const int64_t j = c0 + q * W;
        vstore(acc[q], out + j, std::min(W, c1 - j));
      }
    }
  });
}
template void column_sums(const BF16*, int64_t, int64_t, float*);
template void column_sums(const float*, int64_t, int64_t, float*);
template void column_sums(const double*, int64_t, int64_t, double*);

template <typename S>
Bf16Gemm::Bf16Gemm(const S* w, bool trans, int64_t N, int64_t K, int64_t seg, bool pack)
    : trans_(trans), N_(N), K_(K), Kp_(K + K % 2), seg_(seg), nbs_(seg > 0 ? (seg + kBlock - 1) / kBlock : 0) {
  TORCH_INTERNAL_ASSERT(seg == 0 ? N == 0 : N % seg == 0, "fastrnn: ", N, " columns in segments of ", seg);
  if (N == 0 || K == 0) return;
  const auto f32 = at::TensorOptions().dtype(at::kFloat), b16 = at::TensorOptions().dtype(at::kBFloat16);
  brgemm_ = pack && brgemm_enabled();
  // unpacked steps of few rows: the extension's own AVX512-BF16 kernels where MKL has no AMX to run them on (on
  // AMX, MKL's bfloat16 GEMM keeps them: not measured against these)
  own_small_ = !brgemm_ && !has_amx_bf16();
  if constexpr (std::is_same_v<S, float>) {
    // rounded to bfloat16 once: the operand of either path
    w16_buf_ = at::from_blob(const_cast<S*>(w), {trans ? N : K, trans ? K : N}, f32).to(at::kBFloat16);
    w16_ = w16_buf_.data_ptr<BF16>();
  } else {
    w16_ = w;
  }
  if (!brgemm_) return;
  at::cpu::init_amx();  // false, and nothing to do, without AMX
  // VNNI: block (q, b) holds columns col0(q, b) .. + kBlock of op(W) as [Kp / 2][kBlock][2], pairs of k adjacent;
  // the columns past a segment's end and the row k = K (odd K) are zero, so a full-width tile reads zeros there.
  const int64_t nseg = N / seg, nblk = nseg * nbs_, half = Kp_ / 2;
  packed_ = at::empty({nblk * half * kBlock * 2}, b16);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w16_);
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed_.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (Kp_ * kBlock));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t q = blk / nbs_, b = blk % nbs_, n0 = col0(q, b), width = col1(q, b) - n0;
      uint16_t* o = dst + blk * half * kBlock * 2;
      if (trans) {
        pack_rows_t(src, K, n0, width, reinterpret_cast<uint32_t*>(o));
      } else {
        pack_rows_n(src, K, N, n0, width, o);
      }
    }
  });
}

template <typename S>
const BF16* Bf16Gemm::stage(const S* a_lo, const S* a_hi, int64_t k, int64_t n, int64_t lda) const {
  if (!stage_.defined() || stage_.size(0) < n) stage_ = at::zeros({std::max<int64_t>(n, 1), Kp_}, at::kBFloat16);
  BF16* dst = stage_.data_ptr<BF16>();
  for (int64_t r = 0; r < n; ++r) {
    const S* src = (r < k ? a_lo : a_hi) + r * lda;
    BF16* d = dst + r * Kp_;
    vec_range<float>(0, K_, [&](int64_t j, int64_t cnt) {
      if constexpr (std::is_same_v<S, float>) vstore(vload(src + j, cnt), d + j, cnt);
      else std::copy(src + j, src + j + cnt, d + j);
    });
  }
  return dst;
}

void Bf16Gemm::run(const BF16* a_lo, const BF16* a_hi, int64_t k, int64_t lda, int64_t r0, int64_t r1, int64_t n0,
                   int64_t n1, bool accumulate, float* c, int64_t ldc) const {
  if (r1 <= r0 || n1 <= n0) return;
  if (K_ == 0) return scale_rows(r1 - r0, n1 - n0, accumulate ? 1.f : 0.f, c + r0 * ldc + n0, ldc);
  constexpr int64_t kRows = 64;  // rows a brgemm call: bounds the kernels JIT-compiled for packed steps' row counts
  const int64_t q = n0 / seg_, b = (n0 - q * seg_) / kBlock;
  const BF16* wb = brgemm_ ? static_cast<const BF16*>(packed_.data_ptr()) + (q * nbs_ + b) * Kp_ * kBlock : nullptr;
  for (int64_t r = r0; r < r1;) {
    const BF16* a = r < k ? a_lo : a_hi;
    const int64_t end = r < k ? std::min(r1, k) : r1;
    for (int64_t m; r < end; r += m) {
      m = std::min(kRows, end - r);
      float* cr = c + r * ldc + n0;
      if (brgemm_) {
        TORCH_INTERNAL_ASSERT(K_ % 2 == 0 || lda == Kp_, "fastrnn: an odd K needs a staged A");
        at::native::cpublas::brgemm(m, n1 - n0, Kp_, lda, kBlock, ldc, accumulate, a + r * lda, wb, cr, true);
      } else {
        // op(W)[:, n0:n1] is rows n0.. of W [N, K] (trans) or columns n0.. of W [K, N]
        const BF16* wc = trans_ ? w16_ + n0 * K_ : w16_ + n0;
        const float beta = accumulate ? 1.f : 0.f;
#if defined(CPU_CAPABILITY_AVX512) && defined(FASTRNN_DOT_BF16)
        if (own_small_ && m <= kDotMaxRows) {
          if (trans_) dot_gemm(m, n1 - n0, K_, a + r * lda, lda, wc, beta, cr, ldc);
          else axpy_gemm(m, n1 - n0, K_, a + r * lda, lda, wc, N_, beta, cr, ldc);
          continue;
        }
#endif
        gemm(false, trans_, m, n1 - n0, K_, 1.f, a + r * lda, lda, wc, trans_ ? K_ : N_, beta, cr, ldc);
      }
    }
  }
}

void Bf16Gemm::release() const {
  if (brgemm_) at::native::cpublas::brgemm_release(true);
}

template Bf16Gemm::Bf16Gemm(const float*, bool, int64_t, int64_t, int64_t, bool);
template Bf16Gemm::Bf16Gemm(const BF16*, bool, int64_t, int64_t, int64_t, bool);
template const BF16* Bf16Gemm::stage(const float*, const float*, int64_t, int64_t, int64_t) const;
template const BF16* Bf16Gemm::stage(const BF16*, const BF16*, int64_t, int64_t, int64_t) const;

}  // namespace fastrnn
