// fastrnn C++ extension: shared declarations and helpers. Sources: the time walk once (walk.h), one file per cell
// with its pointwise step (lstm.cpp, gru.cpp, rnn.cpp, ln_lstm.cpp, ln_gru.cpp), the entry points and their checks
// (recurrence.cpp), bindings only in bindings.cpp. The contract (shapes, saved layout) is fastrnn/cells.py; the maths
// is fastrnn/backends/reference.py, which every kernel here computes step for step.
#pragma once

// at::vec picks its implementation from these macros; torch's own objects set them per dispatch target, an
// extension built with -march=native sets them from what the compiler may use.
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastrnn {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using BF16 = at::BFloat16;

// Compiler, OpenMP and vector ISA the extension was built with, and ATen's parallel backend.
std::string build_info();

// ---- entry points (recurrence.cpp), one pair for every cell. cell_id is cells.py's kernel_id (lstm 0, gru 1,
// rnn_tanh 2, rnn_relu 3, ln_lstm 4, ln_gru 5). Shapes: T steps, B rows, H hidden, P = proj_size or H, G gates
// (cells.py). ----
// dtypes: float64, float32 or bfloat16, one for every tensor argument, except that the saved gates and extra are
// float32 in a bfloat16 call (cells.saved_dtype): bfloat16 keeps its state (c, the running gradients) and its
// accumulation in float32, reads and writes its tensors in bfloat16 and runs its GEMMs on bfloat16 operands (AMX
// where the CPU has it). bf16_gemm (float32 only): the same bfloat16 GEMMs for a float32 call, whose tensors and
// state stay float32.
// gx [T,B,G*H], h0 [B,P], c0 [B,H] (cells with a cell state, else None), w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?
// (cells with a projection), batch_sizes [T] int64?
// The normalised cells (cells.py "Normalised cells"; float64 and float32 only, b_hh None) also take cells.Norm as
// norm [norm_width*H] (Norm.params), zmask [T,B,H]? (the zoneout keep mask, gx's dtype) and zkeep (the keep used for
// every element where zmask is None); the other cells refuse norm and zmask.
//   -> out [T,B,P], h_n [B,P], c_n [B,H] (undefined without a cell state), gates, extra (cells.py's saved layout;
//      empty when need_saved is false or the cell saves none)
std::vector<Tensor> recurrence_forward(int64_t cell_id, const Tensor& gx, const Tensor& h0, const OptTensor& c0,
                                       const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                       const OptTensor& batch_sizes, bool reverse, bool need_saved,
                                       bool bf16_gemm = false, const OptTensor& norm = c10::nullopt,
                                       const OptTensor& zmask = c10::nullopt, double zkeep = 1.0);
//   -> d_gx [T,B,G*H], d_h0 [B,P], d_c0 [B,H], d_w_hh [G*H,P], d_b_hh [G*H], d_w_hr [P,H], d_extra [T,B,H]
//      (Grads.d_extra, normalised cells), d_norm [norm_width*H] (Grads.d_norm: d Norm.params, normalised cells);
//      each undefined where its input was absent (d_extra, d_norm: a plain cell)
std::vector<Tensor> recurrence_backward(int64_t cell_id, const Tensor& d_out, const Tensor& d_h_n,
                                        const OptTensor& d_c_n, const Tensor& h0, const OptTensor& c0,
                                        const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                        const OptTensor& batch_sizes, bool reverse, const Tensor& out,
                                        const Tensor& gates, const Tensor& extra, bool bf16_gemm = false,
                                        const OptTensor& norm = c10::nullopt, const OptTensor& zmask = c10::nullopt,
                                        double zkeep = 1.0);
// A whole unpacked layer in inference (nothing saved; plain cells, no projection): x [T,B,I], w_ih [G*H,I],
// b_ih [G*H]?, the rest as recurrence_forward. The input projection is made by the walk's caller as the walk goes:
// in one GEMM up to kWholeProjectionBytes of gx, else in chunks of steps into one reused buffer. A [T,B,G*H] tensor
// of 32 MB or more is a fresh mmap at every call here, and page-faults on first touch (bfloat16 [8192, 512] x
// [512, 2048]: 18 ms into a new tensor, 6.6 ms into a reused one). -> out [T,B,H], h_n [B,H], c_n [B,H] (undefined
// without a cell state)
std::vector<Tensor> layer_forward(int64_t cell_id, const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih,
                                  const Tensor& h0, const OptTensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
                                  bool reverse, bool bf16_gemm = false);
// One step of a Cell class (cell_step.cpp; lstm, gru, rnn_tanh, rnn_relu): x [B,I], h [B,H], c [B,H] (lstm), w_ih
// [G*H,I], w_hh [G*H,H], b_ih, b_hh [G*H]? -> h' (and c'), differentiable (a C++ autograd node) when autograd records.
std::vector<Tensor> cell_step(int64_t cell_id, const Tensor& x, const Tensor& h, const OptTensor& c,
                              const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                              bool bf16_gemm = false);
// x [rows, I] W^T + b for a layer's input projection in training (cell_step.cpp): float32 / float64 on the
// extension's GEMMs (the own kernel where own_gemm_enabled, for d x and d W too), differentiable (a C++ autograd
// node; a double backward runs ATen's mm). Other operands go to ATen, whose checks and messages then apply.
Tensor linear(const Tensor& x, const Tensor& w, const OptTensor& b);
// What the kernel table holds for cell_id: name, G, saved widths (gates, extra), cell state, projection, norm width
// (the tests compare it with fastrnn.cells).
std::tuple<std::string, int64_t, int64_t, int64_t, bool, bool, int64_t> cell_info(int64_t cell_id);

// ---- argument checks: every entry point runs these before it reads or writes any tensor memory ----

std::string shape_str(at::IntArrayRef s);

// t is a defined, contiguous CPU tensor of dtype `dtype` and exactly shape `shape`; `what` names the argument
// and its symbolic shape, e.g. "h0 [B, P]".
void check_tensor(const Tensor& t, const char* what, at::IntArrayRef shape, at::ScalarType dtype);
void check_opt(const OptTensor& t, const char* what, at::IntArrayRef shape, at::ScalarType dtype);
// The first argument fixes the dtype of the call: float32, float64 or bfloat16.
void check_dtype(const Tensor& t, const char* what);
// Validates batch_sizes (int64 CPU [T], non-increasing, each in [0, B]) and returns it, or B repeated T times.
std::vector<int64_t> batch_sizes_vec(const OptTensor& batch_sizes, int64_t T, int64_t B);
// An output tensor: uninitialised, or NaN-filled when FASTRNN_POISON_OUTPUTS=1 (read at every call, as the
// Python backends do) so that an element a kernel forgets to write cannot pass as a stale value.
Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts);
// An optional tensor that is given and defined.
inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
// GEMM sizes go to BLAS as int.
void check_blas_size(int64_t v, const char* what);

