// GRU: the pointwise step of the walk (walk.h), torch's n = tanh(gx_n + r * (W_hn h + b_hn)), h' = (1-z)*n + z*h.
// Saved: gates [T,B,3H] (r, z, n) activated, extra [T,B,H] W_hn h_{t-1} + b_hn.
#include "walk.h"

namespace fastrnn {
namespace {

struct Gru {
  static constexpr int64_t kId = 1;
  static constexpr const char* kName = "gru";
  static constexpr int64_t G = 3;
  static constexpr int64_t kSavedGates = 3, kSavedExtra = 1;
  // d_gh's n block is d_gx's scaled by r; z*dh reaches h_{t-1} directly
  static constexpr bool kCellState = false, kProjection = false, kDghDiffers = true, kDirectDh = true;
  static constexpr bool kNorm = false;
  static constexpr int64_t kRowWork = 3;

  // gh may alias gates: each gate element is read before it is overwritten by its activation.
  template <typename T, typename S>
  static void forward_rows(const FwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const int64_t H = s.H, GH = 3 * H;
    const T* bias = s.bias;
    for (int64_t row = r0; row < r1; ++row) {
      const S* x = s.gx + row * GH;
      const T* g = s.gh + row * GH;
      const S* hp = s.hprev(row);
      S* hr = s.h + row * H;
      T* sg = s.gates ? s.gates + row * GH : nullptr;
      T* se = s.extra ? s.extra + row * H : nullptr;
      vec_range<T>(j0, j1, [&](int64_t j, int64_t n) {
        Vec<T> r = vsigmoid<T, kLow<S>>(vload(x + j, n) + vload(g + j, n) + vload(bias + j, n));
        Vec<T> z = vsigmoid<T, kLow<S>>(vload(x + H + j, n) + vload(g + H + j, n) + vload(bias + H + j, n));
        Vec<T> hh = vload(g + 2 * H + j, n) + vload(bias + 2 * H + j, n);
        Vec<T> nn = vtanh<T, kLow<S>>(vload(x + 2 * H + j, n) + r * hh);
        Vec<T> p = vload(hp + j, n);
        vstore(nn + z * (p - nn), hr + j, n);
        if (sg) {
          vstore(r, sg + j, n);
          vstore(z, sg + H + j, n);
          vstore(nn, sg + 2 * H + j, n);
        }
        if (se) vstore(hh, se + j, n);
      });
    }
  }

  // reference._gru_bwd: d_gx and d_gh (n block scaled by r); dh becomes its direct part dht*z, to which the walk's
  // GEMM adds d_gh W_hh.
  template <typename T, typename S>
  static void backward_rows(const BwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const int64_t H = s.H, GH = 3 * H;
    const Vec<T> one(T(1));
    for (int64_t row = r0; row < r1; ++row) {
      const T* sg = s.gates + row * GH;
      const T* hh = s.extra + row * H;
      const S* hp = s.hprev(row);
      const S* dout = s.d_out + row * H;
      T* dhr = s.dh + row * H;
      S* dx = s.d_gx + row * GH;
      S* dg = s.d_gh + row * GH;
      vec_range<T>(j0, j1, [&](int64_t j, int64_t n) {
        Vec<T> dht = vload(dhr + j, n) + vload(dout + j, n);
        Vec<T> r = vload(sg + j, n), z = vload(sg + H + j, n), nn = vload(sg + 2 * H + j, n);
        Vec<T> dn = dht * (one - z) * (one - nn * nn);
        Vec<T> dr = dn * vload(hh + j, n) * r * (one - r);
        Vec<T> dz = dht * (vload(hp + j, n) - nn) * z * (one - z);
        vstore(dr, dx + j, n);
        vstore(dz, dx + H + j, n);
        vstore(dn, dx + 2 * H + j, n);
        vstore(dr, dg + j, n);
        vstore(dz, dg + H + j, n);
        vstore(dn * r, dg + 2 * H + j, n);
        vstore(dht * z, dhr + j, n);
      });
    }
  }
};

}  // namespace

const CellKernels& gru_kernels() {
  static const CellKernels k = make_kernels<Gru>();
  return k;
}

}  // namespace fastrnn
