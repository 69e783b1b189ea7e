// LSTM (optionally with proj_size): the pointwise step of the walk (walk.h). Gates i, f, g, o in torch's order;
// c' = f*c + i*g, h' = o*tanh(c') [, h' = h' W_hr^T]. Saved: gates [T,B,4H] activated, extra [T,B,H] c_t.
#include "walk.h"

namespace fastrnn {
namespace {

struct Lstm {
  static constexpr int64_t kId = 0;
  static constexpr const char* kName = "lstm";
  static constexpr int64_t G = 4;
  static constexpr int64_t kSavedGates = 4, kSavedExtra = 1;
  static constexpr bool kCellState = true, kProjection = true, kDghDiffers = false, kDirectDh = false;
  static constexpr bool kNorm = false;
  static constexpr int64_t kRowWork = 4;

  // gh may alias gates: each gate element is read before it is overwritten by its activation.
  template <typename T, typename S>
  static void forward_rows(const FwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const int64_t H = s.H, GH = 4 * H;
    const T* bias = s.bias;
    for (int64_t r = r0; r < r1; ++r) {
      const S* x = s.gx + r * GH;
      const T* g = s.gh + r * GH;
      T* cr = s.c + r * H;
      S* hr = s.h + r * H;
      T* sg = s.gates ? s.gates + r * GH : nullptr;
      T* se = s.extra ? s.extra + r * H : nullptr;
      vec_range<T>(j0, j1, [&](int64_t j, int64_t n) {
        auto pre = [&](int64_t q) {
          return vload(x + q * H + j, n) + vload(g + q * H + j, n) + vload(bias + q * H + j, n);
        };
        Vec<T> i = vsigmoid<T, kLow<S>>(pre(0)), f = vsigmoid<T, kLow<S>>(pre(1));
        Vec<T> gg = vtanh<T, kLow<S>>(pre(2)), o = vsigmoid<T, kLow<S>>(pre(3));
        Vec<T> cn = f * vload(cr + j, n) + i * gg;
        vstore(cn, cr + j, n);
        vstore(o * vtanh<T, kLow<S>>(cn), hr + j, n);
        if (sg) {
          vstore(i, sg + j, n);
          vstore(f, sg + H + j, n);
          vstore(gg, sg + 2 * H + j, n);
          vstore(o, sg + 3 * H + j, n);
        }
        if (se) vstore(cn, se + j, n);
      });
    }
  }

  // reference._lstm_bwd: d_gates into d_gx (they are also what reaches W_hh), dc becomes d c_{t-1}; with a
  // projection also hbar = o*tanh(c_t) for d_w_hr.
  template <typename T, typename S>
  static void backward_rows(const BwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const int64_t H = s.H, GH = 4 * H;
    const Vec<T> one(T(1));
    const bool with_d_out = s.with_d_out;
    S* hbar = s.hbar;
    for (int64_t r = r0; r < r1; ++r) {
      const T* dh = s.dh + r * H;
      const S* dout = s.d_out + r * H;
      const T* sg = s.gates + r * GH;
      const T* ct = s.extra + r * H;
      const T* cp = s.cprev(r);
      T* dcr = s.dc + r * H;
      S* dg = s.d_gx + r * GH;
      vec_range<T>(j0, j1, [&](int64_t j, int64_t n) {
        Vec<T> dht = with_d_out ? vload(dh + j, n) + vload(dout + j, n) : vload(dh + j, n);
        Vec<T> i = vload(sg + j, n), f = vload(sg + H + j, n), g = vload(sg + 2 * H + j, n);
        Vec<T> o = vload(sg + 3 * H + j, n);
        Vec<T> tc = vtanh<T, kLow<S>>(vload(ct + j, n));
        Vec<T> dct = vload(dcr + j, n) + dht * o * (one - tc * tc);
        vstore(dct * g * i * (one - i), dg + j, n);
        vstore(dct * vload(cp + j, n) * f * (one - f), dg + H + j, n);
        vstore(dct * i * (one - g * g), dg + 2 * H + j, n);
        vstore(dht * tc * o * (one - o), dg + 3 * H + j, n);
        vstore(dct * f, dcr + j, n);
        if (hbar) vstore(o * tc, hbar + r * H + j, n);
      });
    }
  }
};

}  // namespace

const CellKernels& lstm_kernels() {
  static const CellKernels k = make_kernels<Lstm>();
  return k;
}

}  // namespace fastrnn