// ---- BLAS: row-major C[m,n] = alpha op(A) op(B) + beta C on raw pointers, no tensor per call ----
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
// bfloat16 operands, float32 accumulation and C (the weight gradients of a bfloat16 call): MKL's
// cblas_gemm_bf16bf16f32 (AMX where the CPU has it), else ATen in float32.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const BF16* a, int64_t lda,
          const BF16* b, int64_t ldb, float beta, float* c, int64_t ldc);
// C[m, n] = A^T B for A [k, m] and B [k, n] bfloat16 (row strides lda, ldb), C bfloat16, each element rounded once
// (to nearest even) from its float32 sum: the weight gradient d_gates^T h of a bfloat16 step of k <= 16 rows (a
// Cell), written in the call's type without a float32 [m, n] to allocate and round afterwards (at GRUCell H=512,
// 3 MB of fresh pages and a pass over them per call).
// has_small_bf16_gemm(rows): whether this build and CPU run the two small bfloat16 kernels here (AVX512-BF16, and no
// AMX: there MKL's bfloat16 GEMM keeps them) for that many rows: small_k_gemm_bf16's k, small_rows_gemm_bf16's m.
// Both assert it.
bool has_small_bf16_gemm(int64_t rows);
void small_k_gemm_bf16(int64_t m, int64_t n, int64_t k, const BF16* a, int64_t lda, const BF16* b, int64_t ldb,
                       BF16* c, int64_t ldc);
// C[m, n] = A[m, k] op(W) (+ bias, a row of n) in bfloat16 for m rows that has_small_bf16_gemm takes (a bfloat16
// Cell's input projection and d x): the own AVX512-BF16 kernels (W [n, k] when trans_w, else [k, n], as it is) into
// a float32 scratch kept by the thread, each element rounded once, as ATen's bfloat16 addmm rounds its float32 sums.
// Every operand dense row-major.
void small_rows_gemm_bf16(int64_t m, int64_t n, int64_t k, const BF16* a, const BF16* w, bool trans_w,
                          const BF16* bias, BF16* c);
