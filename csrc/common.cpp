// Shared by the walk and the entry points: argument checks and the raw-pointer GEMM.
#include "fastrnn.h"

#include <cstdlib>
#include <limits>
#include <sstream>
#include <type_traits>

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
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastrnn: ", what,
              " must be float32 or float64 for the cpp backend, got ", t.scalar_type());
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

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_impl<float>(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

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

template <typename T>
StepGemm<T>::StepGemm(const T* w, bool trans, int64_t N, int64_t K, int64_t max_m)
    : w_(w), trans_(trans), N_(N), K_(K) {
  // One or two rows are a matrix-vector product in all but name: plain sgemm beats the packed weight there.
  if constexpr (std::is_same_v<T, float>) {
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
    if (packed_.defined()) {
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m), int(N_), int(K_), a, int(lda),
                          packed_.data_ptr<float>(), int(trans_ ? K_ : N_), beta, c, int(ldc));
      return;
    }
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

template class StepGemm<float>;
template class StepGemm<double>;

}  // namespace fastrnn
