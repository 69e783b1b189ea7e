// Elman RNN (tanh or relu): the pointwise step of the walk (walk.h), h' = act(gx + W_hh h + b_hh). Nothing is saved
// besides `out`; where out has the GEMM's type (float32, float64) the walk's GEMM writes h_{t-1} W_hh^T straight into
// out[t] and the step activates it in place.
#include "walk.h"

namespace fastrnn {
namespace {

template <bool kRelu>
struct Rnn {
  static constexpr int64_t kId = kRelu ? 3 : 2;
  static constexpr const char* kName = kRelu ? "rnn_relu" : "rnn_tanh";
  static constexpr int64_t G = 1;
  static constexpr int64_t kSavedGates = 0, kSavedExtra = 0;
  static constexpr bool kCellState = false, kProjection = false, kDghDiffers = false, kDirectDh = false;
  static constexpr bool kNorm = false;
  static constexpr int64_t kRowWork = 4;  // a tanh an element: chunk rows as for 4H plain elements

  // s.gh may be s.h: it then holds h_{t-1} W_hh^T on entry and the new state on exit.
  template <typename T, typename S>
  static void forward_rows(const FwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const int64_t H = s.H;
    const T* bias = s.bias;
    const Vec<T> zero(T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = s.gh + r * H;
      const S* x = s.gx + r * H;
      S* hr = s.h + r * H;
      vec_range<T>(j0, j1, [&](int64_t j, int64_t n) {
        Vec<T> pre = vload(g + j, n) + vload(x + j, n) + vload(bias + j, n);
        // relu keeps NaN (torch.relu does): select 0 only where pre < 0
        vstore(kRelu ? Vec<T>::blendv(pre, zero, pre < zero) : vtanh<T, kLow<S>>(pre), hr + j, n);
      });
    }
  }

  // d_pre = (dh + d_out) * act'(h), with relu' as torch's threshold_backward (zero where the output is <= 0, NaN
  // passes); the walk's GEMM then replaces dh by d_pre W_hh.
  template <typename T, typename S>
  static void backward_rows(const BwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const int64_t H = s.H;
    const Vec<T> one(T(1)), zero(T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* dh = s.dh + r * H;
      const S* dout = s.d_out + r * H;
      const S* h = s.h + r * H;
      S* dg = s.d_gx + r * H;
      vec_range<T>(j0, j1, [&](int64_t j, int64_t n) {
        Vec<T> dht = vload(dh + j, n) + vload(dout + j, n);
        Vec<T> ht = vload(h + j, n);
        vstore(kRelu ? Vec<T>::blendv(dht, zero, ht <= zero) : dht * (one - ht * ht), dg + j, n);
      });
    }
  }
};

}  // namespace

const CellKernels& rnn_tanh_kernels() {
  static const CellKernels k = make_kernels<Rnn<false>>();
  return k;
}

const CellKernels& rnn_relu_kernels() {
  static const CellKernels k = make_kernels<Rnn<true>>();
  return k;
}

}  // namespace fastrnn