// out[j] = sum over rows r of a[r, j], a [rows, cols] bfloat16, float32 sums (d_b_hh of a bfloat16 call): one pass,
// columns split over threads, where a reduction with a float32 dtype would first copy all of a to float32.
// Also a float32 / float64 a into sums of its own type (a Cell's bias gradients).
template <typename S, typename T>
void column_sums(const S* a, int64_t rows, int64_t cols, T* out);
// True when gemm goes straight to the BLAS linked into torch (sgemm_/dgemm_), false on the at::addmm_ fallback.
bool has_direct_blas();

// Whether float32 GEMMs of many rows run on the extension's own packed AVX-512 kernel (common.cpp panel_gemm) rather
// than MKL: by default on AVX-512 builds on CPUs that are not Intel's, where MKL takes its AVX2 kernels (an EPYC:
// 170 GFLOP/s against the kernel's 485 on a step of [64, 1024] x [1024, 4096], 2 cores). FASTRNN_CPP_OWN_GEMM=1 or 0
// forces it on or off (read at every call).
bool own_gemm_enabled();
// gemm() runs GEMMs of this many rows of A or more on the own kernel (op(B) packed on every call, but see below).
constexpr int64_t kOwnGemmMinRows = 16;
// Where own_gemm_enabled, a W [N, K] that a call meets once (gemm(): a Cell's or a short layer's input projection) is
// read as it is up to this many rows, in passes of 16 (common.cpp dot_gemm), and packed into panels only beyond:
// packing is a pass over W read and written, about as long as the GEMM itself. _C.linear on W [3072, 1024] (12 MB),
// 2 threads, Zen 5: 16 rows 0.55 ms, 32 rows packed 1.33 ms (two passes: 1.10), 48 rows 1.57 (three: 1.65), 64 rows
// 1.80 (2.2).
constexpr int64_t kOnceMaxUnpackedRows = 32;

