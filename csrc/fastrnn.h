// fastrnn C++ extension: shared declarations and helpers. Sources: one file per cell (lstm.cpp, gru.cpp,
// rnn.cpp), bindings only in bindings.cpp. The contract (shapes, saved layout) is fastrnn/cells.py; the maths is
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

// ---- entry points (one file per cell). Shapes: T steps, B rows, H hidden, P = proj_size or H. ----
// lstm.cpp. gx [T,B,4H], h0 [B,P], c0 [B,H], w_hh [4H,P], b_hh [4H]?, w_hr [P,H]?, batch_sizes [T] int64?
//   -> out [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H] (i,f,g,o activated), extra [T,B,H] (c_t); the last two
//   are empty when need_saved is false.
std::vector<Tensor> lstm_forward(const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                                 const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
                                 bool reverse, bool need_saved);
//   -> d_gx [T,B,4H], d_h0 [B,P], d_c0 [B,H], d_w_hh [4H,P], d_b_hh [4H] (undefined without bias),
//      d_w_hr [P,H] (undefined without projection)
std::vector<Tensor> lstm_backward(const Tensor& d_out, const Tensor& d_h_n, const Tensor& d_c_n, const Tensor& h0,
                                  const Tensor& c0, const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                  const OptTensor& batch_sizes, bool reverse, const Tensor& out, const Tensor& gates,
                                  const Tensor& extra);
// gru.cpp. gx [T,B,3H], h0 [B,H], w_hh [3H,H] -> out, h_n, gates [T,B,3H] (r,z,n), extra [T,B,H] (W_hn h + b_hn)
std::vector<Tensor> gru_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
                                const OptTensor& batch_sizes, bool reverse, bool need_saved);
//   -> d_gx, d_h0, d_w_hh, d_b_hh (undefined without bias)
std::vector<Tensor> gru_backward(const Tensor& d_out, const Tensor& d_h_n, const Tensor& h0, const Tensor& w_hh,
                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, const Tensor& out,
                                 const Tensor& gates, const Tensor& extra);
// rnn.cpp (tanh, or relu when relu is true). gx [T,B,H], h0 [B,H], w_hh [H,H] -> out, h_n
std::vector<Tensor> rnn_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
                                const OptTensor& batch_sizes, bool reverse, bool relu);
//   -> d_gx, d_h0, d_w_hh, d_b_hh (undefined without bias)
std::vector<Tensor> rnn_backward(const Tensor& d_out, const Tensor& d_h_n, const Tensor& h0, const Tensor& w_hh,
                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, const Tensor& out,
                                 bool relu);

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

// ---- the time walk of the packed sequence (cells.steps / cells.prev_rows) ----
struct Walk {
  std::vector<int64_t> bs;  // rows active at each step
  int64_t T, B;
  bool reverse;
  int64_t step(int64_t i) const { return reverse ? T - 1 - i : i; }  // forward visits step(0), step(1), ...
  int64_t src(int64_t t) const { return reverse ? t + 1 : t - 1; }   // where h_{t-1} lives in out
  // How many of the n rows active at t continue from out[src(t)]; rows [k, n) start from h0.
  int64_t prev_rows(int64_t t) const {
    int64_t n = bs[t];
    if (reverse) return t + 1 < T ? std::min(n, bs[t + 1]) : 0;
    return t > 0 ? n : 0;
  }
  // The step at which row b takes its state from h0 (-1 when the row is never active).
  int64_t start_step(int64_t b) const {
    if (T == 0 || bs[0] <= b) return -1;
    if (!reverse) return 0;
    int64_t t = 0;
    while (t + 1 < T && bs[t + 1] > b) ++t;
    return t;
  }
};

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

// gh[0:n] = h_{t-1} @ w^T for the n rows of step t: rows [0, k) from hsrc (out[src]), rows [k, n) from h0.
template <typename T>
inline void gemm_prev(const StepGemm<T>& w, const T* hsrc, const T* h0, int64_t k, int64_t n, int64_t P, T* gh,
                      int64_t ldg) {
  if (k > 0) w(k, hsrc, P, T(0), gh, ldg);
  if (n > k) w(n - k, h0 + k * P, P, T(0), gh + k * ldg, ldg);
}

