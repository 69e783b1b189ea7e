// Layer-normalised GRU with zoneout on h (cells.py, "Normalised cells"; reference._ln_gru_fwd/_ln_gru_bwd): the
// pointwise step of the walk (walk.h) over whole rows. Norm.params = [ln_hh (3H) | b_hh (3H)].
//   ah = ln_hh * N(raw) + b_hh, raw = h_{t-1} W_hh^T ; r, z = sigmoid(gx_rz + ah_rz) ; n = tanh(gx_n + r ah_n)
//   hbar = (1 - z) n + z h_{t-1} ; h_t = h_{t-1} + m (hbar - h_{t-1})
// Saved: gates [T,B,3H] activated (r, z, n), extra [T,B,4H] (ah_n | raw_t). Backward: d_gx = d(r, z, n) before
// activation, d_gh = d raw_t (through the layer norm), d_extra = d ah_n.
#include "walk.h"

namespace fastrnn {
namespace {

struct LnGru {
  static constexpr int64_t kId = 5;
  static constexpr const char* kName = "ln_gru";
  static constexpr int64_t G = 3;
  static constexpr int64_t kSavedGates = 3, kSavedExtra = 4;
  // d_gh is d raw_t, not d_gx; z dhbar + (1 - m) dh reaches h_{t-1} directly
  static constexpr bool kCellState = false, kProjection = false, kDghDiffers = true, kDirectDh = true;
  static constexpr bool kNorm = true;
  static constexpr int64_t kRowWork = 6;

  // Whole rows (j0 = 0, j1 = H): raw's statistics, then the gates and h.
  template <typename T, typename S>
  static void forward_rows(const FwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t, int64_t) {
    const int64_t H = s.H, GH = 3 * H;
    const T *ln_hh = s.norm, *b_hh = s.norm + GH;
    const Vec<T> keep(s.keep);
    for (int64_t row = r0; row < r1; ++row) {
      const S* x = s.gx + row * GH;
      const T* raw = s.gh + row * s.ldg;
      const S* hp = s.hprev(row);
      const S* mr = s.mask ? s.mask + row * H : nullptr;
      S* hr = s.h + row * H;
      T* sg = s.gates ? s.gates + row * GH : nullptr;
      T* se = s.extra ? s.extra + row * 4 * H : nullptr;
      const RowStats<T> st = row_stats(raw, GH);
      auto ah = [&](int64_t q, int64_t j, int64_t n) {
        const int64_t e = q * H + j;
        return vload(ln_hh + e, n) * st.hat(vload(raw + e, n)) + vload(b_hh + e, n);
      };
      vec_range<T>(0, H, [&](int64_t j, int64_t n) {
        const Vec<T> r = vsigmoid<T>(vload(x + j, n) + ah(0, j, n));
        const Vec<T> z = vsigmoid<T>(vload(x + H + j, n) + ah(1, j, n));
        const Vec<T> hn = ah(2, j, n);
        const Vec<T> nn = vtanh<T>(vload(x + 2 * H + j, n) + r * hn);
        const Vec<T> p = vload(hp + j, n), m = mr ? vload(mr + j, n) : keep;
        vstore(p + m * (nn + z * (p - nn) - p), hr + j, n);
        if (sg) {
          vstore(r, sg + j, n);
          vstore(z, sg + H + j, n);
          vstore(nn, sg + 2 * H + j, n);
        }
        if (se) vstore(hn, se + j, n);
      });
    }
  }

  // reference._ln_gru_bwd. dh becomes the direct part z dhbar + (1 - m) dht of d h_{t-1}, to which the walk's GEMM
  // adds d raw W_hh. Passes a row: the gates, d_extra and the sums of raw's norm; d raw with the shares of d ln_hh and
  // d b_hh (d ah = d_gx's r and z blocks, then d_extra).
  template <typename T, typename S>
  static void backward_rows(const BwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t, int64_t) {
    const int64_t H = s.H, GH = 3 * H;
    const T* ln_hh = s.norm;
    const Vec<T> one(T(1)), keep(s.keep);
    for (int64_t row = r0; row < r1; ++row) {
      const T* sg = s.gates + row * GH;
      const T* hn = s.extra + row * s.lde;
      const T* raw = hn + H;
      const S* hp = s.hprev(row);
      const S* dout = s.d_out + row * H;
      const S* mr = s.mask ? s.mask + row * H : nullptr;
      T* dhr = s.dh + row * H;
      S* dx = s.d_gx + row * GH;
      S* dg = s.d_gh + row * GH;
      S* dex = s.d_extra + row * H;
      const RowStats<T> rs = row_stats(raw, GH);
      NormBack<T> nr;
      vec_range<T>(0, H, [&](int64_t j, int64_t n) {
        const Vec<T> dht = vload(dhr + j, n) + vload(dout + j, n);
        const Vec<T> m = mr ? vload(mr + j, n) : keep;
        const Vec<T> dhb = m * dht;
        const Vec<T> r = vload(sg + j, n), z = vload(sg + H + j, n), nn = vload(sg + 2 * H + j, n);
        const Vec<T> dn = dhb * (one - z) * (one - nn * nn);
        const Vec<T> dr = dn * vload(hn + j, n) * r * (one - r);
        const Vec<T> dz = dhb * (vload(hp + j, n) - nn) * z * (one - z);
        const Vec<T> dnr = dn * r;
        vstore(dr, dx + j, n);
        vstore(dz, dx + H + j, n);
        vstore(dn, dx + 2 * H + j, n);
        vstore(dnr, dex + j, n);
        const Vec<T> d[3] = {dr, dz, dnr};  // d ah
        for (int64_t q = 0; q < 3; ++q)
          nr.add(d[q] * vload(ln_hh + q * H + j, n), rs.hat(vload(raw + q * H + j, n)), n);
        vstore(dhb * z + (one - m) * dht, dhr + j, n);
      });
      const S* const dah[3] = {dx, dx + H, dex};  // d ah of each block
      norm_back_row(nr, rs, 3, H, dah, ln_hh, raw, dg, s.d_norm, s.d_norm + GH);
    }
  }
};

}  // namespace

const CellKernels& ln_gru_kernels() {
  static const CellKernels k = make_kernels<LnGru>();
  return k;
}

}  // namespace fastrnn