// C[m, N] = A[m, K] @ op(W) + beta C for one weight W that every step multiplies: W is [N, K] (trans, op = W^T) or
// [K, N], row-major. For float32 steps of 3+ rows (max_m; the walk passes 0 for a single step, which reads W once) W
// is packed once here, into the own kernel's panels where own_gemm_enabled, else by MKL, so a step's GEMM does not
// repack W (at 1-2 rows the panels lose: LSTM T=32 B=1 H=256 inference 0.48 ms unpacked against 1.07 on panels;
// there, where own_gemm_enabled, a W [N, K] is packed into 16 x 16 blocks for dot_gemm's products instead).
// Unpacked, float32 steps of up to 16 rows run the extension's own AVX-512 kernels on W as it is (common.cpp
// dot_gemm, axpy_gemm: MKL would pack W on every call), a one-row step elsewhere is a gemv and any other a plain
// gemm. FASTRNN_CPP_PACKED=0 turns MKL's packing off (read when the object is built).
template <typename T>
class StepGemm {
 public:
  StepGemm(const T* w, bool trans, int64_t N, int64_t K, int64_t max_m);
  void operator()(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const;
  // C = A op(W) + bias (a row of N added to every row of C)
  void with_bias(int64_t m, const T* a, int64_t lda, const T* bias, T* c, int64_t ldc) const;
  bool packed() const { return packed_.defined() || own_.defined() || dot_.defined(); }

 private:
  const T* w_;
  bool trans_;
  int64_t N_, K_;
  Tensor packed_;  // MKL's packed copy of W, undefined when not packing
  Tensor own_;     // W in the own kernel's panels (float32), undefined when not packing for it
  Tensor dot_;     // W [N, K] in 16 x 16 blocks for one-row walks (common.cpp pack_dot), where own_gemm_enabled
};

extern template class StepGemm<float>;
extern template class StepGemm<double>;

// The step GEMM on bfloat16 operands with float32 accumulation: C[r0:r1, n0:n1] (+)= A[r0:r1, K] @ op(W)[:, n0:n1].
// W is [N, K] (trans) or [K, N], row-major, bfloat16 or float32 (rounded once here). Its columns come in segments of
// `seg` (a gate's H columns, or all N), each split into blocks of kBlock from the segment's start, so a task can take
// one block of hidden units of every gate and run its GEMM and pointwise pass alone. Where oneDNN's brgemm ukernel
// (through ATen's cpublas) has bfloat16 kernels (AMX, or AVX512-BF16 alone) W is packed once into VNNI blocks and a
// block is one brgemm call per 64 rows; otherwise (also when `pack` is false: a call too short to repay packing) W
// as it is: up to 16 rows on a CPU without AMX, the extension's own AVX512-BF16 kernels (common.cpp dot_gemm,
// axpy_gemm), else MKL's cblas_gemm_bf16bf16f32, or ATen. FASTRNN_CPP_AMX=0 turns the brgemm path off (read when
// the object is built).
class Bf16Gemm {
 public:
  static constexpr int64_t kBlock = 64;
  template <typename S>
  Bf16Gemm(const S* w, bool trans, int64_t N, int64_t K, int64_t seg, bool pack = true);
  int64_t blocks() const { return nbs_; }  // blocks of one segment
  int64_t segments() const { return seg_ ? N_ / seg_ : 0; }
  // [n0, n1) of block b of segment q
  int64_t col0(int64_t q, int64_t b) const { return q * seg_ + b * kBlock; }
  int64_t col1(int64_t q, int64_t b) const { return std::min(q * seg_ + seg_, col0(q, b) + kBlock); }
  // Whether A must be staged (copied to bfloat16 with an even row length) before run: a float32 A, or an odd K on the
  // brgemm path.
  bool stages(bool a_is_float) const { return a_is_float || (brgemm_ && K_ % 2 != 0); }
  // A's rows [0, n) as bfloat16 with stride staged_ld() (zero past K): row r from (r < k ? a_lo : a_hi) + r * lda.
  template <typename S>
  const BF16* stage(const S* a_lo, const S* a_hi, int64_t k, int64_t n, int64_t lda) const;
  int64_t staged_ld() const { return Kp_; }
  // Rows [r0, r1) of C over columns [n0, n1) (one block): row r of A at (r < k ? a_lo : a_hi) + r * lda, staged when
  // stages() says so. accumulate: C += (beta 1), else C = (beta 0).
  void run(const BF16* a_lo, const BF16* a_hi, int64_t k, int64_t lda, int64_t r0, int64_t r1, int64_t n0, int64_t n1,
           bool accumulate, float* c, int64_t ldc) const;
  // Ends a thread's brgemm use (AMX: its tile state) once its part of a parallel region is done.
  void release() const;
  bool brgemm() const { return brgemm_; }

 private:
  bool trans_, brgemm_ = false, own_small_ = false;
  int64_t N_, K_, Kp_, seg_, nbs_;
  const BF16* w16_ = nullptr;  // W in bfloat16 (the fallback's operand)
  Tensor w16_buf_;             // W rounded to bfloat16 when it came as float32
  Tensor packed_;              // [segments * blocks, Kp / 2, kBlock, 2] bfloat16, VNNI (brgemm)
  mutable Tensor stage_;       // staged A
};

extern template Bf16Gemm::Bf16Gemm(const float*, bool, int64_t, int64_t, int64_t, bool);
extern template Bf16Gemm::Bf16Gemm(const BF16*, bool, int64_t, int64_t, int64_t, bool);
extern template const BF16* Bf16Gemm::stage(const float*, const float*, int64_t, int64_t, int64_t) const;
extern template const BF16* Bf16Gemm::stage(const BF16*, const BF16*, int64_t, int64_t, int64_t) const;

// ---- vector maths (at::vec; tails use masked loads/stores so one code path serves every H) ----
template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> vload(const T* p, int64_t cnt) {
  return cnt == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, cnt);
}
template <typename T>
inline void vstore(const Vec<T>& v, T* p, int64_t cnt) {
  v.store(p, cnt);
}
// bfloat16 storage of float32 arithmetic: cnt (<= Vec<float>::size()) elements widened on load, rounded to nearest
// even on store (NaN stays NaN).
inline Vec<float> vload(const BF16* p, int64_t cnt) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 m = cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
#else
  float tmp[Vec<float>::size()] = {};
  for (int64_t i = 0; i < cnt; ++i) tmp[i] = float(p[i]);
  return Vec<float>::loadu(tmp);
