// fastrnn C++ extension: shared declarations and helpers. Sources: the time walk once (walk.h), one file per cell
// with its pointwise step (lstm.cpp, gru.cpp, rnn.cpp), the entry points and their checks (recurrence.cpp),
// bindings only in bindings.cpp. The contract (shapes, saved layout) is fastrnn/cells.py; the maths is
// fastrnn/backends/reference.py, which every kernel here computes step for step.
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
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastrnn {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Compiler, OpenMP and vector ISA the extension was built with, and ATen's parallel backend.
std::string build_info();

// ---- entry points (recurrence.cpp), one pair for every cell. cell_id is cells.py's kernel_id (lstm 0, gru 1,
// rnn_tanh 2, rnn_relu 3). Shapes: T steps, B rows, H hidden, P = proj_size or H, G gates (cells.py). ----
// gx [T,B,G*H], h0 [B,P], c0 [B,H] (cells with a cell state, else None), w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?
// (cells with a projection), batch_sizes [T] int64?
//   -> out [T,B,P], h_n [B,P], c_n [B,H] (undefined without a cell state), gates, extra (cells.py's saved layout;
//      empty when need_saved is false or the cell saves none)
std::vector<Tensor> recurrence_forward(int64_t cell_id, const Tensor& gx, const Tensor& h0, const OptTensor& c0,
                                       const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                       const OptTensor& batch_sizes, bool reverse, bool need_saved);
//   -> d_gx [T,B,G*H], d_h0 [B,P], d_c0 [B,H], d_w_hh [G*H,P], d_b_hh [G*H], d_w_hr [P,H]; each undefined where its
//      input was absent
std::vector<Tensor> recurrence_backward(int64_t cell_id, const Tensor& d_out, const Tensor& d_h_n,
                                        const OptTensor& d_c_n, const Tensor& h0, const OptTensor& c0,
                                        const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                        const OptTensor& batch_sizes, bool reverse, const Tensor& out,
                                        const Tensor& gates, const Tensor& extra);
// What the kernel table holds for cell_id: name, G, saved widths (gates, extra), cell state, projection (the tests
// compare it with fastrnn.cells).
std::tuple<std::string, int64_t, int64_t, int64_t, bool, bool> cell_info(int64_t cell_id);

// ---- argument checks: every entry point runs these before it reads or writes any tensor memory ----

std::string shape_str(at::IntArrayRef s);

// t is a defined, contiguous CPU tensor of dtype `dtype` and exactly shape `shape`; `what` names the argument
// and its symbolic shape, e.g. "h0 [B, P]".
void check_tensor(const Tensor& t, const char* what, at::IntArrayRef shape, at::ScalarType dtype);
void check_opt(const OptTensor& t, const char* what, at::IntArrayRef shape, at::ScalarType dtype);
// The first argument fixes the dtype of the call: float32 or float64.
void check_dtype(const Tensor& t, const char* what);
// Validates batch_sizes (int64 CPU [T], non-increasing, each in [0, B]) and returns it, or B repeated T times.
std::vector<int64_t> batch_sizes_vec(const OptTensor& batch_sizes, int64_t T, int64_t B);
// An output tensor: uninitialised, or NaN-filled when FASTRNN_POISON_OUTPUTS=1 (read at every call, as the
// Python backends do) so that an element a kernel forgets to write cannot pass as a stale value.
Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts);
// GEMM sizes go to BLAS as int.
void check_blas_size(int64_t v, const char* what);

// ---- BLAS: row-major C[m,n] = alpha op(A) op(B) + beta C on raw pointers, no tensor per call ----
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
// True when gemm goes straight to the BLAS linked into torch (sgemm_/dgemm_), false on the at::addmm_ fallback.
bool has_direct_blas();

// C[m, N] = A[m, K] @ op(W) + beta C for one weight W that every step multiplies: W is [N, K] (trans, op = W^T) or
// [K, N], row-major. With MKL (float32, 3+ rows) W is packed once here, so a step's GEMM does not repack W;
// otherwise a one-row step is a gemv and any other a plain gemm. FASTRNN_CPP_PACKED=0 turns packing off (read
// when the object is built).
template <typename T>
class StepGemm {
 public:
  StepGemm(const T* w, bool trans, int64_t N, int64_t K, int64_t max_m);
  void operator()(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const;
  bool packed() const { return packed_.defined(); }

 private:
  const T* w_;
  bool trans_;
  int64_t N_, K_;
  Tensor packed_;  // MKL's packed copy of W, undefined when not packing
};

extern template class StepGemm<float>;
extern template class StepGemm<double>;

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
// exp for the gates. float32: ATen's polynomial exp_u20 (20 ulp, a fraction of Sleef's u10 cost; the error stays
// far below float32's tolerance after the sigmoid squashes it), with NaN passed through as torch does. float64:
// the accurate exp.
template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec<T>::blendv(x.exp_u20(), x, x.isnan());
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
template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    // keep 1 + exp(-x) finite for vrecip (sigmoid(-87) is below float's smallest normal anyway); NaN passes
    return vrecip(Vec<T>(T(1)) + vexp(at::vec::clamp_min(x, Vec<T>(T(-87))).neg()));
  } else {
    return (Vec<T>(T(1)) + x.neg().exp()).reciprocal();
  }
}
// tanh(x) = 2 sigmoid(2x) - 1 in float32 (absolute error ~1 ulp of 1, which is what the tolerances measure);
// float64 keeps Sleef's tanh.
template <typename T>
inline Vec<T> vtanh(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec<T>(T(2)) * vsigmoid(x + x) - Vec<T>(T(1));
  } else {
    return x.tanh();
  }
}

// f(j, cnt) over [0, H) in vector-width pieces; the last piece may be short.
template <typename T, typename F>
inline void vec_loop(int64_t H, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= H; j += W) f(j, W);
  if (j < H) f(j, H - j);
}

}  // namespace fastrnn