// gemm_prev for rows [r0, r1) only: a thread runs the GEMM of its block of rows and then that block's pointwise
// pass, so a step is one parallel region instead of MKL's threading followed by a second region.
template <typename T>
inline void gemm_prev_rows(const StepGemm<T>& w, const T* hsrc, const T* h0, int64_t k, int64_t r0, int64_t r1,
                           int64_t P, T* gh, int64_t ldg) {
  const int64_t a1 = std::min(r1, k);
  if (a1 > r0) w(a1 - r0, hsrc + r0 * P, P, T(0), gh + r0 * ldg, ldg);
  const int64_t b0 = std::max(r0, k);
  if (r1 > b0) w(r1 - b0, h0 + b0 * P, P, T(0), gh + b0 * ldg, ldg);
}

// Rows per block when a block does its own GEMM (2*K*N flops a row) and pointwise pass: about 2^18 flops.
inline int64_t fused_grain(int64_t K, int64_t N) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(2 * K * N, 1));
}

// Whether a step of n rows runs as row blocks that each do their GEMM and pointwise pass (one parallel region),
// or as one GEMM threaded by MKL followed by a parallel pointwise pass. Measured at 2 threads (LSTM): below
// 2^24 flops a step the blocks win (H=64, B=64: 0.72x -> 1.03x torch); above, MKL's own split of a large GEMM
// beats rows split in two (B=16, H=512: 1.19x with MKL, 0.86x with blocks).
inline bool row_blocks(int64_t n, int64_t K, int64_t N) { return n * 2 * K * N < (int64_t(1) << 24); }

// d_w[GH,P] = sum over steps and rows of dg[t,b]^T h_{t-1}[b]: two GEMMs over all T*B rows (rows a step does not
// touch hold zeros in dg and in out). dg: [T,B,GH] with row stride ldg; dg0: [B,GH] scratch.
template <typename T>
inline void weight_grad(const Walk& w, const T* dg, int64_t ldg, const T* out, const T* h0, int64_t GH, int64_t P,
                        T* dg0, T* d_w) {
  const int64_t T_ = w.T, B = w.B;
  // Rows that continue: forward pairs dg[1:] with out[:-1], reverse pairs dg[:-1] with out[1:]; a row that
  // starts from h0 at step t meets a zero row of out there, so it contributes nothing.
  T beta = T(0);
  if (T_ > 1) {
    const T* g = w.reverse ? dg : dg + B * ldg;
    const T* h = w.reverse ? out + B * P : out;
    gemm(true, false, GH, P, (T_ - 1) * B, T(1), g, ldg, h, P, T(0), d_w, P);
    beta = T(1);
  }
  // Rows that start from h0: gather each row's start-step gradient.
  for (int64_t b = 0; b < B; ++b) {
    int64_t s = w.start_step(b);
    T* dst = dg0 + b * GH;
    if (s < 0) {
      std::fill(dst, dst + GH, T(0));
    } else {
      const T* src = dg + (s * B + b) * ldg;
      std::copy(src, src + GH, dst);
    }
  }
  if (B > 0) gemm(true, false, GH, P, B, T(1), dg0, GH, h0, P, beta, d_w, P);
  else if (beta == T(0)) std::fill(d_w, d_w + GH * P, T(0));
}

// h_n[b]: each row's state at its last step (forward: step len_b - 1; reverse: step 0), h0 for rows never active.
template <typename T>
inline void final_state(const Walk& w, const T* out, const T* h0, int64_t P, T* h_n) {
  for (int64_t b = 0; b < w.B; ++b) {
    const T* src = h0 + b * P;
    if (w.T > 0 && w.bs[0] > b) {
      int64_t t = 0;
      if (!w.reverse)
        while (t + 1 < w.T && w.bs[t + 1] > b) ++t;
      src = out + (t * w.B + b) * P;
    }
    std::copy(src, src + P, h_n + b * P);
  }
}

// Rows per parallel chunk so that a chunk carries enough pointwise work to pay for waking a thread.
inline int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1)); }

template <typename T>
inline void zero_rows(T* p, int64_t from, int64_t to, int64_t width) {
  if (to > from) std::fill(p + from * width, p + to * width, T(0));
}

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