#endif
}
inline void vstore(const Vec<float>& v, BF16* p, int64_t cnt) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  const __mmask16 m = cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
  _mm256_mask_storeu_epi16(p, m, __m256i(_mm512_cvtneps_pbh(__m512(v))));
#else
  float tmp[Vec<float>::size()];
  v.store(tmp);
  for (int64_t i = 0; i < cnt; ++i) p[i] = BF16(tmp[i]);
#endif
}
// exp for the gates. float32 on AVX-512: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite), e^r by a polynomial of degree
// 5 (relative error below 2e-7, a few ulp) or, kLow, 4 (3e-6), 2^n by scalef: about half the instructions of ATen's
// exp_u20, which the five sigmoid/tanh of an LSTM unit spend most of a bfloat16 step on. Inputs are clamped to
// [-104, 88.7] (0 and float's largest below and above them), NaN passes. Other float32 targets: exp_u20 (20 ulp), NaN
// passed through as torch does. float64: the accurate exp.
template <typename T, bool kLow = false>
inline Vec<T> vexp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    // max/min return their second operand when either is NaN: NaN stays
    const __m512 z = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.f), __m512(x)));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), z);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p;
    if constexpr (kLow) {
      p = _mm512_fmadd_ps(_mm512_set1_ps(0.041590746492147446f), r, _mm512_set1_ps(0.16790533065795898f));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5000221729278564f));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999637603759766f));
    } else {
      p = _mm512_fmadd_ps(_mm512_set1_ps(0.008265888318419456f), r, _mm512_set1_ps(0.0418987013399601f));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16668042540550232f));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999141693115234f));
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999995827674866f));
    }
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
#else
    return Vec<T>::blendv(x.exp_u20(), x, x.isnan());
#endif
  } else {
    return x.exp();
  }
}
// 1/x. float32: the hardware estimate refined by one Newton step (~1 ulp), several times the throughput of a
// vector division, which the five sigmoid/tanh of an LSTM cell would otherwise queue on.
template <typename T>
inline Vec<T> vrecip(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 v = x, r = _mm512_rcp14_ps(v);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(v, r, _mm512_set1_ps(2.f)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 v = x, r = _mm256_rcp_ps(v);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(v, r, _mm256_set1_ps(2.f)));
  }
#endif
  return x.reciprocal();
}
// Activations for a cell whose tensors are S (its arithmetic T). bfloat16 (kLow<S>) keeps about 1e-4 where an
// output is a sigmoid (it is rounded to 2^-9 on store, and the saved float32 gates feed a backward whose results
// are too): exp of degree 4 and the reciprocal estimate alone (2^-14). tanh keeps the Newton step either way: as
// 2 sigmoid(2x) - 1 its error is absolute, which a small tanh would feel.
template <typename S>
constexpr bool kLow = std::is_same_v<S, BF16>;

template <typename T, bool kLowPrec = false>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kLowPrec) {
      // 1 + exp(-x) is at most float's largest: its estimated reciprocal is finite or zero; NaN passes
      return _mm512_rcp14_ps(__m512(Vec<T>(T(1)) + vexp<T, true>(x.neg())));
    }
#endif
    // keep 1 + exp(-x) finite for vrecip (sigmoid(-87) is below float's smallest normal anyway); NaN passes
    return vrecip(Vec<T>(T(1)) + vexp<T, kLowPrec>(at::vec::clamp_min(x, Vec<T>(T(-87))).neg()));
  } else {
    return (Vec<T>(T(1)) + x.neg().exp()).reciprocal();
  }
}
// tanh(x) = 2 sigmoid(2x) - 1 in float32 (absolute error ~1 ulp of 1, which is what the tolerances measure; kLow:
// a few ulp); float64 keeps Sleef's tanh.
template <typename T, bool kLowPrec = false>
inline Vec<T> vtanh(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec<T>(T(2)) * vrecip(Vec<T>(T(1)) + vexp<T, kLowPrec>(at::vec::clamp_min(x + x, Vec<T>(T(-87))).neg())) -
           Vec<T>(T(1));
  } else {
    return x.tanh();
  }
}

// f(j, cnt) over [j0, j1) in vector-width pieces; the last piece may be short.
template <typename T, typename F>
inline void vec_range(int64_t j0, int64_t j1, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = j0;
  for (; j + W <= j1; j += W) f(j, W);
  if (j < j1) f(j, j1 - j);
}

}  // namespace fastrnn
